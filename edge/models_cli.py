"""`specthink-edge models`: pull, list, rm, path (the store is `edge.models`, pulls are
`edge.model_hub`)."""

from __future__ import annotations

import typer

from edge import model_hub
from edge.model_download import ModelError
from edge.models import entry, list_models, models_dir, path, remove
from edge.outcome import error_line

models_app = typer.Typer(
    help="Download and manage local GGUF models (Hugging Face compatible endpoints).",
    no_args_is_help=True,
)


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(error_line(str(exc)), err=True)
    return typer.Exit(1)


@models_app.command("pull")
def _cli_pull(
    spec: str = typer.Argument(..., help="OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf or OWNER/REPO."),
    endpoint: str | None = typer.Option(
        None, "--endpoint", help="Hugging Face compatible endpoint [env: HF_ENDPOINT]."
    ),
    sha256: str | None = typer.Option(None, "--sha256", help="Expected sha256 of the file."),
) -> None:
    """Download a GGUF model (resumable, checksum verified) and print its path.

    Example: specthink-edge models pull bartowski/DeepSeek-R1-Distill-Qwen-1.5B-GGUF:Q4_K_M
    """
    try:
        out = model_hub.pull(spec, endpoint=endpoint, sha256=sha256)
    except ModelError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        typer.echo("\ninterrupted; run the same pull again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(str(out))


@models_app.command("list")
def _cli_list() -> None:
    """List installed models with their sizes, and the bundled default edge model."""
    from edge import bundled

    entries = list_models()
    default = bundled.default_edge_model()
    if default is not None:
        entries.append(entry(default, f"{bundled.SMOLLM2.name} (bundled default)"))
    if not entries:
        typer.echo(f"no models in {models_dir()} and no bundled default", err=True)
        return
    width = max(len("NAME"), *(len(e.name) for e in entries))
    typer.echo(f"{'NAME':<{width}}  {'SIZE':>10}  MODIFIED")
    for e in entries:
        size = f"{e.size / 1e6:,.1f} MB"
        flag = "" if e.valid else "  (not a GGUF file)"
        typer.echo(f"{e.name:<{width}}  {size:>10}  {e.modified:%Y-%m-%d %H:%M}{flag}")


@models_app.command("rm")
def _cli_rm(name: str = typer.Argument(..., help="Model name as shown by 'models list'.")) -> None:
    """Delete an installed model."""
    try:
        removed = remove(name)
    except ModelError as exc:
        raise _fail(exc) from None
    typer.echo(f"removed {removed}")


@models_app.command("path")
def _cli_path(
    name: str = typer.Argument(..., help="Model name as shown by 'models list'."),
) -> None:
    """Print the local path of an installed model."""
    try:
        found = path(name)
    except ModelError as exc:
        raise _fail(exc) from None
    typer.echo(str(found))
