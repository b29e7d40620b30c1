"""IP fragment reassembly (RFC 791 3.2, RFC 815 holes; IPv6: RFC 8200 4.5, RFC 5722).

Fragments are kept as ``(offset, bytes)`` chunks per datagram, keyed by
(source, destination, protocol, identification) as RFC 791 prescribes. The
datagram is complete when the last fragment (MF=0) fixed the total length and
the chunks cover ``0 .. total`` without a hole (RFC 815's hole list, computed on
demand over the sorted chunks).

Hostile input is bounded three ways:

- memory: every held chunk is charged ``len + CHUNK_OVERHEAD`` against
  ``limit`` (all datagrams together); over the limit the oldest datagrams are
  evicted (``drop.reassembly-limit``), as Linux evicts its oldest queues;
- time: a datagram not completed ``timeout`` seconds after its first fragment
  is dropped (``drop.reassembly-timeout``);
- fragments per datagram: at most ``MAX_FRAGMENTS``.

Overlaps (IPv4): a fragment whose bytes agree with what is already held is
accepted (a retransmitted or re-fragmented duplicate); one that disagrees makes
the whole datagram unusable, so it is dropped (``drop.reassembly-overlap``), as
Linux does since the FragmentSmack fixes. IPv6 (``strict``): any overlap but an
exact duplicate drops the datagram (RFC 5722, RFC 8200 4.5).

The same reassembler (and memory bound) serves IPv6 fragments through ``add``,
keyed by (source, destination, identification) as RFC 8200 4.5 prescribes.
No ICMP time-exceeded is sent on timeout (RFC 792 makes it optional: "may").
"""

from __future__ import annotations

from stack.wire.ipv4 import Ipv4Packet

__all__ = ["CHUNK_OVERHEAD", "MAX_FRAGMENTS", "Ipv4Reassembler"]

CHUNK_OVERHEAD = 64  # bytes charged per chunk besides its data (tuple + bytes object headers)
MAX_FRAGMENTS = 256
MAX_DATAGRAM = 65535

_Key = tuple[object, ...]


class _Datagram:
    __slots__ = ("charged", "chunks", "created", "header", "total")

    def __init__(self, created: float) -> None:
        self.created = created
        self.chunks: list[tuple[int, bytes]] = []  # sorted by offset
        self.total: int | None = None  # payload length, known once the MF=0 fragment arrived
        self.header: bytes | None = None  # IP header of the offset-0 fragment (ICMP quoting)
        self.charged = 0


class Ipv4Reassembler:
    """Sans-I/O: ``receive`` fragments, call ``expire`` at ``get_timer()``."""

    __slots__ = ("_counters", "_datagrams", "limit", "memory", "timeout")

    def __init__(self, limit: int, timeout: float, counters: dict[str, int]) -> None:
        self.limit = limit
        self.timeout = timeout
        self.memory = 0
        self._datagrams: dict[_Key, _Datagram] = {}  # insertion order == creation order
        self._counters = counters

    def __len__(self) -> int:
        return len(self._datagrams)

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] = self._counters.get(name, 0) + n

    def _drop(self, key: _Key, reason: str) -> None:
        dgram = self._datagrams.pop(key)
        self.memory -= dgram.charged
        self._count("drop." + reason)
        self._publish()

    def _publish(self) -> None:
        self._counters["reassembly.bytes"] = self.memory
        self._counters["reassembly.datagrams"] = len(self._datagrams)

    def receive(self, packet: Ipv4Packet, now: float) -> tuple[bytes, bytes] | None:
        """Add one IPv4 fragment. Returns ``(first_fragment_header, payload)`` when the
        datagram is complete, else None (held, or dropped and counted)."""
        start = packet.frag_offset
        return self.add(
            (packet.src, packet.dst, packet.protocol, packet.ident),
            start,
            bytes(packet.payload),
            packet.more_fragments,
            bytes(packet.header) if start == 0 else None,
            MAX_DATAGRAM - packet.header_len,
            now,
        )

    def add(
        self, key: tuple[object, ...], start: int, data: bytes, more: bool,
        header: bytes | None, max_len: int, now: float, *, strict: bool = False,
    ) -> tuple[bytes, bytes] | None:  # fmt: skip
        """Add one fragment of the datagram ``key``: ``data`` at byte ``start``,
        ``more`` unless it is the last; ``header`` (kept for the caller) comes with
        the offset-0 fragment; the payload may not exceed ``max_len``. With
        ``strict`` any overlap other than an exact duplicate drops the datagram
        (RFC 5722 for IPv6). Returns ``(header, payload)`` once complete."""
        end = start + len(data)
        if (more and (len(data) == 0 or len(data) % 8)) or end > max_len:
            # RFC 791 / RFC 8200 4.5: every fragment but the last carries a multiple
            # of 8 bytes; the reassembled datagram must fit its 16-bit length field.
            self._count("drop.reassembly-bad-fragment")
            return None
        dgram = self._datagrams.get(key)
        if dgram is None:
            dgram = self._datagrams[key] = _Datagram(now)
        total = dgram.total
        if not more:
            if (total is not None and total != end) or (
                dgram.chunks and dgram.chunks[-1][0] + len(dgram.chunks[-1][1]) > end
            ):
                self._drop(key, "reassembly-overlap")  # two different ends
                return None
            dgram.total = total = end
        elif total is not None and end > total:
            self._drop(key, "reassembly-overlap")
            return None
        # Overlap with held chunks: consistent duplicates are fine, disagreement is not.
        covered = 0
        for s, d in dgram.chunks:
            if s >= end:
                break
            e = s + len(d)
            if e <= start:
                continue
            lo, hi = max(s, start), min(e, end)
            if (strict and (s != start or e != end)) or d[lo - s : hi - s] != data[
                lo - start : hi - start
            ]:
                self._drop(key, "reassembly-overlap")
                return None
            covered += hi - lo
        if covered < len(data):  # something new (a full duplicate adds nothing)
            if len(dgram.chunks) >= MAX_FRAGMENTS:
                self._drop(key, "reassembly-too-many-fragments")
                return None
            cost = len(data) + CHUNK_OVERHEAD
            if cost + dgram.charged > self.limit:
                self._drop(key, "reassembly-limit")
                return None
            while self.memory + cost > self.limit:
                oldest = next(iter(self._datagrams))
                if oldest == key:  # never evict the one being filled: others go first
                    oldest = list(self._datagrams)[1]
                self._drop(oldest, "reassembly-limit")
            dgram.chunks.append((start, data))
            dgram.chunks.sort(key=_offset)
            dgram.charged += cost
            self.memory += cost
        if header is not None:
            dgram.header = header
        if total is None:
            self._publish()
            return None
        # RFC 815: is there a hole left in 0 .. total?
        pos = 0
        for s, d in dgram.chunks:
            if s > pos:
                self._publish()
                return None
            pos = max(pos, s + len(d))
        del self._datagrams[key]
        self.memory -= dgram.charged
        self._publish()
        out = bytearray(total)
        for s, d in dgram.chunks:
            out[s : s + len(d)] = d
        self._count("reassembly.completed")
        assert dgram.header is not None  # chunk at offset 0 exists since there is no hole
        return dgram.header, bytes(out)

    def get_timer(self) -> float | None:
        for dgram in self._datagrams.values():
            return dgram.created + self.timeout
        return None

    def expire(self, now: float) -> None:
        """Drop datagrams older than ``timeout`` (RFC 791: the reassembly timer)."""
        while self._datagrams:
            key, dgram = next(iter(self._datagrams.items()))
            if dgram.created + self.timeout > now:
                break
            self._drop(key, "reassembly-timeout")


def _offset(chunk: tuple[int, bytes]) -> int:
    return chunk[0]
