"""The prepared device check (issue #19, item 6): a randomly initialised model of a named
architecture, built directly on the device, measured through the project's engines and a
real gRPC server on loopback. No weights and no network: only a tokenizer carried as files.

    python scripts/gpu_check.py --prepare build/gpu_check     # here: tokenizer/ and wheels/
    python scripts/gpu_check.py --shape 32b --tokenizer build/gpu_check/tokenizer --out DIR
    python scripts/gpu_check.py --shape tiny --out DIR         # CPU; the test suite runs this

`--shape 32b` is Qwen2.5-32B's architecture (Qwen2ForCausalLM, 64 layers, 5120 wide, GQA
40/8, vocab 152064) in bf16; `--shape tiny` the same family at toy size, with the same real
tokenizer, so the gRPC path is the real one. docs/gpu.md says how to run it on a lent H200
in one call, and what each row means.

Sections, in the order they run (printed as they finish, and DIR/gpu_check.json rewritten
after each, so a run stopped early still leaves its results):

  build      the model on the device (weights drawn at random; logits checked finite)
  bandwidth  device-to-device copy (bytes read + written / time) and the roofline: the bytes
             one decode step must read (every weight but the input embedding) / bandwidth
  decode     per engine: decode tok/s at batch 1, 8, 32, 64, the steps timed apart from prefill
  prefill    per engine: one 2k-token prompt, tok/s
  overhead   per engine: a decode step's wall time vs the GPU's busy time in it (the sum of
             its kernels, from torch.profiler): what the host costs
  grpc       per engine: a real CloudServer around EngineThread on 127.0.0.1; 1 and 16
             sessions at once, 3 rounds of 20-token takeovers each (round 1 prefills, rounds
             2-3 find their session's cache): p50 / p99 per takeover, cached vs prefilled
  memory     per engine: peak GPU memory over its sections vs the engine's memory plan
  oom        per engine: max_running sessions at the longest context the plan (and the time
             left) allows, prefilled, then decoded together: did anything run out of memory

`--budget-s` is watched: a section that would overrun it is skipped, and the table says so;
a watchdog ends the process shortly after the budget with the JSON written.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, with nothing of the project installed
    sys.path.insert(0, str(ROOT))

DEFAULT_PREPARED = ROOT / "build" / "gpu_check"
TOKENIZER_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"  # Qwen2's tokenizer, bundled
# the wheels a device image may lack or hold too old for shared/rpc's generated code
WHEEL_PACKAGES = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
_GIB = float(1 << 30)

# Qwen2.5-32B's published config.json (the base model, which DeepSeek-R1-Distill-Qwen-32B
# keeps; the Instruct model differs only in rms_norm_eps 1e-6 and its eos id, neither of
# which changes speed or memory).
QWEN25_32B: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_hidden_layers": 64,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "max_position_embeddings": 131072,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": 131072,
    "max_window_layers": 64,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}
TINY = {
    **QWEN25_32B,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "max_window_layers": 2,
}


@dataclass(frozen=True)
class Shape:
    name: str
    config: dict[str, Any]
    context_length: int  # the engines' --context-length in the sections (sizes the plan)
    probe_context: int  # ... in the OOM probe
    budget_s: float  # default --budget-s
    decode_steps: int  # timed decode steps per batch size
    decode_prompt: int  # prompt tokens per session in the decode sweep
    probe_cap: int | None  # most prompt tokens per session in the OOM probe (None: the plan's)
    needs_s: dict[str, float]  # least seconds a section needs to be worth starting


SHAPES = {
    # context 4096 in the sections: the plan then holds 64 sessions (a paged slot is one
    # full context); the OOM probe serves Qwen2.5's usual 32k
    "32b": Shape(
        "32b",
        QWEN25_32B,
        context_length=4096,
        probe_context=32768,
        budget_s=450.0,
        decode_steps=16,
        decode_prompt=128,
        probe_cap=None,
        needs_s={"bandwidth": 5, "decode": 25, "prefill": 8, "overhead": 10, "grpc": 30, "oom": 40},
    ),
    "tiny": Shape(
        "tiny",
        TINY,
        context_length=4096,
        probe_context=4096,
        budget_s=240.0,
        decode_steps=6,
        decode_prompt=48,
        probe_cap=64,
        needs_s={"bandwidth": 1, "decode": 3, "prefill": 1, "overhead": 2, "grpc": 5, "oom": 3},
    ),
}
BATCHES = (1, 8, 32, 64)
PREFILL_TOKENS = 2048
TAKEOVER_TOKENS = 20
GRPC_SESSIONS = (1, 16)
GRPC_ROUNDS = 3
WATCHDOG_GRACE_S = 25.0

# goals (issue #19)
ROOFLINE_GOAL, ROOFLINE_WANTED = 0.7, 0.85
GAIN_32_GOAL = 20.0
TAKEOVER_P50_GOAL_S = 0.5

WORDS_TEXT = (
    "the keeper climbed stairs every evening counting steps lamp light sea wind rose night "
    "windows morning calm grey flat slate boat nets torn crew harbour rocks tide storm cliff "
    "gulls rope iron salt fog bell ship island shore wave north river stone field house door "
    "table bread water fire road hill tree winter summer letter number seven eleven because "
    "although perhaps quickly slowly carefully measured written remembered forgotten"
)
STRETCHES = (
    " The wind rose in the night and rattled the windows of the lamp room.",
    " By morning the sea was calm again, grey and flat as a slate.",
    " A fishing boat came in with its nets torn and its crew exhausted.",
)


# ---- the report: rows as they come, JSON after every section ----------------------------


@dataclass
class Row:
    section: str
    figure: str
    value: str
    goal: str = ""
    status: str = "info"  # MET | NOT MET | info | SKIPPED | ERROR | n/a


class Check:
    """The run's state: rows, results per section, the budget, and the JSON file."""

    def __init__(self, out: Path, budget_s: float, meta: dict[str, Any]) -> None:
        self.out = out
        self.budget_s = budget_s
        self.t0 = time.monotonic()
        self.meta = meta
        self.rows: list[Row] = []
        self.results: dict[str, Any] = {}
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.complete = False
        self._lock = threading.Lock()
        out.mkdir(parents=True, exist_ok=True)
        print(f"{'section':<16} {'figure':<58} {'value':<52} {'goal':<22} status", flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed

    def row(
        self, section: str, figure: str, value: str, goal: str = "", met: bool | None = None
    ) -> None:
        status = "info" if met is None else ("MET" if met else "NOT MET")
        self.add(Row(section, figure, value, goal, status))

    def add(self, r: Row) -> None:
        with self._lock:
            self.rows.append(r)
        print(f"{r.section:<16} {r.figure:<58} {r.value:<52} {r.goal:<22} {r.status}", flush=True)

    def note(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def section(
        self, name: str, needs_s: float, body: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Any] | None:
        """Run `body` if at least `needs_s` of the budget is left; record its result, or why
        it was skipped or failed; rewrite the JSON either way."""
        if self.left < needs_s:
            why = f"{self.left:.0f} s of the budget left, needs ~{needs_s:.0f} s"
            self.skipped.append(f"{name}: {why}")
            self.add(Row(name, "(section skipped)", why, "", "SKIPPED"))
            self.save()
            return None
        started = time.monotonic()
        try:
            result = body()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            self.errors.append(f"{name}: {text}\n{traceback.format_exc()}")
            self.add(Row(name, "(section failed)", text[:200], "", "ERROR"))
            result = {"error": text}
        if result is not None:
            result["section_s"] = round(time.monotonic() - started, 2)
            self.results[name] = result
        self.save()
        return result

    def document(self) -> dict[str, Any]:
        goals = [asdict(r) for r in self.rows if r.status in ("MET", "NOT MET")]
        return {
            "meta": self.meta,
            "budget_s": self.budget_s,
            "elapsed_s": round(self.elapsed, 2),
            "complete": self.complete,
            "rows": [asdict(r) for r in self.rows],
            "goals": {
                "met": sum(r["status"] == "MET" for r in goals),
                "not_met": sum(r["status"] == "NOT MET" for r in goals),
            },
            "sections": self.results,
            "skipped": self.skipped,
            "errors": self.errors,
        }

    def save(self) -> None:
        with self._lock:
            text = json.dumps(clean(self.document()), indent=1, default=str, allow_nan=False)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(text)
        tmp.replace(self.out / "gpu_check.json")


def clean(x: Any) -> Any:
    """JSON has no NaN or infinity: such numbers are written as null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def gib(n: float) -> str:
    return f"{n / _GIB:.2f} GiB"


# ---- preparing (here): the tokenizer as files, the wheels the device may lack ------------


def prepare(folder: Path, wheels: bool = True) -> None:
    """Write folder/tokenizer (Qwen2's tokenizer, from the bundled GGUF) and, with `wheels`,
    folder/wheels (grpcio, protobuf and the two grpcio add-ons at the versions installed
    here, for CPython 3.12 on x86-64)."""
    extract_tokenizer(folder / "tokenizer")
    if wheels:
        download_wheels(folder / "wheels")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"prepared {folder}: {size / (1 << 20):.1f} MiB in all", flush=True)


def extract_tokenizer(folder: Path) -> None:
    from transformers import AutoTokenizer

    from edge import bundled

    gguf = bundled.ensure(bundled.QWEN25_CODER_05B, ROOT / "models")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    print(
        f"tokenizer: {type(tokenizer).__name__} ({len(tokenizer)} ids) from {gguf.name} "
        f"-> {folder} ({size / (1 << 20):.1f} MiB)",
        flush=True,
    )


def wheel_command(folder: Path) -> list[str]:
    """`pip download` of WHEEL_PACKAGES, pinned to the versions installed here."""
    from importlib import metadata

    pins = [f"{name}=={metadata.version(name)}" for name in WHEEL_PACKAGES]
    platforms = [x for p in WHEEL_PLATFORMS for x in ("--platform", p)]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        *platforms,
        "-d",
        str(folder),
        *pins,
    ]


def download_wheels(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.whl"):
        old.unlink()  # one version of each: two would stop the install there
    subprocess.run(wheel_command(folder), check=True)
    names = sorted(p.name for p in folder.glob("*.whl"))
    print(f"wheels -> {folder}: {', '.join(names)}", flush=True)


def load_tokenizer(folder: Path) -> Any:
    """The carried tokenizer; `tokenizer.json` alone if this transformers cannot read the
    saved config (it was written by another version)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        print(f"  AutoTokenizer failed ({type(exc).__name__}: {exc}); tokenizer.json alone")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"),
            bos_token=config.get("bos_token"),
            eos_token=config.get("eos_token"),
            pad_token=config.get("pad_token"),
        )
        template = folder / "chat_template.jinja"
        if template.exists():
            tokenizer.chat_template = template.read_text()
        return tokenizer


# ---- the model: random weights of the named architecture, on the device -----------------


def build_model(shape: Shape, device: Any, first_special: int) -> tuple[Any, dict[str, Any]]:
    """Qwen2ForCausalLM of `shape`, allocated on `device` in bf16 and initialised there
    (transformers' own init: normal(0, 0.02) weights, unit norms). The output rows of the
    special and padding ids (from `first_special` on) are zeroed: their logit is then 0
    while the best of ~150k random logits is well above it, so a greedy takeover never
    ends on EOS or writes an id the tokenizer has no text for."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**{k: v for k, v in shape.config.items() if k != "model_type"})
    started = time.perf_counter()
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        except TypeError:  # a transformers before `dtype`
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    with torch.no_grad():
        model.lm_head.weight[first_special:].zero_()
    sync(device)
    build_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    # a decode step reads every weight once, except the input embedding (one row per token)
    step_bytes = weight_bytes - embed.numel() * embed.element_size()
    with torch.inference_mode():
        ids = torch.randint(0, first_special, (1, 16), device=device)
        logits = model(input_ids=ids).logits
        ok = bool(torch.isfinite(logits).all().item())
    info = {
        "class": type(model).__name__,
        "params": params,
        "weight_bytes": weight_bytes,
        "decode_step_bytes": step_bytes,
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "build_s": round(build_s, 2),
        "logits_finite": ok,
        "config": shape.config,
    }
    return model, info


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device: Any) -> dict[str, Any]:
    """Device-to-device copy of a buffer much larger than the cache: bytes read + written
    per second, median of timed copies (CUDA events on a GPU, the wall clock on a CPU)."""
    import torch

    cuda = device.type == "cuda"
    nbytes = (2 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 256)
    dst = torch.empty_like(src)
    times: list[float] = []
    for i in range(13):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000.0
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t
        if i >= 3:  # three warm-ups
            times.append(seconds)
    same = bool(torch.equal(dst, src))
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    seconds = statistics.median(times)
    return {
        "buffer_bytes": nbytes,
        "copies": len(times),
        "median_s": seconds,
        "bytes_per_s": 2 * nbytes / seconds,
        "copy_correct": same,
        "timer": "cuda events" if cuda else "wall clock",
    }


# ---- driving an engine's steps directly ----------------------------------------------------


def filler(tokenizer: Any, tokens: int, seed: int) -> str:
    """Text of about `tokens` tokens (random common words; cut at a token boundary)."""
    rng = random.Random(seed)
    words = WORDS_TEXT.split()
    text = " ".join(rng.choice(words) for _ in range(tokens + 8))
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    return str(tokenizer.decode(ids))


def greedy() -> Any:
    from shared.wire import Sampling

    return Sampling(temperature=0.0, top_p=1.0, top_k=0, seed=None)


class OutOfTime(Exception):
    """The section's share of the budget ran out in the middle of its work."""


@contextlib.contextmanager
def started_runs(
    engine: Any,
    n: int,
    prompt_tokens: int,
    max_tokens: int,
    tag: str,
    deadline: float | None = None,
    progress: dict[str, Any] | None = None,
) -> Iterator[tuple[list[Any], dict[str, Any]]]:
    """`n` generate calls on `engine`, planned, started and prefilled (timed apart from
    what follows); on exit they are finished and their sessions dropped, whatever
    happened. Past `deadline` (monotonic) the prefill stops with OutOfTime; `progress`
    is kept up to date with the tokens whose KV is computed."""
    from shared.wire import Message

    progress = progress if progress is not None else {}
    messages = [Message("user", "Continue the story.")]
    runs = [
        engine.plan_generate(
            f"{tag}-{i}",
            messages,
            f"({i}) " + filler(engine.tokenizer, prompt_tokens, seed=i),
            max_tokens,
            greedy(),
            (),
            lambda: False,
        )
        for i in range(n)
    ]
    info: dict[str, Any] = {"prompt_tokens": [len(r.prompt) for r in runs]}
    try:
        for run in runs:
            engine.start(run)
        sync(engine.device)
        started = time.perf_counter()
        steps = 0
        while filling := [r for r in runs if r.prefilling]:
            if deadline is not None and time.monotonic() > deadline:
                raise OutOfTime(f"prefill stopped after {steps} steps")
            engine.prefill_step(filling, sharing=False)
            steps += 1
            progress["kv_tokens"] = sum(len(r.s.ids) for r in runs if r.s is not None)
        sync(engine.device)
        info["prefill_s"] = time.perf_counter() - started
        info["prefill_steps"] = steps
        yield runs, info
    finally:
        try:
            engine.finish(runs)
        finally:
            for i in range(n):
                engine.drop(f"{tag}-{i}")


def decode_steps(engine: Any, runs: Sequence[Any], steps: int) -> list[float]:
    """Wall seconds of each of `steps` decode steps over the runs still going."""
    times: list[float] = []
    for _ in range(steps):
        going = [r for r in runs if not r.done]
        if not going:
            break
        sync(engine.device)
        t = time.perf_counter()
        engine.decode_step(going)
        sync(engine.device)
        times.append(time.perf_counter() - t)
    return times


def decode_sweep(check: Check, engine: Any, shape: Shape, tag: str) -> dict[str, Any]:
    """Decode tok/s at each batch size: the sessions prefilled first (timed apart), three
    warm-up steps, then `decode_steps` timed steps; tok/s = batch / median step."""
    warm = 3
    limit = engine.memory.max_running
    out: dict[str, Any] = {
        "batches": {},
        "prompt_tokens": shape.decode_prompt,
        "warm_steps": warm,
        "batch_limit": limit,
    }
    for b in BATCHES:
        if b > limit:  # the paged engine has no room for more; the loop would never admit more
            out["batches"][str(b)] = {"skipped": f"beyond the plan's batch limit {limit}"}
            continue
        if check.left < shape.needs_s["decode"] / 2:
            out["batches"][str(b)] = {"skipped": "the time budget"}
            continue
        max_tokens = warm + shape.decode_steps + 8
        with started_runs(engine, b, shape.decode_prompt, max_tokens, f"{tag}-dec{b}") as (
            runs,
            info,
        ):
            decode_steps(engine, runs, warm)
            times = decode_steps(engine, runs, shape.decode_steps)
            going = sum(not r.done for r in runs)
        step = statistics.median(times)
        out["batches"][str(b)] = {
            "batch": b,
            "step_s_median": step,
            "step_s_min": min(times),
            "step_s_max": max(times),
            "steps": len(times),
            "tok_s": b / step,
            "still_going": going,
            "prefill_s": info["prefill_s"],
            "prefill_steps": info["prefill_steps"],
        }
    return out


def prefill_2k(engine: Any, tag: str) -> dict[str, Any]:
    """One PREFILL_TOKENS prompt, the engine's own chunking (Engine.prefill), twice on fresh
    sessions; the faster counts (the first may still pay for lazy init)."""
    from shared.wire import Message

    messages = [Message("user", "Continue the story.")]
    tries = []
    for i in range(2):
        text = filler(engine.tokenizer, PREFILL_TOKENS - 20, seed=1000 + i)
        session = f"{tag}-pre{i}"
        sync(engine.device)
        t = time.perf_counter()
        done = engine.prefill(session, messages, text, lambda: False)
        sync(engine.device)
        wall = time.perf_counter() - t
        engine.drop(session)
        tokens = int(done.usage.prefilled_tokens)
        tries.append({"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall})
    best = max(tries, key=lambda x: x["tok_s"])
    return {
        "tries": tries,
        "tok_s": best["tok_s"],
        "tokens": best["tokens"],
        "chunk": getattr(engine, "prefill_chunk", None),
    }


def busy_union(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels may overlap on streams)."""
    total, end = 0.0, -math.inf
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def host_overhead(engine: Any, shape: Shape, batch: int, tag: str) -> dict[str, Any]:
    """Wall time of decode steps vs the GPU's busy time in them: the union of the kernels'
    intervals as torch.profiler records them. Wall time is taken without the profiler (it
    slows the host); on a CPU there is no device time to compare, only the wall."""
    import torch

    steps = 5
    with started_runs(engine, batch, shape.decode_prompt, 3 + 2 * steps + 8, tag) as (runs, _):
        decode_steps(engine, runs, 3)
        wall = statistics.median(decode_steps(engine, runs, steps))
        if engine.device.type != "cuda":
            return {"batch": batch, "wall_s": wall, "gpu_busy_s": None, "overhead": None}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            profiled = decode_steps(engine, runs, steps)
            torch.cuda.synchronize(engine.device)
        kernels = [
            (float(e.time_range.start), float(e.time_range.end))
            for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
        ]
    out: dict[str, Any] = {
        "batch": batch,
        "wall_s": wall,
        "profiled_wall_s": statistics.median(profiled) if profiled else None,
        "kernels_per_step": len(kernels) / max(1, len(profiled)),
        "gpu_busy_s": None,
        "overhead": None,
    }
    if kernels and profiled:
        busy = busy_union(kernels) / 1e6 / len(profiled)  # microseconds -> s per step
        out["gpu_busy_s"] = busy
        out["overhead"] = 1.0 - busy / wall if wall > 0 else None
    else:
        out["note"] = "the profiler recorded no device kernels"
    return out


# ---- gRPC: a real server on loopback, clients from shared/rpc ------------------------------


def grpc_takeovers(engine: Any, tag: str) -> dict[str, Any]:
    """A CloudServer around EngineThread(engine) on 127.0.0.1, as `serve` runs it; for 1 and
    16 sessions at once, each session takes over GRPC_ROUNDS times (its full text, then that
    text + what it was written + a stretch of its own), through the stub of shared/rpc."""
    from cloud.engine_thread import EngineThread
    from cloud.server import CloudServer, ServerOptions
    from shared.rpc import specthink_pb2 as pb
    from shared.rpc import specthink_pb2_grpc as pb_grpc
    from shared.wire import Message

    loop = EngineThread(engine)
    server = CloudServer(
        None, ServerOptions(host="127.0.0.1", port=0, reflection=False, max_waiting=64)
    )
    server.attach(loop)

    def warm_up() -> None:
        for _ in loop.generate(
            "__warmup__", [Message("user", "Hi")], "", 2, greedy(), (), lambda: False
        ):
            pass
        loop.drop("__warmup__")

    opening = filler(engine.tokenizer, 60, seed=7)
    out: dict[str, Any] = {"address": server.address, "max_running": loop.max_running}
    try:
        server.start(warm_up=warm_up)
        for n in GRPC_SESSIONS:
            out[str(n)] = grpc_phase(server.address, n, opening, f"{tag}-grpc{n}", pb, pb_grpc)
    finally:
        server.stop_now()
        loop.close()
        thread = getattr(loop, "_thread", None)
        if thread is not None:
            thread.join(timeout=30)
        # nothing of the server may keep the engine (a paged pool is most of the device)
        server.engine = server.servicer.engine = None
    return out


def grpc_phase(
    address: str, sessions: int, opening: str, tag: str, pb: Any, pb_grpc: Any
) -> dict[str, Any]:
    """`sessions` clients at once, each on its own channel and session id."""
    import grpc

    records: list[dict[str, Any]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(sessions)

    def one(i: int) -> None:
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.SpecThinkStub(channel)
        session = f"{tag}-{i}"
        text = f"({i}) {opening}"
        messages = [pb.ChatMessage(role="user", content="Continue the story.")]
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            barrier.wait(timeout=60)
            for r in range(GRPC_ROUNDS):
                request = pb.TakeoverRequest(
                    session_id=session,
                    full=pb.FullText(messages=messages, assistant_text=text),
                    sampling=pb.Sampling(temperature=0.0, top_p=1.0, top_k=0),
                    write=pb.WriteSpec(max_tokens=TAKEOVER_TOKENS),
                )
                started = time.perf_counter()
                first: float | None = None
                written = ""
                done = None
                for event in stub.Takeover(request, timeout=120):
                    if event.HasField("chunk"):
                        if first is None:
                            first = time.perf_counter() - started
                        written += event.chunk.text
                    else:
                        done = event.done
                wall = time.perf_counter() - started
                if done is None:
                    raise RuntimeError("the stream ended without its final message")
                with lock:
                    records.append(
                        {
                            "session": i,
                            "round": r,
                            "wall_s": wall,
                            "first_chunk_s": first,
                            "prompt": done.usage.prompt_tokens,
                            "cached": done.usage.cached_tokens,
                            "prefilled": done.usage.prefilled_tokens,
                            "generated": done.usage.generated_tokens,
                            "queue_s": done.timings.queue_s,
                            "prefill_s": done.timings.prefill_s,
                            "decode_s": done.timings.decode_s,
                        }
                    )
                text += written + STRETCHES[(i + r) % len(STRETCHES)]
            stub.EndSession(pb.EndSessionRequest(session_id=session), timeout=30)
        except Exception as exc:  # reported in the results, never hidden
            with lock:
                errors.append(f"session {i}: {type(exc).__name__}: {exc}"[:400])
        finally:
            channel.close()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return summarize_takeovers(sessions, records, errors)


def summarize_takeovers(
    sessions: int, records: list[dict[str, Any]], errors: list[str]
) -> dict[str, Any]:
    walls = [x["wall_s"] for x in records]
    first = [x for x in records if x["round"] == 0]
    later = [x for x in records if x["round"] > 0]
    return {
        "sessions": sessions,
        "rounds": GRPC_ROUNDS,
        "takeover_tokens": TAKEOVER_TOKENS,
        "takeovers": len(records),
        "p50_s": percentile(walls, 50),
        "p99_s": percentile(walls, 99),
        "prefilled_round_p50_s": percentile([x["wall_s"] for x in first], 50),
        "cached_rounds_p50_s": percentile([x["wall_s"] for x in later], 50),
        "first_chunk_p50_s": percentile(
            [x["first_chunk_s"] for x in records if x["first_chunk_s"] is not None], 50
        ),
        "generated": sum(x["generated"] for x in records),
        "prompt_tokens": sum(x["prompt"] for x in records),
        "cached_tokens": sum(x["cached"] for x in records),
        "prefilled_tokens": sum(x["prefilled"] for x in records),
        "later_rounds_cached_tokens": sum(x["cached"] for x in later),
        "later_rounds_prefilled_tokens": sum(x["prefilled"] for x in later),
        "errors": errors,
        "records": records,
    }


# ---- memory: the plan, the peak, and a probe at the plan's limits ---------------------------


def plan_of(engine: Any, weight_bytes: int) -> dict[str, Any]:
    """The engine's memory plan; `planned_bytes` (weights + KV budget + reserve) where the
    plan has it, else weights + KV budget, said so."""
    plan = engine.memory
    planned = getattr(plan, "planned_bytes", None)
    basis = "plan.planned_bytes (weights + KV budget + step reserve)"
    if planned is None:
        planned = weight_bytes + plan.budget_bytes
        basis = "weights + KV budget (the plan states no total)"
    return {
        "engine": getattr(engine, "kind", type(engine).__name__),
        "describe": plan.describe(),
        "budget_bytes": plan.budget_bytes,
        "budget_tokens": plan.budget_tokens,
        "bytes_per_token": plan.bytes_per_token,
        "max_running": plan.max_running,
        "context_length": plan.context_length,
        "free_bytes": plan.free_bytes,
        "weights_bytes": getattr(plan, "weights_bytes", None),
        "reserve_bytes": getattr(plan, "reserve_bytes", None),
        "sessions": getattr(plan, "sessions", None),
        "slots": getattr(plan, "slots", None),
        "planned_bytes": int(planned),
        "planned_basis": basis,
    }


def peak_memory(device: Any) -> dict[str, Any]:
    import torch

    if device.type != "cuda":
        return {"device": device.type, "max_rss_bytes": max_rss()}
    free, total = torch.cuda.mem_get_info(device)
    return {
        "device": "cuda",
        "max_allocated": int(torch.cuda.max_memory_allocated(device)),
        "max_reserved": int(torch.cuda.max_memory_reserved(device)),
        "allocated_now": int(torch.cuda.memory_allocated(device)),
        "free_now": int(free),
        "total": int(total),
    }


def max_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def release(device: Any) -> None:
    """Give the allocator's cache back (the plan's mem_get_info counts it as used) and start
    a new peak."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(exc: BaseException | None) -> bool:
    """torch's OutOfMemoryError or the engine's EngineOutOfMemory, here or as a cause."""
    seen = 0
    while exc is not None and seen < 8:
        if type(exc).__name__ in ("OutOfMemoryError", "EngineOutOfMemory"):
            return True
        if "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def oom_probe(
    engine: Any, shape: Shape, share_s: float, prefill_rate: float | None
) -> dict[str, Any]:
    """max_running sessions, each with as long a prompt as the KV budget and the context
    give it (or the time share allows, at the measured prefill rate), prefilled, then
    decoded together for a few steps. Any out-of-memory error, where it happened, and the
    peak memory."""
    plan = engine.memory
    sessions = plan.max_running
    new_tokens = 8
    room = 48  # the chat template around the text, and the tokens written
    per_session_plan = max(16, min(plan.budget_tokens // sessions, engine.context_length) - room)
    tokens, limited_by = per_session_plan, "the plan"
    if shape.probe_cap is not None and shape.probe_cap < tokens:
        tokens, limited_by = shape.probe_cap, f"--shape {shape.name}'s cap"
    if prefill_rate:
        # prefill at a long context is slower than the measured 2k: keep a margin
        by_time = int((share_s - 20.0) * prefill_rate * 0.6 / sessions)
        if by_time < tokens:
            tokens, limited_by = max(16, by_time), "the time budget"
    release(engine.device)
    out: dict[str, Any] = {
        "sessions": sessions,
        "context_length": engine.context_length,
        "prompt_tokens_each": tokens,
        "plan_tokens_each": per_session_plan,
        "limited_by": limited_by,
        "oom": False,
        "phase": "prefill",
    }
    progress: dict[str, Any] = {"kv_tokens": 0}
    deadline = time.monotonic() + share_s - 10.0
    tag = f"oom-{os.getpid()}"
    try:
        with started_runs(
            engine, sessions, tokens, new_tokens + 4, tag, deadline=deadline, progress=progress
        ) as (runs, info):
            out["phase"] = "decode"
            out["prefill_s"] = info["prefill_s"]
            out["decode_step_s"] = decode_steps(engine, runs, 4)
            progress["kv_tokens"] = sum(len(r.s.ids) for r in runs if r.s is not None)
            out["phase"] = "done"
    except OutOfTime as exc:
        out["stopped"] = f"the time budget: {exc}"
    except Exception as exc:
        if not is_oom(exc):
            raise
        out["oom"] = True
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    out["kv_tokens"] = progress["kv_tokens"]
    out["kv_fraction_of_budget"] = progress["kv_tokens"] / max(1, plan.budget_tokens)
    out["memory"] = peak_memory(engine.device)
    return out


# ---- the run -------------------------------------------------------------------------------


@dataclass
class Setup:
    """What every engine's sections share."""

    check: Check
    shape: Shape
    model: Any
    tokenizer: Any
    device: Any
    weight_bytes: int
    roofline_ms: float | None
    prefill_rates: dict[str, float] = field(default_factory=dict)


def make_engine(setup: Setup, name: str, context_length: int) -> Any:
    from cloud.engine import ENGINES

    release(setup.device)  # mem_get_info, which sizes the plan, counts the allocator's cache
    return ENGINES[name](
        setup.model,
        setup.tokenizer,
        model_id=f"random-qwen2.5-{setup.shape.name}",
        device=setup.device,
        loaded_from=f"random init ({setup.shape.name}, scripts/gpu_check.py)",
        max_cache_bytes=None,
        context_length=context_length,
        max_running=None,
    )


def after_engine(setup: Setup, name: str, where: str) -> None:
    """With the engine gone, device memory should be back to the weights."""
    release(setup.device)
    if setup.device.type != "cuda":
        return
    import torch

    left = int(torch.cuda.memory_allocated(setup.device)) - setup.weight_bytes
    setup.check.results.setdefault("left_after_engine", {})[f"{where}[{name}]"] = left
    if left > (1 << 30):
        setup.check.note(f"[{name}] {gib(left)} still allocated beyond the weights after {where}")


def engine_sections(setup: Setup, name: str, context_length: int) -> None:
    """decode, prefill, overhead, grpc and memory for one engine (alive only in here)."""
    check, shape = setup.check, setup.shape
    engine = make_engine(setup, name, context_length)
    tag = f"{name}-{os.getpid()}"
    plan = plan_of(engine, setup.weight_bytes)
    check.results[f"plan[{name}]"] = plan
    check.note(f"[{name}] {plan['describe']}")
    release(setup.device)

    def decode() -> dict[str, Any]:
        r = decode_sweep(check, engine, shape, tag)
        done = {int(k): v for k, v in r["batches"].items() if "tok_s" in v}
        for b, v in sorted(done.items()):
            if b == 1 and setup.roofline_ms:
                ratio = setup.roofline_ms / (v["step_s_median"] * 1000)
                r["roofline_ratio"] = ratio
                check.row(
                    f"decode[{name}]",
                    "batch 1: tok/s, ms/token, share of the roofline",
                    f"{v['tok_s']:.1f} tok/s, {v['step_s_median'] * 1000:.2f} ms = "
                    f"{ratio:.2f} of roofline",
                    f">= {ROOFLINE_GOAL} ({ROOFLINE_WANTED} wanted)",
                    ratio >= ROOFLINE_GOAL,
                )
            else:  # a step still reads every weight once: the roofline step is the same
                share = ""
                if setup.roofline_ms:
                    v["roofline_ratio"] = setup.roofline_ms / (v["step_s_median"] * 1000)
                    share = f" = {v['roofline_ratio']:.2f} of roofline"
                check.row(
                    f"decode[{name}]",
                    f"batch {b}: aggregate decode tok/s (step median)",
                    f"{v['tok_s']:.1f} tok/s, {v['step_s_median'] * 1000:.2f} ms/step{share}",
                )
        for b, v in r["batches"].items():
            if "skipped" in v:
                check.add(Row(f"decode[{name}]", f"batch {b}", v["skipped"], "", "SKIPPED"))
        if 1 in done and 32 in done:
            gain = done[32]["tok_s"] / done[1]["tok_s"]
            r["gain_32"] = gain
            check.row(
                f"decode[{name}]",
                "32 sessions: aggregate decode tok/s / one session",
                f"{gain:.1f}x ({done[32]['tok_s']:.1f} vs {done[1]['tok_s']:.1f} tok/s)",
                f">= {GAIN_32_GOAL:.0f}x",
                gain >= GAIN_32_GOAL,
            )
        return r

    def prefill() -> dict[str, Any]:
        r = prefill_2k(engine, tag)
        setup.prefill_rates[name] = r["tok_s"]
        check.row(
            f"prefill[{name}]",
            f"prefill tok/s, one {PREFILL_TOKENS // 1024}k-token prompt",
            f"{r['tok_s']:.0f} tok/s ({r['tokens']} tokens, chunks of {r['chunk']})",
        )
        return r

    def overhead() -> dict[str, Any]:
        r: dict[str, Any] = {}
        for b in (1, 32):
            if b > engine.memory.max_running:
                continue
            h = host_overhead(engine, shape, b, f"{tag}-ovh{b}")
            r[str(b)] = h
            if h["gpu_busy_s"] is None:
                why = h.get("note") or f"n/a on {engine.device.type}"
                value = f"wall {h['wall_s'] * 1000:.2f} ms/step; GPU busy: {why}"
            else:
                value = (
                    f"wall {h['wall_s'] * 1000:.2f} ms, GPU busy {h['gpu_busy_s'] * 1000:.2f} "
                    f"ms: host {h['overhead']:.0%} of the step"
                )
            check.row(f"overhead[{name}]", f"decode step at batch {b}: wall vs GPU busy", value)
        return r

    def rpc() -> dict[str, Any]:
        r = grpc_takeovers(engine, tag)
        for n in GRPC_SESSIONS:
            s = r[str(n)]
            value = (
                f"p50 {s['p50_s']:.3f} / p99 {s['p99_s']:.3f} s (round 1 "
                f"{s['prefilled_round_p50_s']:.3f}, 2-3 {s['cached_rounds_p50_s']:.3f}); "
                f"rounds 2-3 {s['later_rounds_cached_tokens']} cached / "
                f"{s['later_rounds_prefilled_tokens']} prefilled tok"
            )
            if s["errors"]:
                value += f"; {len(s['errors'])} ERRORS"
            goal = n == 16
            check.row(
                f"grpc[{name}]",
                f"{n} session{'s' if n > 1 else ''} x {GRPC_ROUNDS} rounds of "
                f"{TAKEOVER_TOKENS}-token takeovers",
                value,
                f"p50 <= {TAKEOVER_P50_GOAL_S} s" if goal else "",
                (s["p50_s"] <= TAKEOVER_P50_GOAL_S and not s["errors"]) if goal else None,
            )
        return r

    def memory() -> dict[str, Any]:
        peak = peak_memory(setup.device)
        r = {"plan": plan, "peak": peak}
        if setup.device.type != "cuda":
            value = f"n/a on {setup.device.type} (max RSS {gib(peak['max_rss_bytes'])})"
            check.add(
                Row(
                    f"memory[{name}]",
                    "peak GPU memory vs the plan",
                    value,
                    "within the plan",
                    "n/a",
                )
            )
            return r
        within = peak["max_allocated"] <= plan["planned_bytes"]
        r["within"] = within
        check.row(
            f"memory[{name}]",
            "peak GPU memory (decode, prefill, overhead, gRPC) vs the plan",
            f"{gib(peak['max_allocated'])} allocated ({gib(peak['max_reserved'])} reserved) "
            f"of {gib(plan['planned_bytes'])} planned",
            "within the plan",
            within,
        )
        return r

    check.section(f"decode[{name}]", shape.needs_s["decode"], decode)
    check.section(f"prefill[{name}]", shape.needs_s["prefill"], prefill)
    check.section(f"overhead[{name}]", shape.needs_s["overhead"], overhead)
    check.section(f"grpc[{name}]", shape.needs_s["grpc"], rpc)
    check.section(f"memory[{name}]", 0, memory)


def probe_section(setup: Setup, name: str, context_length: int, share_s: float) -> None:
    """The OOM probe for one engine, built for the probe's context (alive only in here)."""
    check = setup.check

    def probe() -> dict[str, Any]:
        engine = make_engine(setup, name, context_length)
        plan = plan_of(engine, setup.weight_bytes)
        check.note(f"[{name}] probe plan: {plan['describe']}")
        r = oom_probe(engine, setup.shape, share_s, setup.prefill_rates.get(name))
        r["plan"] = plan
        del engine
        if setup.device.type == "cuda":
            peak = r["memory"]["max_allocated"]
            mem = f"peak {gib(peak)} of {gib(plan['planned_bytes'])} planned"
            r["within_plan"] = peak <= plan["planned_bytes"]
        else:
            mem = f"no GPU: max RSS {gib(r['memory']['max_rss_bytes'])}"
        if r["oom"]:
            what = f"OOM in {r['phase']}"
        elif "stopped" in r:
            what = f"no OOM, but stopped by {r['stopped']}"
        else:
            what = "no OOM"
        check.row(
            f"oom[{name}]",
            f"{r['sessions']} sessions x {r['prompt_tokens_each']:,} tokens, context "
            f"{r['context_length']:,} ({r['kv_fraction_of_budget']:.0%} of the KV budget; "
            f"by {r['limited_by']})",
            f"{what}; {mem}",
            "no OOM at the plan's limits",
            not r["oom"],
        )
        return r

    check.section(f"oom[{name}]", setup.shape.needs_s["oom"], probe)


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "grpcio", "protobuf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def start_watchdog(check: Check, after_s: float) -> None:
    """End the process `after_s` from the start, JSON written, if it is still running."""

    def fire() -> None:
        check.errors.append(f"watchdog: still running {after_s:.0f} s after the start")
        with contextlib.suppress(Exception):
            check.save()
        print(f"gpu_check: the watchdog ended the run at {after_s:.0f} s", flush=True)
        os._exit(3)

    timer = threading.Timer(max(1.0, after_s - check.elapsed), fire)
    timer.daemon = True
    timer.start()


def run_check(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    shape = SHAPES[args.shape]
    budget = args.budget_s if args.budget_s is not None else shape.budget_s
    context = args.context_length or shape.context_length
    probe_context = args.probe_context or shape.probe_context
    tokenizer_dir = Path(args.tokenizer)
    if not (tokenizer_dir / "tokenizer.json").exists():
        print(f"no tokenizer in {tokenizer_dir}: extracting it from the bundled GGUF", flush=True)
        extract_tokenizer(tokenizer_dir)  # here only: the device has no GGUF
    import torch

    from cloud.engine import ENGINES

    names = list(ENGINES) if args.engines == "all" else args.engines.split(",")
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        print(f"gpu_check: unknown engine {unknown}; known: {', '.join(ENGINES)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device.type == "cuda"
    if not cuda:  # one thread: a shared CPU's contention stalls OpenMP's second thread
        torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {
        "shape": shape.name,
        "engines": names,
        "context_length": context,
        "probe_context": probe_context,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
        "versions": versions(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        meta["device_memory_bytes"] = int(props.total_memory)
        meta["multiprocessors"] = int(props.multi_processor_count)
    check = Check(Path(args.out), budget, meta)
    check.t0 = t_start
    start_watchdog(check, budget + WATCHDOG_GRACE_S)
    check.note(
        f"{shape.name} on {meta['device']} ({meta['device_name']}), budget {budget:.0f} s, "
        f"engines {', '.join(names)}, context {context:,} (OOM probe {probe_context:,})"
    )
    tokenizer = load_tokenizer(tokenizer_dir)
    # ids from the first special one on are never written (see build_model)
    first_special = min(
        [*tokenizer.all_special_ids, len(tokenizer), int(shape.config["vocab_size"])]
    )
    state: dict[str, Any] = {}

    def build() -> dict[str, Any]:
        model, info = build_model(shape, device, first_special)
        state["model"] = model
        info["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "ids": len(tokenizer),
            "first_special": first_special,
        }
        check.row(
            "build",
            f"{info['class']} {shape.name}: random {info['dtype']} weights on {device.type}",
            f"{info['params'] / 1e9:.2f}B params, {gib(info['weight_bytes'])}, "
            f"built in {info['build_s']:.1f} s",
        )
        check.row(
            "build",
            "logits of a 16-token forward",
            "finite" if info["logits_finite"] else "NaN or inf",
            "finite",
            info["logits_finite"],
        )
        return info

    built = check.section("build", 0, build)
    if "model" not in state or built is None:
        check.complete = True
        check.save()
        return 1
    step_bytes = int(built["decode_step_bytes"])

    def bw() -> dict[str, Any]:
        r = bandwidth(device)
        roofline_s = step_bytes / r["bytes_per_s"]
        r["decode_step_bytes"] = step_bytes
        r["roofline_ms_per_token"] = roofline_s * 1000
        check.row(
            "bandwidth",
            f"device-to-device copy, read + written ({r['timer']})",
            f"{r['bytes_per_s'] / 1e12:.3f} TB/s ({gib(r['buffer_bytes'])} buffer)",
            "copy correct",
            r["copy_correct"],
        )
        check.row(
            "bandwidth",
            "roofline at batch 1: weight bytes / bandwidth",
            f"{roofline_s * 1000:.2f} ms/token = {1 / roofline_s:.1f} tok/s "
            f"({step_bytes / 1e9:.2f} GB read per step)",
        )
        return r

    bw_result = check.section("bandwidth", shape.needs_s["bandwidth"], bw)
    setup = Setup(
        check,
        shape,
        state.pop("model"),
        tokenizer,
        device,
        int(built["weight_bytes"]),
        (bw_result or {}).get("roofline_ms_per_token"),
    )
    for name in names:
        engine_sections(setup, name, context)
        after_engine(setup, name, "its sections")
    # the OOM probes last: an out-of-memory error can leave nothing behind for the rest
    for i, name in enumerate(names):
        share = max(0.0, check.left - 5.0) / (len(names) - i)
        probe_section(setup, name, probe_context, share)
        after_engine(setup, name, "the OOM probe")

    check.complete = True
    check.save()
    met = sum(r.status == "MET" for r in check.rows)
    not_met = sum(r.status == "NOT MET" for r in check.rows)
    print(
        f"gpu_check: {met} goals met, {not_met} not met, {len(check.skipped)} sections "
        f"skipped, {len(check.errors)} errors, {check.elapsed:.0f} s -> "
        f"{Path(args.out) / 'gpu_check.json'}",
        flush=True,
    )
    return 1 if check.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prepare", metavar="DIR", help="write DIR/tokenizer and DIR/wheels")
    parser.add_argument("--no-wheels", action="store_true", help="--prepare the tokenizer only")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--out", metavar="DIR", help="where gpu_check.json is written")
    parser.add_argument(
        "--tokenizer",
        default=str(DEFAULT_PREPARED / "tokenizer"),
        help="the prepared tokenizer folder (extracted from the bundled GGUF if missing)",
    )
    parser.add_argument("--engines", default="all", help="comma-separated engine names, or all")
    parser.add_argument("--budget-s", type=float, help="seconds for the whole run")
    parser.add_argument("--context-length", type=int, help="the engines' context, for the plan")
    parser.add_argument("--probe-context", type=int, help="the OOM probe's context")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when there is one)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (1)")
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), wheels=not args.no_wheels)
        return 0
    if not args.out:
        parser.error("--out DIR is needed (or --prepare DIR)")
    return run_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
