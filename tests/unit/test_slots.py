"""The paged engine's slot table (cloud.slots): decoding rows stay in slots [0, D), moves
are exchanges the engine carries out, and masked columns are zeroed before they are read.

A fake pool of position-coded contents checks that every exchange moves a session's KV
with it: each slot's content is a list of (owner, column) cells."""

from __future__ import annotations

import pytest

from cloud.slots import Exchange, Slot, SlotTable


class FakePool:
    def __init__(self, table: SlotTable) -> None:
        self.cells: list[list[object]] = [[None] * table.columns for _ in table.owners]

    def write(self, slot: Slot, name: str, n: int) -> None:
        self.cells[slot.index][:n] = [(name, c) for c in range(n)]

    def carry_out(self, moves: list[Exchange]) -> None:
        for m in moves:
            a, b = self.cells[m.a], self.cells[m.b]
            a[: m.columns], b[: m.columns] = b[: m.columns], a[: m.columns]


def holds(pool: FakePool, slot: Slot, name: str, n: int) -> bool:
    return pool.cells[slot.index][:n] == [(name, c) for c in range(n)]


def test_decoding_slots_stay_at_the_front_and_each_session_keeps_its_kv():
    table = SlotTable(5, 16)
    pool = FakePool(table)
    sessions = {name: table.allocate() for name in "abcd"}
    for i, (name, slot) in enumerate(sessions.items()):
        pool.write(slot, name, 3 + i)
        table.mark_written(slot.index, 3 + i)
    for name in "cad":
        pool.carry_out(table.join(sessions[name]))
    assert table.decoding == 3
    assert {sessions[n].index for n in "cad"} == {0, 1, 2}
    pool.carry_out(table.leave(sessions["c"]))
    assert table.decoding == 2 and {sessions[n].index for n in "ad"} == {0, 1}
    assert sessions["c"].index >= 2
    for i, name in enumerate("abcd"):
        assert holds(pool, sessions[name], name, 3 + i), name


def test_joining_twice_and_leaving_a_non_decoding_slot_move_nothing():
    table = SlotTable(3, 8)
    slot = table.allocate()
    table.mark_written(slot.index, 4)
    assert len(table.join(slot)) == 1
    assert table.join(slot) == []
    other = table.allocate()
    assert table.leave(other) == []


def test_allocation_skips_the_decode_rows_and_runs_out_loudly():
    table = SlotTable(2, 8)
    first = table.allocate()
    table.join(first)
    second = table.allocate()
    assert second.index == 1
    with pytest.raises(RuntimeError, match="no free slot"):
        table.allocate()
    with pytest.raises(RuntimeError, match="decoding slot"):
        table.release(first)
    table.release(second)
    assert table.free == 1


def test_columns_are_zeroed_ahead_once_and_never_past_the_slot():
    table = SlotTable(2, 600)
    slot = table.allocate()
    table.mark_written(slot.index, 10)
    assert table.to_zero(slot.index, 8) is None  # all written already
    assert table.to_zero(slot.index, 11) == (10, 256)  # rounded up
    assert table.to_zero(slot.index, 200) is None
    assert table.to_zero(slot.index, 590) == (256, 600)  # capped at the capacity


def test_an_exchange_carries_the_written_marks_with_the_contents():
    table = SlotTable(3, 64)
    a, b = table.allocate(), table.allocate()
    table.mark_written(a.index, 40)
    table.mark_written(b.index, 7)
    (move,) = table.join(b)  # b moves to slot 0, which was free (written 0)
    assert move.columns == 7 and b.index == 0
    assert table.written[0] == 7
    (move,) = table.join(a)
    assert move.columns == 40 and table.written[a.index] == 40
