"""Edge decode speed of two llama-cpp-python builds on this machine, side by side.

Each build lives in its own Python environment; each round runs both (order alternating,
ABBA) in child processes that load the same GGUF and decode the same greedy tokens, and the
report is the median of the per-round speed ratios. Used to check that the portable build
(scripts/llama_build.sh) is as fast as a native (GGML_NATIVE=ON) one:

    python -m scripts.bench_build --a .venv/bin/python --b /tmp/native/bin/python \\
        --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time
import llama_cpp
model, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = llama_cpp.Llama(model_path=model, n_ctx=1024, n_threads=threads, verbose=False)
prompt = llm.tokenize(b"Write a short story about a lighthouse keeper.", add_bos=True)
llm.eval(prompt)
out, started = 0, time.perf_counter()
for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=False):
    out += 1
    if out >= tokens:
        break
took = time.perf_counter() - started
info = llama_cpp.llama_print_system_info().decode().strip()
print(json.dumps({"tok_s": out / took, "tokens": out, "system_info": info}))
"""


def run_once(python: str, model: str, tokens: int, threads: int) -> dict:
    done = subprocess.run(
        [python, "-c", CHILD, model, str(tokens), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", required=True, help="Python of build A (ours)")
    parser.add_argument("--b", required=True, help="Python of build B (the baseline)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    ratios, speeds_a, speeds_b, infos = [], [], [], {}
    for i in range(args.rounds):
        order = ("a", "b") if i % 4 in (0, 3) else ("b", "a")
        result = {}
        for which in order:
            result[which] = run_once(getattr(args, which), args.model, args.tokens, args.threads)
            infos[which] = result[which]["system_info"]
        speeds_a.append(result["a"]["tok_s"])
        speeds_b.append(result["b"]["tok_s"])
        ratios.append(result["a"]["tok_s"] / result["b"]["tok_s"])
        print(
            f"round {i + 1}: A {result['a']['tok_s']:.1f} tok/s, B {result['b']['tok_s']:.1f} "
            f"tok/s, A/B {ratios[-1]:.3f}",
            file=sys.stderr,
        )
    report = {
        "ratio_a_over_b_median": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "a_tok_s_median": round(statistics.median(speeds_a), 1),
        "b_tok_s_median": round(statistics.median(speeds_b), 1),
        "a_system_info": infos["a"],
        "b_system_info": infos["b"],
        "tokens": args.tokens,
        "threads": args.threads,
        "model": args.model,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
