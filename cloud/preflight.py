"""What `specthink-cloud serve` checks before it loads a model: everything that is cheap.

Loading a real model takes minutes; a typo in a flag should cost a second. Each check
returns one line per problem (no traceback), in the order of the flags, so that all of
them are reported at once. No torch and no gRPC here: files are read with the standard
library (`ssl` proves a certificate and its key are a pair), and a port is tried with a
plain socket, bound as gRPC binds it, so that a taken port gets the system's reason in
one line. The server binds for real right after, still before the model loads.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cloud.auth import ApiKeys
from cloud.dtypes import parse_dtype

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # as cloud.engine reads an id
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ServeChecks:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    api_key_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = None
    engine: str = "auto"


ENGINE_NAMES = ("auto", "rows", "paged")  # `serve --engine` (cloud.engine.ENGINES, and auto)


def model_problem(model: str) -> str | None:
    """A model is a folder with config.json, a GGUF file, or a hub id (`owner/name`)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"--model {model}: not a model folder (no config.json)"
        return None
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            return f"--model {model}: not a model (expected a .gguf file or a model folder)"
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as exc:
            return f"--model {model}: cannot read it ({exc.strerror})"
        if magic != b"GGUF":
            return f"--model {model}: not a GGUF file (no GGUF magic)"
        return None
    if HUB_ID.match(model) and not model.endswith(".gguf"):
        return None  # a hub id: only loading can tell whether the hub has it
    return f"--model {model}: no such model file or folder"


def _readable(flag: str, path: Path) -> str | None:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"{flag} {path}: cannot read it ({exc.strerror})"
    if not data.strip():
        return f"{flag} {path}: the file is empty"
    return None


def tls_problems(cert: Path | None, key: Path | None, client_ca: Path | None) -> list[str]:
    """Both or neither of cert and key, each readable, and a matching pair; a readable CA."""
    if cert is None and key is None:
        return ["--tls-client-ca needs --tls-cert and --tls-key"] if client_ca else []
    if cert is None or key is None:
        return ["TLS needs both --tls-cert and --tls-key"]
    problems = [p for p in (_readable("--tls-cert", cert), _readable("--tls-key", key)) if p]
    if not problems:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
            problems.append(
                f"--tls-cert {cert} / --tls-key {key}: not a PEM certificate and its key ({reason})"
            )
    if client_ca is not None:
        problem = _readable("--tls-client-ca", client_ca)
        if problem is None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=str(client_ca))
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
                problem = f"--tls-client-ca {client_ca}: not a PEM certificate ({reason})"
        if problem:
            problems.append(problem)
    return problems


def port_problem(flag: str, host: str, port: int) -> str | None:
    """Whether `host:port` can be listened on now (0: any free port, always fine). Bound
    with SO_REUSEADDR as gRPC and the metrics server bind; one address of the host that
    binds is enough, as for gRPC."""
    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host}: not an address of this host ({exc.strerror})"
    reason = "no address"
    for family, kind, proto, _name, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
                probe.listen()
            return None
        except OSError as exc:
            reason = exc.strerror or str(exc)
    return f"{flag} {port}: cannot listen on {host}:{port} ({reason})"


def serve_problems(c: ServeChecks) -> list[str]:
    """Every problem with the serve flags that can be found without loading the model."""
    problems: list[str] = []
    if (problem := model_problem(c.model)) is not None:
        problems.append(problem)
    if not _DEVICE.match(c.device):
        problems.append(f"--device {c.device}: unknown device: use auto, cuda, mps or cpu")
    try:
        parse_dtype(c.dtype)
    except ValueError as exc:
        problems.append(f"--dtype: {exc}")
    if c.engine.strip().lower() not in ENGINE_NAMES:
        problems.append(f"--engine {c.engine}: unknown engine: use {', '.join(ENGINE_NAMES)}")
    if c.api_key_file is not None:
        try:
            ApiKeys.from_file(c.api_key_file)
        except ValueError as exc:
            problems.append(str(exc))
    problems += tls_problems(c.tls_cert, c.tls_key, c.tls_client_ca)
    if c.metrics_port is not None and not 0 <= c.metrics_port <= 65535:
        problems.append(f"--metrics-port {c.metrics_port}: not a port (0-65535)")
    if c.metrics_port and c.metrics_port == c.port:
        problems.append(f"--metrics-port {c.metrics_port}: the same port as --port")
        return problems
    ports = [("--port", c.port), ("--metrics-port", c.metrics_port or 0)]
    taken = [port_problem(flag, c.host, port) for flag, port in ports]
    return problems + [problem for problem in taken if problem is not None]
