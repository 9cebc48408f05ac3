"""Tensor parallelism: every rank runs every engine call, in the same order (no torch here).

`specthink-cloud serve --tensor-parallel N` runs under torchrun, one process per device;
each holds a shard of the model (transformers' tensor-parallel plan), so every forward is
a collective that all N processes must enter with the same inputs. Rank 0 serves gRPC
and runs the engine loop as one process would; its `StepEngine` is wrapped in a
`ReplicatedStepEngine` that sends each call that changes the engine's state (start, a
prefill step, a decode step, finish, drop) to the other ranks before running it. Those
ranks run `follow`: they replay the calls on their own engine, so their KV caches and
batches evolve as rank 0's do. The transport is a `Channel` (`cloud.engine.tensor_parallel`
implements it with torch.distributed on a gloo group).

What must be equal on every rank, and how it is made so:
  the prompt        planned on rank 0 in the caller's thread (tokenize, check); the plan's
                    arguments travel with `start`, and each rank plans the same call
  sampling          rank 0 gives a request without a seed one before planning, so every
                    rank draws the same tokens from the same logits
  cancellation      should_stop() is rank 0's alone: the other ranks never call it, they
                    learn of it from rank 0's `finish`
  time              the engine's clock (session TTL) reads the time rank 0 sent with the
                    call; engine state derived from measured speed (`REPLICATED_STATE`,
                    e.g. the prefill chunk while others decode) is rank 0's, sent along
  memory budget     the smallest budget of any rank (`cloud.engine.tensor_parallel`)
  failures          after each call the ranks compare outcomes (ok, or the exception's
                    type); ranks that disagree have diverged, and the job stops
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from cloud.engine_api import (
    CacheStats,
    EngineCancelled,
    EngineInfo,
    Run,
    StepEngine,
)
from shared.wire import Message, Sampling

log = logging.getLogger(__name__)

# Engine attributes decided from measured time on rank 0 that change what a step computes
# (the width of a prefill chunk shared with decoding runs): sent with every call.
REPLICATED_STATE = ("_prefill_rate",)
# Rank 0 sends a message at least this often, so an idle server's ranks never reach the
# transport's timeout.
HEARTBEAT_S = 60.0
EXIT_DIVERGED = 70


def launch_problem(tensor_parallel: int, env: dict[str, str]) -> str | None:
    """Why this process cannot serve with `--tensor-parallel N`, in one line, or None."""
    if tensor_parallel <= 1:
        return None
    how = (
        f"launch one process per device: torchrun --nproc-per-node {tensor_parallel} "
        f"-m cloud.cli serve --tensor-parallel {tensor_parallel} ... "
        f"(or torchrun --nproc-per-node {tensor_parallel} --no-python specthink-cloud serve ...)"
    )
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")):
        return f"--tensor-parallel {tensor_parallel} needs torchrun: {how}"
    if env["WORLD_SIZE"] != str(tensor_parallel):
        return (
            f"--tensor-parallel {tensor_parallel}, but torchrun started {env['WORLD_SIZE']} "
            f"processes: {how}"
        )
    return None


def rank_of(env: dict[str, str]) -> int:
    return int(env.get("RANK", "0"))


class Channel(Protocol):
    """Rank 0 to every rank, in order; and one value from every rank to every rank."""

    rank: int
    world_size: int

    def send(self, message: Any) -> None:
        """Rank 0: deliver `message` to every other rank (they call receive)."""
        ...

    def receive(self) -> Any:
        """Ranks > 0: the next message rank 0 sent."""
        ...

    def agree(self, value: str) -> list[str]:
        """Every rank's value, in rank order (every rank calls it)."""
        ...


@dataclass(frozen=True)
class Call:
    """One engine call, as it travels from rank 0."""

    op: str  # start, prefill, decode, finish, drop, tick, close
    now: float  # rank 0's clock for this call
    state: dict[str, Any]  # REPLICATED_STATE, as rank 0 has it
    args: tuple[Any, ...] = ()


class SharedClock:
    """The engine's clock: the time rank 0 gave the call being run."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


def _never_stop() -> bool:
    return False


def _portable(value: Any) -> Any:
    """`value` as another rank gets it: a callable (should_stop) becomes one that never
    stops, also in a dataclass's fields (a request type folding the parameters)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _never_stop
            for f in dataclasses.fields(value)
            if callable(getattr(value, f.name)) and not isinstance(getattr(value, f.name), type)
        }
        return dataclasses.replace(value, **changes) if changes else value  # type: ignore[type-var]
    if callable(value) and not isinstance(value, type):
        return _never_stop
    return value


def _seeded(value: Any, seed: Callable[[], int]) -> Any:
    """`value` with a seed in every `Sampling` that has none (itself or a field)."""
    if isinstance(value, Sampling):
        return value if value.seed is not None else dataclasses.replace(value, seed=seed())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _seeded(getattr(value, f.name), seed)
            for f in dataclasses.fields(value)
            if isinstance(getattr(value, f.name), Sampling)
        }
        return dataclasses.replace(value, **changes) if changes else value  # type: ignore[type-var]
    return value


def _fresh_seed() -> int:
    return secrets.randbits(63)


def _outcome(error: BaseException | None) -> str:
    return "ok" if error is None else type(error).__name__


def _diverged(outcomes: list[str]) -> None:
    """Ranks whose engines no longer hold the same state cannot compute together."""
    log.critical(
        "tensor-parallel ranks diverged (outcome per rank: %s): stopping the job", outcomes
    )
    logging.shutdown()
    os._exit(EXIT_DIVERGED)


@dataclass
class _Plan:
    kind: str  # generate or prefill
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class ReplicatedStepEngine:
    """Rank 0's `StepEngine`: each state-changing call goes to every rank, then runs here.

    Planning (tokenize, check) stays in the caller's thread and sends nothing; the plan
    travels with `start`. One lock orders the calls: what the engine thread runs and a
    drop from a gRPC thread reach every rank in the order they ran here.
    """

    def __init__(
        self,
        engine: StepEngine,
        channel: Channel,
        clock: SharedClock,
        *,
        on_diverged: Callable[[list[str]], None] = _diverged,
        seed: Callable[[], int] = _fresh_seed,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.engine = engine
        self.channel = channel
        self.clock = clock
        self.info: EngineInfo = engine.info
        self.calls: Counter[str] = Counter()  # calls sent, by op
        self._on_diverged = on_diverged
        self._seed = seed
        self._lock = threading.Lock()
        self._plans: dict[int, _Plan] = {}  # id(run) -> its plan, until started
        self._plans_lock = threading.Lock()
        self._ids: dict[int, tuple[int, Run]] = {}  # id(run) -> (run id, run), started
        self._next_id = 0
        self._sent_at = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat_s = heartbeat_s
        self._heart = threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True)
        self._heart.start()

    # ---- planning (the caller's thread; nothing sent) -------------------------------

    def plan_generate(self, *args: Any, **kwargs: Any) -> Run:
        args = tuple(_seeded(a, self._seed) for a in args)
        kwargs = {k: _seeded(v, self._seed) for k, v in kwargs.items()}
        run = self.engine.plan_generate(*args, **kwargs)
        self._remember(run, _Plan("generate", args, kwargs))
        return run

    def plan_prefill(self, *args: Any, **kwargs: Any) -> Run:
        run = self.engine.plan_prefill(*args, **kwargs)
        self._remember(run, _Plan("prefill", args, kwargs))
        return run

    def _remember(self, run: Run, plan: _Plan) -> None:
        """Keep what the other ranks need to plan the same call, until it starts (a call
        cancelled while waiting never starts: its plan goes with the run)."""
        portable = _Plan(
            plan.kind,
            tuple(_portable(a) for a in plan.args),
            {k: _portable(v) for k, v in plan.kwargs.items()},
        )
        key = id(run)
        with self._plans_lock:
            self._plans[key] = portable
        with contextlib.suppress(TypeError):  # not weak-referenceable: kept until started
            weakref.finalize(run, self._forget_plan, key)

    def _forget_plan(self, key: int) -> None:
        with self._plans_lock:
            self._plans.pop(key, None)

    # ---- the calls every rank runs ---------------------------------------------------

    def start(self, run: Run) -> None:
        with self._plans_lock:
            plan = self._plans.pop(id(run))
        rid = self._next_id
        self._next_id += 1
        self._ids[id(run)] = (rid, run)
        self._run("start", (rid, plan.kind, plan.args, plan.kwargs), lambda: self.engine.start(run))

    def prefill_step(self, runs: Sequence[Run], sharing: bool) -> None:
        self._run(
            "prefill", (self._rids(runs), sharing), lambda: self.engine.prefill_step(runs, sharing)
        )

    def decode_step(self, runs: Sequence[Run]) -> None:
        self._run("decode", (self._rids(runs),), lambda: self.engine.decode_step(runs))

    def finish(self, runs: Sequence[Run]) -> None:
        rids = self._rids(runs)
        for run in runs:
            self._ids.pop(id(run), None)
        self._run("finish", (rids,), lambda: self.engine.finish(runs))

    def drop(self, session: str) -> bool:
        found: list[bool] = []
        self._run("drop", (session,), lambda: found.append(self.engine.drop(session)))
        return bool(found and found[0])

    def close(self) -> None:
        """The other ranks leave their loop (once; later calls are refused)."""
        with self._lock:
            if not self._closed.is_set():
                self._closed.set()
                self.channel.send(Call("close", time.monotonic(), {}))

    def _rids(self, runs: Sequence[Run]) -> list[int]:
        return [self._ids[id(r)][0] for r in runs]

    def _run(self, op: str, args: tuple[Any, ...], local: Callable[[], None]) -> None:
        """Send the call, run it here, and compare outcomes with every rank."""
        with self._lock:
            if self._closed.is_set():
                raise EngineCancelled("tensor-parallel engine closed")
            self.clock.now = time.monotonic()
            state = {
                k: getattr(self.engine, k) for k in REPLICATED_STATE if hasattr(self.engine, k)
            }
            self.channel.send(Call(op, self.clock.now, state, args))
            self._sent_at = time.monotonic()
            self.calls[op] += 1
            error: BaseException | None = None
            try:
                local()
            except BaseException as exc:
                error = exc
            outcomes = self.channel.agree(_outcome(error))
            if len(set(outcomes)) > 1:
                self._on_diverged(outcomes)
            if error is not None:
                raise error

    def _beat(self) -> None:
        while not self._closed.wait(self._heartbeat_s / 4):
            if time.monotonic() - self._sent_at < self._heartbeat_s:
                continue
            with self._lock:
                if self._closed.is_set():
                    return
                self.clock.now = time.monotonic()
                self.channel.send(Call("tick", self.clock.now, {}))
                self._sent_at = time.monotonic()

    # ---- local only ------------------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        """What else the command line reads of the engine (its memory plan, load figures):
        rank 0's engine's."""
        if name == "engine":  # not set yet (during __init__): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def count_tokens(self, messages: Sequence[Message], assistant_text: str) -> int:
        return self.engine.count_tokens(messages, assistant_text)

    def cache_stats(self) -> CacheStats:
        return self.engine.cache_stats()


def follow(engine: StepEngine, channel: Channel, clock: SharedClock) -> Counter[str]:
    """Ranks > 0: replay rank 0's calls on `engine` until it closes; returns the calls run,
    by op. Nothing here calls should_stop(): rank 0 decides, its `finish` says so."""
    runs: dict[int, Run] = {}
    calls: Counter[str] = Counter()
    while True:
        call: Call = channel.receive()
        clock.now = call.now
        if call.op == "close":
            return calls
        if call.op == "tick":
            continue
        for key, value in call.state.items():
            if hasattr(engine, key):
                setattr(engine, key, value)
        calls[call.op] += 1
        error: BaseException | None = None
        try:
            _replay(engine, runs, call)
        except BaseException as exc:  # rank 0 should have failed alike: agree() checks
            error = exc
        outcomes = channel.agree(_outcome(error))
        if len(set(outcomes)) > 1:
            _diverged(outcomes)


def _replay(engine: StepEngine, runs: dict[int, Run], call: Call) -> None:
    if call.op == "start":
        rid, kind, args, kwargs = call.args
        plan = engine.plan_generate if kind == "generate" else engine.plan_prefill
        runs[rid] = run = plan(*args, **kwargs)
        engine.start(run)
    elif call.op == "prefill":
        rids, sharing = call.args
        engine.prefill_step([runs[r] for r in rids], sharing)
        _drain(runs[r] for r in rids)
    elif call.op == "decode":
        (rids,) = call.args
        engine.decode_step([runs[r] for r in rids])
        _drain(runs[r] for r in rids)
    elif call.op == "finish":
        (rids,) = call.args
        finished = [runs.pop(r) for r in rids if r in runs]
        engine.finish(finished)
    elif call.op == "drop":
        (session,) = call.args
        engine.drop(session)
    else:
        raise ValueError(f"unknown tensor-parallel call {call.op!r}")


def _drain(runs: Iterator[Run]) -> None:
    """Nobody reads a follower's text: let it go as it is written."""
    for run in runs:
        run.take()
