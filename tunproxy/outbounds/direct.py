"""DIRECT: carry a flow on an ordinary socket of this host.

Every socket tunproxy opens to the world carries SO_MARK = the fwmark, so the
policy rule that sends everything else into the TUN skips it (no loop), and
optionally SO_BINDTODEVICE to leave by one interface. The same marked-socket
dialer (``marked_socket``, ``dial_tcp``) reaches proxy servers for the other
outbounds.

Errors map to what the app would have seen without tunproxy:

    ECONNREFUSED                          -> ConnectRefused  (RST)
    EHOSTUNREACH, ENETUNREACH, ENETDOWN,
    EADDRNOTAVAIL, no address for a name  -> Unreachable     (ICMP unreachable / RST)
    ETIMEDOUT, the caller's timeout       -> ConnectTimeout
    anything else                         -> OutboundError
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import cast

from tunproxy.errors import ConnectRefused, ConnectTimeout, OutboundError, Unreachable
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamProtocol,
    Target,
)

__all__ = ["DirectOutbound", "Resolver", "dial_tcp", "map_connect_error", "marked_socket"]

log = logging.getLogger(__name__)

Resolver = Callable[[str], Awaitable[list[str]]]
"""Turns a domain into IP literals (empty list: no such name). Supplied by the DNS module."""

_UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EADDRNOTAVAIL}


def address_family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def marked_socket(
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    *,
    fwmark: int | None,
    interface: str | None = None,
) -> socket.socket:
    """A non-blocking socket that bypasses tunproxy's own routing."""
    sock = socket.socket(family, kind)
    try:
        sock.setblocking(False)
        if fwmark is not None:
            # Needs CAP_NET_ADMIN. The routing rules match this mark to skip the TUN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
        if interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        if kind == socket.SOCK_STREAM:
            # The relay writes what the app wrote; Nagle would only add latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        sock.close()
        raise OutboundError(
            f"cannot set up an outgoing socket (mark {fwmark}, interface {interface}): {exc}"
        ) from exc
    return sock


async def dial_tcp(
    address: str, port: int, *, fwmark: int | None, interface: str | None = None
) -> socket.socket:
    """Connect a marked TCP socket to an IP literal. Raises OSError as the kernel
    reports it; the caller bounds the time and maps the error."""
    loop = asyncio.get_running_loop()
    sock = marked_socket(
        address_family(address), socket.SOCK_STREAM, fwmark=fwmark, interface=interface
    )
    try:
        await _connect(loop, sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                   address: tuple[str, int]) -> None:  # fmt: skip
    """Non-blocking connect of ``sock`` to an IP literal. Not the loop's sock_connect:
    uvloop's first resolves the address through getaddrinfo in its thread pool, even an
    IP literal (its numeric fast path needs a socket type it is not given), so every
    connection waited for a thread round trip and a loop turn before its SYN left."""
    err = sock.connect_ex(address)
    if err == errno.EINPROGRESS:
        done = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _settle, done)
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


def _settle(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def map_connect_error(exc: OSError, what: str) -> OutboundError:
    """The OutboundError an app would recognise for a failed connect to ``what``."""
    # Say what errno says (asyncio's sock_connect put "Connect call failed (...)" in strerror).
    text = f"{what}: {os.strerror(exc.errno) if exc.errno else exc}"
    if exc.errno == errno.ECONNREFUSED:
        return ConnectRefused(text)
    if exc.errno in _UNREACHABLE:
        return Unreachable(text)
    if exc.errno == errno.ETIMEDOUT:
        return ConnectTimeout(text)
    return OutboundError(text)


def _describe(target: Target, address: str) -> str:
    return str(target) if target.address == address else f"{target} at {address}"


class DirectOutbound(Outbound):
    def __init__(
        self,
        name: str = "DIRECT",
        fwmark: int | None = None,
        interface: str | None = None,
        resolve: Resolver | None = None,
    ) -> None:
        self.name = name
        self.fwmark = fwmark
        self.interface = interface
        self.resolve = resolve

    def __repr__(self) -> str:
        return f"DirectOutbound({self.name!r}, fwmark={self.fwmark}, interface={self.interface})"

    async def _addresses(self, target: Target) -> list[str]:
        if target.address is not None:
            return [target.address]
        assert target.domain is not None  # Target guarantees one of the two
        if self.resolve is None:
            raise Unreachable(f"{target}: only a domain is known and {self.name} has no resolver")
        try:
            addresses = await self.resolve(target.domain)
        except OSError as exc:
            raise Unreachable(f"{target}: cannot resolve {target.domain}: {exc}") from exc
        if not addresses:
            raise Unreachable(f"{target}: {target.domain} has no address")
        return addresses

    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                sock = await self._connect_any(target)
        except TimeoutError:
            raise ConnectTimeout(f"{target}: no answer within {timeout:g} s") from None
        try:
            # Calls protocol.connection_made(transport), as the interface promises.
            transport, _ = await loop.create_connection(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        return transport

    async def _connect_any(self, target: Target) -> socket.socket:
        """Try each address in turn (the resolver's order); report the last failure."""
        failure: OutboundError | None = None
        for address in await self._addresses(target):
            try:
                return await dial_tcp(
                    address, target.port, fwmark=self.fwmark, interface=self.interface
                )
            except OSError as exc:
                failure = map_connect_error(exc, _describe(target, address))
                log.debug("%s: connect to %s failed: %s", self.name, address, exc)
        assert failure is not None  # _addresses never returns an empty list
        raise failure

    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                addresses = await self._addresses(target)
        except TimeoutError:
            raise ConnectTimeout(f"{target}: no address within {timeout:g} s") from None
        address = addresses[0]
        sock = marked_socket(
            address_family(address), socket.SOCK_DGRAM,
            fwmark=self.fwmark, interface=self.interface,
        )
        try:
            # A connected UDP socket: the kernel drops datagrams from anyone but the
            # target, and ICMP errors about it come back as error_received.
            sock.connect((address, target.port))
            session = UdpSocketSession(receiver, _describe(target, address))
            await loop.create_datagram_endpoint(lambda: session, sock=sock)
        except OSError as exc:
            sock.close()
            raise map_connect_error(exc, _describe(target, address)) from exc
        except BaseException:
            sock.close()
            raise
        return session


class UdpSocketSession(asyncio.DatagramProtocol, DatagramSession):
    """One connected UDP socket, as a DatagramSession and its own protocol.

    An ICMP refusal or unreachable for the target ends the session (the relay
    can then answer the app the same way); other socket errors are transient
    (a full buffer) and only lose that datagram.
    """

    def __init__(self, receiver: DatagramReceiver, what: str) -> None:
        self.receiver = receiver
        self.what = what
        self.transport: asyncio.DatagramTransport | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast: asyncio's selector datagram transport does not subclass DatagramTransport
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self._closed:
            self.receiver.datagram_received(data)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and (
            exc.errno == errno.ECONNREFUSED or exc.errno in _UNREACHABLE
        ):
            self._lose(map_connect_error(exc, self.what))
        else:
            log.debug("udp %s: %s", self.what, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(exc)

    def _lose(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        if self.transport is not None:
            self.transport.close()
        self.receiver.session_lost(exc)

    # DatagramSession

    def send(self, data: bytes) -> None:
        if not self._closed and self.transport is not None:
            self.transport.sendto(data)

    def close(self) -> None:
        """Closed by the relay: no session_lost."""
        if not self._closed:
            self._closed = True
            if self.transport is not None:
                self.transport.close()
