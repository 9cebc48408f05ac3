"""`specthink-cloud`: serve the large model over gRPC. Heavy imports happen inside `serve`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="SpecThink cloud: the large model behind a gRPC API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"specthink-cloud: error: {message}", err=True)
    raise typer.Exit(code)


@app.callback()
def _root() -> None:
    """SpecThink cloud."""


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Hugging Face folder or id, or a .gguf file.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 picks a free one).", min=0, max=65535)] = 50051,
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="auto, bfloat16, float16 or float32. auto: bfloat16 on CUDA and on CPUs "
            "with native bf16 (AMX, AVX512-BF16), float16 on MPS, else float32."
        ),
    ] = "auto",
    api_key_file: Annotated[
        Path | None, typer.Option(help="File of API keys, one per line; enables auth.")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port.")
    ] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server private key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="CA for client certificates: enables mutual TLS.")
    ] = None,
    drain_grace_s: Annotated[float, typer.Option(help="Drain grace on SIGTERM.")] = 30.0,
    max_waiting: Annotated[int, typer.Option(help="Admission queue length.", min=0)] = 32,
    max_cache_bytes: Annotated[
        int, typer.Option(help="KV cache budget for sessions, bytes.", min=0)
    ] = 2 << 30,
    session_ttl_s: Annotated[float, typer.Option(help="Idle session lifetime.")] = 600.0,
    reflection: Annotated[bool, typer.Option(help="Serve gRPC server reflection.")] = True,
    log_prompts: Annotated[bool, typer.Option(help="Log prompt text (off by default).")] = False,
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where converted GGUF weights are cached.")
    ] = None,
) -> None:
    """Load MODEL and serve takeovers until SIGTERM (then drain and exit 0)."""
    from cloud.dtypes import parse_dtype, read_cpu_bf16_flags, resolve_dtype

    try:
        dtype = parse_dtype(dtype)
    except ValueError as exc:
        _fail(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        from cloud.engine import TransformersEngine
    except ImportError as exc:
        _fail(f"the cloud runtime is not installed ({exc.name}): pip install 'specthink[cloud]'")
    from cloud.engine_thread import EngineThread
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
    )
    typer.echo(f"specthink-cloud: loading {model} ...", err=True)
    try:
        engine = TransformersEngine.load(
            model,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            max_cache_bytes=max_cache_bytes,
            session_ttl_s=session_ttl_s,
        )
    except (ValueError, OSError) as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    engine_loop = EngineThread(engine)  # all model work on one thread: one warm torch pool
    try:
        server = CloudServer(engine_loop, options)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    server.install_signal_handlers()
    server.start(warm_up=lambda: _warm_up(engine_loop))
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
    typer.echo("specthink-cloud: drained, bye", err=True)


def _warm_up(engine: object) -> None:
    """One tiny generation so the first real takeover does not pay for lazy init."""
    from shared.wire import Message, Sampling

    session = "__warmup__"
    for _ in engine.generate(  # type: ignore[attr-defined]
        session, [Message("user", "Hi")], "", 2, Sampling(temperature=0), (), lambda: False
    ):
        pass
    engine.drop(session)  # type: ignore[attr-defined]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
