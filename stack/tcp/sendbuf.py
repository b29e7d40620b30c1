"""The send buffer: bytes queued towards the peer, from SND.UNA to the end.

Data is kept as the chunks the application passed to ``send`` (copied at most
once, when the caller handed us a mutable buffer). A segment inside one chunk
is a zero-copy memoryview slice; only a segment spanning chunks is joined.
Chunk start offsets are kept in a parallel list so finding the chunk that
holds an offset is a bisect, and acknowledged chunks are dropped from the
front with lazy compaction: per-segment work stays O(log n) / O(1) amortized.
"""

from __future__ import annotations

from bisect import bisect_right

__all__ = ["SendBuffer"]

_COALESCE_SMALL = 2048  # sends smaller than this are appended to a small tail chunk
_COALESCE_LIMIT = 16384  # ... as long as that chunk stays below this size
_COMPACT_AT = 64


class SendBuffer:
    """Stream offsets ``start`` (first unacknowledged byte held) to ``end`` (next byte queued)."""

    __slots__ = ("_chunks", "_head", "_starts", "end", "start")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._starts: list[int] = []
        self._head = 0  # index of the first live chunk
        self.start = 0
        self.end = 0

    def __len__(self) -> int:
        return self.end - self.start

    def append(self, data: bytes) -> None:
        n = len(data)
        if not n:
            return
        chunks = self._chunks
        if (
            n < _COALESCE_SMALL
            and len(chunks) > self._head
            and len(chunks[-1]) + n <= _COALESCE_LIMIT
        ):
            # Many tiny writes would otherwise cost a chunk each; a new bytes object keeps
            # any memoryview already handed out over the old tail valid.
            chunks[-1] = chunks[-1] + data
        else:
            chunks.append(data)
            self._starts.append(self.end)
        self.end += n

    def get(self, a: int, b: int) -> bytes | memoryview:
        """The bytes at stream offsets [a, b) (start <= a <= b <= end)."""
        if a >= b:
            return b""
        starts = self._starts
        chunks = self._chunks
        i = bisect_right(starts, a, self._head) - 1
        s = starts[i]
        chunk = chunks[i]
        if b <= s + len(chunk):
            if a == s and b == s + len(chunk):
                return chunk
            return memoryview(chunk)[a - s : b - s]
        parts: list[bytes | memoryview] = [memoryview(chunk)[a - s :]]
        pos = s + len(chunk)
        i += 1
        while pos < b:
            chunk = chunks[i]
            take = min(len(chunk), b - pos)
            parts.append(chunk if take == len(chunk) else memoryview(chunk)[:take])
            pos += take
            i += 1
        return b"".join(parts)

    def release(self, upto: int) -> None:
        """Forget bytes below ``upto`` (they were acknowledged)."""
        if upto <= self.start:
            return
        upto = min(upto, self.end)
        self.start = upto
        chunks = self._chunks
        starts = self._starts
        head = self._head
        n = len(chunks)
        while head < n and starts[head] + len(chunks[head]) <= upto:
            chunks[head] = b""
            head += 1
        if head >= _COMPACT_AT and head * 2 >= n:
            del chunks[:head]
            del starts[:head]
            head = 0
        self._head = head
