"""Admission follows the engine's batch size: up to max_running requests run (and decode
together); the queue and its retry hint are sized by that capacity (cloud.admission)."""

from __future__ import annotations

import contextlib
import threading

import pytest

from cloud.admission import Admission, AdmissionLimits
from shared import errors


def test_up_to_max_running_requests_run_at_once_and_the_next_one_waits():
    admission = Admission(AdmissionLimits(max_running=3, max_waiting=4))
    with contextlib.ExitStack() as running:
        for _ in range(3):
            running.enter_context(admission.slot(10, lambda: False))
        assert (admission.running, admission.waiting) == (3, 0)
        entered = threading.Event()

        def fourth() -> None:
            with admission.slot(10, lambda: False):
                entered.set()

        waiter = threading.Thread(target=fourth)
        waiter.start()
        assert not entered.wait(0.2)  # the batch is full: it waits
        assert admission.waiting == 1
    waiter.join(5)  # a place freed up
    assert entered.is_set()


def test_beyond_the_queue_a_request_is_refused_with_a_hint_that_shrinks_with_capacity():
    def hint(max_running: int) -> float:
        admission = Admission(AdmissionLimits(max_running=max_running, max_waiting=0))
        admission._mean_run_s = 8.0  # a takeover takes 8 s while batched
        with contextlib.ExitStack() as running:
            for _ in range(max_running):
                running.enter_context(admission.slot(10, lambda: False))
            with pytest.raises(errors.Overloaded) as refused, admission.slot(10, lambda: False):
                pass
        return refused.value.retry_after_s

    one, eight = hint(1), hint(8)
    assert one == pytest.approx(8.0)  # the one running call must finish
    assert eight == pytest.approx(1.0)  # one of eight finishes every 1 s on average
