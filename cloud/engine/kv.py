"""KV caches as tensors: their size, cropping, batch rows, and the memory they may use.

Part of `cloud.engine`, the package that alone imports torch and transformers. Which
session keeps which cache is `cloud.session_cache`; how rows are batched is `cloud.batching`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from cloud import memory
from cloud.engine_api import EngineOutOfMemory


def cache_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.nbytes
    return total


def crop(cache: Any, n: int) -> None:
    """Cut every layer of `cache` to its first `n` tokens (layers may disagree after an
    interrupted forward, so each is cut on its own)."""
    for layer in getattr(cache, "layers", []):
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.dim() >= 2 and keys.shape[-2] > n:
            layer.crop(n - keys.shape[-2])


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def kv_bytes_per_token(cfg: Any, dtype: torch.dtype) -> int:
    """KV bytes one token of context costs: layers x (K + V) x kv heads x head dim."""
    heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
    kv_heads = int(getattr(cfg, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(cfg, "head_dim", 0) or getattr(cfg, "hidden_size", heads) // heads)
    layers = int(getattr(cfg, "num_hidden_layers", 1) or 1)
    return layers * 2 * kv_heads * head_dim * dtype.itemsize


def model_shape(cfg: Any, dtype: torch.dtype) -> memory.ModelShape:
    """What the memory plan needs of a model config."""
    heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
    return memory.ModelShape(
        bytes_per_token=kv_bytes_per_token(cfg, dtype),
        hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
        intermediate_size=int(getattr(cfg, "intermediate_size", 0) or 0),
        vocab_size=int(getattr(cfg, "vocab_size", 0) or 0),
        attention_heads=heads,
        dtype_bytes=dtype.itemsize,
    )


def weights_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def is_out_of_memory(exc: BaseException) -> bool:
    """A device (or host) allocation failed: CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc) if isinstance(exc, RuntimeError) else ""
    return "out of memory" in text or "can't allocate memory" in text


def as_out_of_memory(exc: BaseException, device: torch.device) -> EngineOutOfMemory | None:
    """`exc` as the engine's EngineOutOfMemory (with the allocator's cache given back),
    or None when it is something else."""
    if not is_out_of_memory(exc):
        return None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EngineOutOfMemory(first[:300])


def free_bytes(device: torch.device) -> int:
    """Free memory for KV on `device`, measured now (after the weights are loaded)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return memory.available_ram()


def cache_of(layers: Iterable[tuple[Any, Any]]) -> Any:
    """A DynamicCache that holds these per-layer [batch, heads, tokens, dim] tensors as
    they are (no copy)."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k[:, :, :0], v[:, :, :0], i)  # creates layer i, of the cache's own kind
        layer: Any = cache.layers[i]
        layer.keys, layer.values = k, v
    return cache
