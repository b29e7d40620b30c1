"""The DNS hijack handler: every query the machine sends to port 53 ends here.

``DnsService.handle_query`` answers one wire-format query:

1. Malformed input never raises: FORMERR if a header was readable, else drop.
2. ``block`` domains: NXDOMAIN, or 0.0.0.0 / :: (``block-response: zero``).
3. ``hosts`` domains: the static addresses (remembered as real-ip mappings).
4. PTR for an address in the fake range: the domain it stands for, never upstream.
5. fake-ip mode, domain not in ``fake-ip-filter``:
   - A/AAAA: an address from the fake range, TTL ``dns.ttl``;
   - HTTPS/SVCB (65/64): an empty NOERROR answer (NODATA). This is the safer of
     the two choices: stripping the address hints would still leave ``alpn`` and
     alias targets, and any SvcParam added later could carry addresses again;
     with NODATA the client falls back to A/AAAA, which it gets from the fake range.
   - anything else is forwarded, with A/AAAA records dropped from every section
     (MX/SRV additional data must not hand out real addresses either).
6. real-ip mode (and filtered domains): forwarded upstream; the A/AAAA addresses
   in the answer are remembered with the queried name; SVCB/HTTPS records lose
   ipv4hint/ipv6hint/ech (see ``svcb.py``).

Upstream answers go through a TTL cache (negative caching per RFC 2308) and a
coalescer (N identical concurrent queries make one upstream query). All
configured servers are asked at once and the first useful answer wins; if none
answers within ``dns.timeout`` the client gets SERVFAIL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import time
from collections.abc import Callable, Sequence

from dnslib import (
    AAAA,
    CLASS,
    EDNS0,
    OPCODE,
    PTR,
    QTYPE,
    RCODE,
    RD,
    RR,
    A,
    DNSBuffer,
    DNSHeader,
    DNSQuestion,
    DNSRecord,
)

from tunproxy.dns.cache import CachedAnswer, CacheKey, Coalescer, DnsCache
from tunproxy.dns.config import DnsConfig, parse_dns_config
from tunproxy.dns.domains import DomainMap, DomainSet, normalize_domain
from tunproxy.dns.fakeip import FakeIpPool
from tunproxy.dns.realip import RealIpMemory
from tunproxy.dns.resolvers import OutboundFor, Resolver, ResolverError, make_resolver
from tunproxy.dns.svcb import SvcbError, strip_svc_params

__all__ = ["DnsConfig", "DnsService", "parse_dns_config"]

log = logging.getLogger("tunproxy.dns")

QTYPE_SVCB = 64
QTYPE_HTTPS = 65
ADDRESS_TYPES = (QTYPE.A, QTYPE.AAAA)
UPSTREAM_UDP_SIZE = 1232  # EDNS buffer size of DNS Flag Day 2020: no IP fragmentation
MAX_UDP_ANSWER = 1232  # what we send back over UDP before setting TC
MAX_UPSTREAM_INFLIGHT = 256  # distinct upstream queries at once; more wait (within the timeout)


def _reverse_address(name: str) -> str | None:
    """``4.3.2.1.in-addr.arpa`` -> ``1.2.3.4`` (and the ip6.arpa nibble form)."""
    labels = name.split(".")
    try:
        if name.endswith(".in-addr.arpa") and len(labels) == 6:
            return str(ipaddress.IPv4Address(".".join(reversed(labels[:4]))))
        if name.endswith(".ip6.arpa") and len(labels) == 34:
            nibbles = "".join(reversed(labels[:32]))
            return str(ipaddress.IPv6Address(int(nibbles, 16)))
    except ValueError:
        return None
    return None


def _error_from_header(query: bytes, rcode: int = RCODE.FORMERR) -> bytes | None:
    """An empty answer with ``rcode`` built from the header alone: FORMERR for a message
    whose header at least is readable (RFC 1035 4.1.1)."""
    if len(query) < 12 or query[2] & 0x80:  # no header, or it is a response: drop
        return None
    flags = ((query[2] | 0x80) << 8) | 0x80 | rcode  # QR set, opcode and RD kept, RA set
    flags &= ~0x0600  # AA, TC clear
    return query[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)


class DnsService:
    def __init__(
        self,
        config: DnsConfig,
        outbound_for: OutboundFor,
        *,
        clock: Callable[[], float] = time.monotonic,
        resolvers: Sequence[Resolver] | None = None,
    ) -> None:
        """``clock`` drives cache expiry (tests pass a hand-set one); ``resolvers``
        replaces the ones built from ``config.servers`` (tests, embedding)."""
        self.config = config
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "queries", "malformed", "dropped", "fake_answers", "blocked", "hosts",
                "forwarded", "cache_hits", "upstream_queries", "upstream_failures",
                "coalesced", "servfail", "truncated", "errors",
            ),
            0,
        )  # fmt: skip
        self.pool = FakeIpPool(config.fake_ip_ranges, config.fake_ip_size)
        if config.fake_ip_persist:
            try:
                restored = self.pool.load(config.fake_ip_persist)
                log.info("restored %d fake-ip mappings from %s", restored,
                         config.fake_ip_persist)  # fmt: skip
            except ValueError as exc:
                log.warning("ignoring fake-ip snapshot: %s", exc)
        self.realip = RealIpMemory(config.realip_size)
        self.cache = DnsCache(config.cache_size, clock=clock)
        self.coalescer: Coalescer[CacheKey, DNSRecord] = Coalescer()
        self.resolvers: list[Resolver] = (
            list(resolvers)
            if resolvers is not None
            else [make_resolver(s, outbound_for) for s in config.servers]
        )
        self._upstream_slots = asyncio.Semaphore(MAX_UPSTREAM_INFLIGHT)
        # Servers given by name without "#ip=": resolving them through ourselves would
        # wait on the very lookup that needs them (until the timeout). A proxy can still
        # reach them by name; DIRECT cannot, and is told so at once.
        self._server_names = {normalize_domain(s.host) for s in config.servers if s.address is None}
        self._filter = DomainSet(config.fake_ip_filter)
        self._block = DomainSet(config.block)
        self._hosts: DomainMap[tuple[str, ...]] = DomainMap(config.hosts.items())
        for name, addresses in config.hosts.items():
            if not name.startswith(("+.", "*.")):
                self.realip.remember(name, addresses)

    # --- the interface the relay uses ---------------------------------------------

    def hijacks(self, address: str, port: int, network: str) -> bool:
        return self.config.enable and any(
            h.matches(address, port, network) for h in self.config.hijack
        )

    def is_fake(self, address: str) -> bool:
        return self.config.mode == "fake-ip" and self.pool.contains(address)

    def domain_for(self, address: str) -> str | None:
        if self.is_fake(address):
            # A fake address we do not know is refused by the caller, never guessed.
            return self.pool.domain_for(address)
        return self.realip.domain_for(address)

    async def resolve(self, domain: str) -> list[str]:
        """Real addresses of ``domain`` (IPv4 first); [] if it has none or upstream fails."""
        name = normalize_domain(domain)
        try:
            return [str(ipaddress.ip_address(name))]  # already an address
        except ValueError:
            pass
        if name in self._block:
            return []
        static = self._hosts.get(name)
        if static is not None:
            return sorted(static, key=lambda a: ":" in a)
        if name in self._server_names:
            log.warning(
                "dns.servers: %s is needed to resolve itself; give its address with "
                "'#ip=' in the URL, or a 'hosts' entry", name,
            )  # fmt: skip
            return []
        results = await asyncio.gather(
            self._lookup(name, QTYPE.A, CLASS.IN),
            self._lookup(name, QTYPE.AAAA, CLASS.IN),
            return_exceptions=True,
        )
        addresses: list[str] = []
        for result in results:
            if isinstance(result, BaseException):
                if not isinstance(result, (ResolverError, TimeoutError, asyncio.CancelledError)):
                    log.error("resolving %s failed", name, exc_info=result)
                continue
            for rr in result.rr:
                if rr.rtype in ADDRESS_TYPES:
                    address = str(rr.rdata)
                    if not self.pool.contains(address):
                        addresses.append(address)
        return addresses

    async def handle_query(
        self, query: bytes, *, network: str, client: tuple[str, int]
    ) -> bytes | None:
        """Answer one DNS message (over TCP: without its 2-byte length prefix).

        ``network`` is "udp" or "tcp" (UDP answers are truncated to what the client
        can take); ``client`` is the querier's address (for logs). Never raises:
        None means drop (no readable header, or a response sent to us).
        """
        self.counters["queries"] += 1
        try:
            request = DNSRecord.parse(query)
        except Exception:  # dnslib raises several types on garbage
            self.counters["malformed"] += 1
            return _error_from_header(query)
        header = request.header
        if header.qr:
            self.counters["dropped"] += 1  # a response sent to us: never answer it (loops)
            return None
        if header.opcode != OPCODE.QUERY:
            return self._finish(request, self._reply(request, RCODE.NOTIMP), network)
        if len(request.questions) != 1:
            self.counters["malformed"] += 1
            return self._finish(request, self._reply(request, RCODE.FORMERR), network)
        try:
            reply = await self._answer(request)
        except (ResolverError, TimeoutError) as exc:
            log.debug("upstream failed for %s: %s", request.q.qname, exc)
            self.counters["servfail"] += 1
            reply = self._reply(request, RCODE.SERVFAIL)
        except Exception:
            log.exception("DNS answer for %s failed", request.q.qname)
            self.counters["errors"] += 1
            self.counters["servfail"] += 1
            reply = self._reply(request, RCODE.SERVFAIL)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s %s from %s:%d -> %s %s", network, request.q.qname,
                QTYPE.get(request.q.qtype), client[0], client[1],
                RCODE.get(reply.header.rcode), " ".join(str(rr.rdata) for rr in reply.rr)[:200],
            )  # fmt: skip
        try:
            return self._finish(request, reply, network)
        except Exception:  # an upstream record dnslib cannot write back, say
            log.exception("DNS answer for %s could not be encoded", request.q.qname)
            self.counters["errors"] += 1
            self.counters["servfail"] += 1
            return _error_from_header(query, RCODE.SERVFAIL)

    def save(self) -> None:
        """Write the fake-ip table to ``fake-ip-persist`` (if configured)."""
        if self.config.fake_ip_persist:
            self.pool.save(self.config.fake_ip_persist)

    async def aclose(self) -> None:
        try:
            self.save()
        except OSError as exc:
            log.warning("could not save the fake-ip table: %s", exc)
        self.coalescer.cancel_all()
        for resolver in self.resolvers:
            await resolver.aclose()

    # --- answering ----------------------------------------------------------------

    @staticmethod
    def _reply(request: DNSRecord, rcode: int) -> DNSRecord:
        header = DNSHeader(
            id=request.header.id, qr=1, opcode=request.header.opcode, aa=0, tc=0,
            rd=request.header.rd, ra=1, rcode=rcode,
        )  # fmt: skip
        return DNSRecord(header, questions=list(request.questions))

    def _finish(self, request: DNSRecord, reply: DNSRecord, network: str) -> bytes:
        opt = next((rr for rr in request.ar if rr.rtype == QTYPE.OPT), None)
        if opt is not None:
            # RFC 6891 7: a request with OPT gets an OPT back.
            reply.ar = [rr for rr in reply.ar if rr.rtype != QTYPE.OPT]
            reply.add_ar(EDNS0(udp_len=UPSTREAM_UDP_SIZE))
        data = bytes(reply.pack())  # dnslib packs a bytearray; the compiled stack takes bytes
        if network == "udp":
            # RFC 1035 4.2.1 / RFC 6891 6.2.5: no more than the client can take over UDP.
            limit = 512 if opt is None else min(max(opt.rclass, 512), MAX_UDP_ANSWER)
            if len(data) > limit:
                self.counters["truncated"] += 1
                reply.header.tc = 1
                reply.rr, reply.auth = [], []
                reply.ar = [rr for rr in reply.ar if rr.rtype == QTYPE.OPT]
                data = bytes(reply.pack())
        return data

    async def _answer(self, request: DNSRecord) -> DNSRecord:
        question = request.q
        qname = question.qname
        name = normalize_domain(str(qname))
        qtype, qclass = question.qtype, question.qclass
        config = self.config

        if name == "localhost" or name.endswith(".localhost"):
            # RFC 6761 6.3: loopback, never a fake address nor a query upstream.
            reply = self._reply(request, RCODE.NOERROR)
            if qtype == QTYPE.A:
                reply.add_answer(RR(qname, QTYPE.A, CLASS.IN, config.ttl, A("127.0.0.1")))
            elif qtype == QTYPE.AAAA:
                reply.add_answer(RR(qname, QTYPE.AAAA, CLASS.IN, config.ttl, AAAA("::1")))
            return reply
        if name == "invalid" or name.endswith(".invalid"):
            return self._reply(request, RCODE.NXDOMAIN)  # RFC 6761 6.4

        if name in self._block:
            self.counters["blocked"] += 1
            if config.block_response == "nxdomain":
                return self._reply(request, RCODE.NXDOMAIN)
            reply = self._reply(request, RCODE.NOERROR)
            if qtype == QTYPE.A:
                reply.add_answer(RR(qname, QTYPE.A, CLASS.IN, config.ttl, A("0.0.0.0")))
            elif qtype == QTYPE.AAAA:
                reply.add_answer(RR(qname, QTYPE.AAAA, CLASS.IN, config.ttl, AAAA("::")))
            return reply

        static = self._hosts.get(name)
        if static is not None and qtype in (*ADDRESS_TYPES, QTYPE_HTTPS, QTYPE_SVCB):
            self.counters["hosts"] += 1
            reply = self._reply(request, RCODE.NOERROR)
            version = 4 if qtype == QTYPE.A else 6
            for address in static:
                if qtype in ADDRESS_TYPES and ipaddress.ip_address(address).version == version:
                    rdata = A(address) if version == 4 else AAAA(address)
                    reply.add_answer(RR(qname, qtype, CLASS.IN, config.ttl, rdata))
            self.realip.remember(name, static)
            return reply

        if qtype == QTYPE.PTR:
            reversed_address = _reverse_address(name)
            if reversed_address is not None and self.pool.contains(reversed_address):
                domain = self.pool.domain_for(reversed_address)
                if domain is None:
                    return self._reply(request, RCODE.NXDOMAIN)
                reply = self._reply(request, RCODE.NOERROR)
                reply.add_answer(RR(qname, QTYPE.PTR, CLASS.IN, config.ttl, PTR(domain + ".")))
                return reply

        filtered = name in self._filter or (
            config.fake_ip_filter_match is not None and config.fake_ip_filter_match(name)
        )
        fake = config.mode == "fake-ip" and not filtered and qclass == CLASS.IN
        if fake and qtype in ADDRESS_TYPES:
            self.counters["fake_answers"] += 1
            reply = self._reply(request, RCODE.NOERROR)
            fake_address = self.pool.address_for(name, 4 if qtype == QTYPE.A else 6)
            if fake_address is not None:  # no range of this family: NODATA
                rdata = A(fake_address) if qtype == QTYPE.A else AAAA(fake_address)
                reply.add_answer(RR(qname, qtype, CLASS.IN, config.ttl, rdata))
            return reply
        if fake and qtype in (QTYPE_HTTPS, QTYPE_SVCB):
            self.counters["fake_answers"] += 1
            return self._reply(request, RCODE.NOERROR)  # NODATA; see the module docstring

        self.counters["forwarded"] += 1
        answer = await self._lookup(name, qtype, qclass)
        reply = self._reply(request, answer.rcode)
        if answer.rcode == RCODE.SERVFAIL:
            self.counters["servfail"] += 1
        sections: list[list[RR]] = [answer.rr, answer.auth, answer.ar]
        if fake:
            sections = [[rr for rr in s if rr.rtype not in ADDRESS_TYPES] for s in sections]
        else:
            self._remember(name, answer)
        reply.rr, reply.auth, reply.ar = (self._strip_svcb(s) for s in sections)
        return reply

    def _remember(self, name: str, answer: CachedAnswer) -> None:
        self.realip.remember(name, [str(rr.rdata) for rr in answer.rr if rr.rtype in ADDRESS_TYPES])
        for rr in answer.ar:  # glue / additional data: remember under its own name
            if rr.rtype in ADDRESS_TYPES:
                self.realip.remember(normalize_domain(str(rr.rname)), [str(rr.rdata)])

    @staticmethod
    def _strip_svcb(records: list[RR]) -> list[RR]:
        out = []
        for rr in records:
            if rr.rtype in (QTYPE_HTTPS, QTYPE_SVCB):
                buffer = DNSBuffer()
                rr.rdata.pack(buffer)
                try:
                    stripped = strip_svc_params(bytes(buffer.data))
                except SvcbError:
                    continue  # unreadable: drop the record rather than pass hints through
                if stripped is None:
                    continue
                rr = RR(rr.rname, rr.rtype, rr.rclass, rr.ttl, RD(stripped))
            out.append(rr)
        return out

    # --- upstream -----------------------------------------------------------------

    async def _lookup(self, name: str, qtype: int, qclass: int) -> CachedAnswer:
        key: CacheKey = (name, qtype, qclass)
        hit = self.cache.get(key)
        if hit is not None:
            self.counters["cache_hits"] += 1
            return hit
        if key in self.coalescer:
            self.counters["coalesced"] += 1
        deadline = asyncio.get_running_loop().time() + self.config.timeout
        async with asyncio.timeout_at(deadline):
            response = await self.coalescer.run(key, lambda: self._fetch(key, deadline))
        return CachedAnswer(
            response.header.rcode,
            list(response.rr),
            list(response.auth),
            [rr for rr in response.ar if rr.rtype != QTYPE.OPT],
        )

    async def _fetch(self, key: CacheKey, deadline: float) -> DNSRecord:
        if not self.resolvers:
            raise ResolverError("no upstream resolvers configured")
        # The shared lookup ends with its first caller's budget, slot wait included: with
        # a dead upstream, lookups queued behind the slots would otherwise start only once
        # their callers had their SERVFAIL, and pile up on the dead server after them.
        async with asyncio.timeout_at(deadline), self._upstream_slots:
            return await self._fetch_now(key)

    async def _fetch_now(self, key: CacheKey) -> DNSRecord:
        name, qtype, qclass = key
        self.counters["upstream_queries"] += 1
        query = DNSRecord(DNSHeader(id=0, rd=1), q=DNSQuestion(name + ".", qtype, qclass))
        query.add_ar(EDNS0(udp_len=UPSTREAM_UDP_SIZE))
        wire = query.pack()
        tasks = [asyncio.ensure_future(self._ask(resolver, wire)) for resolver in self.resolvers]
        last: DNSRecord | None = None
        error: BaseException | None = None
        try:
            for next_done in asyncio.as_completed(tasks):
                try:
                    response = await next_done
                except ResolverError as exc:
                    error = exc
                    continue
                # Another server may do better than SERVFAIL / REFUSED: keep listening.
                if response.header.rcode in (RCODE.SERVFAIL, RCODE.REFUSED):
                    last = response
                    continue
                self.cache.put(key, response)
                return response
        finally:
            for task in tasks:
                task.cancel()
        self.counters["upstream_failures"] += 1
        if last is not None:
            return last
        raise ResolverError(str(error) if error else "no answer")

    async def _ask(self, resolver: Resolver, wire: bytes) -> DNSRecord:
        answer = await resolver.exchange(wire, timeout=self.config.timeout)
        try:
            return DNSRecord.parse(answer)
        except Exception as exc:
            raise ResolverError(f"{resolver}: unparsable answer: {exc}") from exc
