"""Out-of-order segments held above RCV.NXT (RFC 9293 3.10.7.4, seventh check).

Blocks are disjoint, sorted by stream offset and never adjacent-merged
(merging would copy); on overlap the bytes already held win, and only the
new, uncovered parts of a segment are stored. The caller bounds what it
offers to the receive window, so bytes held never exceed the window.
"""

from __future__ import annotations

from bisect import bisect_right

__all__ = ["Reassembly"]


class Reassembly:
    __slots__ = ("_data", "_starts", "held", "last_block", "sack_history")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._data: list[bytes] = []
        self.held = 0
        # Offsets (start, end) of the most recently received segment, for the first SACK
        # block (RFC 2018 4: the first block reports the most recently received segment).
        self.last_block: tuple[int, int] = (0, 0)
        # Starts of the blocks that led recent SACK options, freshest first (RFC 2018 4).
        self.sack_history: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def add(self, start: int, data: bytes | memoryview) -> None:
        """Hold ``data`` at ``start`` (above the in-order point), minus what is already held."""
        end = start + len(data)
        self.last_block = (start, end)
        starts = self._starts
        blocks = self._data
        i = bisect_right(starts, start) - 1
        pos = start
        if i >= 0:
            prev_end = starts[i] + len(blocks[i])
            if prev_end >= end:
                return  # entirely a duplicate
            pos = max(pos, prev_end)
        i += 1
        # Fill the gaps between existing blocks from pos up to end.
        while pos < end:
            next_start = starts[i] if i < len(starts) else end
            if next_start > pos:
                stop = min(next_start, end)
                piece = bytes(data[pos - start : stop - start])
                starts.insert(i, pos)
                blocks.insert(i, piece)
                self.held += len(piece)
                i += 1
                pos = stop
            if i < len(starts) and starts[i] <= pos:
                pos = max(pos, starts[i] + len(blocks[i]))
                i += 1

    def pop_in_order(self, rcv_nxt: int) -> list[bytes]:
        """Remove and return the blocks that now continue the stream at ``rcv_nxt``."""
        starts = self._starts
        blocks = self._data
        out: list[bytes] = []
        n = 0
        while n < len(starts) and starts[n] <= rcv_nxt:
            s = starts[n]
            block = blocks[n]
            e = s + len(block)
            if e > rcv_nxt:
                out.append(block if s == rcv_nxt else block[rcv_nxt - s :])
                rcv_nxt = e
            n += 1
        if n:
            self.held -= sum(len(b) for b in blocks[:n])
            del starts[:n]
            del blocks[:n]
        return out

    def ranges(self) -> list[tuple[int, int]]:
        """Held data as merged [start, end) ranges (adjacent blocks joined), ascending."""
        out: list[tuple[int, int]] = []
        for s, block in zip(self._starts, self._data, strict=True):
            e = s + len(block)
            if out and out[-1][1] == s:
                out[-1] = (out[-1][0], e)
            else:
                out.append((s, e))
        return out

    def end(self) -> int:
        """One past the highest held byte (0 when empty)."""
        if not self._starts:
            return 0
        return self._starts[-1] + len(self._data[-1])
