"""The sender's SACK scoreboard (RFC 6675 3, RFC 2018).

Which stream ranges above SND.UNA the peer reported as received, merged into
sorted disjoint [start, end) ranges, plus their total. The sender uses it to
retransmit only the holes and to estimate the data still in the network
("pipe", RFC 6675 4).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

__all__ = ["Scoreboard"]


class Scoreboard:
    __slots__ = ("_ends", "_starts", "sacked")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.sacked = 0

    def __bool__(self) -> bool:
        return bool(self._starts)

    @property
    def highest(self) -> int:
        """One past the highest SACKed byte (callers check the board is non-empty)."""
        return self._ends[-1]

    def add(self, start: int, end: int) -> bool:
        """Merge one SACK block; True when it reported something new."""
        if start >= end:
            return False
        starts = self._starts
        ends = self._ends
        # Blocks that overlap or touch [start, end).
        lo = bisect_left(ends, start)
        hi = bisect_right(starts, end)
        if lo < hi:
            new_start = min(start, starts[lo])
            new_end = max(end, ends[hi - 1])
            covered = sum(ends[k] - starts[k] for k in range(lo, hi))
            if new_start == starts[lo] and new_end == ends[hi - 1] and hi - lo == 1:
                return False
            starts[lo:hi] = [new_start]
            ends[lo:hi] = [new_end]
            self.sacked += (new_end - new_start) - covered
            return True
        starts.insert(lo, start)
        ends.insert(lo, end)
        self.sacked += end - start
        return True

    def ack(self, una: int) -> None:
        """Drop everything below the new cumulative ACK."""
        starts = self._starts
        ends = self._ends
        n = 0
        while n < len(starts) and ends[n] <= una:
            self.sacked -= ends[n] - starts[n]
            n += 1
        if n:
            del starts[:n]
            del ends[:n]
        if starts and starts[0] < una:
            self.sacked -= una - starts[0]
            starts[0] = una

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self.sacked = 0

    def next_hole(self, pos: int, limit: int) -> tuple[int, int] | None:
        """The first un-SACKed range at or after ``pos`` and below ``limit``."""
        starts = self._starts
        ends = self._ends
        i = bisect_right(ends, pos)
        # Ranges with index >= i end after pos; if the first begins at or before pos,
        # pos is inside it and the hole begins at its end.
        if i < len(starts) and starts[i] <= pos:
            pos = ends[i]
            i += 1
        if pos >= limit:
            return None
        hole_end = starts[i] if i < len(starts) else limit
        return pos, min(hole_end, limit)

    def sacked_between(self, a: int, b: int) -> int:
        """SACKed bytes inside [a, b)."""
        total = 0
        starts = self._starts
        ends = self._ends
        i = bisect_right(ends, a)
        while i < len(starts) and starts[i] < b:
            total += min(ends[i], b) - max(starts[i], a)
            i += 1
        return total

    def lost_limit(self, threshold: int) -> int | None:
        """RFC 6675 4 IsLost, for all holes at once: un-SACKed bytes below the returned
        offset have more than ``threshold`` SACKed bytes above them. None: nothing lost."""
        starts = self._starts
        ends = self._ends
        above = 0
        for i in range(len(starts) - 1, -1, -1):
            above += ends[i] - starts[i]
            if above > threshold:
                return starts[i]
        return None

    def blocks(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._ends, strict=True))
