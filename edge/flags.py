"""The edge's command-line flags, declared once, and how they become one `EdgeOptions`.

`FLAGS` is the one list (name, type with its typer option, default). A command names the
flags it takes (`ASK`, `CHAT`, `EVAL`) and is written as `def cmd(<its own arguments>,
options: EdgeOptions)`; `with_flags` gives typer the signature with those flags added and
calls the command with them gathered into `EdgeOptions`. Typer only: nothing is loaded.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.options import EdgeOptions, Mark, Strategy, choices
from edge.outcome import EdgeError


def _knobs_help() -> str:
    from dataclasses import MISSING

    from shared.policy import PolicyConfig

    knobs = [
        f"{f.name}={f.default}"
        for f in fields(PolicyConfig)
        if f.default is not MISSING and not isinstance(f.default, tuple) and f.name != "recap_text"
    ]
    return (
        "Policy knob KEY=VALUE (repeatable), e.g. --set takeover_tokens=30. trigger=keywords "
        "hands over where the probe reflects or verifies (the paper's rules); "
        "trigger=uncertainty where the small model is unsure (mean entropy of its probe, in "
        "nats, over uncertainty_threshold); trigger=cloud-judge where the large model finds "
        "the probe unlikely (its mean log-probability per token under judge_threshold), "
        "judged in the takeover call. Knobs and defaults: " + ", ".join(knobs) + "."
    )


KNOBS_HELP = _knobs_help()

# name -> (annotation with its typer option, default); order is the help's order
FLAGS: dict[str, tuple[Any, Any]] = {
    "model": (
        Annotated[
            str | None,
            typer.Option(
                "--model",
                "-m",
                help="GGUF file of the small model, or a name from 'specthink-edge models "
                "list' (default: the bundled smollm2-135m).",
            ),
        ],
        None,
    ),
    "cloud": (
        Annotated[
            str | None,
            typer.Option(
                "--cloud",
                help="Cloud address HOST:PORT, or grpc://HOST:PORT as the cloud prints it "
                "(env SPECTHINK_CLOUD).",
            ),
        ],
        None,
    ),
    "json_out": (
        Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")],
        False,
    ),
    "jsonl": (
        Annotated[bool, typer.Option("--jsonl", help="Stream one JSON event per line.")],
        False,
    ),
    "max_tokens": (
        Annotated[
            int | None,
            typer.Option(
                "--max-tokens",
                help="Token budget of an answer, edge + cloud (default 2048; eval: the "
                "paper's 32768).",
            ),
        ],
        None,
    ),
    "temperature": (
        Annotated[
            float | None,
            typer.Option("--temperature", help="Sampling temperature (0 = greedy)."),
        ],
        None,
    ),
    "top_p": (
        Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")],
        None,
    ),
    "top_k": (
        Annotated[int | None, typer.Option("--top-k", help="Top-k sampling (0 = off).")],
        None,
    ),
    "seed": (Annotated[int | None, typer.Option("--seed", help="Sampling seed.")], None),
    "mode": (
        Annotated[
            str | None,
            typer.Option(
                "--mode",
                help="auto (default: what fits the model), reasoning (the cloud takes over "
                "where the small model's probe reflects: 'Wait', 'let me check') or "
                "non-reasoning (for a small model that never says 'Wait': the cloud writes "
                "the opening and takes over after every paragraph break).",
            ),
        ],
        None,
    ),
    "strategy": (
        Annotated[
            str | None,
            typer.Option(
                "--strategy",
                help=f"{choices(Strategy)}: speculative (the small model writes, the cloud "
                "takes over at breaks), edge (never the cloud) or cloud (the large model "
                "writes all).",
            ),
        ],
        None,
    ),
    "local_only": (
        Annotated[bool, typer.Option("--local-only", help="Never contact the cloud.")],
        False,
    ),
    "system": (
        Annotated[str | None, typer.Option("--system", help="System message.")],
        None,
    ),
    "policy_file": (
        Annotated[
            Path | None,
            typer.Option("--policy", help="TOML file of policy knobs (the --set names)."),
        ],
        None,
    ),
    "knobs": (Annotated[list[str] | None, typer.Option("--set", help=KNOBS_HELP)], None),
    "gpu_layers": (
        Annotated[
            int | None,
            typer.Option("--gpu-layers", help="Layers to offload to the GPU/Metal (-1 = all)."),
        ],
        None,
    ),
    "threads": (
        Annotated[int | None, typer.Option("--threads", help="CPU threads for the small model.")],
        None,
    ),
    "hide_thinking": (
        Annotated[
            bool, typer.Option("--hide-thinking", help="Drop <think> reasoning from the output.")
        ],
        False,
    ),
    "verbose": (
        Annotated[
            bool, typer.Option("--verbose", "-v", help="Timings and speeds after each answer.")
        ],
        False,
    ),
    "mark": (
        Annotated[
            str,
            typer.Option(
                "--mark",
                help=f"How to mark the cloud's text: {choices(Mark)}. auto: colour on a "
                "terminal, [cloud]...[/cloud] on a terminal with NO_COLOR; piped, the text "
                "stays plain and stderr says who wrote how much.",
            ),
        ],
        "auto",
    ),
    "prefill_every": (
        Annotated[
            int,
            typer.Option(
                "--prefill-every",
                help="Push the edge's text to the cloud every N drafted tokens (0 = off), so "
                "that takeovers find a warm cache.",
                min=0,
            ),
        ],
        0,
    ),
}

# what each command takes
EVAL = (
    "cloud",
    "model",
    "max_tokens",
    "temperature",
    "seed",
    "mode",
    "policy_file",
    "knobs",
    "gpu_layers",
    "threads",
)
ASK = tuple(FLAGS)
CHAT = tuple(name for name in FLAGS if name != "json_out")

_OPTION_FIELDS = {f.name for f in fields(EdgeOptions)}
if set(FLAGS) != _OPTION_FIELDS:  # pragma: no cover - guards edits to either list
    raise AssertionError(f"FLAGS and EdgeOptions differ: {set(FLAGS) ^ _OPTION_FIELDS}")


def parse(flags: dict[str, Any]) -> EdgeOptions:
    """The parsed flags as one `EdgeOptions` (the choices that are not settings checked)."""
    values = dict(flags)
    values["knobs"] = tuple(values.get("knobs") or ())
    if "mark" in values:
        try:
            values["mark"] = Mark(str(values["mark"]).strip().lower())
        except ValueError:
            raise EdgeError(f"--mark takes {choices(Mark)}") from None
    if values.get("json_out") and values.get("jsonl"):
        raise EdgeError("--json and --jsonl exclude each other")
    return EdgeOptions(**values)


def with_flags(names: Sequence[str]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The command with the named flags added to its signature (after its own parameters),
    called with them gathered into `options: EdgeOptions`."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = typing.get_type_hints(command, include_extras=True)
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(command).parameters.values()
            if p.name != "options"
        ]
        added = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=FLAGS[name][0],
                default=FLAGS[name][1],
            )
            for name in names
        ]

        @functools.wraps(command)
        def run(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in names}
            return command(options=parse(given), **kwargs)

        params = own + added
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        return run

    return decorate
