"""Choose the uncertainty trigger's thresholds on problems that are never reported.

Runs the edge model alone over the calibration sample (edge/datasets/math500-l123-calib.jsonl)
as the eval would (the paper's prompt and sampling), with the uncertainty trigger armed but a
threshold no probe reaches, so every paragraph break is probed and none hands over. Records
the entropy (nats) of the small model's next-token distribution at each probe token, and
prints the thresholds at which a given share of breaks would hand over:

    .venv/bin/python -m scripts.calibrate_uncertainty --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Writes bench-results/uncertainty_calibration.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edge import datasets
from edge.cloud_session import CloudSession
from edge.drafter import LlamaDrafter
from edge.session import SessionOptions, SpeculativeSession
from shared.policy import Mode, PolicyConfig, Trigger
from shared.wire import Message, Sampling

NEVER = 1e9  # a threshold no entropy reaches: probe every break, never hand over
SHARES = (0.2, 0.35, 0.5)  # shares of breaks that would hand over


class NoCloud:
    """A transport the loop never calls (nothing reaches the threshold)."""

    def takeover(self, call: Any) -> Iterator[Any]:
        raise AssertionError("calibration never hands over")

    def prefill(self, session_id: str, text: Any) -> tuple[int, str]:
        raise AssertionError("calibration never prefills")


class Recording:
    """Wraps the drafter to keep each probe's per-token entropies."""

    def __init__(self, drafter: LlamaDrafter) -> None:
        self.drafter = drafter
        self.probes: list[list[float]] = []

    def draft(self, *args: Any, uncertainty: bool = False, **kwargs: Any) -> Iterator[Any]:
        entropies: list[float] = []
        if uncertainty:
            self.probes.append(entropies)
        for token in self.drafter.draft(*args, uncertainty=uncertainty, **kwargs):
            if token.entropy is not None:
                entropies.append(token.entropy)
            yield token


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench-results/uncertainty_calibration.json")
    args = parser.parse_args()
    problems = datasets.load_problems(datasets.resolve("math500-l123-calib"), None, None)
    drafter = Recording(LlamaDrafter(args.model, threads=args.threads, seed=args.seed))
    policy = PolicyConfig(
        mode=Mode.NON_REASONING,
        trigger=Trigger.UNCERTAINTY,
        uncertainty_threshold=NEVER,
        start_tokens=0,  # no cloud here: the edge writes the opening too
    )
    sampling = Sampling(temperature=0.6, top_p=0.95, top_k=50, seed=args.seed)
    started = time.perf_counter()
    for problem in problems:
        loop = SpeculativeSession(
            drafter,  # type: ignore[arg-type]
            CloudSession(NoCloud(), "calibration"),  # type: ignore[arg-type]
            SessionOptions(max_tokens=args.max_tokens, sampling=sampling, policy=policy),
        )
        loop.run([Message("user", datasets.math_prompt(problem))])
        print(f"problem {problem.id}: {len(drafter.probes)} breaks so far", file=sys.stderr)
    probes = [p for p in drafter.probes if p]
    by_window = {
        str(w): [statistics.fmean(p[:w]) for p in probes] for w in (1, 3, len(max(probes, key=len)))
    }
    report: dict[str, Any] = {
        "problems": [p.id for p in problems],
        "breaks": len(probes),
        "seconds": round(time.perf_counter() - started, 1),
        "windows": {},
    }
    for window, values in by_window.items():
        report["windows"][window] = {
            "mean": round(statistics.fmean(values), 3),
            "median": round(statistics.median(values), 3),
            "thresholds": {
                f"{int(share * 100)}% of breaks": round(quantile(values, 1 - share), 3)
                for share in SHARES
            },
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
