"""The cloud process: a gRPC server around the servicer, with health, reflection, TLS,
metrics and a graceful drain. No torch here: the engine is built by the caller.

Life cycle: health NOT_SERVING -> engine warm-up -> SERVING (the address is printed) ->
SIGTERM -> NOT_SERVING, admit nothing new, let in-flight takeovers finish within the
grace period, end the rest with UNAVAILABLE, exit 0.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cloud.admission import Admission, AdmissionLimits
from cloud.auth import ApiKeys
from cloud.engine_api import Engine
from cloud.metrics import Metrics
from cloud.servicer import SpecThinkServicer
from cloud.sessions import SessionStore
from cloud.validation import Limits
from shared.rpc import specthink_pb2 as pb
from shared.rpc import specthink_pb2_grpc as rpc

log = logging.getLogger("specthink.cloud")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecThink"].full_name


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
    max_workers: int = 64
    log_prompts: bool = False
    limits: Limits = Limits()


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


class CloudServer:
    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.options = options
        self.engine = engine
        self.metrics = Metrics()
        self.admission = Admission(AdmissionLimits(max_waiting=options.max_waiting))
        self.sessions = SessionStore(on_evict=engine.drop)
        api_keys = ApiKeys.from_file(options.api_key_file) if options.api_key_file else None
        self.servicer = SpecThinkServicer(
            engine, admission=self.admission, sessions=self.sessions, limits=options.limits,
            api_keys=api_keys, metrics=self.metrics, log_prompts=options.log_prompts,
        )
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_workers),
            options=[
                ("grpc.max_receive_message_length", options.limits.max_message_bytes),
                ("grpc.max_send_message_length", options.limits.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        rpc.add_SpecThinkServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if options.reflection:
            names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{options.host}:{options.port}"
        credentials = _credentials(options)
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{options.host}:{self.port}"
        self._stopped = threading.Event()

    def _set_health(self, status: int) -> None:
        self.health.set("", status)  # type: ignore[arg-type]
        self.health.set(SERVICE_NAME, status)  # type: ignore[arg-type]

    def start(self, warm_up: Callable[[], None] | None = None) -> None:
        """Listen at once (health answers NOT_SERVING), warm up, then report SERVING."""
        self.server.start()
        if self.options.metrics_port is not None:
            self.metrics.serve(self.options.metrics_port, self.options.host)
        if warm_up is not None:
            warm_up()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> None:
        """Stop admitting, let in-flight work finish within the grace, then stop."""
        log.info('{"event": "drain", "grace_s": %s}', self.options.drain_grace_s)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.admission.close()
        if not self.admission.wait_idle(self.options.drain_grace_s):
            self.servicer.stopping.set()  # remaining streams end with UNAVAILABLE
            self.admission.wait_idle(5.0)
        self.server.stop(grace=1.0).wait()
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, frame: object) -> None:
            threading.Thread(target=self.drain, name="drain", daemon=True).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def wait(self) -> None:
        while not self._stopped.wait(timeout=0.5):
            pass
