"""Upstream groups (mihomo's ``proxy-groups``): one Outbound choosing among others.

- ``select``: the chosen member (the first until ``select(name)`` changes it).
- ``fallback``: the first member alive, in the order given.
- ``url-test``: the alive member with the lowest latency; it changes only when another is
  faster by more than ``tolerance`` ms (no flapping between near-equals).
- ``load-balance``: members picked by rendezvous (highest-random-weight) hashing of the
  destination host, so one destination keeps its member while the alive set stays the same,
  and only the flows of a member that died move.

Health checks (all kinds but ``select``): every ``interval`` seconds an HTTP GET of ``url``
goes through each member (``open_stream``, so through the proxy as flows go); a member is
alive when a status line comes back within ``timeout``, and its latency is kept. A flow whose
member fails to connect marks it dead at once and is retried on the next choice, so failover
does not wait for the next check; recovery is noticed by the next check.

``GroupState`` holds the decisions and is sans-I/O (time passed in); ``GroupOutbound`` is the
asyncio adapter around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tunproxy.errors import ConnectRefused, ConnectTimeout, OutboundError, ProxyError
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamProtocol,
    Target,
    note_member,
    trail,
)

__all__ = ["GROUP_KINDS", "GroupConfig", "GroupOutbound", "GroupState", "Probe", "trail"]

log = logging.getLogger("tunproxy.groups")

GROUP_KINDS = ("select", "fallback", "url-test", "load-balance")


@dataclass(slots=True)
class GroupConfig:
    name: str
    kind: str
    members: list[str]
    url: str = "http://www.gstatic.com/generate_204"
    interval: float = 300.0
    timeout: float = 5.0
    tolerance: float = 0.0  # ms
    line: int = 0
    file: str = ""
    skipped: list[str] = field(default_factory=list)  # members tunproxy cannot use


class GroupState:
    """Which member each new flow goes to. ``alive`` starts all True (unknown = usable)."""

    def __init__(self, kind: str, members: Sequence[str], tolerance: float = 0.0) -> None:
        if not members:
            raise ValueError("a group needs at least one member")
        self.kind = kind
        self.members = list(members)
        self.alive = dict.fromkeys(self.members, True)
        self.latency: dict[str, float | None] = dict.fromkeys(self.members)
        self.selected = self.members[0]
        self.tolerance = tolerance / 1000.0
        self._fastest: str | None = None
        # A url-test or fallback group's member fixed through the controller (mihomo's
        # ``fixed``): taken first while it is alive, the group's own choice otherwise.
        self.fixed: str | None = None

    def select(self, name: str) -> None:
        if name not in self.alive:
            raise ValueError(f"{name!r} is not a member")
        self.selected = name

    def fix(self, name: str | None) -> None:
        """Fix a url-test or fallback group on ``name``; None unfixes it."""
        if name is not None and name not in self.alive:
            raise ValueError(f"{name!r} is not a member")
        self.fixed = name

    def report(self, member: str, latency: float | None) -> None:
        """A health check's (or a failed connection's, with None) outcome."""
        self.alive[member] = latency is not None
        self.latency[member] = latency
        if self.kind == "url-test":
            self._refastest()

    def _refastest(self) -> None:
        timed = [(lat, m) for m, lat in self.latency.items() if lat is not None and self.alive[m]]
        if not timed:
            self._fastest = None
            return
        best_lat, best = min(timed)
        cur = self._fastest
        cur_lat = self.latency.get(cur) if cur is not None else None
        if cur is None or cur_lat is None or not self.alive[cur] or (
            best_lat + self.tolerance < cur_lat
        ):
            self._fastest = best

    def order(self, key: str) -> list[str]:
        """Members to try for a flow to ``key`` (the destination host), best first: alive
        ones by the group's choice, then the dead ones (a check may be stale)."""
        alive = [m for m in self.members if self.alive[m]]
        dead = [m for m in self.members if not self.alive[m]]
        if self.kind == "select":
            return [self.selected]
        if self.kind == "load-balance":
            return sorted(alive, key=lambda m: _weight(key, m), reverse=True) + dead
        if self.kind == "url-test":
            first = self._fastest if self._fastest in alive else None
            rest = sorted(alive, key=lambda m: (self.latency[m] is None, self.latency[m] or 0))
            alive = ([first] if first else []) + [m for m in rest if m != first]
        fixed = self.fixed
        if fixed is not None and fixed in alive:  # url-test, fallback: while it is alive
            alive = [fixed, *(m for m in alive if m != fixed)]
        return alive + dead


def _weight(key: str, member: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{member}".encode(), digest_size=8).digest(),
                          "big")


class _StatusLine(asyncio.Protocol):
    def __init__(self) -> None:
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n" in self.buf and not self.done.done():
            self.done.set_result(self.buf.split(b"\r\n", 1)[0])

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before a status line"))


class Probe:
    """One health check: an HTTP GET of ``url`` through an outbound; the seconds until the
    status line came back, or None. https:// runs TLS over the outbound's stream, the
    certificate not verified: a check sends nothing secret and measures reachability."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        host = parts.hostname or ""
        self._tls_host = host if parts.scheme == "https" else None
        port = parts.port or (443 if self._tls_host is not None else 80)
        try:
            ipaddress.ip_address(host)
            self._target = Target(port, address=host)
        except ValueError:
            self._target = Target(port, domain=host)
        self._request = (f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} "
                         f"HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: tunproxy\r\n"
                         "Connection: close\r\n\r\n").encode()

    async def run(self, outbound: Outbound, timeout: float) -> float | None:
        start = time.monotonic()
        proto = _StatusLine()
        transport: asyncio.Transport | None = None
        try:
            async with asyncio.timeout(timeout):
                transport = await outbound.open_stream(self._target, proto, timeout=timeout)
                if self._tls_host is not None:
                    transport = await self._start_tls(transport, proto)
                transport.write(self._request)
                line = await proto.done
            if line.startswith(b"HTTP/"):
                return time.monotonic() - start
        except (OSError, OutboundError, TimeoutError, ConnectionError, ValueError) as exc:
            log.debug("health check of %s failed: %s", self._target.host, exc)
        finally:
            if transport is not None:
                transport.close()
        return None

    async def _start_tls(
        self, transport: asyncio.Transport, proto: asyncio.Protocol
    ) -> asyncio.Transport:
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        tls = await asyncio.get_running_loop().start_tls(
            transport, proto, ctx, server_hostname=self._tls_host or None
        )
        if tls is None:
            raise ConnectionError("TLS handshake did not complete")
        return tls


class GroupOutbound(Outbound):
    """An Outbound over ``members`` (other Outbounds), chosen by a ``GroupState``."""

    def __init__(self, config: GroupConfig, members: dict[str, Outbound]) -> None:
        self.name = config.name
        self.config = config
        self.members = members
        self.state = GroupState(config.kind, list(members), config.tolerance)
        self._checker: asyncio.Task[None] | None = None
        self._probe = Probe(config.url)
        self.checked_at: dict[str, float] = {}  # member -> wall time of its last check

    def start(self) -> None:
        """Start the health checks (needs a running loop; idempotent)."""
        if self.config.kind != "select" and self._checker is None:
            self._checker = asyncio.get_running_loop().create_task(self._check_forever())

    async def _check_forever(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.interval)

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(name) for name in self.state.members))

    async def _check(self, name: str) -> None:
        latency = await self._probe.run(self.members[name], self.config.timeout)
        if latency is None:
            log.debug("group %s: health check through %s failed", self.name, name)
        was = self.state.alive[name]
        self.state.report(name, latency)
        self.checked_at[name] = time.time()
        if was != (latency is not None):
            log.info("group %s: member %s is %s", self.name, name,
                     "up" if latency is not None else "down")

    def now(self) -> str | None:
        """The member a new flow would take now (mihomo's ``now``); None for load-balance,
        which picks by destination."""
        if self.config.kind == "load-balance":
            return None
        return self.state.order("")[0]

    def _candidates(self, target: Target) -> list[str]:
        self.start()
        return self.state.order(target.host)

    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        last: OutboundError | None = None
        for name in self._candidates(target):
            try:
                transport = await self.members[name].open_stream(target, protocol,
                                                                 timeout=timeout)
                note_member(name)
                return transport
            except (ConnectRefused, ConnectTimeout, ProxyError, OSError) as exc:
                if self.config.kind == "select":
                    raise
                last = exc if isinstance(exc, OutboundError) else ConnectRefused(str(exc))
                if self.state.alive.get(name):
                    log.info("group %s: member %s is down (%s)", self.name, name, exc)
                self.state.report(name, None)
        raise last or ConnectRefused(f"group {self.name}: no member")

    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        last: OutboundError | None = None
        for name in self._candidates(target):
            try:
                session = await self.members[name].open_datagram(target, receiver,
                                                                 timeout=timeout)
                note_member(name)
                return session
            except (ConnectRefused, ConnectTimeout, ProxyError, OSError) as exc:
                if self.config.kind == "select":
                    raise
                last = exc if isinstance(exc, OutboundError) else ConnectRefused(str(exc))
        raise last or ConnectRefused(f"group {self.name}: no member")

    def select(self, name: str) -> None:
        """Switch a ``select`` group (for the controller API)."""
        self.state.select(name)

    async def aclose(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None


def groups_without_udp(groups: dict[str, GroupConfig], no_udp: set[str]) -> set[str]:
    """The groups none of whose members (upstreams, or groups, recursively) carry UDP:
    a UDP flow skips a rule naming one, as for such an upstream. (mihomo asks the member
    chosen at the time; a group with any UDP member is taken to carry UDP.)"""
    out: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, g in groups.items():
            if name not in out and g.members and all(
                m in no_udp or m in out or m == "REJECT" for m in g.members
            ) and any(m != "REJECT" for m in g.members):
                out.add(name)
                changed = True
    return out


def build_groups(groups: dict[str, GroupConfig], outbounds: dict[str, Outbound]) -> None:
    """Add a GroupOutbound per group to ``outbounds``; members may be groups defined in any
    order (mihomo allows it), but not in a cycle (checked when the config was read)."""
    pending = dict(groups)
    while pending:
        ready = [g for g in pending.values()
                 if all(m in outbounds or m not in groups for m in g.members)]
        if not ready:
            raise ValueError(f"proxy groups in a cycle: {', '.join(pending)}")
        for g in ready:
            members = {m: outbounds[m] for m in g.members if m in outbounds}
            outbounds[g.name] = GroupOutbound(g, members)
            del pending[g.name]
