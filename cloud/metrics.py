"""Prometheus metrics, named like vLLM's (vllm:X becomes specthink:X) so dashboards and
autoscalers built for vLLM fit. Served over HTTP by `serve --metrics-port`.

Without prometheus-client installed, `Metrics` records nothing and serves nothing.
"""

from __future__ import annotations

from typing import Any

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

    def watch_engine(self, engine: Any) -> None:
        """Record the engine's batch-size limit, and the batch size of every decode step
        when it runs in steps (`cloud.engine_thread.EngineThread.add_step_observer`)."""
        if not self.enabled:
            return
        info = getattr(engine, "info", None)
        self.max_running.set(getattr(info, "max_running", 1))
        add_observer = getattr(engine, "add_step_observer", None)
        if add_observer is not None:
            add_observer(self.batch_size.observe)

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
