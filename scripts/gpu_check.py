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

The parts: gpu_check_report.py (rows, the JSON, the budget and its watchdog),
gpu_check_model.py (shapes, prepared files, the model on the device), gpu_check_measure.py
(bandwidth and an engine's steps driven directly), gpu_check_grpc.py (takeovers through a
real server), gpu_check_memory.py (the plan, the peak, the OOM probe), gpu_check_sections.py
(each engine's sections and their rows); this file runs them in order and is the CLI.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file, with nothing of the project installed
    sys.path.insert(0, str(ROOT))

from scripts.gpu_check_measure import bandwidth  # noqa: E402
from scripts.gpu_check_model import (  # noqa: E402
    DEFAULT_PREPARED,
    SHAPES,
    build_model,
    extract_tokenizer,
    load_tokenizer,
    prepare,
)
from scripts.gpu_check_report import WATCHDOG_GRACE_S, Check, gib, start_watchdog  # noqa: E402
from scripts.gpu_check_sections import Setup, after_engine, engine_sections, probe_section  # noqa: E402


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "tokenizers", "grpcio", "protobuf"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


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
