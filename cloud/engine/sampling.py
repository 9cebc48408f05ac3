"""One token from a logits vector, as the request's sampling settings say.

Part of `cloud.engine`, the package that alone imports torch and transformers.
"""

from __future__ import annotations

import torch

from shared.wire import Sampling


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from a [vocab] logits vector: greedy at temperature 0, otherwise
    temperature, then top_k (0 = off), then top_p (nucleus)."""
    logits = logits.float().cpu()
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / s.temperature
    if 0 < s.top_k < logits.numel():
        values, order = torch.topk(logits, s.top_k)  # sorted, highest first
    else:
        values, order = torch.sort(logits, descending=True)
    if 0 < s.top_p < 1:
        p = torch.softmax(values, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        values = values.masked_fill((p.cumsum(dim=-1) - p) >= s.top_p, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    return int(order[torch.multinomial(probs, 1, generator=generator)])
