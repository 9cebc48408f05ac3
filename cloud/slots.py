"""Which session holds which slot of the paged engine's KV pool, and which slots decode. No torch.

The pool (`cloud.engine.paged`) is preallocated: `n` slots of one full context each, in
one tensor per layer. A session keeps its slot while it is idle (its KV stays where it
was written) until the session cache (`cloud.session_cache`) evicts it.

The decode batch is the slots [0, decoding): a run that starts decoding is moved to slot
`decoding`, one that stops has the last decoding slot moved into its place. A decode step
then reads `pool[:decoding]`, a view: no per-step gather, no padding rows. Each move is
an exchange of two slots' contents (`Exchange`), which the engine carries out on the
tensors; this table only decides them, so it is tested without torch.

`written[i]` is how many leading columns of slot i hold finite values (KV, or zeros the
engine wrote). A decode step attends over the longest row's columns for every row, with
the others' extra columns masked; masked columns must still be finite (0 x NaN is NaN),
so the engine zeroes up to what it reads (`to_zero`) and exchanges carry the marks along.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class Slot:
    """A session's place in the pool; `index` changes when the table moves it."""

    index: int


@dataclass(frozen=True)
class Exchange:
    """Swap the contents of slots a and b, their first `columns` columns (the longer of
    what either has written); an empty slot takes part like any other."""

    a: int
    b: int
    columns: int


class SlotTable:
    def __init__(self, slots: int, columns: int) -> None:
        if slots < 1:
            raise ValueError("a pool needs at least one slot")
        self.columns = columns  # each slot's capacity
        self.owners: list[Slot | None] = [None] * slots
        self.written = [0] * slots
        self.decoding = 0  # slots [0, decoding) are the decode batch

    @property
    def free(self) -> int:
        return sum(o is None for o in self.owners)

    def allocate(self) -> Slot:
        """A free slot outside the decode batch (the highest, so that the low ones stay free
        for runs that start decoding). Raises RuntimeError when none is free (the session
        cache evicts before it asks, so this is a bug)."""
        for i in range(len(self.owners) - 1, self.decoding - 1, -1):
            if self.owners[i] is None:
                slot = Slot(i)
                self.owners[i] = slot
                return slot
        raise RuntimeError("no free slot in the KV pool")

    def release(self, slot: Slot) -> None:
        """The slot's session is gone (evicted, dropped): its slot is free again."""
        if slot.index < self.decoding:
            raise RuntimeError("a decoding slot cannot be released")
        if self.owners[slot.index] is slot:
            self.owners[slot.index] = None

    def join(self, slot: Slot) -> list[Exchange]:
        """Make `slot` the next decoding row (moving it to index `decoding`)."""
        if slot.index < self.decoding:
            return []  # already decoding
        moves = self._exchange(slot.index, self.decoding)
        self.decoding += 1
        return moves

    def leave(self, slot: Slot) -> list[Exchange]:
        """Take `slot` out of the decode batch; the last decoding row fills its place."""
        if slot.index >= self.decoding:
            return []
        moves = self._exchange(slot.index, self.decoding - 1)
        self.decoding -= 1
        return moves

    def to_zero(self, index: int, columns: int) -> tuple[int, int] | None:
        """Columns [start, end) of slot `index` the engine must zero before reading
        `columns` of it (None: all written). Rounds up, so zeroing happens rarely."""
        start = self.written[index]
        if start >= columns:
            return None
        end = min(self.columns, columns + 255 - (columns - 1) % 256)
        self.written[index] = end
        return start, end

    def mark_written(self, index: int, columns: int) -> None:
        """The engine wrote the first `columns` columns of slot `index`."""
        self.written[index] = max(self.written[index], columns)

    def forget(self, index: int) -> None:
        """A fresh session starts in slot `index`: nothing there needs moving any more."""
        self.written[index] = 0

    def _exchange(self, a: int, b: int) -> list[Exchange]:
        if a == b:
            return []
        columns = max(self.written[a], self.written[b])
        oa, ob = self.owners[a], self.owners[b]
        self.owners[a], self.owners[b] = ob, oa
        self.written[a], self.written[b] = self.written[b], self.written[a]
        for slot, index in ((oa, b), (ob, a)):
            if slot is not None:
                slot.index = index
        return [Exchange(a, b, columns)] if columns else []
