"""The answer cache (hand-set clock) and the coalescer."""

from __future__ import annotations

import asyncio

import pytest
from dnslib import QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSQuestion, DNSRecord

from tunproxy.dns.cache import Coalescer, DnsCache, cache_ttl


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(name: str, rcode: int = RCODE.NOERROR, answers: list[RR] | None = None,
             soa: tuple[int, int] | None = None) -> DNSRecord:  # fmt: skip
    record = DNSRecord(DNSHeader(qr=1, rcode=rcode), q=DNSQuestion(name, QTYPE.A))
    for rr in answers or []:
        record.add_answer(rr)
    if soa is not None:
        ttl, minimum = soa
        times = (1, 3600, 600, 86400, minimum)
        record.add_auth(RR("test.", QTYPE.SOA, ttl=ttl, rdata=SOA("ns.test.", "h.test.", times)))
    return record


def a_rr(name: str, address: str, ttl: int) -> RR:
    return RR(name, QTYPE.A, ttl=ttl, rdata=A(address))


KEY = ("a.test", QTYPE.A, 1)


def test_positive_answer_ages_and_expires() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    answers = [a_rr("a.test", "10.0.0.1", 60), a_rr("a.test", "10.0.0.2", 30)]
    assert cache.put(KEY, response("a.test", answers=answers))
    clock.now += 10
    hit = cache.get(KEY)
    assert hit is not None and hit.rcode == RCODE.NOERROR
    assert [(str(rr.rdata), rr.ttl) for rr in hit.rr] == [("10.0.0.1", 50), ("10.0.0.2", 20)]
    clock.now += 19.9
    assert cache.get(KEY) is not None  # the RRset lives for its smallest TTL, 30 s
    clock.now += 0.1
    assert cache.get(KEY) is None
    assert len(cache) == 0


def test_nxdomain_cached_for_soa_minimum() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock)
    assert cache.put(KEY, response("a.test", RCODE.NXDOMAIN, soa=(300, 20)))
    clock.now += 19
    hit = cache.get(KEY)
    assert hit is not None and hit.rcode == RCODE.NXDOMAIN and not hit.rr
    assert hit.auth[0].rtype == QTYPE.SOA and hit.auth[0].ttl == 300 - 19
    clock.now += 1
    assert cache.get(KEY) is None


def test_nodata_cached_for_soa_ttl_when_smaller() -> None:
    assert cache_ttl(response("a.test", soa=(15, 900))) == 15


def test_negative_without_soa_not_cached() -> None:
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, response("a.test", RCODE.NXDOMAIN))
    assert cache.get(KEY) is None


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED, RCODE.FORMERR])
def test_failures_not_cached(rcode: int) -> None:
    cache = DnsCache(clock=Clock())
    assert not cache.put(KEY, response("a.test", rcode, soa=(300, 300)))


def test_zero_ttl_not_cached_and_caps_apply() -> None:
    clock = Clock()
    cache = DnsCache(clock=clock, max_ttl=100, negative_max_ttl=50)
    assert not cache.put(KEY, response("a.test", answers=[a_rr("a.test", "10.0.0.1", 0)]))
    cache.put(KEY, response("a.test", answers=[a_rr("a.test", "10.0.0.1", 10**6)]))
    clock.now += 100
    assert cache.get(KEY) is None
    cache.put(KEY, response("a.test", RCODE.NXDOMAIN, soa=(10**6, 10**6)))
    clock.now += 50
    assert cache.get(KEY) is None


def test_bounded_lru() -> None:
    cache = DnsCache(max_entries=2, clock=Clock())
    for i, name in enumerate(("a.test", "b.test", "c.test")):
        cache.put((name, 1, 1), response(name, answers=[a_rr(name, f"10.0.0.{i}", 60)]))
        if name == "b.test":
            cache.get(("a.test", 1, 1))  # a is now more recent than b
    assert cache.get(("a.test", 1, 1)) is not None
    assert cache.get(("b.test", 1, 1)) is None
    assert cache.get(("c.test", 1, 1)) is not None


def test_coalescer_runs_once_for_concurrent_callers() -> None:
    asyncio.run(_coalescer_runs_once())


async def _coalescer_runs_once() -> None:
    coalescer: Coalescer[str, int] = Coalescer()
    release = asyncio.Event()
    calls = 0

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    waiters = [asyncio.ensure_future(coalescer.run("k", work)) for _ in range(10)]
    await asyncio.sleep(0)
    assert "k" in coalescer
    release.set()
    assert await asyncio.gather(*waiters) == [42] * 10
    assert calls == 1 and coalescer.started == 1 and coalescer.joined == 9
    assert "k" not in coalescer
    # Afterwards a new call runs again (no stale result is kept).
    assert await coalescer.run("k", work) == 42 and calls == 2


def test_coalescer_shares_errors_and_survives_a_cancelled_waiter() -> None:
    asyncio.run(_coalescer_shares_errors())


async def _coalescer_shares_errors() -> None:
    coalescer: Coalescer[str, int] = Coalescer()
    release = asyncio.Event()

    async def failing() -> int:
        await release.wait()
        raise LookupError("upstream said no")

    first = asyncio.ensure_future(coalescer.run("k", failing))
    second = asyncio.ensure_future(coalescer.run("k", failing))
    await asyncio.sleep(0)
    first.cancel()  # the first caller gives up; the work goes on for the second
    await asyncio.sleep(0)
    release.set()
    with pytest.raises(LookupError):
        await second
    assert first.cancelled()
