"""Tokens from logits for a whole batch at once, on the logits' device: temperature, top-k,
top-p and a per-request seed, with one host sync per step (the caller's `.tolist()`).

Part of `cloud.engine`, the package that alone imports torch and transformers.

Each row samples by the Gumbel-max rule over its filtered logits: argmax(logits / T +
G) with G = -log(-log(U)) picks token i with probability softmax(logits / T)_i, exactly
as multinomial sampling does. U comes from a counter-based hash of (the row's seed, how
many tokens that request has drawn, the candidate's rank), computed on the device for all
rows in one expression: a request's tokens depend on its own seed and logits only, never
on which other requests share its batch, and no per-row generator object (or per-row
kernel launch) is needed. A request without a seed is given a random one when planned.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import torch

from shared.wire import Sampling

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # the multiplier of a well-mixing 32-bit integer hash (< 2**27)
_GOLDEN = 0x9E3779B9


def fresh_seed() -> int:
    """A seed for a request that gave none (63 bits, fits an int64)."""
    return secrets.randbits(63)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of each element of an int64 tensor of values < 2**32; every
    product stays below 2**59, so int64 never overflows on any device."""
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    x = ((x >> 16) ^ x) * _MIX & _MASK32
    return (x >> 16) ^ x


def uniform_noise(seeds: torch.Tensor, draws: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, width] floats in (0, 1): row r's are a function of (seeds[r], draws[r]) and the
    column alone."""
    key = _hash32((seeds & _MASK32) ^ _hash32(((seeds >> 32) & _MASK32) ^ _hash32(draws)))
    cols = torch.arange(width, device=seeds.device, dtype=torch.int64)
    bits = _hash32((key.unsqueeze(1) + cols.unsqueeze(0) * _GOLDEN) & _MASK32)
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample_rows(
    logits: torch.Tensor,
    settings: Sequence[Sampling],
    seeds: Sequence[int],
    draws: Sequence[int],
) -> torch.Tensor:
    """One token id per row of [rows, vocab] `logits` (a LongTensor on their device).

    Row r uses `settings[r]` (temperature 0: greedy; top_k 0: off; top_p 1: off), drawing
    with seed `seeds[r]` for the `draws[r]`-th time."""
    _, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if all(s.temperature <= 0 for s in settings):
        return greedy
    # every row's settings in two transfers to the device, not one per setting
    ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in settings]
    ints = torch.tensor(
        [[seed, draw, k] for seed, draw, k in zip(seeds, draws, ks, strict=True)],
        dtype=torch.int64,
    ).to(device)
    floats = torch.tensor(
        [
            [max(s.temperature, 1e-5), s.top_p if 0 < s.top_p < 1 else 2.0, s.temperature > 0]
            for s in settings
        ],
        dtype=torch.float32,
    ).to(device)
    temps, top_p, hot = floats[:, 0:1], floats[:, 1:2], floats[:, 2] > 0
    scaled = logits / temps
    width = max(ks)
    if width < vocab:  # every row keeps at most `width` candidates: no full sort
        values, order = torch.topk(scaled, width, dim=-1)  # sorted, highest first
    else:
        values, order = torch.sort(scaled, dim=-1, descending=True)
    rank = torch.arange(values.shape[1], device=device).unsqueeze(0)
    values = values.masked_fill(rank >= ints[:, 2:3], -torch.inf)
    p = torch.softmax(values, dim=-1)
    # drop a candidate when those ranked before it already reach top_p (the first stays)
    values = values.masked_fill((p.cumsum(dim=-1) - p) >= top_p, -torch.inf)
    u = uniform_noise(ints[:, 0], ints[:, 1], values.shape[1])
    choice = torch.argmax(values - torch.log(-torch.log(u)), dim=-1, keepdim=True)
    sampled = order.gather(1, choice).squeeze(1)
    return torch.where(hot, sampled, greedy)


def sample(logits: torch.Tensor, s: Sampling, seed: int, draw: int = 0) -> int:
    """One token id from a [vocab] logits vector (`sample_rows` for one row)."""
    return int(sample_rows(logits.unsqueeze(0), [s], [seed], [draw])[0])
