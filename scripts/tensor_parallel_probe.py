"""Does transformers' tensor-parallel plan run here, and what does it cost? (docs/tensor-parallel.md)

    .venv/bin/python scripts/tensor_parallel_probe.py FOLDER single
    .venv/bin/torchrun --nproc-per-node 2 scripts/tensor_parallel_probe.py FOLDER tp
    .venv/bin/python scripts/tensor_parallel_probe.py FOLDER compare

FOLDER is a Hugging Face folder (a GGUF's conversion under $SPECTHINK_CACHE_DIR/converted/).
`single` and `tp` each save the last position's logits for one prompt and print the load
time, the median of 16 greedy decode steps and the text; `compare` says whether the ranks'
logits equal the one-process logits (allclose 1e-4) and each other (bitwise).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, DistributedConfig, DynamicCache

OUT = Path(tempfile.gettempdir()) / "specthink-tp-probe"
PROMPT = "The capital of France is Paris. The capital of Germany is"


def main(folder: str, mode: str) -> None:
    OUT.mkdir(exist_ok=True)
    if mode == "compare":
        one = torch.load(OUT / "single-0.pt")
        ranks = sorted(OUT.glob("tp-*.pt"))
        shards = [torch.load(p) for p in ranks]
        for p, t in zip(ranks, shards, strict=True):
            print(
                f"{p.stem}: max |diff| {(one - t).abs().max().item():.3g}, allclose(1e-4) "
                f"{torch.allclose(one, t, atol=1e-4, rtol=1e-4)}"
            )
        print("ranks bitwise equal:", all(torch.equal(shards[0], t) for t in shards))
        return
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    extra = {"distributed_config": DistributedConfig(tp_plan="auto")} if mode == "tp" else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    load = time.perf_counter() - t0
    rank = dist.get_rank() if mode == "tp" else 0
    steps = []
    with torch.inference_mode():
        cache = DynamicCache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        torch.save(out.logits[0, -1].clone(), OUT / f"{mode}-{rank}.pt")
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        text = [int(token)]
        for _ in range(16):
            t = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            steps.append(time.perf_counter() - t)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            text.append(int(token))
    median = sorted(steps)[len(steps) // 2] * 1000
    print(
        f"{mode} rank {rank}: load {load:.1f} s, decode step median {median:.1f} ms, "
        f"text {tok.decode(text)!r}",
        flush=True,
    )
    if mode == "tp":
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
