"""The KV budget and batch limit a cloud picks from its machine (cloud.memory)."""

from __future__ import annotations

import pytest

from cloud import memory

GIB = 1 << 30
QWEN_05B_FP32 = 24 * 2 * 2 * 64 * 4  # layers x (K+V) x kv heads x head dim x bytes


def test_cpu_budget_is_a_share_of_available_ram():
    p = memory.plan(
        device="cpu", free_bytes=16 * GIB, bytes_per_token=QWEN_05B_FP32, context_length=32768
    )
    assert p.budget_bytes == int(16 * GIB * memory.RAM_FRACTION)
    assert "available CPU RAM" in p.describe()


def test_cuda_budget_is_a_fraction_of_free_memory_after_the_weights():
    p = memory.plan(
        device="cuda", free_bytes=70 * GIB, bytes_per_token=262144, context_length=32768
    )
    assert p.budget_bytes == int(70 * GIB * memory.CUDA_FRACTION)
    assert p.max_running == p.budget_bytes // (262144 * memory.TYPICAL_SESSION_TOKENS)


def test_the_budget_never_exceeds_what_is_free_the_context_is_capped_instead():
    p = memory.plan(
        device="cpu", free_bytes=1 * GIB, bytes_per_token=QWEN_05B_FP32, context_length=32768
    )
    assert p.budget_bytes <= 1 * GIB * memory.RAM_FRACTION
    assert p.context_length < 32768
    assert p.context_length * QWEN_05B_FP32 <= p.budget_bytes
    assert p.max_running >= 1
    assert "capped" in p.describe() and "--context-length" in p.describe()


def test_no_room_for_kv_after_the_weights_is_a_clear_error():
    with pytest.raises(ValueError, match="not enough memory for the KV cache"):
        memory.plan(
            device="cuda",
            free_bytes=1 << 20,
            bytes_per_token=262144,
            context_length=32768,
            weights_bytes=61 * GIB,
        )


def test_the_step_reserve_comes_out_of_the_kv_budget():
    shape = memory.ModelShape(262144, 5120, 27648, 152064, 40, 2)
    reserve = memory.step_reserve_bytes(
        shape, prefill_chunk=512, max_rows=64, context_length=8192, device="cuda"
    )
    p = memory.plan(
        device="cuda",
        free_bytes=70 * GIB,
        bytes_per_token=262144,
        context_length=8192,
        weights_bytes=61 * GIB,
        reserve_bytes=reserve,
    )
    assert p.budget_bytes == int(70 * GIB * memory.CUDA_FRACTION) - reserve
    assert p.planned_bytes == 61 * GIB + p.budget_bytes + reserve
    assert p.planned_bytes <= 61 * GIB + 70 * GIB
    text = p.describe()
    assert "weights 61.00 GiB" in text and "step reserve" in text and "sessions of" in text


def test_a_paged_plan_is_a_whole_number_of_slots_and_bounds_the_batch():
    p = memory.plan(
        device="cuda",
        free_bytes=70 * GIB,
        bytes_per_token=262144,
        context_length=8192,
        slot_tokens=8193,
    )
    assert p.slots == int(70 * GIB * memory.CUDA_FRACTION) // (8193 * 262144)
    assert p.budget_bytes == p.slots * 8193 * 262144
    assert p.max_running <= p.slots and p.sessions == p.slots
    assert p.context_length == 8192


def test_the_batch_limit_follows_the_budget_within_its_cap():
    small = memory.plan(
        device="cpu", free_bytes=2 * GIB, bytes_per_token=QWEN_05B_FP32, context_length=32768
    )
    large = memory.plan(
        device="cpu", free_bytes=64 * GIB, bytes_per_token=QWEN_05B_FP32, context_length=32768
    )
    assert 1 <= small.max_running < large.max_running <= memory.MAX_RUNNING_CAP


def test_explicit_values_win_and_say_so():
    p = memory.plan(
        device="cpu",
        free_bytes=64 * GIB,
        bytes_per_token=100,
        context_length=1000,
        budget_bytes=12345,
        max_running=3,
    )
    assert (p.budget_bytes, p.max_running) == (12345, 3)
    assert "--max-cache-bytes" in p.describe() and "--max-running" in p.describe()


def test_available_ram_is_read_from_this_machine():
    assert memory.available_ram() > 0


def test_a_slot_shorter_than_the_model_context_caps_it_and_says_why():
    p = memory.plan(
        device="cuda",
        free_bytes=70 * GIB,
        bytes_per_token=262144,
        context_length=131072,
        slot_tokens=8193,
    )
    assert p.context_length == 8192 and p.slots >= 30
    assert "paged engine's default slot" in p.describe() and "--context-length" in p.describe()
