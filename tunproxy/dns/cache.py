"""An answer cache that honours TTLs, with negative caching, and a coalescer.

``DnsCache`` is sans-I/O: time comes from an injected clock, so tests move it
by hand. Entries are keyed by (name, qtype, qclass) and bounded (LRU).

- Positive answers live for the smallest TTL in the answer section (RFC 2181
  5.2: an RRset has one TTL), capped at ``max_ttl``; served with TTLs counted
  down by the time spent in the cache (RFC 1035 6.1.3 / RFC 1034 4.3.5).
- NXDOMAIN and NODATA (NOERROR, no answer) live for min(SOA TTL, SOA MINIMUM)
  of the SOA in the authority section (RFC 2308 section 5), capped at
  ``negative_max_ttl``; without an SOA they are not cached (RFC 2308 5: "SHOULD
  NOT be cached").
- SERVFAIL, REFUSED and the like are not cached: the next query tries again.

``Coalescer`` makes N concurrent identical upstream queries one: the first
caller starts the work, the others await the same result.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from dnslib import QTYPE, RCODE, RR, DNSRecord

__all__ = ["CacheKey", "CachedAnswer", "Coalescer", "DnsCache", "cache_ttl"]

CacheKey = tuple[str, int, int]  # (lower-case name without trailing dot, qtype, qclass)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What a cache hit gives back: rcode and sections with TTLs already counted down."""

    rcode: int
    rr: list[RR]
    auth: list[RR]
    ar: list[RR]


@dataclass(slots=True)
class _Entry:
    stored_at: float
    expires_at: float
    rcode: int
    rr: list[RR]
    auth: list[RR]
    ar: list[RR]


def _negative_ttl(response: DNSRecord) -> int | None:
    for rr in response.auth:
        if rr.rtype == QTYPE.SOA:
            # RFC 2308 section 5: TTL of the SOA, but no more than its MINIMUM field.
            return int(min(rr.ttl, rr.rdata.times[-1]))
    return None


def cache_ttl(response: DNSRecord) -> int | None:
    """How long ``response`` may be cached, in seconds; None = not cacheable."""
    rcode = response.header.rcode
    if rcode == RCODE.NOERROR and response.rr:
        return int(min(rr.ttl for rr in response.rr))
    if rcode == RCODE.NXDOMAIN or (rcode == RCODE.NOERROR and not response.rr):
        return _negative_ttl(response)
    return None


def _aged(records: list[RR], elapsed: int) -> list[RR]:
    return [
        RR(rr.rname, rr.rtype, rr.rclass, max(0, rr.ttl - elapsed), rr.rdata)
        if rr.rtype != QTYPE.OPT
        else rr
        for rr in records
    ]


class DnsCache:
    def __init__(
        self,
        max_entries: int = 4096,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_ttl: int = 86400,
        negative_max_ttl: int = 3 * 3600,  # RFC 2308 section 5: one to three hours
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._max_ttl = max_ttl
        self._negative_max_ttl = negative_max_ttl
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, response: DNSRecord) -> bool:
        """Store ``response`` if it is cacheable; returns whether it was stored."""
        ttl = cache_ttl(response)
        if ttl is None or ttl <= 0:
            return False
        negative = not response.rr
        ttl = min(ttl, self._negative_max_ttl if negative else self._max_ttl)
        now = self._clock()
        self._entries[key] = _Entry(
            stored_at=now,
            expires_at=now + ttl,
            rcode=response.header.rcode,
            rr=list(response.rr),
            auth=list(response.auth),
            ar=[rr for rr in response.ar if rr.rtype != QTYPE.OPT],
        )
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True

    def get(self, key: CacheKey) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now >= entry.expires_at:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        elapsed = int(now - entry.stored_at)
        return CachedAnswer(
            entry.rcode, _aged(entry.rr, elapsed), _aged(entry.auth, elapsed),
            _aged(entry.ar, elapsed),
        )  # fmt: skip

    def clear(self) -> None:
        self._entries.clear()


class Coalescer(Generic[K, V]):
    """One in-flight computation per key; concurrent callers share its result.

    The shared work runs in its own task, so a caller that is cancelled (or
    times out) does not cancel it for the others.
    """

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Task[V]] = {}
        self.started = 0  # how many computations actually ran (tests, counters)
        self.joined = 0  # how many callers rode on someone else's computation

    def __len__(self) -> int:
        return len(self._inflight)

    def __contains__(self, key: object) -> bool:
        return key in self._inflight

    async def run(self, key: K, factory: Callable[[], Awaitable[V]]) -> V:
        task = self._inflight.get(key)
        if task is None:
            self.started += 1

            async def work() -> V:
                return await factory()

            task = asyncio.ensure_future(work())
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._forget(key, _t))
        else:
            self.joined += 1
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters got it, or nobody is left to care

    def cancel_all(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
