"""The engine knows nothing about gRPC, auth, deltas or the policy: text in, text out, with a per-session KV cache.

`TransformersEngine` implements `cloud.engine_api.StepEngine`; this package is the only
place in the project that imports torch or transformers (`weights`: loading; `kv`: cache
tensors and memory; `sampling`; `steps`: the engine). `cloud.engine_thread.EngineThread` runs
its steps for many calls at once; `generate` / `prefill` run one call by themselves.

One call, in the order the code runs it:

1. plan      render conversation + assistant text to one string (chat template, or a
             plain prompt) and tokenize the *whole* string (caller's thread); BPE merges
             across the old/new boundary, so token ids are never appended to a cached
             list, they are re-derived from the text
2. start     check the session's cache out (`cloud.session_cache`); keep the longest
             common token prefix with its ids, crop the KV to it (one token less if
             everything is cached: the last token's logits are needed to sample)
3. prefill   the rest, one chunk per step: `prefill_chunk` tokens, or while other calls
             are decoding as many as this machine prefills in `sharing_target_s`
             (measured), so their streams pause for about that long at most;
             should_stop() between chunks; the last chunk's logits give the first token
4. decode    one token per step for every decoding call in ONE forward: their caches are
             the rows of a left-padded batch (`cloud.batching`), each token at its own position,
             the padding masked; calls join and leave the batch between steps.
             `cloud.decoding.TextOutput` turns tokens into text and says when the call
             ends (EOS, max_tokens, a stop string, a full context window; a character or
             word left unfinished at max_tokens gets a few more tokens)
5. finish    the session holds exactly the ids whose KV is computed; it is checked back
             in, and idle sessions are evicted LRU-first within the KV budget
             (`cloud.memory`, sized from the machine) and after `session_ttl_s`

Models without a chat template get `shared.prompting.plain_prompt` (the same on the
edge), then the assistant text verbatim.

Models are loaded from a Hugging Face folder, a hub id (only where the hub is
reachable), or a `.gguf` file, converted once (`cloud.engine.weights`).
"""

from cloud.decoding import IncrementalDetokenizer, find_stop
from cloud.engine.base import EngineBase
from cloud.engine.paged import PagedEngine
from cloud.engine.sampling import sample, sample_rows
from cloud.engine.steps import TransformersEngine
from cloud.engine.weights import convert_gguf, default_cache_dir, gguf_digest, pick_device

# --engine NAME -> the engine class (same constructor and load() for both)
ENGINES: dict[str, type[EngineBase]] = {"rows": TransformersEngine, "paged": PagedEngine}
# --engine auto, by the device the model runs on. CPU: rows, measured faster there
# (docs/batching.md, scripts/batching_decision.py). CUDA: paged, the path built for it (no
# per-step KV copy, one forward per step, attention read in place); scripts/gpu_check.py
# measures both on a GPU. MPS: rows (not measured).
AUTO_ENGINE = {"cpu": "rows", "cuda": "paged", "mps": "rows"}


def engine_class(kind: str, device: str) -> type[EngineBase]:
    """The class `serve --engine KIND` runs on DEVICE (auto, cuda, cuda:1, mps, cpu);
    ValueError names the choices."""
    kind = kind.strip().lower()
    if kind == "auto":
        dev = pick_device(device).type
        kind = AUTO_ENGINE.get(dev, "rows")
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}: use auto, {', '.join(ENGINES)}")
    return ENGINES[kind]


__all__ = [
    "AUTO_ENGINE",
    "ENGINES",
    "EngineBase",
    "IncrementalDetokenizer",
    "PagedEngine",
    "TransformersEngine",
    "convert_gguf",
    "default_cache_dir",
    "engine_class",
    "find_stop",
    "gguf_digest",
    "pick_device",
    "sample",
    "sample_rows",
]
