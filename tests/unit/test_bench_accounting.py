"""The benchmark's prefill accounting: prefilled tokens per token the cloud had not seen.

`scripts.bench_rig.prefill_work` decides the "prefilled / new tokens <= 1.1" rows of the
e2e, network and concurrency sections, so a miscount would pass or fail them wrongly."""

from __future__ import annotations

from scripts.bench_concurrency import session_runs
from scripts.bench_rig import prefill_work


def call(prompt: int, generated: int, prefilled: int, **extra: int) -> dict[str, int]:
    return {"prompt": prompt, "generated": generated, "prefilled": prefilled, **extra}


def test_a_cached_session_prefills_only_what_is_new() -> None:
    # call 1: 50 prompt tokens, all new; call 2 continues from 50 + 20 held: 10 new
    run = {"calls": [call(50, 20, 50), call(80, 20, 10)]}
    work = prefill_work([run])
    assert (work["prefilled"], work["unseen"], work["calls"]) == (60, 60, 2)
    assert work["ratio"] == 1.0
    assert work["extra_per_call"] == 0.0


def test_re_prefilling_the_history_counts_as_extra_work() -> None:
    run = {"calls": [call(50, 20, 50), call(80, 20, 80)]}
    work = prefill_work([run])
    assert work["unseen"] == 60
    assert work["ratio"] == 130 / 60
    assert work["extra_per_call"] == 35.0


def test_each_run_starts_with_nothing_held() -> None:
    runs = [{"calls": [call(30, 5, 30)]}, {"calls": [call(30, 5, 30)]}]
    assert prefill_work(runs)["unseen"] == 60


def test_no_calls_gives_no_ratio() -> None:
    work = prefill_work([{"calls": []}])
    assert work["ratio"] is None and work["extra_per_call"] is None


def test_concurrency_records_become_runs_per_session_in_round_order() -> None:
    # two phases reuse session ids 0 and 1; records arrive out of order
    phase = {
        "records": [
            call(80, 20, 10, session=0, round=1),
            call(40, 10, 40, session=1, round=0),
            call(50, 20, 50, session=0, round=0),
        ]
    }
    runs = session_runs([phase, phase])
    assert len(runs) == 4
    assert [[c["round"] for c in r["calls"]] for r in runs] == [[0, 1], [0], [0, 1], [0]]
    work = prefill_work(runs)
    assert (work["prefilled"], work["unseen"]) == (2 * 100, 2 * 100)
