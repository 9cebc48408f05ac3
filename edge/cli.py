"""`specthink-edge`: ask, chat, eval, config, models. The signature is the CLI; the
docstring is the help. Heavy imports (llama.cpp, grpc channels) happen inside commands.

Exit codes: 0 done; 1 runtime failure; 2 bad input; 3 the cloud refused our credentials;
4 the cloud rejected the request; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from edge.config import ConfigError, EffectiveConfig, auto_threads, config_app, resolve
from edge.models import models_app

EXIT_RUNTIME, EXIT_USAGE, EXIT_AUTH, EXIT_REJECTED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
EXIT_CLOUD_UNREACHABLE = 5  # the answer was written, but by the edge alone

app = typer.Typer(
    help="SpecThink edge: a small model on this machine reasons; a large one in the cloud "
    "takes over where it reflects.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config_app, name="config")
app.add_typer(models_app, name="models")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr, a non-zero exit, no traceback."""
    typer.echo(f"specthink-edge: error: {message}", err=True)
    raise typer.Exit(code)


def notice(message: str) -> None:
    typer.echo(f"specthink-edge: {message}", err=True)


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
        "--mode", help="reasoning or non-reasoning (a small model that never says 'Wait')."
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


def settings(**flags: Any) -> EffectiveConfig:
    try:
        return resolve(flags)
    except ConfigError as exc:
        fail(str(exc))


def policy_config(cfg: EffectiveConfig, knobs: list[str] | None) -> Any:
    from shared import policy

    try:
        config = policy.PolicyConfig()
        if cfg.policy_file:
            config = policy.load_policy_file(cfg.policy_file)
        overrides: dict[str, Any] = {"mode": cfg.mode}
        for knob in knobs or []:
            key, sep, value = knob.partition("=")
            if not sep:
                raise policy.PolicyConfigError(f"--set expects KEY=VALUE, got {knob!r}")
            overrides[key.strip()] = _knob_value(value.strip())
        return policy.config_from_mapping(overrides, config)
    except policy.PolicyConfigError as exc:
        fail(str(exc))


def _knob_value(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        return value


def load_drafter(cfg: EffectiveConfig) -> Any:
    from edge import bundled
    from edge.drafter import DrafterError, LlamaDrafter

    model = cfg.model
    if model is None:
        default = bundled.default_edge_model()
        if default is None:
            fail(
                "no model given and the embedded default is not installed: pass --model "
                "FILE.gguf, run 'specthink-edge models pull REPO:QUANT', or "
                f"'{bundled.SMOLLM2.install_hint}'"
            )
        model = str(default)
    else:
        model = _resolve_model_name(model)
    try:
        return LlamaDrafter(
            model,
            context_length=cfg.context_length,
            gpu_layers=cfg.gpu_layers,
            threads=cfg.threads or auto_threads(),  # what `config show` says
            seed=cfg.seed,
        )
    except DrafterError as exc:
        fail(str(exc))


class LazyDrafter:
    """The cloud strategy loads the small model only if the cloud fails and the edge has
    to write on alone."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self.drafter: Any = None

    @property
    def counters(self) -> Any:
        return getattr(self.drafter, "counters", None)

    def draft(self, *args: Any, **kwargs: Any) -> Any:
        if self.drafter is None:
            notice("loading the local model to write on without the cloud")
            self.drafter = self._load()
        return self.drafter.draft(*args, **kwargs)


def _resolve_model_name(model: str) -> str:
    """A path as given, or the name of a model in the local store."""
    if Path(model).expanduser().exists() or (
        model.endswith(".gguf") and "/" not in model.strip("./")
    ):
        return model
    from edge import models

    try:
        return str(models.path(model))
    except models.ModelError:
        return model  # let the drafter report "not found" with the path as typed


def connect_cloud(cfg: EffectiveConfig, strategy: str, local_only: bool) -> tuple[Any, str]:
    """The gRPC transport (or None) and the strategy that will really run."""
    if local_only or strategy == "edge":
        return None, "edge"
    if not cfg.cloud:
        if strategy == "cloud":
            fail("--strategy cloud needs a cloud: pass --cloud HOST:PORT or set SPECTHINK_CLOUD")
        notice("no cloud configured (--cloud or SPECTHINK_CLOUD): running edge-only")
        return None, "edge"
    from edge.cloud_client import ClientOptions, GrpcCloud

    tls = bool(cfg.tls or cfg.tls_ca_file)
    options = ClientOptions(
        address=cfg.cloud,
        api_key=cfg.api_key,
        connect_timeout_s=cfg.connect_timeout_s,
        takeover_timeout_s=cfg.takeover_timeout_s,
        tls=tls,
        tls_ca_file=Path(cfg.tls_ca_file) if cfg.tls_ca_file else None,
        tls_cert_file=Path(cfg.tls_cert_file) if cfg.tls_cert_file else None,
        tls_key_file=Path(cfg.tls_key_file) if cfg.tls_key_file else None,
    )
    try:
        return GrpcCloud(options, notify=notice), strategy
    except OSError as exc:
        fail(f"cannot set up the cloud connection: {exc}")


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            fail("no prompt: pass it as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        fail("empty prompt")
    return prompt.strip()


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C inside: the first raises KeyboardInterrupt (the caller cancels the cloud
    call and keeps what is on screen); from then on a second one exits at once, even while
    the first is being cleaned up. Outside the block Ctrl-C behaves as Python's default."""

    def hard_exit(signum: int, frame: Any) -> None:
        os._exit(EXIT_INTERRUPTED)

    def first(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, hard_exit)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, first)
    interrupted = False
    try:
        yield
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if not interrupted:  # an interrupted run keeps the hard exit until it ends
            signal.signal(signal.SIGINT, previous)


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
    output = Output(json_out, jsonl, mark, hide_thinking, verbose, run.transport)
    session_id = uuid.uuid4().hex
    cloud_session = CloudSession(run.transport, session_id) if run.transport else None
    try:
        answer = run.answer(messages, cloud_session, output)
    finally:
        if run.transport is not None:
            run.transport.end_session(session_id)
            run.transport.close()
    if json_out:
        _print_json(answer.to_json(), run.strategy, run.drafter, run.transport)
    if verbose:
        _print_speeds(answer, run.transport)
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


@dataclass
class Output:
    """Where an answer goes: streamed text, JSON lines, or one JSON object at the end;
    fallbacks are said on stderr in every case."""

    json_out: bool
    jsonl: bool
    mark: str
    hide_thinking: bool
    verbose: bool
    transport: Any

    def sink(self) -> Any:
        from edge.render import JsonLinesRenderer, Quiet, StderrNotices, TextRenderer

        if self.json_out:
            return StderrNotices(Quiet())
        if self.jsonl:
            return StderrNotices(_WithRetries(JsonLinesRenderer(), self.transport))
        return TextRenderer(mark=self.mark, hide_thinking=self.hide_thinking, verbose=self.verbose)


class _WithRetries:
    """Adds the transport's retry count to the `done` event's stats."""

    def __init__(self, inner: Any, transport: Any) -> None:
        self.inner, self.transport = inner, transport

    def __call__(self, event: Any) -> None:
        if event.kind == "done" and self.transport is not None:
            event.data["stats"]["cloud_retries"] = self.transport.retries
        self.inner(event)


@dataclass
class Run:
    """What ask and chat share: settings, the small model, the cloud, the options."""

    cfg: EffectiveConfig
    drafter: Any
    transport: Any
    strategy: str
    options: Any
    prompt: str = ""
    last_partial: str = ""  # the text of the latest interrupted answer (chat keeps it)

    def answer(self, messages: list[Any], cloud_session: Any, output: Output) -> Any:
        """One answer through the session loop, with Ctrl-C and refusals handled: the
        partial answer is kept (and printed as JSON with --json/--jsonl), then exit."""
        from edge.session import CloudRefused, Event, SpeculativeSession
        from shared import errors

        sink = output.sink()
        loop = SpeculativeSession(self.drafter, cloud_session, self.options, sink=sink)
        try:
            with interruptible():
                return loop.run(messages)
        except KeyboardInterrupt:
            if self.transport is not None:
                self.transport.cancel_active()  # the server sees CANCELLED and stops
            partial = loop.answer_so_far("interrupted")
            self.last_partial = partial.text
            self._end(output, sink, partial, Event)
            notice("interrupted; the partial answer is kept")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except CloudRefused as refused:
            self._end(output, sink, refused.answer, Event)
            error = refused.error
            if isinstance(error, errors.Unauthenticated):
                fail(
                    f"the cloud at {self.cfg.cloud} refused the API key "
                    f"(--api-key-file on the cloud, SPECTHINK_API_KEY here): {error.message}",
                    EXIT_AUTH,
                )
            fail(
                f"the cloud at {self.cfg.cloud} rejected the request: {error.message}",
                EXIT_REJECTED,
            )

    def _end(self, output: Output, sink: Any, partial: Any, event: Any) -> None:
        if output.json_out:
            _print_json(partial.to_json(), self.strategy, self.drafter, self.transport)
        elif output.jsonl:
            sink(event("done", partial.to_json()))
        else:
            sink.close()


def prepare(
    *,
    model: str | None,
    cloud: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    mode: str | None,
    strategy: str | None,
    local_only: bool,
    policy_file: Path | None,
    knobs: list[str] | None,
    gpu_layers: int | None,
    threads: int | None,
    mark: str,
    prefill_every: int,
    prompt: Callable[[], str] | None = None,
) -> Run:
    """Check every input, then load the small model and set up the cloud connection."""
    from edge.session import SessionOptions
    from shared.wire import Sampling

    if mark not in ("auto", "color", "brackets", "none"):
        fail("--mark takes auto, color, brackets or none")
    cfg = settings(
        model=model,
        cloud=cloud,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mode=mode,
        strategy=strategy,
        policy_file=str(policy_file) if policy_file else None,
        gpu_layers=gpu_layers,
        threads=threads,
    )
    text = prompt() if prompt is not None else ""
    policy = policy_config(cfg, knobs)
    cloud_only = cfg.strategy == "cloud" and bool(cfg.cloud) and not local_only
    # bad model: fail before any notice; the cloud strategy loads it only to fall back
    drafter = LazyDrafter(lambda: load_drafter(cfg)) if cloud_only else load_drafter(cfg)
    transport, run_strategy = connect_cloud(cfg, cfg.strategy, local_only)
    options = SessionOptions(
        strategy=run_strategy,
        max_tokens=cfg.max_tokens,
        policy=policy,
        sampling=Sampling(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed
        ),
        prefill_every=prefill_every,
    )
    return Run(cfg, drafter, transport, run_strategy, options, text)


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
    output = Output(False, jsonl, mark, hide_thinking, verbose, run.transport)
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
        _print_speeds(answer, run.transport)
    if answer.stats.fallback and not output.jsonl:
        notice(f"the cloud failed {answer.stats.fallbacks} time(s); written locally instead")
    return answer


def _history_text(text: str) -> str:
    from edge.render import strip_thinking

    return strip_thinking(text)


# ---- eval ------------------------------------------------------------------------------


@app.command("eval")
def eval_(
    dataset: Annotated[Path, typer.Argument(help="JSONL of problems (MATH-500, AIME 2024 ...).")],
    cloud: CloudOpt = None,
    model: ModelOpt = None,
    limit: Annotated[int | None, typer.Option("--limit", help="First N problems.", min=1)] = None,
    levels: Annotated[str | None, typer.Option("--levels", help="MATH levels, e.g. 1,2.")] = None,
    strategies: Annotated[
        str, typer.Option("--strategy", help="Comma-separated strategies.")
    ] = "speculative,edge,cloud",
    max_tokens: MaxTokensOpt = None,
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
    gpu_layers: GpuOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Run DATASET under each strategy: accuracy, tokens, measured speed; table, JSON, PNG.

    Results are appended per problem to OUT/results.jsonl: an interrupted run resumes."""
    from datetime import date

    from edge import evaluate
    from edge.session import CloudSession, SessionOptions, SpeculativeSession
    from shared.wire import Message, Sampling

    wanted = [s.strip() for s in strategies.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in ("speculative", "edge", "cloud")]
    if not wanted or unknown:
        fail(
            f"--strategy takes speculative, edge and/or cloud, not {', '.join(unknown) or 'nothing'}"
        )
    try:
        level_set = {int(x) for x in levels.split(",")} if levels else None
        problems = evaluate.load_problems(dataset, level_set, limit)
    except ValueError:
        fail(f"--levels takes comma-separated integers, not {levels!r}")
    except evaluate.EvalError as exc:
        fail(str(exc))
    cfg = settings(
        model=model,
        cloud=cloud,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        mode=mode,
        policy_file=str(policy_file) if policy_file else None,
        gpu_layers=gpu_layers,
        threads=threads,
    )
    policy = policy_config(cfg, knobs)
    needs_cloud = any(s != "edge" for s in wanted)
    if needs_cloud and not cfg.cloud:
        fail("strategies speculative and cloud need a cloud: pass --cloud HOST:PORT")
    transport, _ = connect_cloud(cfg, "speculative", local_only=not needs_cloud)
    drafter = load_drafter(cfg) if any(s != "cloud" for s in wanted) else None
    sampling = Sampling(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed
    )

    def answer_fn(prompt: str, strategy: str) -> dict[str, Any]:
        session_id = uuid.uuid4().hex
        cloud_session = CloudSession(transport, session_id) if strategy != "edge" else None
        options = SessionOptions(
            strategy=strategy, max_tokens=cfg.max_tokens, sampling=sampling, policy=policy
        )
        loop = SpeculativeSession(drafter, cloud_session, options)  # type: ignore[arg-type]
        try:
            return loop.run([Message("user", prompt)]).to_json()
        finally:
            if cloud_session is not None:
                transport.end_session(session_id)

    out_dir = out or Path("eval-results") / dataset.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    run_config = {
        "dataset": dataset.name,
        "levels": sorted(level_set) if level_set else None,
        "limit": limit,
        "strategies": wanted,
        "max_tokens": cfg.max_tokens,
        "mode": cfg.mode,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "seed": cfg.seed,
        "edge_model": str(getattr(drafter, "path", "")),
        "policy": {k: v for k, v in vars(policy).items() if k != "mode"},
    }
    rows: list[Any] = []
    interrupted = False
    try:
        rows = evaluate.run_eval(
            problems,
            wanted,
            answer_fn,
            out_dir / "results.jsonl",
            progress=sys.stderr.isatty(),
            run_config=run_config,
            restart=restart,
        )
    except evaluate.EvalInterrupted as stop:
        rows, interrupted = stop.rows, True
    except evaluate.EvalError as exc:
        fail(str(exc))
    finally:
        if transport is not None:
            transport.close()
    summaries = evaluate.summarize(rows)
    typer.echo(evaluate.format_table(summaries))
    evaluate.write_report(summaries, rows, out_dir / "report.json", run_config=run_config)
    evaluate.plot(
        summaries, out_dir / "tradeoff.png", dataset=dataset.stem, date=date.today().isoformat()
    )
    notice(
        f"wrote {out_dir / 'report.json'}, {out_dir / 'tradeoff.png'} and "
        f"{out_dir / 'results.jsonl'}"
    )
    if interrupted:
        notice("interrupted: run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED)


def _print_json(result: dict[str, Any], strategy: str, drafter: Any, transport: Any = None) -> None:
    result["strategy"] = strategy
    counters = getattr(drafter, "counters", None)
    if counters is not None:
        result["stats"]["edge_evaluated_prompt_tokens"] = counters.evaluated_prompt_tokens
        result["stats"]["edge_prompt_tokens"] = counters.prompt_tokens
    if transport is not None:
        result["stats"]["cloud_retries"] = transport.retries
    typer.echo(json.dumps(result, ensure_ascii=False))


def _print_speeds(answer: Any, transport: Any = None) -> None:
    """-v: one line of timings and speeds on stderr."""
    s = answer.stats
    edge_rate = s.edge_tokens / s.edge_draft_s if s.edge_draft_s else 0.0
    cloud_rate = s.cloud_tokens / s.cloud_wait_s if s.cloud_wait_s else 0.0
    total = s.edge_tokens + s.cloud_tokens
    retries = transport.retries if transport is not None else 0
    notice(
        f"{total} tokens in {s.wall_s:.2f} s ({total / s.wall_s if s.wall_s else 0:.1f} tok/s), "
        f"first token {s.ttft_s:.2f} s | edge {s.edge_tokens} tok at {edge_rate:.1f} tok/s | "
        f"cloud {s.cloud_tokens} tok at {cloud_rate:.1f} tok/s incl. network, "
        f"{s.takeovers} takeovers, {s.cloud_wait_s:.2f} s waiting on the cloud | "
        f"cloud cache {s.cloud_cached_tokens} cached / {s.cloud_prefill_tokens} prefilled | "
        f"{retries} retries, {s.full_text_resends} full-text resends, {s.fallbacks} fallbacks"
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
