"""`specthink-cloud`: serve the large model over gRPC. Heavy imports happen inside `serve`."""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from shared.cli_style import CONTEXT_SETTINGS, TYPER_SETTINGS, version_flag

if TYPE_CHECKING:
    from cloud.engine_api import Engine

app = typer.Typer(
    help="SpecThink cloud: the large model behind a gRPC API.",
    context_settings=CONTEXT_SETTINGS,
    **TYPER_SETTINGS,
)


def _fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"specthink-cloud: error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _root(version: bool = version_flag("specthink-cloud")) -> None:
    """SpecThink cloud: the large model behind a gRPC API."""


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Option(metavar="MODEL", help="Hugging Face folder or id, or a .gguf file."),
    ],
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", help="Port (0 picks a free one).", min=0, max=65535)
    ] = 50051,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            metavar="DTYPE",
            help="auto, bfloat16, float16 or float32. auto: bfloat16 on CUDA and on CPUs "
            "with native bf16 (AMX, AVX512-BF16), float16 on MPS, else float32.",
        ),
    ] = "auto",
    api_key_file: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="File of API keys, one per line; enables auth."),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(metavar="PORT", help="Serve Prometheus metrics on this port.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Server certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="Server private key (PEM).")
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="CA for client certificates: enables mutual TLS."),
    ] = None,
    drain_grace_s: Annotated[
        float, typer.Option(metavar="SECONDS", help="Drain grace on SIGTERM.")
    ] = 30.0,
    max_waiting: Annotated[
        int, typer.Option(metavar="N", help="Admission queue length.", min=0)
    ] = 32,
    max_cache_bytes: Annotated[
        int,
        typer.Option(
            metavar="BYTES",
            help="KV cache budget for sessions (0: sized from free memory; printed at start).",
            min=0,
        ),
    ] = 0,
    max_running: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Batch-size limit: takeovers decoded together (0: sized from the KV budget).",
            min=0,
        ),
    ] = 0,
    engine_kind: Annotated[
        str,
        typer.Option(
            "--engine",
            metavar="ENGINE",
            help="auto, rows or paged. rows: per-session caches batched as padded rows "
            "(measured best on CPU); paged: a preallocated KV pool read in place, one forward "
            "per step (the GPU path); auto picks by device (docs/batching.md).",
        ),
    ] = "auto",
    context_length: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Tokens one session may hold (0: the model's, capped to what memory holds; "
            "the paged engine reserves this much per session).",
            min=0,
        ),
    ] = 0,
    tensor_parallel: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Shard the model over N devices, one process each, launched with torchrun "
            "(docs/tensor-parallel.md).",
            min=1,
        ),
    ] = 1,
    session_ttl_s: Annotated[
        float, typer.Option(metavar="SECONDS", help="Idle session lifetime.")
    ] = 600.0,
    engine_stall_s: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="Liveness fails when one engine step runs longer than this, or steps keep "
            "failing this long (the kubelet restarts the pod).",
            min=1.0,
        ),
    ] = 60.0,
    max_connection_age_s: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="Close each client connection after this age (+-10%) so clients reconnect "
            "and reach new replicas (0: never).",
            min=0.0,
        ),
    ] = 300.0,
    max_connection_age_grace_s: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="Calls in flight on a connection closed for its age get this long to finish.",
            min=0.0,
        ),
    ] = 60.0,
    reflection: Annotated[bool, typer.Option(help="Serve gRPC server reflection.")] = True,
    log_prompts: Annotated[bool, typer.Option(help="Log prompt text.")] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Where converted GGUF weights are cached (default: $SPECTHINK_CACHE_DIR "
            "or ~/.cache/specthink).",
        ),
    ] = None,
) -> None:
    """Load MODEL and serve takeovers until SIGTERM (then drain and exit 0).

    Flags, key and TLS files are checked and the port is bound before the model loads;
    health answers NOT_SERVING until it is loaded and warm. The address is printed on
    stdout once it serves."""
    import os

    from cloud.dtypes import read_cpu_bf16_flags, resolve_dtype
    from cloud.tensor_parallel import launch_problem, rank_of

    loading = _LoadOptions(
        model=model,
        device=device,
        dtype=dtype.strip().lower(),
        cache_dir=cache_dir,
        max_cache_bytes=max_cache_bytes,
        session_ttl_s=session_ttl_s,
        max_running=max_running,
        context_length=context_length,
        engine_kind=engine_kind,
        tensor_parallel=tensor_parallel,
    )
    if problem := launch_problem(tensor_parallel, dict(os.environ)):
        _fail(problem)
    if tensor_parallel > 1 and rank_of(dict(os.environ)) > 0:  # serves nothing: follows rank 0
        _follow(loading)
        return
    from cloud.preflight import ServeChecks, serve_problems

    problems = serve_problems(
        ServeChecks(
            model=model,
            device=device,
            dtype=dtype,
            api_key_file=api_key_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            host=host,
            port=port,
            metrics_port=metrics_port,
            engine=engine_kind,
        )
    )
    for problem in problems:
        typer.echo(f"specthink-cloud: error: {problem}", err=True)
    if problems:
        raise typer.Exit(2)
    dtype = dtype.strip().lower()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from cloud.server import CloudServer, ServerOptions

    options = ServerOptions(
        host=host,
        port=port,
        api_key_file=api_key_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        metrics_port=metrics_port,
        reflection=reflection,
        drain_grace_s=drain_grace_s,
        max_waiting=max_waiting,
        log_prompts=log_prompts,
        session_ttl_s=session_ttl_s,
        engine_stall_s=engine_stall_s,
        max_connection_age_s=max_connection_age_s,
        max_connection_age_grace_s=max_connection_age_grace_s,
    )
    try:
        server = CloudServer(None, options)  # binds the port now: fails in a second
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    try:
        server.listen()  # health NOT_SERVING while the model loads
    except OSError as exc:
        server.stop_now()
        _fail(f"cannot serve metrics on port {metrics_port}: {exc.strerror or exc}")
    engine = _load(server, loading)
    typer.echo(
        f"specthink-cloud: engine {engine.info.engine}; memory plan: {engine.memory.describe()}; "
        f"peak host RSS while loading {engine.peak_host_bytes / (1 << 30):.2f} GiB",
        err=True,
    )
    from cloud import faults
    from cloud.engine_thread import EngineThread

    try:
        stepped = faults.from_env(engine)  # tests only: SPECTHINK_FAULT_INJECT (unset: engine)
    except ValueError as exc:
        server.stop_now()
        _fail(str(exc))
    if stepped is not engine:
        typer.echo(f"specthink-cloud: FAULT INJECTION ACTIVE ({faults.ENV}): tests only", err=True)
    # all model work on one thread (one warm torch pool); it reports each step to health
    engine_loop = EngineThread(stepped, health=server.engine_health)
    server.attach(engine_loop)
    server.start(warm_up=lambda: _warm_up(engine_loop))
    if server.admission.closed:  # SIGTERM during the warm-up: draining, never served
        server.wait()
        _close_ranks(engine)
        typer.echo("specthink-cloud: drained, bye", err=True)
        return
    info = engine.info
    why = resolve_dtype(dtype, info.device.split(":")[0], read_cpu_bf16_flags()).reason
    typer.echo(
        f"specthink-cloud: {info.model_id} on {info.device}, dtype {info.dtype} ({why}), "
        f"context {info.context_length}",
        err=True,
    )
    scheme = "grpcs" if tls_cert else "grpc"
    print(f"specthink-cloud listening on {scheme}://{server.address}", flush=True)
    server.wait()
    _close_ranks(engine)
    typer.echo("specthink-cloud: drained, bye", err=True)


@dataclass(frozen=True)
class _LoadOptions:
    """The flags that reach the engine, read once by `serve` (rank 0 and the others alike)."""

    model: str
    device: str
    dtype: str
    cache_dir: Path | None
    max_cache_bytes: int  # 0: from the memory plan
    session_ttl_s: float
    max_running: int  # 0: from the memory plan
    context_length: int  # 0: the model's, capped to what memory holds
    engine_kind: str
    tensor_parallel: int

    def engine_class(self) -> Any:
        """The engine class to load (imports torch). --engine auto under --tensor-parallel
        is rows: the paged engine's KV pool is not sharded (`load_sharded` refuses it)."""
        from cloud.engine import engine_class

        auto = self.engine_kind.strip().lower() == "auto"
        kind = "rows" if auto and self.tensor_parallel > 1 else self.engine_kind
        return engine_class(kind, self.device)

    def engine_kwargs(self) -> dict[str, Any]:
        """Keywords of the engine class's `load` (and of `load_sharded`)."""
        return {
            "device": self.device,
            "dtype": self.dtype,
            "cache_dir": self.cache_dir,
            "max_cache_bytes": self.max_cache_bytes or None,
            "session_ttl_s": self.session_ttl_s,
            "max_running": self.max_running or None,
            "context_length": self.context_length or None,
        }


class _StopLoading(Exception):
    """SIGTERM or SIGINT while the model loads: stop at once, nothing to drain."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _load(server: Any, loading: _LoadOptions) -> Any:
    """Load the engine while the server already answers health (NOT_SERVING). A signal
    meanwhile stops the process: SIGTERM (an orchestrator) with 0, SIGINT (Ctrl-C) with
    130, as an interrupted command; a load error is one line and exit 2. Returns with the
    server's own signal handlers (drain) in place."""

    def stop_loading(signum: int, frame: object) -> None:
        raise _StopLoading(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_loading)
    try:
        try:
            import cloud.engine  # noqa: F401 (torch and transformers: is the runtime there?)
        except ImportError as exc:
            server.stop_now()
            _fail(
                f"the cloud runtime is not installed ({exc.name}): pip install 'specthink[cloud]'"
            )
        typer.echo(f"specthink-cloud: loading {loading.model} ...", err=True)
        try:
            if loading.tensor_parallel > 1:
                return _load_sharded(loading)
            return loading.engine_class().load(loading.model, **loading.engine_kwargs())
        except (ValueError, OSError) as exc:
            server.stop_now()
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except _StopLoading as stop:
        server.stop_now()
        typer.echo(f"specthink-cloud: stopped while loading the model ({stop})", err=True)
        raise typer.Exit(130 if stop.signum == signal.SIGINT else 0) from None
    finally:
        server.install_signal_handlers()


def _load_sharded(loading: _LoadOptions) -> Any:
    """Rank 0 of --tensor-parallel: its shard, behind the engine that replays every call on
    the other ranks (`cloud.tensor_parallel`)."""
    from cloud.engine.tensor_parallel import load_sharded
    from cloud.tensor_parallel import ReplicatedStepEngine

    engine, channel, clock = load_sharded(
        loading.engine_class(), loading.model, **loading.engine_kwargs()
    )
    typer.echo(f"specthink-cloud: tensor-parallel over {channel.world_size} ranks", err=True)
    return ReplicatedStepEngine(engine, channel, clock)


def _follow(loading: _LoadOptions) -> None:
    """Ranks > 0 of --tensor-parallel: load this rank's shard, then run rank 0's engine calls
    until it closes (SIGTERM is rank 0's to handle: it drains, then closes)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        from cloud.engine.tensor_parallel import load_sharded
    except ImportError as exc:
        _fail(f"the cloud runtime is not installed ({exc.name}): pip install 'specthink[cloud]'")
    from cloud.tensor_parallel import follow

    try:  # the class rank 0 picks, with the same settings
        engine, channel, clock = load_sharded(
            loading.engine_class(), loading.model, **loading.engine_kwargs()
        )
    except (ValueError, OSError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    calls = follow(engine, channel, clock)
    summary = ", ".join(f"{op} {n}" for op, n in sorted(calls.items()))
    typer.echo(
        f"specthink-cloud: rank {channel.rank}: rank 0 closed; calls run: {summary}", err=True
    )
    channel.close()


def _close_ranks(engine: Any) -> None:
    """--tensor-parallel: the other ranks leave once rank 0 has drained."""
    from cloud.tensor_parallel import ReplicatedStepEngine

    if isinstance(engine, ReplicatedStepEngine):
        calls = ", ".join(f"{op} {n}" for op, n in sorted(engine.calls.items()))
        engine.close()
        typer.echo(f"specthink-cloud: rank 0: calls sent: {calls}", err=True)


def _warm_up(engine: Engine) -> None:
    """One tiny generation so the first real takeover does not pay for lazy init."""
    from cloud.engine_api import GenerateRequest
    from shared.wire import Message, Sampling

    warm = GenerateRequest("__warmup__", (Message("user", "Hi"),), "", 2, Sampling(temperature=0))
    for _ in engine.generate(warm, lambda: False):
        pass
    engine.drop(warm.session)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
