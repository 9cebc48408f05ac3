"""`specthink-edge config show`: every setting with its value and source, and whether the
configured cloud answers (one GetModelInfo). Resolving the settings is `edge.config`."""

from __future__ import annotations

import json

import typer

from edge.config import SETTINGS, ConfigError, EffectiveConfig, json_value, resolve
from edge.outcome import error_line

config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)


@config_app.callback()
def _config_callback() -> None:
    """Show the effective configuration."""


@config_app.command("show")
def _cli_show(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
) -> None:
    """Print every setting with its value and where it came from (the API key masked).

    Precedence: flags > SPECTHINK_* environment > config file > defaults.
    """
    try:
        cfg = resolve({})
    except ConfigError as exc:
        typer.echo(error_line(str(exc)), err=True)
        raise typer.Exit(2) from None
    exists = "exists" if cfg.config_file_exists else "not found"
    default_model = _bundled_default()
    cloud = _cloud_status(cfg)
    from edge.models import models_dir

    store = cfg.models_dir or str(models_dir())  # the store `models` and -m NAME use
    if as_json:
        doc = {
            "config_file": str(cfg.config_file),
            "config_file_exists": cfg.config_file_exists,
            "settings": {
                s.name: {
                    "value": json_value(s, getattr(cfg, s.name)),
                    "source": cfg.source(s.name),
                }
                for s in SETTINGS
            },
            "model_in_use": cfg.model or default_model,
            "cloud_status": cloud,
        }
        doc["settings"]["models_dir"]["value"] = store  # type: ignore[index]
        typer.echo(json.dumps(doc, indent=2))
        return
    rows = [("NAME", "VALUE", "SOURCE"), *cfg.rows()]
    if cfg.model is None and default_model:
        shown = (f"{default_model} (bundled default)", "default")
        rows = [("model", *shown) if row[0] == "model" else row for row in rows]
    rows = [(r[0], store, r[2]) if r[0] == "models_dir" else r for r in rows]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, value, source in rows:
        typer.echo(f"{name:<{w0}}  {value:<{w1}}  {source}".rstrip())
    typer.echo(f"\nconfig file: {cfg.config_file} ({exists})")
    if cloud is not None:
        if cloud["reachable"]:
            typer.echo(
                f"cloud: {cfg.cloud} answers: {cloud['model_id']} ({cloud['dtype']}), "
                f"context {cloud['context_length']}"
            )
        else:
            typer.echo(f"cloud: {cfg.cloud} unreachable: {cloud['why']}")


def _bundled_default() -> str | None:
    from edge import bundled

    path = bundled.default_edge_model()
    return str(path) if path else None


def _cloud_status(cfg: EffectiveConfig) -> dict[str, object] | None:
    """Whether the configured cloud answers, and what it serves (GetModelInfo)."""
    if not cfg.cloud:
        return None
    from dataclasses import asdict

    from edge.cloud_client import ClientOptions, GrpcCloud
    from edge.reachability import check

    transport = GrpcCloud(ClientOptions.from_config(cfg))
    try:
        return asdict(check(transport.model_info, transport.options.address, cfg.connect_timeout_s))
    finally:
        transport.close()
