"""`specthink-edge`: ask, chat, eval, config, models. The signature is the CLI; the
docstring is the help. The wiring behind the commands (settings, model, cloud, output) is
edge/wiring.py; heavy imports (llama.cpp, grpc channels) happen inside the commands.

Exit codes: 0 done; 1 runtime failure; 2 bad input; 3 the cloud refused our credentials;
4 the cloud rejected the request; 5 the cloud could not be used at all (the answer was
written by the edge alone); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.config_cli import config_app
from edge.models import models_app
from edge.wiring import (
    EXIT_AUTH,
    EXIT_CLOUD_UNREACHABLE,
    EXIT_INTERRUPTED,
    Output,
    Run,
    fail,
    notice,
    prepare,
    print_json,
    print_speeds,
    read_prompt,
    settings,
)
from shared.cli_style import CONTEXT_SETTINGS, TYPER_SETTINGS, version_flag

app = typer.Typer(
    help="SpecThink edge: a small model on this machine reasons; a large one in the cloud "
    "takes over where it reflects.",
    context_settings=CONTEXT_SETTINGS,
    **TYPER_SETTINGS,
)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")


@app.callback()
def _root(version: bool = version_flag("specthink-edge")) -> None:
    """SpecThink edge: a small model on this machine reasons; a large one in the cloud
    takes over where it reflects."""


# ---- shared options -------------------------------------------------------------------

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="GGUF file of the small model.")
]
CloudOpt = Annotated[
    str | None, typer.Option("--cloud", help="Cloud address HOST:PORT (env SPECTHINK_CLOUD).")
]
MaxTokensOpt = Annotated[
    int | None, typer.Option("--max-tokens", help="Token budget of the answer (edge + cloud).")
]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampling seed.")]
ModeOpt = Annotated[
    str | None,
    typer.Option(
        "--mode",
        help="auto (default: what fits the model), reasoning, or non-reasoning (a small "
        "model that never says 'Wait').",
    ),
]
StrategyOpt = Annotated[
    str | None,
    typer.Option(
        "--strategy",
        help="speculative, edge (never the cloud) or cloud (the large model writes all).",
    ),
]
PolicyOpt = Annotated[Path | None, typer.Option("--policy", help="TOML file of policy knobs.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Policy knob KEY=VALUE, e.g. --set takeover_tokens=30 (repeatable)."
    ),
]
GpuOpt = Annotated[
    int | None, typer.Option("--gpu-layers", help="Layers to offload to the GPU/Metal (-1 = all).")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for the small model.")
]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Top-k sampling (0 = off).")]
LocalOnlyOpt = Annotated[bool, typer.Option("--local-only", help="Never contact the cloud.")]
SystemOpt = Annotated[str | None, typer.Option("--system", help="System message.")]
HideThinkingOpt = Annotated[
    bool, typer.Option("--hide-thinking", help="Drop <think> reasoning from the output.")
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Timings and speeds after each answer.")
]
MarkOpt = Annotated[
    str,
    typer.Option(
        "--mark",
        help="How to mark the cloud's text: auto (colour on a terminal), color, brackets, none.",
    ),
]
PrefillEveryOpt = Annotated[
    int,
    typer.Option(
        "--prefill-every",
        help="Push the edge's text to the cloud every N drafted tokens (0 = off), so that "
        "takeovers find a warm cache.",
        min=0,
    ),
]


# ---- ask ------------------------------------------------------------------------------


@app.command()
def ask(
    prompt: Annotated[
        str | None, typer.Argument(help="The question; read from stdin when absent or '-'.")
    ] = None,
    model: ModelOpt = None,
    cloud: CloudOpt = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object at the end.")
    ] = False,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="Stream one JSON event per line.")] = False,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    mode: ModeOpt = None,
    strategy: StrategyOpt = None,
    local_only: LocalOnlyOpt = False,
    system: SystemOpt = None,
    policy_file: PolicyOpt = None,
    knobs: SetOpt = None,
    gpu_layers: GpuOpt = None,
    threads: ThreadsOpt = None,
    hide_thinking: HideThinkingOpt = False,
    verbose: VerboseOpt = False,
    mark: MarkOpt = "auto",
    prefill_every: PrefillEveryOpt = 0,
) -> None:
    """Answer PROMPT with the small model, handing reflective steps to the cloud.

    The answer streams to stdout (the cloud's text coloured on a terminal);
    notices go to stderr. If the cloud fails, the edge keeps what it received,
    writes on alone, and says so. Exit codes: 0 done, 2 bad input, 3 API key
    refused, 4 request rejected, 5 the cloud could not be used at all (the
    answer was still written locally), 130 interrupted (the partial answer is
    kept)."""
    if json_out and jsonl:
        fail("--json and --jsonl exclude each other")
    run = prepare(
        model=model,
        cloud=cloud,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mode=mode,
        strategy=strategy,
        local_only=local_only,
        policy_file=policy_file,
        knobs=knobs,
        gpu_layers=gpu_layers,
        threads=threads,
        mark=mark,
        prefill_every=prefill_every,
        prompt=lambda: read_prompt(prompt),
    )
    from edge.session import CloudSession
    from shared.wire import Message

    messages = ([Message("system", system)] if system else []) + [Message("user", run.prompt)]
    output = Output(json_out, jsonl, mark, hide_thinking, verbose, run)
    session_id = uuid.uuid4().hex
    cloud_session = CloudSession(run.transport, session_id) if run.transport else None
    try:
        answer = run.answer(messages, cloud_session, output)
    finally:
        if run.transport is not None:
            run.transport.end_session(session_id)
            run.transport.close()
    if json_out:
        print_json(answer.to_json(), run)
    if verbose:
        print_speeds(answer, run)
    unusable = run.cloud_unusable
    if unusable is not None and unusable.key_refused:  # no takeover met it: say it now
        fail(
            f"the cloud at {run.cfg.cloud} refused the API key (--api-key-file on the cloud, "
            "SPECTHINK_API_KEY here); the answer was written by the edge alone",
            EXIT_AUTH,
        )
    if unusable is not None:  # said in one line when it was found
        raise typer.Exit(EXIT_CLOUD_UNREACHABLE)
    if answer.stats.fallback and answer.stats.cloud_tokens == 0:
        fail(
            f"the cloud at {run.cfg.cloud} could not be used; the answer was written by the "
            "edge alone",
            EXIT_CLOUD_UNREACHABLE,
        )
    if answer.stats.fallback:
        notice(
            f"the cloud failed {answer.stats.fallbacks} time(s); those parts were written locally"
        )


# ---- chat -----------------------------------------------------------------------------

CHAT_HELP = "/exit (or Ctrl-D) leaves, /reset starts a new conversation, Ctrl-C stops an answer"


@app.command()
def chat(
    model: ModelOpt = None,
    cloud: CloudOpt = None,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON event per line.")] = False,
    max_tokens: MaxTokensOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    seed: SeedOpt = None,
    mode: ModeOpt = None,
    strategy: StrategyOpt = None,
    local_only: LocalOnlyOpt = False,
    system: SystemOpt = None,
    policy_file: PolicyOpt = None,
    knobs: SetOpt = None,
    gpu_layers: GpuOpt = None,
    threads: ThreadsOpt = None,
    hide_thinking: HideThinkingOpt = False,
    verbose: VerboseOpt = False,
    mark: MarkOpt = "auto",
    prefill_every: PrefillEveryOpt = 0,
) -> None:
    """Talk turn by turn: each line on stdin is a user turn ('> ' on a terminal).

    The conversation is one cloud session: the cloud re-uses its cache across
    turns and takeovers keep working. /exit or end of input leaves, /reset
    starts over; Ctrl-C stops the answer being written (it is kept)."""
    from edge.session import CloudSession
    from shared.wire import Message

    run = prepare(
        model=model,
        cloud=cloud,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mode=mode,
        strategy=strategy,
        local_only=local_only,
        policy_file=policy_file,
        knobs=knobs,
        gpu_layers=gpu_layers,
        threads=threads,
        mark=mark,
        prefill_every=prefill_every,
    )
    interactive = sys.stdin is not None and sys.stdin.isatty()
    output = Output(False, jsonl, mark, hide_thinking, verbose, run)
    session_id = uuid.uuid4().hex
    cloud_session = CloudSession(run.transport, session_id) if run.transport else None
    opening = [Message("system", system)] if system else []
    history = list(opening)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        where = f"with the cloud at {run.cfg.cloud}" if run.transport else "on this machine only"
        notice(f"chat {where}; {CHAT_HELP}")
    turn = 0
    try:
        while True:
            line = _read_turn(interactive)
            if line is None or line.strip() in ("/exit", "/quit", "/bye"):
                break
            command = line.strip()
            if not command:
                continue
            if command == "/reset":
                history = list(opening)
                if cloud_session is not None:
                    cloud_session.forget()
                notice("new conversation")
                continue
            if command in ("/help", "/?"):
                notice(CHAT_HELP)
                continue
            turn += 1
            history.append(Message("user", line.rstrip("\n")))
            if jsonl:
                typer.echo(
                    json.dumps(
                        {"event": "turn", "turn": turn, "user": history[-1].content},
                        ensure_ascii=False,
                    )
                )
            answer = _chat_turn(run, history, cloud_session, output)
            history.append(Message("assistant", _history_text(answer.text)))
    finally:
        if run.transport is not None:
            run.transport.end_session(session_id)
            run.transport.close()


def _read_turn(interactive: bool) -> str | None:
    """The next user turn, or None at the end of input. Ctrl-C at the prompt only hints."""
    while True:
        try:
            if interactive:
                return input("> ")
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            if interactive:
                sys.stdout.write("\n")
            return None
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            notice(CHAT_HELP)


def _chat_turn(run: Run, history: list[Any], cloud_session: Any, output: Output) -> Any:
    """One answer; Ctrl-C stops it (keeping it) and the chat goes on."""
    try:
        answer = run.answer(history, cloud_session, output)
    except typer.Exit as stop:
        if stop.exit_code != EXIT_INTERRUPTED:
            raise
        signal.signal(signal.SIGINT, signal.default_int_handler)  # next Ctrl-C: soft again
        from edge.session import Answer, Stats

        if cloud_session is not None:
            cloud_session.forget()
        return Answer(run.last_partial, "interrupted", [], Stats())
    if output.verbose:
        print_speeds(answer, run)
    if answer.stats.fallback and not output.jsonl:
        notice(f"the cloud failed {answer.stats.fallbacks} time(s); written locally instead")
    return answer


def _history_text(text: str) -> str:
    from edge.render import strip_thinking

    return strip_thinking(text)


# ---- eval ------------------------------------------------------------------------------


@app.command()
def doctor(model: ModelOpt = None) -> None:
    """Check that llama.cpp decodes on this CPU, and say what it was built with.

    Runs a 4-token decode of the model (the bundled one by default) in a child
    process, so a runtime that crashes is reported instead of killing this one."""
    from edge import selfcheck
    from edge.wiring import EXIT_RUNTIME, model_path

    result = selfcheck.check_runtime(model_path(settings(model=model)))
    typer.echo(f"llama.cpp built with: {result.system_info or 'unknown'}")
    typer.echo(result.message)
    if not result.ok:
        raise typer.Exit(EXIT_RUNTIME)


@app.command("eval")
def eval_(
    dataset: Annotated[
        str,
        typer.Argument(
            help="math500, aime2024, math500-l123-s60 (shipped) or a JSONL file of problems."
        ),
    ],
    cloud: CloudOpt = None,
    model: ModelOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", help="First N problems.", min=1)] = None,
    levels: Annotated[str | None, typer.Option("--levels", help="MATH levels, e.g. 1,2.")] = None,
    strategies: Annotated[
        str, typer.Option("--strategy", help="Comma-separated strategies (and variant names).")
    ] = "speculative,edge,cloud",
    variants: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="A named speculative run with its own knobs, NAME:KNOB=V[,KNOB=V] "
            "(repeatable), e.g. unc-1.0:trigger=uncertainty,uncertainty_threshold=1.0.",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", help="Token budget per answer (default: the paper's 32768)."),
    ] = None,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = None,
    mode: ModeOpt = None,
    policy_file: PolicyOpt = None,
    knobs: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Results folder (default eval-results/DATASET).")
    ] = None,
    restart: Annotated[
        bool, typer.Option("--restart", help="Discard earlier results in --out.")
    ] = False,
    allow_mixed: Annotated[
        bool,
        typer.Option(
            "--allow-mixed",
            help="Resume results written by another cloud or edge model (rows name theirs).",
        ),
    ] = False,
    gpu_layers: GpuOpt = None,
    threads: ThreadsOpt = None,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Only write the table, report.json and tradeoff.png from OUT/results.jsonl "
            "(no model, no cloud; safe beside a running eval).",
        ),
    ] = False,
) -> None:
    """Run DATASET under each strategy: accuracy, tokens, measured speed; table, JSON, PNG.

    Results are appended per problem to OUT/results.jsonl: an interrupted run resumes.
    The table counts the problems every strategy has answered."""
    from edge import eval_command

    if report_only:
        eval_command.report(dataset, out)
        return
    eval_command.run(
        dataset,
        cloud=cloud,
        model=model,
        limit=limit,
        levels=levels,
        strategies=strategies,
        variants=variants,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        mode=mode,
        policy_file=policy_file,
        knobs=knobs,
        out=out,
        restart=restart,
        allow_mixed=allow_mixed,
        gpu_layers=gpu_layers,
        threads=threads,
    )


def main() -> None:
    # gRPC's C core logs connection events (GOAWAY on a cloud restart ...) on stderr at
    # INFO; the edge says what matters itself, in one line each
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        app()
    except BrokenPipeError:  # `ask ... | head`
        sys.exit(0)
    except KeyboardInterrupt:  # Ctrl-C before an answer began (loading the model ...)
        sys.stderr.write("\n")
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
