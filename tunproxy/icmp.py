"""Honest ping: echo requests from the TUN go where the policy sends the address.

The stack hands each echo request to a unicast address over as an ``EchoRequest``
(``StackConfig.echo_events``); ``Pinger.handle`` decides it like a flow
(network ``icmp``, no port):

- DIRECT: a real echo request leaves from this host (marked with the fwmark, so it
  skips the tunnel); the destination's reply is relayed back into the TUN, so
  ``ping`` shows real reachability and real round-trip times. No reply, no answer.
- REJECT: ICMP host unreachable; DROP: nothing.
- an upstream (SOCKS5 cannot carry ICMP): ICMP administratively prohibited, at once
  (``ping`` prints "Packet filtered"), never a made-up reply.
- a fake-ip address: the domain's real address (same family) is pinged.

Sockets: an unprivileged ICMP datagram socket (``socket(AF_INET, SOCK_DGRAM,
IPPROTO_ICMP)``, allowed for groups in ``net.ipv4.ping_group_range``; the kernel
picks the identifier and hands us only our replies), else a raw socket (root /
CAP_NET_RAW; replies filtered by our identifier). Either way the request carries
our own identifier and sequence number, mapped back to the app's on the reply, so
the app's own ping socket never sees a reply meant for tunproxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable

import rules
from stack import EchoRequest, Refusal, Stack
from stack.flow import ip_text
from stack.wire import icmpv4, icmpv6
from tunproxy.policy import Policy

__all__ = ["Pinger"]

log = logging.getLogger("tunproxy.icmp")

REPLY_TIMEOUT = 30.0  # a request unanswered this long is forgotten (its reply would be late)
MAX_PENDING = 4096

_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence


class _Socket:
    """One ICMP socket of one family: datagram if allowed, else raw."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        family: socket.AddressFamily,
        fwmark: int | None,
        on_reply: Callable[[str, int, int, bytes], None],
    ) -> None:
        proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
        self.family = family
        self.raw = False
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM, proto)
        except PermissionError:
            sock = socket.socket(family, socket.SOCK_RAW, proto)  # needs CAP_NET_RAW
            self.raw = True
        try:
            sock.setblocking(False)
            if fwmark is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        except OSError:
            sock.close()
            raise
        self.sock = sock
        self.ident = os.getpid() & 0xFFFF if self.raw else 0  # datagram: the kernel's
        log.info("pings to %s leave through an ICMP %s socket", family.name,
                 "raw" if self.raw else "datagram")  # fmt: skip
        self.loop = loop
        self.on_reply = on_reply
        loop.add_reader(sock.fileno(), self._readable)

    def send(self, address: str, seq: int, data: bytes) -> None:
        v4 = self.family == socket.AF_INET
        buf = bytearray(8 + len(data))
        if v4:
            icmpv4.Icmpv4Repr(icmpv4.ECHO_REQUEST, 0, self.ident, seq, data).emit(buf)
        else:  # the kernel fills in the ICMPv6 checksum (it knows the source address)
            _ECHO.pack_into(buf, 0, icmpv6.ECHO_REQUEST, 0, 0, self.ident, seq)
            buf[8:] = data
        self.sock.sendto(bytes(buf), (address, 0))

    def _readable(self) -> None:
        for _ in range(64):
            try:
                packet, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error queued on the socket, say
                log.debug("ping socket: %s", exc)
                continue
            if self.raw and self.family == socket.AF_INET:
                packet = packet[(packet[0] & 0x0F) * 4 :]  # raw IPv4 includes the IP header
            if len(packet) < 8:
                continue
            kind, code, _, ident, seq = _ECHO.unpack_from(packet)
            reply = icmpv4.ECHO_REPLY if self.family == socket.AF_INET else icmpv6.ECHO_REPLY
            if kind != reply or code != 0 or (self.raw and ident != self.ident):
                continue
            self.on_reply(str(addr[0]).split("%")[0], seq, ident, packet[8:])

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class Pinger:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stack: Stack,
        policy: Callable[[], Policy],
        flush_soon: Callable[[], None],
        fwmark: int | None,
    ) -> None:
        self.loop = loop
        self.stack = stack
        self.policy = policy
        self.flush_soon = flush_soon
        self.fwmark = fwmark
        self._sockets: dict[socket.AddressFamily, _Socket | None] = {}
        self._seq = 0
        # our sequence number -> (request, address pinged, deadline)
        self._pending: dict[int, tuple[EchoRequest, str, float]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters = {"forwarded": 0, "replied": 0, "refused": 0, "dropped": 0}

    def handle(self, request: EchoRequest) -> None:
        task = self.loop.create_task(self._handle(request))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bug: handling a ping failed", exc_info=task.exception())

    def _refuse(self, request: EchoRequest, how: str) -> None:
        self.counters["dropped" if how == Refusal.DROP else "refused"] += 1
        self.stack.refuse_echo(request, how, self.loop.time())
        self.flush_soon()

    async def _handle(self, request: EchoRequest) -> None:
        policy = self.policy()
        dst = ip_text(request.dst)
        dns = policy.dns
        domain = dns.domain_for(dst) if dns is not None else None
        fake = dns is not None and dns.is_fake(dst)
        if fake and domain is None:
            self._refuse(request, Refusal.UNREACHABLE)
            return
        verdict = policy.ruleset.match(rules.FlowMeta(
            network="icmp", src_ip=ip_text(request.src), src_port=0,
            dst_ip=None if fake else dst, dst_port=0, domain=domain,
        ))  # fmt: skip
        route = policy.route(verdict.target, tcp=False)
        if route.outbound is None:
            self._refuse(request, route.refusal or Refusal.UNREACHABLE)
            return
        if route.outbound is not policy.outbounds.get("DIRECT"):
            self._refuse(request, Refusal.PROHIBITED)  # a proxy cannot carry ICMP
            return
        address: str | None = dst
        if fake and dns is not None and domain is not None:
            version = request.version
            found = [a for a in await dns.resolve(domain)
                     if ipaddress.ip_address(a).version == version]  # fmt: skip
            address = found[0] if found else None
        if address is None:
            self._refuse(request, Refusal.UNREACHABLE)
            return
        self._forward(request, address)

    def _socket(self, family: socket.AddressFamily) -> _Socket | None:
        if family not in self._sockets:
            try:
                self._sockets[family] = _Socket(self.loop, family, self.fwmark, self._reply)
            except OSError as exc:
                log.warning("cannot send pings (%s); echo requests are answered with "
                            "'administratively prohibited'", exc)  # fmt: skip
                self._sockets[family] = None
        return self._sockets[family]

    def _forward(self, request: EchoRequest, address: str) -> None:
        family = socket.AF_INET if request.version == 4 else socket.AF_INET6
        sock = self._socket(family)
        if sock is None:
            self._refuse(request, Refusal.PROHIBITED)
            return
        now = self.loop.time()
        if len(self._pending) >= MAX_PENDING:
            self._expire(now)
        self._seq = (self._seq + 1) & 0xFFFF
        self._pending[self._seq] = (request, address, now + REPLY_TIMEOUT)
        try:
            sock.send(address, self._seq, request.data)
        except OSError as exc:
            del self._pending[self._seq]
            log.debug("ping %s: %s", address, exc)
            self._refuse(request, Refusal.UNREACHABLE)
            return
        self.counters["forwarded"] += 1

    def _expire(self, now: float) -> None:
        for seq in [s for s, (_, _, deadline) in self._pending.items() if deadline < now]:
            del self._pending[seq]
        while len(self._pending) >= MAX_PENDING:
            del self._pending[next(iter(self._pending))]

    def _reply(self, source: str, seq: int, ident: int, data: bytes) -> None:
        entry = self._pending.get(seq)
        if entry is None:
            return
        request, address, _ = entry
        if ipaddress.ip_address(source) != ipaddress.ip_address(address):
            return
        del self._pending[seq]
        self.counters["replied"] += 1
        self.stack.send_echo_reply(request, data, self.loop.time())
        self.flush_soon()

    async def aclose(self) -> None:
        for sock in self._sockets.values():
            if sock is not None:
                sock.close()
        self._sockets.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
