"""The cloud process: a gRPC server around the servicer, with health, reflection, TLS,
metrics and a graceful drain. No torch here: the engine is built by the caller.

Life cycle: bind the port (before the model loads, so a taken port fails in a second,
not after minutes of loading) -> listen with health NOT_SERVING (calls get UNAVAILABLE
while no engine is attached) -> attach the loaded engine -> warm-up -> SERVING (the
address is printed) -> SIGTERM -> NOT_SERVING, admit nothing new, let in-flight
takeovers finish within the grace period, end the rest with UNAVAILABLE, exit 0.

Health (grpc.health.v1) answers for three service names, from one verdict
(`cloud.health.judge`) that a monitor thread recomputes every `health_tick_s`:

  ""  and  "specthink.v1.SpecThink"   readiness: SERVING once warm, while the engine's
                                      steps succeed, and not while draining
  "liveness"                          liveness: NOT_SERVING only when the engine is stuck
                                      (a step ran past --engine-stall-s), broken for good
                                      (a sticky CUDA error) or failing for that long

After a step error, while no traffic arrives, a canary (the warm-up: 2 tokens) tests the
engine every `canary_every_s`, so a broken engine leaves the endpoints within two steps
and a healed one comes back without traffic. With `max_connection_age_s`, every client
connection is closed (GOAWAY, in-flight calls get `max_connection_age_grace_s` to finish)
after that age, so clients reconnect and reach replicas added since.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.admission import Admission, AdmissionLimits
from cloud.auth import ApiKeys
from cloud.engine_api import Engine
from cloud.health import DRAINING, IN_SERVICE, LOADING, EngineHealth, HealthLimits, Verdict, judge
from cloud.metrics import Metrics
from cloud.rpc_calls import Malformed
from cloud.servicer import SpecThinkServicer
from cloud.sessions import SessionStore
from cloud.validation import Limits
from shared.rpc import specthink_pb2 as pb

log = logging.getLogger("specthink.cloud")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecThink"].full_name
LIVENESS = "liveness"  # the health service name the liveness probe asks for
READINESS = ("", SERVICE_NAME)  # the whole server, and the SpecThink service
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051
    api_key_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    metrics_port: int | None = None
    reflection: bool = True
    drain_grace_s: float = 30.0
    max_waiting: int = 32
    max_waiting_tokens: int = 262_144
    max_workers: int = 64
    session_ttl_s: float = 1800.0
    max_sessions: int = 4096
    log_prompts: bool = False
    limits: Limits = field(default_factory=Limits)
    engine_stall_s: float = 60.0  # a step longer than this (or failing that long): not live
    error_streak: int = 2  # failed steps in a row before readiness says NOT_SERVING
    canary_every_s: float = 2.0  # after a step error, test the idle engine this often
    health_tick_s: float = 0.2
    max_connection_age_s: float = 0.0  # 0: connections live for ever
    max_connection_age_grace_s: float = 60.0


def _credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
    if not options.tls_cert and not options.tls_key:
        return None
    if not (options.tls_cert and options.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    cert = Path(options.tls_cert).read_bytes()
    key = Path(options.tls_key).read_bytes()
    ca = Path(options.tls_client_ca).read_bytes() if options.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _tolerant(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: bytes protobuf refuses (invalid UTF-8 in
    a string field, a truncated message) become `Malformed`, which the servicer answers
    with INVALID_ARGUMENT instead of gRPC's INTERNAL "Exception deserializing request!"."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as exc:
            return Malformed(
                f"request is not a valid {message_class.DESCRIPTOR.name} "
                f"({type(exc).__name__}; strings must be valid UTF-8)"
            )

    return parse


def _add_servicer(servicer: SpecThinkServicer, server: grpc.Server) -> None:
    """Like the generated add_SpecThinkServicer_to_server, with tolerant deserializers."""
    handlers = {
        "Takeover": grpc.unary_stream_rpc_method_handler(
            servicer.Takeover,
            request_deserializer=_tolerant(pb.TakeoverRequest),
            response_serializer=pb.TakeoverEvent.SerializeToString,
        ),
        "Prefill": grpc.unary_unary_rpc_method_handler(
            servicer.Prefill,
            request_deserializer=_tolerant(pb.PrefillRequest),
            response_serializer=pb.PrefillResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=_tolerant(pb.ModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString,
        ),
        "EndSession": grpc.unary_unary_rpc_method_handler(
            servicer.EndSession,
            request_deserializer=_tolerant(pb.EndSessionRequest),
            response_serializer=pb.EndSessionResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]


def _connection_age(options: ServerOptions) -> list[tuple[str, int]]:
    """gRPC server options that close each connection after `max_connection_age_s` (gRPC
    adds +-10% jitter, so a fleet of edges does not reconnect at once)."""
    if options.max_connection_age_s <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(options.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(options.max_connection_age_grace_s * 1000)),
    ]


class CloudServer:
    """Binds its port at construction (OSError with one line when it cannot). `engine`
    may come later, through `attach`, once the model has loaded."""

    def __init__(self, engine: Engine | None, options: ServerOptions) -> None:
        self.options = options
        self.engine = engine
        self._born = time.monotonic()  # startup_s in the "serving" log line counts from here
        self.metrics = Metrics()
        self.admission = Admission(
            AdmissionLimits(
                max_waiting=options.max_waiting, max_waiting_tokens=options.max_waiting_tokens
            )
        )
        self.sessions = SessionStore(
            max_sessions=options.max_sessions, ttl_s=options.session_ttl_s, on_evict=self._evict
        )
        api_keys = ApiKeys.from_file(options.api_key_file) if options.api_key_file else None
        self.servicer = SpecThinkServicer(
            engine,
            admission=self.admission,
            sessions=self.sessions,
            limits=options.limits,
            api_keys=api_keys,
            metrics=self.metrics,
            log_prompts=options.log_prompts,
        )
        self.health = health.HealthServicer()
        self.engine_health = EngineHealth(on_error=self._engine_error)
        self.health_limits = HealthLimits(options.engine_stall_s, options.error_streak)
        self.verdict = Verdict(False, True, LOADING)
        self._phase = LOADING
        self._health_lock = threading.Lock()
        self._canary: Callable[[], None] | None = None
        self._canary_running = threading.Event()
        self._monitor_stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_workers),
            options=[
                ("grpc.max_receive_message_length", options.limits.max_message_bytes),
                ("grpc.max_send_message_length", options.limits.max_message_bytes),
                ("grpc.so_reuseport", 0),
                *_connection_age(options),
            ],
        )
        _add_servicer(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if options.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self._publish(self.verdict, force=True)
        address = f"{options.host}:{options.port}"
        credentials = _credentials(options)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio >= 1.60 raises where older versions returned 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot listen on {address} (in use, or not an address of this host)")
        self.address = f"{options.host}:{self.port}"
        self.metrics_port: int | None = None  # the port metrics listen on, once started
        self._metrics_http: Any = None
        self._listening = False
        self._stopped = threading.Event()
        self._draining = threading.Lock()

    def _evict(self, key: str) -> None:
        if self.engine is not None:
            self.engine.drop(key)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def attach(self, engine: Engine) -> None:
        """Hand the loaded engine to the server (health stays NOT_SERVING until `start`).
        Admission follows the engine's batch-size limit (`info.max_running`, known once the
        model is loaded; 1 for an engine that runs one call at a time). Nothing waits yet:
        takeovers are refused with UNAVAILABLE until now."""
        limit = max(1, int(getattr(engine.info, "max_running", 1)))
        self.admission.limits = dataclasses.replace(self.admission.limits, max_running=limit)
        self.metrics.watch_engine(engine)  # the batch limit, and each decode step's batch size
        self.engine = engine
        self.servicer.engine = engine

    # ---- health ---------------------------------------------------------------------

    def _publish(self, verdict: Verdict, force: bool = False) -> None:
        """Set the health statuses (and metrics) to `verdict`; log a change."""
        before, self.verdict = self.verdict, verdict
        changed = (before.ready, before.live, before.reason) != (
            verdict.ready,
            verdict.live,
            verdict.reason,
        )
        if changed or force:
            for name in READINESS:
                self.health.set(name, _SERVING if verdict.ready else _NOT_SERVING)  # type: ignore[arg-type]
            self.health.set(LIVENESS, _SERVING if verdict.live else _NOT_SERVING)  # type: ignore[arg-type]
        if changed:
            log.info(
                json.dumps(
                    {
                        "event": "health",
                        "ready": verdict.ready,
                        "live": verdict.live,
                        "reason": verdict.reason,
                        "detail": verdict.detail,
                        "was": before.reason,
                    }
                )
            )
        self.metrics.health(verdict, self.engine_health.pulse(), self.engine_health.now())

    def check_health(self) -> Verdict:
        """Judge the engine now and publish the verdict (the monitor calls this)."""
        with self._health_lock:
            pulse = self.engine_health.pulse()
            now = self.engine_health.now()
            verdict = judge(pulse, now, self.health_limits, self._phase)
            self._publish(verdict)
        ended = pulse.ended_at if pulse.ended_at is not None else now
        if (
            pulse.streak
            and pulse.step_since is None
            and now - ended >= self.options.canary_every_s
            and self._phase not in (LOADING, DRAINING)
        ):
            self._start_canary()
        return verdict

    def _monitor_loop(self) -> None:
        while not self._monitor_stop.wait(self.options.health_tick_s):
            try:
                self.check_health()
            except Exception:  # the monitor must outlive any surprise
                log.exception("health monitor")

    def _start_canary(self) -> None:
        canary = self._canary
        if canary is None or self._canary_running.is_set():
            return
        self._canary_running.set()

        def run() -> None:
            outcome = "ok"
            try:
                canary()
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            finally:
                self._canary_running.clear()
            log.info(json.dumps({"event": "canary", "outcome": outcome}))

        threading.Thread(target=run, name="health-canary", daemon=True).start()

    def _engine_error(self, error: BaseException) -> None:
        self.metrics.inc("engine_step_errors", error=type(error).__name__)
        log.warning(
            json.dumps(
                {
                    "event": "engine_error",
                    "error": type(error).__name__,
                    "message": str(error).splitlines()[0][:300] if str(error) else "",
                }
            )
        )

    def listen(self) -> None:
        """Start answering: health (NOT_SERVING), reflection, metrics; takeovers get
        UNAVAILABLE until an engine is attached. OSError when the metrics port is taken."""
        if self._listening:
            return
        self.server.start()
        self._listening = True
        self._monitor = threading.Thread(target=self._monitor_loop, name="health", daemon=True)
        self._monitor.start()
        if self.options.metrics_port is not None:
            self._metrics_http = self.metrics.serve(self.options.metrics_port, self.options.host)
            if self._metrics_http is not None:
                self.metrics_port = self._metrics_http.server_port

    def start(self, warm_up: Callable[[], None] | None = None) -> None:
        """Listen (if not yet: health answers NOT_SERVING), warm up, then report SERVING."""
        if self.engine is None:
            raise RuntimeError("attach an engine before start()")
        self.listen()
        if warm_up is not None:
            warm_up()
        self._canary = warm_up  # after a step error, the same tiny generation tests the engine
        if self.admission.closed:  # a drain during warm-up wins: it never served
            return
        self._phase = IN_SERVICE
        self.check_health()
        log.info(
            json.dumps(
                {
                    "event": "serving",
                    "address": self.address,
                    "metrics_port": self.metrics_port,
                    # bind -> SERVING: load and warm-up; the startup probe's budget is sized on it
                    "startup_s": round(time.monotonic() - self._born, 1),
                }
            )
        )

    def drain(self) -> None:
        """Stop admitting, let in-flight work finish within the grace, then stop.

        Health flips to NOT_SERVING at once (probes and load balancers stop sending), new
        takeovers get UNAVAILABLE, running and queued ones have `drain_grace_s` to finish;
        what is still running then ends with UNAVAILABLE (the edge resends or falls back)."""
        with self._draining:  # a second SIGTERM waits for the first drain
            if self._stopped.is_set():
                return
            grace = self.options.drain_grace_s
            log.info(
                json.dumps(
                    {
                        "event": "drain",
                        "grace_s": grace,
                        "running": self.admission.running,
                        "waiting": self.admission.waiting,
                    }
                )
            )
            self._phase = DRAINING  # readiness NOT_SERVING, and it stays so
            self.check_health()
            self.admission.close()
            if not self.admission.wait_idle(grace):
                self.servicer.stopping.set()  # remaining streams end with UNAVAILABLE
                self.admission.wait_idle(5.0)
            self.server.stop(grace=1.0).wait()
            self._stop_monitor()
            self._stop_metrics()
            log.info(json.dumps({"event": "drained"}))
            self._stopped.set()

    def stop_now(self) -> None:
        """Stop at once without a drain (tests, and a second signal)."""
        self.servicer.stopping.set()
        self.admission.close()
        self.server.stop(grace=None).wait()
        self._stop_monitor()
        self._stop_metrics()
        self._stopped.set()

    def _stop_monitor(self) -> None:
        self._monitor_stop.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(5)

    def _stop_metrics(self) -> None:
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
            self._metrics_http = None

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            threading.Thread(target=self.drain, name="drain", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait(self) -> None:
        while not self._stopped.wait(timeout=0.5):
            pass
