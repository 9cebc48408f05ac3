"""Batched sampling on the logits' device (cloud.engine.sampling): the distribution is the
one the settings ask for, and each request's tokens depend on its own seed alone."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from cloud.engine.sampling import sample_rows  # noqa: E402
from shared.wire import Sampling  # noqa: E402

LOGITS = [2.0, 1.0, 0.0, -1.0]  # softmax .644 .237 .087 .032


def test_frequencies_follow_the_softmax_of_the_scaled_logits():
    logits = torch.tensor([LOGITS] * 4000)
    rows = [Sampling(1.0, 1.0, 0)] * 4000
    tokens = sample_rows(logits, rows, [11] * 4000, list(range(4000))).tolist()
    want = torch.softmax(torch.tensor(LOGITS), dim=-1).tolist()
    for token, p in enumerate(want):
        seen = tokens.count(token) / len(tokens)
        assert abs(seen - p) < 4 * math.sqrt(p * (1 - p) / len(tokens)) + 1e-3, (token, seen, p)


def test_temperature_sharpens_and_top_k_and_top_p_cut_the_tail():
    n = 2000
    logits = torch.tensor([LOGITS] * n)
    cold = sample_rows(logits, [Sampling(0.25, 1.0, 0)] * n, [3] * n, list(range(n))).tolist()
    assert cold.count(0) / n > 0.95  # T = 0.25: .98 on the top token
    top2 = sample_rows(logits, [Sampling(1.0, 1.0, 2)] * n, [3] * n, list(range(n))).tolist()
    assert set(top2) == {0, 1}
    nucleus = sample_rows(logits, [Sampling(1.0, 0.8, 0)] * n, [3] * n, list(range(n))).tolist()
    assert set(nucleus) == {0, 1}  # .644 < .8 <= .644 + .237


def test_a_row_draws_the_same_token_whatever_else_is_in_its_batch():
    torch.manual_seed(0)
    mine = torch.randn(1, 1000)
    others = torch.randn(7, 1000)
    alone = sample_rows(mine, [Sampling(0.9, 0.95, 50)], [1234], [5])
    batched = sample_rows(
        torch.cat([others[:3], mine, others[3:]]),
        [Sampling(0.7, 1.0, 0)] * 3 + [Sampling(0.9, 0.95, 50)] + [Sampling(0.0, 1.0, 0)] * 4,
        [1, 2, 3, 1234, 5, 6, 7, 8],
        [0, 0, 0, 5, 0, 0, 0, 0],
    )
    assert int(batched[3]) == int(alone[0])
    assert batched[4:].tolist() == others[3:].argmax(dim=-1).tolist()  # greedy rows


def test_the_seed_and_the_draw_count_decide_the_token():
    torch.manual_seed(1)
    logits = torch.randn(1, 5000)
    s = [Sampling(1.0, 1.0, 0)]
    again = {int(sample_rows(logits, s, [99], [4])[0]) for _ in range(5)}
    assert len(again) == 1
    draws = {int(sample_rows(logits, s, [99], [d])[0]) for d in range(40)}
    seeds = {int(sample_rows(logits, s, [seed], [4])[0]) for seed in range(40)}
    assert len(draws) > 10 and len(seeds) > 10
