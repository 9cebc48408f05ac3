"""`specthink-edge`: ask, chat, eval, doctor, config, models. The signature is the CLI (the
flags shared by ask, chat and eval are declared once in edge/flags.py); the docstring is the
help. A command gets one `EdgeOptions`, builds its run (edge/run.py) and turns what that
returns (`Outcome`, `EdgeError`) into lines and an exit code: only this module does that.
Heavy imports (llama.cpp, grpc channels) happen inside the commands.

Exit codes: 0 done; 1 runtime failure; 2 bad input; 3 the cloud refused our credentials;
4 the cloud rejected the request; 5 the cloud could not be used at all (the answer was
written by the edge alone); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from edge.config_cli import config_app
from edge.flags import ASK, CHAT, EVAL, with_flags
from edge.models_cli import models_app
from edge.options import EdgeOptions
from edge.outcome import EXIT_INTERRUPTED, EXIT_RUNTIME, EdgeError, Outcome, error_line, notice_line
from shared.cli_style import CONTEXT_SETTINGS, TYPER_SETTINGS, version_flag

if TYPE_CHECKING:
    from edge.cloud_session import CloudSession
    from edge.run import Run
    from shared.wire import Message

HELP = """SpecThink edge: a small model on this machine reasons; a large one in the cloud
takes over where it reflects.

\b
takeover       at a paragraph break the cloud's large model writes the next
               stretch (20 tokens, more when it verifies); then the small one
trigger        what decides a takeover (--set trigger=...): keywords (the
               paper's rules: the small model's probe of the next paragraph
               says 'Wait', 'check' ...) or uncertainty (its probe's entropy
               is high)
non-reasoning  --mode for a small model that never says 'Wait': the cloud
               writes the opening and takes over at every paragraph break
--set KEY=V    any policy knob (ask --help lists them with their defaults)
config file    ~/.config/specthink/config.toml, or the file SPECTHINK_CONFIG
               names; flags > SPECTHINK_* > file > defaults (config show)
"""

app = typer.Typer(
    help=HELP,
    context_settings=CONTEXT_SETTINGS,
    **TYPER_SETTINGS,
)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models", short_help="Download and manage local GGUF models.")


@app.callback(help=HELP)
def _root(version: bool = version_flag("specthink-edge")) -> None:
    """SpecThink edge (the help is HELP)."""


def notice(message: str) -> None:
    typer.echo(notice_line(message), err=True)


def _command(
    name: str | None = None, flags: Sequence[str] = (), short: str | None = None
) -> Callable[[Callable[..., int | None]], Callable[..., int | None]]:
    """Register a command: its flags added (edge/flags.py), and what it ends with turned
    into an exit code: the int it returns, or an `EdgeError`'s one line and code."""

    def register(command: Callable[..., int | None]) -> Callable[..., int | None]:
        parsed = with_flags(flags)(command) if flags else command

        @functools.wraps(parsed)
        def run(*args: Any, **kwargs: Any) -> None:
            try:
                code = parsed(*args, **kwargs)
            except EdgeError as exc:
                typer.echo(error_line(exc.message), err=True)
                raise typer.Exit(exc.exit_code) from None
            if code:
                raise typer.Exit(code)

        app.command(name, short_help=short)(run)  # short: whole in the top-level list
        return command

    return register


def _say(outcome: Outcome) -> None:
    line = outcome.line()
    if line:
        typer.echo(line, err=True)


# ---- ask ------------------------------------------------------------------------------


@_command(flags=ASK, short="Answer a question; the cloud takes over where it reflects.")
def ask(
    prompt: Annotated[
        str | None, typer.Argument(help="The question; read from stdin when absent or '-'.")
    ] = None,
    *,
    options: EdgeOptions,
) -> int:
    """Answer PROMPT with the small model, handing reflective steps to the cloud.

    The answer streams to stdout (the cloud's text coloured on a terminal);
    notices go to stderr. If the cloud fails, the edge keeps what it received,
    writes on alone, and says so. Exit codes: 0 done, 2 bad input, 3 API key
    refused, 4 request rejected, 5 the cloud could not be used at all (the
    answer was still written locally), 130 interrupted (the partial answer is
    kept)."""
    from edge.run import build_run
    from edge.run_report import answer_json, speed_lines
    from shared.wire import Message

    with build_run(options, prompt, asks=True) as run:
        outcome = run.answer(run.opening([Message("user", run.prompt)]), run.cloud_session())
        # said before the run ends its cloud session (a wait a second Ctrl-C may cut short)
        if options.json_out:
            typer.echo(json.dumps(answer_json(outcome.answer, run), ensure_ascii=False))
        if options.verbose and not (outcome.interrupted or outcome.refused):
            for line in speed_lines(outcome.answer, run):
                notice(line)
        _say(outcome)
    return outcome.exit_code


# ---- chat -----------------------------------------------------------------------------

CHAT_HELP = "/exit (or Ctrl-D) leaves, /reset starts a new conversation, Ctrl-C stops an answer"
_SLASH = {"/exit": "exit", "/quit": "exit", "/bye": "exit", "/reset": "reset", "/help": "help"}
_SLASH["/?"] = "help"


def slash_command(line: str) -> tuple[str, str]:
    """What a chat line is: ("text", "") for the model, or a command ("exit", "reset",
    "help" with its words, "unknown" with one line) when it is one word starting with '/'."""
    word = line.strip()
    if not re.fullmatch(r"/[A-Za-z?]\S*", word):
        return "text", ""
    kind = _SLASH.get(word.lower(), "unknown")
    if kind == "help":
        return kind, CHAT_HELP
    if kind == "unknown":
        return kind, f"unknown command {word}; {CHAT_HELP}"
    return kind, ""


@_command(flags=CHAT, short="Talk turn by turn (one cloud session).")
def chat(*, options: EdgeOptions) -> int:
    """Talk turn by turn: each line on stdin is a user turn ('> ' on a terminal).

    The conversation is one cloud session: the cloud re-uses its cache across
    turns and takeovers keep working. /exit or end of input leaves, /reset
    starts over; Ctrl-C stops the answer being written (it is kept)."""
    from edge.run import build_run
    from shared.wire import Message

    interactive = sys.stdin is not None and sys.stdin.isatty()
    with build_run(options) as run:
        cloud_session = run.cloud_session()
        opening = run.opening([])
        history = list(opening)
        if interactive:
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
            where = (
                f"with the cloud at {run.cfg.cloud}" if run.transport else "on this machine only"
            )
            notice(f"chat {where}; {CHAT_HELP}")
        turn = 0
        while True:
            line = _read_turn(interactive, run.say)
            if line is None:
                return 0
            if not line.strip():
                continue
            command, words = slash_command(line)
            if command == "exit":
                return 0
            if command == "reset":
                history = list(opening)
                if cloud_session is not None:
                    cloud_session.forget()
                notice("new conversation")
                continue
            if command != "text":  # help, or a mistyped command: never sent to the model
                notice(words)
                continue
            turn += 1
            history.append(Message("user", line.rstrip("\n")))
            if options.jsonl:
                typer.echo(
                    json.dumps(
                        {"event": "turn", "turn": turn, "user": history[-1].content},
                        ensure_ascii=False,
                    )
                )
            outcome = _chat_turn(run, history, cloud_session)
            if outcome.refused:
                return outcome.exit_code
            history.append(Message("assistant", _history_text(outcome.answer.text)))


def _read_turn(interactive: bool, say: Callable[[str], None]) -> str | None:
    """The next user turn, or None at the end of input. Ctrl-C at the prompt only hints;
    bytes that are not UTF-8 are replaced, and said."""
    from edge.prompt_input import read_line, say_replaced

    while True:
        try:
            line, replaced = read_line(interactive)
            say_replaced("the line", replaced, say)
            return line
        except EOFError:
            if interactive:
                sys.stdout.write("\n")
            return None
        except KeyboardInterrupt:
            sys.stdout.write("\n")
            notice(CHAT_HELP)


def _chat_turn(run: Run, history: list[Message], cloud_session: CloudSession | None) -> Outcome:
    """One answer; Ctrl-C stops it (keeping it) and the chat goes on."""
    from edge.run import soften_ctrl_c
    from edge.run_report import speed_lines

    outcome = run.answer(history, cloud_session)
    if outcome.refused:
        _say(outcome)
        return outcome
    if outcome.interrupted:
        soften_ctrl_c()  # the next Ctrl-C stops the next answer, softly again
        if cloud_session is not None:
            cloud_session.forget()
        _say(outcome)
        return outcome
    answer = outcome.answer
    if run.options.verbose:
        for line in speed_lines(answer, run):
            notice(line)
    if answer.stats.fallback and not run.options.jsonl:
        notice(f"the cloud failed {answer.stats.fallbacks} time(s); written locally instead")
    return outcome


def _history_text(text: str) -> str:
    from edge.render import strip_thinking

    return strip_thinking(text)


# ---- doctor, eval ----------------------------------------------------------------------


@_command(flags=("model",), short="Check that llama.cpp decodes on this CPU.")
def doctor(*, options: EdgeOptions) -> int:
    """Check that llama.cpp decodes on this CPU, and say what it was built with.

    Runs a 4-token decode of the model (the bundled one by default) in a child
    process, so a runtime that crashes is reported instead of killing this one."""
    from edge import selfcheck
    from edge.run import settings
    from edge.small_model import model_path

    result = selfcheck.check_runtime(model_path(settings(options)))
    typer.echo(f"llama.cpp built with: {result.system_info or 'unknown'}")
    typer.echo(result.message)
    return 0 if result.ok else EXIT_RUNTIME


@_command("eval", flags=EVAL, short="Accuracy and speed per strategy on a dataset.")
def eval_(
    dataset: Annotated[
        str,
        typer.Argument(
            help="math500, aime2024, math500-l123-s60 (shipped) or a JSONL file of problems."
        ),
    ],
    limit: Annotated[int | None, typer.Option("--limit", help="First N problems.", min=1)] = None,
    levels: Annotated[str | None, typer.Option("--levels", help="MATH levels, e.g. 1,2.")] = None,
    strategies: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="Comma-separated strategies (and variant names), default speculative,edge,"
            "cloud; with --report, the rows of the table, in this order (default: all).",
        ),
    ] = None,
    variants: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            help="A named speculative run with its own knobs, NAME:KNOB=V[,KNOB=V] "
            "(repeatable), e.g. unc-1.0:trigger=uncertainty,uncertainty_threshold=1.0.",
        ),
    ] = None,
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
    report_only: Annotated[
        bool,
        typer.Option(
            "--report",
            help="Only write the table, report.json and tradeoff.png from OUT/results.jsonl "
            "(no model, no cloud; safe beside a running eval).",
        ),
    ] = False,
    also: Annotated[
        list[Path] | None,
        typer.Option(
            "--also",
            help="With --report: the rows of DIR/results.jsonl join the table (repeatable; "
            "each (problem, strategy) from one folder only, same models and settings); "
            "OUT/results.jsonl is read too if there is one, and the outputs go to OUT.",
            metavar="DIR",
        ),
    ] = None,
    versus: Annotated[
        list[str] | None,
        typer.Option(
            "--versus",
            help="With --report: each row also paired with this one (repeatable; edge and "
            "cloud always are), e.g. --versus probe-0.27.",
            metavar="NAME",
        ),
    ] = None,
    *,
    options: EdgeOptions,
) -> int:
    """Run DATASET under each strategy: accuracy, tokens, measured speed; table, JSON, PNG.

    Results are appended per problem to OUT/results.jsonl: an interrupted run resumes.
    The table counts the problems every strategy has answered; --report --also DIR joins
    other folders' results into one table."""
    from edge import eval_command

    if report_only:
        eval_command.report(dataset, out, also or [], strategies, versus or [])
        return 0
    if also or versus:
        flag = "--also" if also else "--versus"
        raise EdgeError(f"{flag} only goes with --report (it shapes a table of results)")
    finished = eval_command.run(
        dataset,
        options,
        limit=limit,
        levels=levels,
        strategies=strategies,
        variants=variants or [],
        out=out,
        restart=restart,
        allow_mixed=allow_mixed,
    )
    if not finished:
        notice("interrupted: run the same command again to resume")
        return EXIT_INTERRUPTED
    return 0


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
