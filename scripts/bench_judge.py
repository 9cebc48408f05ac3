"""The cloud judge's cost at one paragraph break on this machine, side by side.

Loads the cloud's model as `specthink-cloud serve` does and, on two sessions holding the
same context, times a prefill of the new text alone (what the next takeover computes
whatever the trigger) against the judged prefill of the same text and a probe (the
cloud-judge trigger's call: logits at every probe position, scored); the difference is
the probe's cost, beside one decode step of the same model (what one written token
costs). The uncertainty trigger's cost at a break on the cloud is nothing: the edge
measures its own entropy.

    .venv/bin/python -m scripts.bench_judge --model models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf

Defaults match the MATH-500 eval: ~600 tokens held (prompt + a 400-token answer at its
middle), ~60 new tokens since the last call, a 20-token probe.
"""

from __future__ import annotations

import argparse
import json
import time

from scripts.gpu_check_measure import judge_break


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--delta", type=int, default=60)
    parser.add_argument("--probe", type=int, default=20)
    args = parser.parse_args()

    from cloud.engine import engine_class
    from cloud.engine_api import Generated, GenerateRequest
    from cloud.engine_thread import EngineThread
    from shared.wire import Message

    engine = engine_class(args.engine, "auto").load(args.model, num_threads=args.threads)
    result = judge_break(engine, "bench", args.context, args.delta, args.probe)
    # one decode step of the same model, for scale: 33 tokens after a warm prefill
    loop = EngineThread(engine)
    try:
        ask = GenerateRequest("step", (Message("user", "Count on."),), "1, 2, 3,", 33)
        loop.prefill(ask, lambda: False)
        t = time.perf_counter()
        generated = 0
        for item in loop.generate(ask, lambda: False):
            if isinstance(item, Generated):
                generated = item.usage.generated_tokens
        result["decode_step_s"] = (time.perf_counter() - t) / max(1, generated)
    finally:
        loop.close()
    result["device"], result["dtype"] = engine.info.device, engine.info.dtype
    print(json.dumps(result, indent=2))
    print(
        f"judge at a break: {args.delta} new tokens {result['plain_s'] * 1000:.0f} ms alone, "
        f"{result['judged_s'] * 1000:.0f} ms with the {args.probe}-token probe: the probe "
        f"costs {result['probe_cost_s'] * 1000:.0f} ms = "
        f"{result['probe_cost_s'] / result['decode_step_s']:.1f} decode steps "
        f"({result['decode_step_s'] * 1000:.0f} ms each)"
    )


if __name__ == "__main__":
    main()
