"""SOCKS5 outbound: the asyncio dialer around ``tunproxy.protocols.socks5``.

TCP: connect to the proxy with a marked socket, run the codec in a handshake
Protocol, then give the transport to the relay's protocol (``set_protocol``).
The request names the domain when the flow has one, so the proxy resolves it
and no DNS query leaves this host.

UDP (RFC 1928 section 7): one UDP ASSOCIATE per local UDP session. Its control
connection stays open while the session lives, and its closing ends the
session (the association ends with it, RFC 1928 section 6). Datagrams go to
the relay address from the reply (the proxy's own address when the reply says
0.0.0.0 or ::) with the section 7 header; fragments, malformed datagrams and
datagrams from any other source are dropped.

With ``pipeline``, the request goes out with the greeting (one round trip less
per connection; the proxy must read its input as a stream, as dante does).

Failures: a reply code maps to what the app would see (5 -> ConnectRefused,
3/4 -> Unreachable, 6 -> ConnectTimeout, others -> ProxyError); a proxy that
cannot be reached, breaks the protocol or stalls before the request ->
ProxyError.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from typing import cast

from tunproxy.errors import (
    ConnectRefused,
    ConnectTimeout,
    OutboundError,
    ProxyError,
    Unreachable,
)
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamProtocol,
    Target,
)
from tunproxy.outbounds.direct import address_family, dial_tcp, marked_socket
from tunproxy.protocols.socks5 import (
    Connected,
    Failed,
    Reply,
    Socks5Client,
    Socks5LocalError,
    Socks5RemoteError,
    State,
    UdpDatagram,
    emit_address,
)

__all__ = ["Socks5Outbound"]

log = logging.getLogger(__name__)


class Socks5Outbound(Outbound):
    def __init__(
        self,
        name: str,
        server_host: str,
        server_port: int,
        username: str | None = None,
        password: str | None = None,
        fwmark: int | None = None,
        udp: bool = True,
        interface: str | None = None,
        pipeline: bool = False,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        self.name = name
        self.server_host = server_host
        self.server_port = server_port
        self.auth = (username, password) if username is not None and password is not None else None
        self.fwmark = fwmark
        self.udp = udp
        self.interface = interface
        self.pipeline = pipeline
        self._sessions: set[_UdpAssociation] = set()
        self._proxy = f"{server_host}:{server_port}"
        if ":" in server_host:
            self._proxy = f"[{server_host}]:{server_port}"

    def __repr__(self) -> str:
        return f"Socks5Outbound({self.name!r}, {self._proxy})"

    # --- shared: reach the proxy and run the handshake --------------------------------------

    async def _proxy_address(self) -> str:
        try:
            ipaddress.ip_address(self.server_host)
        except ValueError:
            pass
        else:
            return self.server_host
        # A proxy given by name: the system resolver, once per connection. Give an IP
        # literal in the config to depend on nothing.
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(
                self.server_host, self.server_port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise ProxyError(f"SOCKS5 proxy {self._proxy}: cannot resolve: {exc}") from exc
        return str(infos[0][4][0])

    async def _dial(self, holder: list[_Handshake]) -> tuple[asyncio.Transport, _Handshake]:
        """TCP to the proxy (marked), with a handshake protocol attached."""
        loop = asyncio.get_running_loop()
        address = await self._proxy_address()
        try:
            sock = await dial_tcp(
                address, self.server_port, fwmark=self.fwmark, interface=self.interface
            )
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ProxyError(f"SOCKS5 proxy {self._proxy} is down: {reason}") from exc
        handshake = _Handshake(Socks5Client(self.auth, pipeline=self.pipeline), loop)
        holder.append(handshake)
        try:
            transport, _ = await loop.create_connection(lambda: handshake, sock=sock)
        except BaseException:
            sock.close()
            raise
        return transport, handshake

    # --- TCP --------------------------------------------------------------------------------

    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        _check_expressible(target)
        holder: list[_Handshake] = []
        try:
            async with asyncio.timeout(timeout):
                transport, handshake = await self._dial(holder)
                handshake.codec.connect(target.host, target.port)
                handshake.flush()
                event = await handshake.done
        except TimeoutError:
            state = holder[0].codec.state if holder else State.IDLE
            _abandon(holder)
            # A proxy that ignores what follows the greeting stalls just like this.
            hint = "; or it does not take pipelined requests" if self.pipeline else ""
            if state is State.AWAIT_REPLY:
                # The proxy has our request: it is the destination that does not answer.
                raise ConnectTimeout(
                    f"{target}: no answer within {timeout:g} s (via SOCKS5 proxy "
                    f"{self._proxy}{hint})"
                ) from None
            raise ProxyError(
                f"SOCKS5 proxy {self._proxy} did not answer within {timeout:g} s "
                f"(stuck in {state.value}{hint})"
            ) from None
        except _Refused as failure:
            _abandon(holder)
            raise self._reply_error(failure.event, target) from None
        except BaseException:
            _abandon(holder)
            raise
        handshake.hand_over(protocol, event)
        return transport

    def _reply_error(self, event: Failed, target: Target) -> OutboundError:
        text = f"{target}: {event.message} (SOCKS5 proxy {self._proxy})"
        code = event.reply_code
        if code == Reply.CONNECTION_REFUSED:
            return ConnectRefused(text)
        if code in (Reply.NETWORK_UNREACHABLE, Reply.HOST_UNREACHABLE):
            return Unreachable(text)
        if code == Reply.TTL_EXPIRED:
            return ConnectTimeout(text)
        return ProxyError(text)

    # --- UDP --------------------------------------------------------------------------------

    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        if not self.udp:
            raise ProxyError(f"{self.name}: UDP is disabled for SOCKS5 proxy {self._proxy}")
        _check_expressible(target)
        loop = asyncio.get_running_loop()
        holder: list[_Handshake] = []
        udp_sock: socket.socket | None = None
        try:
            async with asyncio.timeout(timeout):
                control, handshake = await self._dial(holder)
                local = control.get_extra_info("sockname")
                proxy_ip = control.get_extra_info("peername")[0]
                # Our datagrams will come from the control connection's address and
                # this socket's port; tell the proxy exactly (RFC 1928 section 4).
                udp_sock = marked_socket(
                    address_family(local[0]), socket.SOCK_DGRAM,
                    fwmark=self.fwmark, interface=self.interface,
                )
                udp_sock.bind((local[0], 0))
                handshake.codec.udp_associate(local[0], udp_sock.getsockname()[1])
                handshake.flush()
                event = await handshake.done
                relay = self._relay_address(event, proxy_ip, udp_sock.family)
                # Connected: the kernel now drops datagrams from anyone but the relay.
                udp_sock.connect(relay)
                association = _UdpAssociation(self, target, receiver, control, relay)
                await loop.create_datagram_endpoint(lambda: association, sock=udp_sock)
        except TimeoutError:
            _close_quietly(udp_sock)
            _abandon(holder)
            raise ProxyError(
                f"SOCKS5 proxy {self._proxy}: no UDP ASSOCIATE within {timeout:g} s"
            ) from None
        except _Refused as failure:
            _close_quietly(udp_sock)
            _abandon(holder)
            raise ProxyError(
                f"SOCKS5 proxy {self._proxy} refused UDP ASSOCIATE: {failure.event.message}"
            ) from None
        except OSError as exc:
            _close_quietly(udp_sock)
            _abandon(holder)
            raise ProxyError(f"SOCKS5 proxy {self._proxy}: UDP relay: {exc}") from exc
        except BaseException:
            _close_quietly(udp_sock)
            _abandon(holder)
            raise
        # From here the control connection only tells us when the association ends.
        control.set_protocol(association.control_protocol)
        association.control_protocol.connection_made(control)
        control.resume_reading()
        self._sessions.add(association)
        return association

    def _relay_address(
        self, event: Connected, proxy_ip: str, family: socket.AddressFamily
    ) -> tuple[str, int]:
        try:
            ip = ipaddress.ip_address(event.bound_addr)
        except ValueError:
            raise ProxyError(
                f"SOCKS5 proxy {self._proxy} named its UDP relay {event.bound_addr!r}: "
                "only IP addresses are supported"
            ) from None
        # RFC 1928 leaves an unspecified BND.ADDR to mean "the address you reached me at".
        host = proxy_ip if ip.is_unspecified else ip.compressed
        if address_family(host) != family:
            raise ProxyError(
                f"SOCKS5 proxy {self._proxy}: UDP relay {host} is not in the control "
                "connection's address family"
            )
        return host, event.bound_port

    async def aclose(self) -> None:
        for association in list(self._sessions):
            association.close()


class _Refused(Exception):
    """Carries the codec's Failed event (a refusal the protocol allows) through ``done``."""

    def __init__(self, event: Failed) -> None:
        super().__init__(event.message)
        self.event = event


def _check_expressible(target: Target) -> None:
    """Refuse up front a target SOCKS5 cannot carry (a domain over 255 bytes, ...)."""
    try:
        emit_address(target.host, target.port)
    except Socks5LocalError as exc:
        raise Unreachable(f"{target}: cannot be sent through SOCKS5: {exc}") from None


def _abandon(holder: list[_Handshake]) -> None:
    for handshake in holder:
        handshake.abandon()


def _close_quietly(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.close()


class _Handshake(asyncio.Protocol):
    """Drives the codec over the proxy connection until the command's reply.

    ``done`` resolves to the Connected event, or raises ProxyError (the proxy broke
    the protocol or closed) or _Refused (a refusal the protocol allows). On Connected,
    reading pauses so that no payload byte arrives before ``hand_over``.
    """

    def __init__(self, codec: Socks5Client, loop: asyncio.AbstractEventLoop) -> None:
        self.codec = codec
        self.done: asyncio.Future[Connected] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._late = bytearray()  # bytes after Connected, should a read slip through
        self._late_eof = False
        self._lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast: uvloop's transports do not subclass asyncio.Transport
        self.transport = cast(asyncio.Transport, transport)
        self.flush()

    def flush(self) -> None:
        data = self.codec.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            self._late += data
            return
        try:
            events = self.codec.receive_data(data)
        except Socks5RemoteError as exc:
            self._fail(ProxyError(f"the SOCKS5 proxy broke the protocol: {exc}"))
            return
        self.flush()
        for event in events:
            if isinstance(event, Connected):
                assert self.transport is not None
                self.transport.pause_reading()
                self.done.set_result(event)
            else:
                self._fail(_Refused(event))

    def eof_received(self) -> bool:
        if not self.done.done():
            try:
                self.codec.receive_eof()
            except Socks5RemoteError as exc:
                self._fail(ProxyError(str(exc)))
            return False
        self._late_eof = True
        return True  # keep the write side for the relay; it learns of the EOF in hand_over

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            reason = f": {exc}" if exc is not None else ""
            self._fail(ProxyError(f"the SOCKS5 proxy closed the connection{reason}"))
        self._lost = (exc,)

    def _fail(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def abandon(self) -> None:
        """The caller gave up: close, and let nobody wait on ``done``."""
        if not self.done.done():
            self.done.cancel()
        elif not self.done.cancelled():
            self.done.exception()  # retrieved: no "never retrieved" warning
        if self.transport is not None:
            self.transport.abort()

    def hand_over(self, protocol: StreamProtocol, event: Connected) -> None:
        """Give the transport to the relay's protocol, as if it had been there all along."""
        transport = self.transport
        assert transport is not None
        transport.set_protocol(protocol)
        if self._lost is None and not self._late_eof:
            # Re-arm reading first: the first read happens on a later loop iteration,
            # after the callbacks below, so a pause the protocol asks for still holds.
            transport.resume_reading()
        protocol.connection_made(transport)
        data = event.leftover + bytes(self._late)
        if data:
            protocol.data_received(data)
        if self._lost is not None:
            protocol.connection_lost(self._lost[0])
        elif self._late_eof and not protocol.eof_received():
            transport.close()


class _ControlProtocol(asyncio.Protocol):
    """The association's TCP connection after the handshake: it only signals the end."""

    def __init__(self, association: _UdpAssociation) -> None:
        self.association = association

    def data_received(self, data: bytes) -> None:
        # RFC 1928 defines nothing on this connection after the reply; ignore it.
        log.debug("%s: %d unexpected bytes on the UDP control connection", self.association,
                  len(data))

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.association.lose(
            ProxyError(f"{self.association}: the proxy closed the UDP association")
        )


class _UdpAssociation(asyncio.DatagramProtocol, DatagramSession):
    """One UDP ASSOCIATE: the control connection, the relay socket, the header for the target."""

    def __init__(
        self,
        outbound: Socks5Outbound,
        target: Target,
        receiver: DatagramReceiver,
        control: asyncio.Transport,
        relay: tuple[str, int],
    ) -> None:
        self.outbound = outbound
        self.target = target
        self.receiver = receiver
        self.control = control
        self.relay = relay
        # The domain when known: the proxy resolves it (RFC 1928 section 7, ATYP X'03').
        self.header = UdpDatagram.header(target.host, target.port)
        self.control_protocol = _ControlProtocol(self)
        self.transport: asyncio.DatagramTransport | None = None
        self.dropped = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"socks5-udp {self.outbound._proxy} -> {self.target}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast: asyncio's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if self._closed:
            return
        # The socket is connected to the relay, so the kernel filters sources; check
        # anyway in case a platform does not.
        if addr[0] != self.relay[0] or addr[1] != self.relay[1]:
            self.dropped += 1
            return
        try:
            payload = UdpDatagram.payload_of(data)
        except Socks5RemoteError as exc:
            self.dropped += 1
            log.debug("%r: malformed datagram from the relay: %s", self, exc)
            return
        if payload is None:
            self.dropped += 1  # a fragment (RFC 1928 section 7: MUST drop)
            return
        self.receiver.datagram_received(payload)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
            # Nothing listens on the relay port any more: the association is gone.
            self.lose(ProxyError(f"{self!r}: the relay port is closed ({exc.strerror})"))
        else:
            log.debug("%r: %s", self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(exc)

    def lose(self, exc: Exception | None) -> None:
        """The association ended on the proxy's side."""
        if self._closed:
            return
        self._shut()
        self.receiver.session_lost(exc)

    def _shut(self) -> None:
        self._closed = True
        self.outbound._sessions.discard(self)
        if self.transport is not None:
            self.transport.close()
        self.control.close()

    # DatagramSession

    def send(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.sendto(self.header + data)

    def close(self) -> None:
        """Closed by the relay: no session_lost."""
        if not self._closed:
            self._shut()
