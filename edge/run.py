"""From `EdgeOptions` to answers: `build_run` checks every input, then constructs the small
model, the cloud client and the renderer once; `Run.answer` runs one answer through the
session loop and returns an `Outcome`. Setup that cannot go on raises `EdgeError`; neither
prints an exit code's line: edge/cli.py does.

The order of `build_run` is the order a person hears about problems: settings, the prompt,
the policy knobs, the model file (cheap checks), the prompt's length against the context,
then the cloud client (its reachability check starts at once, in the background) and the
small model's load. Heavy imports (llama.cpp, grpc) happen in the functions that need them.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from types import FrameType, TracebackType
from typing import TYPE_CHECKING

from edge.config import SETTINGS, ConfigError, EffectiveConfig, resolve
from edge.options import EdgeOptions, Strategy
from edge.outcome import (
    EXIT_AUTH,
    EXIT_CLOUD_UNREACHABLE,
    EXIT_INTERRUPTED,
    EXIT_REJECTED,
    EdgeError,
    Notices,
    Outcome,
    notice_line,
)
from edge.policy_choice import policy_choice, with_mode
from edge.prompt_input import read_prompt, say_replaced, valid_text
from edge.small_model import LazyDrafter, check_prompt_fits, load_drafter, model_path

if TYPE_CHECKING:
    from edge.answer import Answer, EventSink
    from edge.cloud_client import GrpcCloud
    from edge.cloud_session import CloudSession
    from edge.drafter import LlamaDrafter
    from edge.reachability import BackgroundCheck, Reachability
    from edge.session import SessionOptions, SpeculativeSession
    from shared.wire import Message


SETTING_NAMES = frozenset(s.name for s in SETTINGS)

# ---- settings ----------------------------------------------------------------


def settings(options: EdgeOptions) -> EffectiveConfig:
    """The flags over SPECTHINK_* over the config file over the defaults."""
    given = {f.name: getattr(options, f.name) for f in fields(options) if f.name in SETTING_NAMES}
    if options.policy_file is not None:
        given["policy_file"] = str(options.policy_file)
    try:
        return resolve(given)
    except ConfigError as exc:
        raise EdgeError(str(exc)) from None


# ---- the cloud ---------------------------------------------------------------------------


def connect_cloud(
    cfg: EffectiveConfig,
    strategy: Strategy,
    local_only: bool,
    say: Callable[[str], None],
    check: bool = True,
) -> tuple[GrpcCloud | None, Strategy]:
    """The gRPC client (or None) and the strategy that will really run. With `check`, the
    client checks the cloud in the background from now on and an unusable one is said once,
    in one line, as soon as that is known."""
    if local_only or strategy is Strategy.EDGE:
        return None, Strategy.EDGE
    if not cfg.cloud:
        if strategy is Strategy.CLOUD:
            raise EdgeError(
                "--strategy cloud needs a cloud: pass --cloud HOST:PORT or set SPECTHINK_CLOUD"
            )
        say("no cloud configured (--cloud or SPECTHINK_CLOUD): running edge-only")
        return None, Strategy.EDGE
    from edge.cloud_client import ClientOptions, GrpcCloud

    try:
        client = GrpcCloud(ClientOptions.from_config(cfg), notify=say, check_reachability=check)
    except OSError as exc:
        raise EdgeError(f"cannot set up the cloud connection: {exc}") from None
    return client, strategy


# ---- Ctrl-C --------------------------------------------------------------------------------


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C inside: the first raises KeyboardInterrupt (the caller cancels the cloud
    call and keeps what is on screen); from then on a second one exits at once, even while
    the first is being cleaned up. Outside the block Ctrl-C behaves as Python's default
    once `soften_ctrl_c` is called (an interrupted run keeps the hard exit until then)."""

    def hard_exit(signum: int, frame: FrameType | None) -> None:
        os.write(2, notice_line("interrupted again; exiting now\n").encode())
        os._exit(EXIT_INTERRUPTED)

    def first(signum: int, frame: FrameType | None) -> None:
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


def soften_ctrl_c() -> None:
    """After an interrupted answer that the caller goes on from (a chat): Ctrl-C raises
    KeyboardInterrupt again instead of exiting at once."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ---- the run ------------------------------------------------------------------------------


@dataclass
class Run:
    """What ask and chat share: settings, the small model, the cloud client, the output.
    Built by `build_run`; a context manager that ends its cloud sessions and connection."""

    options: EdgeOptions
    cfg: EffectiveConfig
    drafter: LlamaDrafter | LazyDrafter
    transport: GrpcCloud | None  # None: the edge writes alone (strategy edge)
    strategy: Strategy
    session_options: SessionOptions
    say: Notices
    check: BackgroundCheck | None  # of the configured cloud (also when found unusable)
    prompt: str = ""
    mode_reason: str = ""  # which mode runs and why (--mode auto picks by the model)
    system: str = ""  # --system, as valid text
    _sessions: list[str] = field(default_factory=list)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            for session_id in self._sessions:
                self.transport.end_session(session_id)
            self.transport.close()
        self._sessions.clear()

    @property
    def small_model(self) -> LlamaDrafter | None:
        """The small model once loaded (the cloud strategy loads it only to fall back)."""
        drafter = self.drafter
        return drafter.loaded if isinstance(drafter, LazyDrafter) else drafter

    @property
    def cloud_unusable(self) -> Reachability | None:
        """The check's finding when the configured cloud could not be used at all."""
        found = self.check.peek() if self.check is not None else None
        return found if found is not None and not found.reachable else None

    def opening(self, messages: Sequence[Message]) -> list[Message]:
        """`messages` after the system message, when there is one."""
        return opening(self.system, messages)

    def cloud_session(self) -> CloudSession | None:
        """A new conversation with the cloud (one session, its cache reused across calls)."""
        from edge.cloud_session import CloudSession

        if self.transport is None:
            return None
        session_id = uuid.uuid4().hex
        self._sessions.append(session_id)
        return CloudSession(self.transport, session_id)

    def sink(self) -> EventSink:
        """The renderer of one answer: streamed text, JSON lines, or nothing until the end;
        fallbacks are said on stderr in every case."""
        from edge.render import JsonLinesRenderer, Quiet, StderrNotices, TextRenderer, WithStats
        from edge.run_report import report_stats

        # a cloud the check found unusable was said when found: its fallbacks are not again
        said = frozenset({"NeverReached"})
        if self.options.json_out:
            return StderrNotices(Quiet(), said=said)
        if self.options.jsonl:
            stats = WithStats(JsonLinesRenderer(), lambda s: report_stats(s, self))
            return StderrNotices(stats, said=said)
        return TextRenderer(
            mark=self.options.mark,
            hide_thinking=self.options.hide_thinking,
            verbose=self.options.verbose,
            said=said,
        )

    def answer(self, messages: Sequence[Message], cloud: CloudSession | None) -> Outcome:
        """One answer through the session loop. Ctrl-C and refusals end it as values: the
        partial answer is kept (and its `done` event sent with --jsonl)."""
        from edge.answer import CloudRefused
        from edge.session import SpeculativeSession
        from shared import errors

        sink = self.sink()
        loop = SpeculativeSession(self.drafter, cloud, self.session_options, sink=sink)
        try:
            with interruptible():
                answer = loop.run(messages)
        except KeyboardInterrupt:
            if self.transport is not None:
                self.transport.cancel_active()  # the server sees CANCELLED and stops
            partial = loop.answer_so_far("interrupted")
            self._end(loop, sink, partial)
            said = (
                "interrupted; the partial answer is kept"
                if partial.text
                else "interrupted before any text was written"
            )
            return Outcome(partial, EXIT_INTERRUPTED, said)
        except CloudRefused as refused:
            self._end(loop, sink, refused.answer)
            error = refused.error
            if isinstance(error, errors.Unauthenticated):
                return Outcome(
                    refused.answer,
                    EXIT_AUTH,
                    f"the cloud at {self.cfg.cloud} refused the API key "
                    f"(--api-key-file on the cloud, SPECTHINK_API_KEY here): {error.message}",
                    refused=True,
                )
            return Outcome(
                refused.answer,
                EXIT_REJECTED,
                f"the cloud at {self.cfg.cloud} rejected the request: {error.message}",
                refused=True,
            )
        return self._completed(answer)

    def _end(self, loop: SpeculativeSession, sink: EventSink, partial: Answer) -> None:
        from edge.answer import Event
        from edge.render import TextRenderer

        if self.options.jsonl:
            sink(Event("done", partial.to_json()))
        elif isinstance(sink, TextRenderer):
            sink.close()

    def _completed(self, answer: Answer) -> Outcome:
        unusable = self.cloud_unusable
        if unusable is not None and unusable.key_refused:  # no takeover met it: say it now
            return Outcome(
                answer,
                EXIT_AUTH,
                f"the cloud at {self.cfg.cloud} refused the API key (--api-key-file on the "
                "cloud, SPECTHINK_API_KEY here); the answer was written by the edge alone",
            )
        if unusable is not None:  # said in one line when it was found
            return Outcome(answer, EXIT_CLOUD_UNREACHABLE)
        if answer.stats.fallback and answer.stats.cloud_tokens == 0:
            return Outcome(
                answer,
                EXIT_CLOUD_UNREACHABLE,
                f"the cloud at {self.cfg.cloud} could not be used; the answer was written by "
                "the edge alone",
            )
        if answer.stats.fallback:
            return Outcome(
                answer,
                message=f"the cloud failed {answer.stats.fallbacks} time(s); those parts were "
                "written locally",
            )
        return Outcome(answer)


def build_run(options: EdgeOptions, prompt: str | None = None, *, asks: bool = False) -> Run:
    """Check every input, then load the small model and set up the cloud connection.
    `asks`: the run answers one prompt, `prompt` or stdin (read after the settings are known
    good, before anything loads)."""
    from edge.session import SessionOptions
    from shared.wire import Message, Sampling

    say = Notices()
    cfg = settings(options)
    text = read_prompt(prompt, say) if asks else ""
    system, replaced = valid_text(options.system or "")
    say_replaced("the system message", replaced, say)
    choice = policy_choice(cfg, options.knobs)
    strategy = Strategy(cfg.strategy)
    if options.local_only and strategy is Strategy.CLOUD:
        raise EdgeError(
            "--local-only never contacts the cloud, so --strategy cloud cannot run: drop one"
        )
    cloud_only = strategy is Strategy.CLOUD and bool(cfg.cloud) and not options.local_only
    if not cloud_only:
        model = model_path(cfg)  # a bad model: one line, before any notice
        if asks:  # the small model writes: its context must hold the prompt, and more
            check_prompt_fits(model, cfg.context_length, opening(system, [Message("user", text)]))
    transport, run_strategy = connect_cloud(cfg, strategy, options.local_only, say)
    drafter: LlamaDrafter | LazyDrafter
    if cloud_only:  # the cloud strategy loads the small model only to fall back
        drafter = LazyDrafter(lambda: load_drafter(cfg), say)
        policy, mode_reason = with_mode(choice, None)
    else:
        drafter = load_drafter(cfg)
        policy, mode_reason = with_mode(choice, drafter)
    check = transport.check if transport is not None else None
    found = transport.unusable if transport is not None else None
    if transport is not None and found is not None and not found.key_refused and not cloud_only:
        # known before the first token: write on this machine only (said once, by the check)
        transport.close()
        transport, run_strategy = None, Strategy.EDGE
    session_options = SessionOptions(
        strategy=run_strategy,
        max_tokens=cfg.max_tokens,
        policy=policy,
        sampling=Sampling(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed
        ),
        prefill_every=options.prefill_every,
        think_prefix="" if isinstance(drafter, LazyDrafter) else drafter.think_prefix,
    )
    return Run(
        options,
        cfg,
        drafter,
        transport,
        run_strategy,
        session_options,
        say,
        check,
        text,
        mode_reason,
        system,
    )


def opening(system: str, messages: Sequence[Message]) -> list[Message]:
    from shared.wire import Message

    return [*([Message("system", system)] if system else []), *messages]
