"""Choose the cloud judge's thresholds on problems that are never reported.

Runs the edge model over the calibration sample (edge/datasets/math500-l123-calib.jsonl) as
the eval would (the paper's prompt and sampling, non-reasoning mode: the cloud writes the
first 100 tokens) with the cloud-judge trigger against a real cloud, at a threshold every
probe passes: every paragraph break is judged (the cloud scores the probe) and none hands
over, so the rest of each answer is the edge's own. `--opening edge` lets the edge write
the opening too (how docs/results/judge-calibration.json was first made: its probes follow
the edge's own opening, and the cloud finds them likelier than after its own, so its
thresholds hand over more breaks in the eval than on the calibration problems).
Records each probe's score (the cloud's mean log-probability of its tokens) beside the
small model's mean entropy over it, and prints the thresholds at which a given share of
breaks would hand over, for the judge alone and for the judge asked only where the edge is
unsure (entropy at or above the uncertainty trigger's 0.27):

    specthink-cloud serve --model models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --port 50072 &
    .venv/bin/python -m scripts.calibrate_judge --cloud 127.0.0.1:50072 \\
        --model models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf

Writes bench-results/judge_calibration.json (the README's copy: docs/results/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from edge import datasets
from edge.answer import Event
from edge.cloud_client import ClientOptions, GrpcCloud
from edge.cloud_session import CloudSession
from edge.drafter import LlamaDrafter
from edge.session import SessionOptions, SpeculativeSession
from shared.policy import Mode, PolicyConfig, Trigger, probe_uncertainty
from shared.wire import Message, Sampling

EVERY = -1e9  # a threshold every probe passes: judge every break, never hand over
SHARES = (0.2, 0.35, 0.5)  # shares of breaks that would hand over
UNSURE = 0.27  # the uncertainty trigger's default threshold (mean entropy, whole probe)


class Recording:
    """Wraps the drafter to keep each probe's per-token entropies."""

    def __init__(self, drafter: LlamaDrafter) -> None:
        self.drafter = drafter
        self.probes: list[list[float]] = []

    def draft(self, *args: Any, uncertainty: bool = False, **kwargs: Any) -> Any:
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


def thresholds(scores: list[float]) -> dict[str, float]:
    """The score under which the lowest `share` of these probes falls (they hand over)."""
    return {f"{int(share * 100)}% of breaks": round(quantile(scores, share), 3) for share in SHARES}


def _judge_events(into: list[Event]) -> Any:
    """A session sink that keeps the judge's verdicts."""
    return lambda event: into.append(event) if event.kind == "judge" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cloud", required=True, help="HOST:PORT of a running cloud")
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench-results/judge_calibration.json")
    parser.add_argument(
        "--opening",
        choices=("cloud", "edge"),
        default="cloud",
        help="who writes the answer's first 100 tokens (the eval: the cloud)",
    )
    args = parser.parse_args()
    problems = datasets.load_problems(datasets.resolve("math500-l123-calib"), None, None)
    drafter = Recording(LlamaDrafter(args.model, threads=args.threads, seed=args.seed))
    cloud = GrpcCloud(ClientOptions(args.cloud, first_chunk_timeout_s=60, stall_timeout_s=60))
    policy = PolicyConfig(
        mode=Mode.NON_REASONING,
        trigger=Trigger.CLOUD_JUDGE,
        judge_threshold=EVERY,
        judge_min_uncertainty=1e-12,  # measures the edge's entropy; judges every probe
        start_tokens=100 if args.opening == "cloud" else 0,
    )
    sampling = Sampling(temperature=0.6, top_p=0.95, top_k=50, seed=args.seed)
    breaks: list[dict[str, Any]] = []
    started = time.perf_counter()
    for problem in problems:
        verdicts: list[Event] = []
        loop = SpeculativeSession(
            drafter,  # type: ignore[arg-type]
            CloudSession(cloud, f"calibration-{problem.id}"),
            SessionOptions(max_tokens=args.max_tokens, sampling=sampling, policy=policy),
            sink=_judge_events(verdicts),
        )
        first = len(drafter.probes)
        answer = loop.run([Message("user", datasets.math_prompt(problem))])
        probes = [p for p in drafter.probes[first:] if p]
        judged = [p for p in probes if probe_uncertainty(p, policy) >= 1e-12]
        if len(judged) != len(verdicts):
            sys.exit(f"problem {problem.id}: {len(judged)} probes but {len(verdicts)} verdicts")
        for entropies, event in zip(judged, verdicts, strict=True):
            breaks.append(
                {
                    "problem": problem.id,
                    "score": round(event.data["score"], 4),
                    "entropy": round(probe_uncertainty(entropies, policy), 4),
                }
            )
        s = answer.stats
        print(
            f"problem {problem.id}: {len(verdicts)} breaks judged, judge wait "
            f"{s.judge_wait_s:.2f} s, cloud prefill {s.judge_prefill_s:.2f} s",
            file=sys.stderr,
        )
    cloud.close()
    scores = [b["score"] for b in breaks]
    unsure = [b["score"] for b in breaks if b["entropy"] >= UNSURE]
    report: dict[str, Any] = {
        "problems": [p.id for p in problems],
        "opening": args.opening,
        "breaks": len(breaks),
        "seconds": round(time.perf_counter() - started, 1),
        "score": {
            "mean": round(statistics.fmean(scores), 3),
            "median": round(statistics.median(scores), 3),
            "thresholds": thresholds(scores),
        },
        f"score where entropy >= {UNSURE}": {
            "breaks": len(unsure),
            "thresholds": thresholds(unsure) if unsure else {},
        },
        "entropy-score correlation": (
            round(statistics.correlation([b["entropy"] for b in breaks], scores), 3)
            if len(breaks) > 2
            else None
        ),
        "per_break": breaks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_break"}, indent=2))


if __name__ == "__main__":
    main()
