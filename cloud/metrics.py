"""Prometheus metrics, named like vLLM's (vllm:X becomes specthink:X) so dashboards and
autoscalers built for vLLM fit. Served over HTTP by `serve --metrics-port`.

Without prometheus-client installed, `Metrics` records nothing and serves nothing.
"""

from __future__ import annotations

from typing import Any

from cloud.health import REASONS, Pulse, Verdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    def __init__(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError:
            self.enabled = False
            return
        self.enabled = True
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.running = prom.Gauge(
            "specthink:num_requests_running", "Requests on the engine now.", registry=r
        )
        self.waiting = prom.Gauge(
            "specthink:num_requests_waiting",
            "Requests waiting for a place in the engine's batch.",
            registry=r,
        )
        self.max_running = prom.Gauge(
            "specthink:max_running",
            "Batch-size limit: requests the engine decodes together at most.",
            registry=r,
        )
        self.batch_size = prom.Histogram(
            "specthink:decode_batch_size",
            "Requests decoded together, per engine step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.ttft = prom.Histogram(
            "specthink:time_to_first_token_seconds",
            "Time from request to first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = prom.Histogram(
            "specthink:e2e_request_latency_seconds",
            "Takeover latency, request to final message.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = prom.Histogram(
            "specthink:request_queue_time_seconds",
            "Time spent waiting for the engine.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = prom.Counter(
            "specthink:prompt_tokens", "Prompt tokens of all requests.", registry=r
        )
        self.prefill_tokens = prom.Counter(
            "specthink:prefill_tokens", "Prompt tokens computed (not cached).", registry=r
        )
        self.generation_tokens = prom.Counter(
            "specthink:generation_tokens", "Tokens generated.", registry=r
        )
        self.cache_queries = prom.Counter(
            "specthink:prefix_cache_queries",
            "Prompt tokens looked up in session caches.",
            registry=r,
        )
        self.cache_hits = prom.Counter(
            "specthink:prefix_cache_hits", "Prompt tokens found in session caches.", registry=r
        )
        self.session_hits = prom.Counter(
            "specthink:session_cache_hits", "Calls that re-used a session's cache.", registry=r
        )
        self.session_misses = prom.Counter(
            "specthink:session_cache_misses", "Calls that found no cache to re-use.", registry=r
        )
        self.session_evictions = prom.Gauge(
            "specthink:session_cache_evictions", "Session caches evicted (LRU or TTL).", registry=r
        )
        self.sessions = prom.Gauge("specthink:active_sessions", "Sessions held.", registry=r)
        self.cache_bytes = prom.Gauge(
            "specthink:session_cache_bytes", "Bytes of KV cache held for sessions.", registry=r
        )
        self.takeovers = prom.Counter(
            "specthink:takeovers", "Finished takeovers.", ["finish_reason"], registry=r
        )
        self.errors = prom.Counter(
            "specthink:request_errors", "Requests that failed.", ["code"], registry=r
        )
        self.judge_verdicts = prom.Counter(
            "specthink:judge_verdicts",
            "Probes judged (cloud-judge trigger), by verdict: accepted or rejected.",
            ["verdict"],
            registry=r,
        )
        self.judge_score = prom.Histogram(
            "specthink:judge_score",
            "The judge's score of each probe: mean log-probability per token (nats).",
            buckets=(-8.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.25, 0.0),
            registry=r,
        )
        # ---- load, for the autoscaler: rises with the batch, before anything waits
        self.batch_usage = prom.Gauge(
            "specthink:batch_usage_perc",
            "Running requests / max_running: how full the decode batch is (1 = full).",
            registry=r,
        )
        self.batch_demand = prom.Gauge(
            "specthink:batch_demand_perc",
            "(Running + waiting requests) / max_running: the autoscaler's signal "
            "(above 1: requests queue).",
            registry=r,
        )
        # ---- engine health (cloud.health): what the health probes say, and why
        self.health_status = prom.Gauge(
            "specthink:health_status",
            "1 when the probe's health service answers SERVING, else 0.",
            ["probe"],
            registry=r,
        )
        self.health_reason = prom.Gauge(
            "specthink:health_reason",
            "1 for the reason behind the current health verdict, 0 for the others.",
            ["reason"],
            registry=r,
        )
        self.engine_step_errors = prom.Counter(
            "specthink:engine_step_errors",
            "Engine steps that raised, by error class.",
            ["error"],
            registry=r,
        )
        self.engine_error_streak = prom.Gauge(
            "specthink:engine_consecutive_step_errors",
            "Engine steps in a row that failed (0 after one that did not).",
            registry=r,
        )
        self.engine_step_running = prom.Gauge(
            "specthink:engine_step_running_seconds",
            "How long the engine step now running has run (0 between steps).",
            registry=r,
        )
        self.engine_steps = prom.Gauge(
            "specthink:engine_steps", "Engine steps ended (the heartbeat).", registry=r
        )
        self.engine_sheds = prom.Counter(
            "specthink:engine_out_of_memory_sheds",
            "Steps that ran out of device memory and made the newest calls wait (none failed).",
            registry=r,
        )
        self.engine_shed_limit = prom.Gauge(
            "specthink:engine_calls_after_shed",
            "How many calls took part in steps after the last out-of-memory shed.",
            registry=r,
        )
        self._levels = {"running": 0.0, "waiting": 0.0}

    def watch_engine(self, engine: Any) -> None:
        """Record the engine's batch-size limit, and the batch size of every decode step
        when it runs in steps (`cloud.engine_thread.EngineThread.add_step_observer`)."""
        if not self.enabled:
            return
        info = getattr(engine, "info", None)
        self.max_running.set(getattr(info, "max_running", 1))
        self._levels["max_running"] = float(getattr(info, "max_running", 1))
        self._load()
        add_observer = getattr(engine, "add_step_observer", None)
        if add_observer is not None:
            add_observer(self.batch_size.observe)
        add_shed_observer = getattr(engine, "add_shed_observer", None)
        if add_shed_observer is not None:
            add_shed_observer(self._shed)

    def _shed(self, calls_left: int) -> None:
        self.engine_sheds.inc()
        self.engine_shed_limit.set(calls_left)

    def serve(self, port: int, host: str = "0.0.0.0") -> Any:
        if not self.enabled:
            return None
        import prometheus_client as prom

        server, _thread = prom.start_http_server(port, addr=host, registry=self.registry)
        return server

    def observe(self, name: str, value: float) -> None:
        if self.enabled:
            getattr(self, name).observe(value)

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if self.enabled and value:
            metric = getattr(self, name)
            (metric.labels(**labels) if labels else metric).inc(value)

    def set(self, name: str, value: float) -> None:
        if self.enabled:
            getattr(self, name).set(value)
            if name in self._levels:
                self._levels[name] = value
                self._load()

    def _load(self) -> None:
        limit = max(1.0, self._levels.get("max_running", 1.0))
        running, waiting = self._levels["running"], self._levels["waiting"]
        self.batch_usage.set(running / limit)
        self.batch_demand.set((running + waiting) / limit)

    def health(self, verdict: Verdict, pulse: Pulse, now: float) -> None:
        """Publish a health verdict and the engine pulse behind it."""
        if not self.enabled:
            return
        self.health_status.labels(probe="readiness").set(float(verdict.ready))
        self.health_status.labels(probe="liveness").set(float(verdict.live))
        for reason in REASONS:
            self.health_reason.labels(reason=reason).set(float(reason == verdict.reason))
        self.engine_error_streak.set(pulse.streak)
        running = now - pulse.step_since if pulse.step_since is not None else 0.0
        self.engine_step_running.set(max(0.0, running))
        self.engine_steps.set(pulse.steps)
