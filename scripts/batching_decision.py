"""The measurement behind docs/batching.md's choice: transformers' ContinuousBatchingManager
against the engine's two paths (rows of per-session caches; the paged KV pool), on this machine.

    .venv/bin/python -m scripts.batching_decision [--model GGUF] [--threads 1] [--reps 3]

Both run on the SAME model object (Qwen2.5-Coder-0.5B by default, fp32 on CPU), with the
same prompts (64 tokens), 16 new greedy tokens, 1 and 8 requests at once, interleaved
(A B, B A, ...), and report the medians:
  manager  a persistent `model.init_continuous_batching()` manager (paged cache, block
           sharing on), requests added together, results read back
  rows     `TransformersEngine`'s step API as the engine loop drives it: start, prefill
           (several prompts in one forward), batched decode steps
  paged    `PagedEngine` (`serve --engine paged`) driven the same way, on the same model
Then the manager's prefix reuse: a request that continues an earlier one (its prompt plus
the 16 tokens it wrote plus 20 new ones) and how many of its tokens the manager found in
its cache (`search_prefix_match`), against the engine's session cache.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STORY = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the "
    "steps as his father had taught him. There were one hundred and twelve of them, worn "
    "smooth in the middle by a century of boots. At the top he trimmed the wick. "
) * 3
NEW = 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=str(ROOT / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args(argv)

    import torch
    from transformers import GenerationConfig
    from transformers.generation import ContinuousBatchingConfig

    from cloud.engine import PagedEngine, TransformersEngine
    from cloud.engine_api import GenerateRequest
    from shared.wire import Message, Sampling

    torch.set_num_threads(args.threads)
    engine = TransformersEngine.load(args.model, device="cpu", num_threads=args.threads)
    paged = PagedEngine(
        engine.model,
        engine.tokenizer,
        model_id="paged",
        device=engine.device,
        loaded_from=engine.loaded_from,
        context_length=1024,
        max_cache_bytes=16 * 1025 * engine.memory.bytes_per_token,
    )
    engines: dict[str, Any] = {"rows": engine, "paged": paged}
    msgs = [Message("user", "Continue the story.")]
    greedy = Sampling(temperature=0.0, top_p=1.0, top_k=0)
    prompts = [engine.tokenize(msgs, STORY[i * 7 :])[:64] for i in range(8)]

    def stepped(name: str, n: int) -> dict[str, float]:
        engine = engines[name]
        runs = []
        for i in range(n):
            ask = GenerateRequest(f"rows-{i}-{time.monotonic_ns()}", tuple(msgs), "", NEW, greedy)
            run = engine.plan_generate(ask, lambda: False)
            run.prompt = list(prompts[i])
            assert run.output is not None
            run.output.extra = 0  # exactly NEW tokens, as the manager writes
            runs.append(run)
        started = time.perf_counter()
        for r in runs:
            engine.start(r)
        while any(r.prefilling for r in runs):
            engine.prefill_step([r for r in runs if r.prefilling], sharing=False)
        while not all(r.done for r in runs):
            engine.decode_step([r for r in runs if not r.done])
        engine.finish(runs)
        wall = time.perf_counter() - started
        tokens = sum(r.output.generated for r in runs if r.output is not None)
        for r in runs:
            engine.drop(r.session)
        return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}

    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=-1)
    manager = engine.model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(
            num_blocks=128, page_size=16, max_batch_tokens=512
        ),
    )
    manager.start()

    def via_manager(inputs: list[list[int]]) -> tuple[dict[str, float], dict[str, Any]]:
        started = time.perf_counter()
        ids = manager.add_requests(inputs, max_new_tokens=NEW)
        pending, outputs = set(ids), {}
        while pending:
            out = manager.get_result(timeout=600)
            if out is None:
                raise RuntimeError("the manager returned no result")
            if out.is_finished() and out.request_id in pending:
                pending.discard(out.request_id)
                outputs[out.request_id] = out
        wall = time.perf_counter() - started
        tokens = sum(len(o.generated_tokens) for o in outputs.values())
        return {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall}, outputs

    results: dict[str, Any] = {"threads": args.threads, "new_tokens": NEW, "runs": []}
    try:
        stepped("rows", 1), stepped("paged", 1), via_manager(prompts[:1])  # warm all
        names = ["rows", "paged", "manager"]
        for rep in range(args.reps):
            for n in (1, 8):
                order = names[rep % 3 :] + names[: rep % 3]  # each goes first in turn
                got = {}
                for name in order:
                    got[name] = (
                        stepped(name, n) if name != "manager" else via_manager(prompts[:n])[0]
                    )
                results["runs"].append({"n": n, **got})
                print(json.dumps({"rep": rep, "n": n, **got}), flush=True)
        # prefix reuse: continue the first prompt with what it wrote and 20 new tokens
        cache = manager.batch_processor.cache
        matched: list[int] = []
        search = cache.search_prefix_match

        def spy(request_id: str, prompt_ids: list[int]) -> int:
            matched.append(search(request_id, prompt_ids))
            return matched[-1]

        cache.search_prefix_match = spy
        _, outputs = via_manager([prompts[0]])
        written = next(iter(outputs.values())).generated_tokens
        extra = engine.tokenize(msgs, STORY[300:])[:20]
        continued = list(prompts[0]) + list(written) + extra
        via_manager([continued])
        results["manager_prefix_reuse"] = {
            "prompt": len(continued),
            "found_in_cache": matched[-1],
            "recomputed": len(continued) - matched[-1],
            "new_tokens": len(extra),
            "page_size": 16,
        }
    finally:
        manager.stop(block=True)
    med = {
        (name, n): statistics.median(r[name]["tok_s"] for r in results["runs"] if r["n"] == n)
        for name in ("rows", "paged", "manager")
        for n in (1, 8)
    }
    results["median_tok_s"] = {f"{k[0]}@{k[1]}": v for k, v in med.items()}
    results["gain_8_over_1"] = {
        name: med[(name, 8)] / med[(name, 1)] for name in ("rows", "paged", "manager")
    }
    results["paged_over_rows"] = {n: med[("paged", n)] / med[("rows", n)] for n in (1, 8)}
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
