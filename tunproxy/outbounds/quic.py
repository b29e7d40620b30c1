"""QUIC upstream: MASQUE over one HTTP/3 connection per upstream.

TCP flows: HTTP/3 CONNECT (RFC 9114 section 4.4), one request stream per flow,
``:authority`` = the flow's domain when known (the proxy resolves it: no local DNS
leak) else its IP; the stream's DATA = the flow's bytes, FIN = half-close, a stream
reset = RST. UDP flows: CONNECT-UDP (RFC 9298), HTTP Datagrams (RFC 9297) with context
ID 0 in QUIC DATAGRAM frames, or in DATAGRAM capsules on the request stream when a
datagram does not fit a QUIC packet.

The connection opens on the first flow and is shared by all of them; it is kept alive
by PINGs and, when it dies, its flows end (the relay resets the apps) and the next flow
dials again, with the session ticket of the last one (TLS resumption).

Failures: a 407 (wrong token) is a ProxyError logged once per connection; other
refusals map the proxy's Proxy-Status (RFC 9209) to what the app would see.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any, cast

from tunproxy.errors import ConnectRefused, ConnectTimeout, OutboundError, ProxyError, Unreachable
from tunproxy.h3link import (
    CERTIFICATE_ALERTS,
    H3_CONNECT_ERROR,
    ClientTLS,
    H3Link,
    Headers,
    LinkSettings,
    SessionTicket,
    dial,
)
from tunproxy.masque import (
    DEFAULT_UDP_TEMPLATE,
    CapsuleParser,
    MasqueError,
    connect_request,
    connect_udp_request,
    datagram_prefix,
    parse_http_datagram,
    response_status,
)
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamProtocol,
    Target,
)
from tunproxy.outbounds.direct import address_family, marked_socket

__all__ = ["QuicOutbound"]

log = logging.getLogger(__name__)

# Bytes a stream holds for a local app that is not reading before the connection stops
# reading its socket (see h3link's "Flow control").
HOLD_LIMIT = 1024 * 1024
# Unsent bytes queued on a stream before the local sender is paused.
SEND_LIMIT = 1024 * 1024


class QuicOutbound(Outbound):
    def __init__(
        self,
        name: str,
        server_host: str,
        server_port: int,
        *,
        token: str | None = None,
        sni: str | None = None,
        ca: str | None = None,
        insecure: bool = False,
        udp: bool = True,
        udp_template: str = DEFAULT_UDP_TEMPLATE,
        fwmark: int | None = None,
        interface: str | None = None,
        idle_timeout: float = 30.0,
        keepalive: float = 10.0,
        max_datagram_size: int = 1200,
        congestion: str = "cubic",
        cert: str | None = None,
        key: str | None = None,
    ) -> None:
        self.name = name
        self.server_host = server_host
        self.server_port = server_port
        self.token = token
        self.udp = udp
        self.udp_template = udp_template
        self.fwmark = fwmark
        self.interface = interface
        self.keepalive = keepalive
        self._proxy = f"[{server_host}]:{server_port}" if ":" in server_host else (
            f"{server_host}:{server_port}")
        server_name = sni
        if server_name is None:
            try:
                ipaddress.ip_address(server_host)
            except ValueError:
                server_name = server_host
        self.tls = ClientTLS(server_name=server_name, cafile=ca, insecure=insecure,
                             certfile=cert, keyfile=key)
        self.settings = LinkSettings(idle_timeout=idle_timeout, max_datagram_size=max_datagram_size,
                                     congestion=congestion)
        self._connection: _Connection | None = None
        self._dialing: asyncio.Future[_Connection] | None = None
        self._told_token = False
        self._told_certificate = False
        if insecure:
            log.warning(
                "upstream %s: TLS certificate of %s is NOT verified (insecure: true): "
                "anyone on the path can read and change this traffic", name, self._proxy,
            )

    def __repr__(self) -> str:
        return f"QuicOutbound({self.name!r}, {self._proxy})"

    # -- the shared connection ------------------------------------------------------------
    async def _connect(self, timeout: float) -> _Connection:
        connection = self._connection
        if connection is not None and connection.link.alive:
            return connection
        if self._dialing is None:
            self._dialing = asyncio.ensure_future(self._dial())
            dialing = self._dialing
            dialing.add_done_callback(lambda f: self._dial_done(f))
        try:
            return await asyncio.wait_for(asyncio.shield(self._dialing), timeout)
        except TimeoutError:
            raise ProxyError(
                f"QUIC proxy {self._proxy}: no handshake within {timeout:g} s"
            ) from None

    def _dial_done(self, future: asyncio.Future[_Connection]) -> None:
        self._dialing = None
        if not future.cancelled() and future.exception() is None:
            self._connection = future.result()

    async def _dial(self) -> _Connection:
        address = await self._proxy_address()
        if self.tls.session_ticket is not None:
            try:
                return await self._dial_once(address)
            except ProxyError as exc:
                # A ticket the server no longer knows (it restarted) should only cost the
                # resumption; qh3 2.1 fails the whole handshake instead. Once more without.
                log.debug("upstream %s: handshake with a session ticket failed (%s); "
                          "retrying without", self.name, exc)
                self.tls.session_ticket = None
        return await self._dial_once(address)

    async def _dial_once(self, address: str) -> _Connection:
        holder: list[_Connection] = []

        def factory(link: H3Link) -> _Connection:
            connection = _Connection(self, link)
            holder.append(connection)
            return connection

        def make_socket(addr: str) -> socket.socket:
            return marked_socket(
                address_family(addr), socket.SOCK_DGRAM, fwmark=self.fwmark,
                interface=self.interface,
            )

        try:
            await dial(
                make_socket, address, self.server_port, self.tls, self.settings, factory,
                self._store_ticket, SEND_LIMIT,
            )
        except ConnectionError:
            reason = holder[0].link.closed_reason if holder else None
            raise ProxyError(
                f"QUIC proxy {self._proxy}: handshake failed"
                + (f": {reason}" if reason else "")
            ) from None
        except OSError as exc:
            raise ProxyError(f"QUIC proxy {self._proxy}: {exc}") from exc
        connection = holder[0]
        connection.start_keepalive()
        log.info("upstream %s: QUIC connection to %s is up%s", self.name, self._proxy,
                 " (TLS session resumed)" if connection.link.resumed else "")
        return connection

    def _store_ticket(self, ticket: SessionTicket) -> None:
        self.tls.session_ticket = ticket

    async def _proxy_address(self) -> str:
        try:
            ipaddress.ip_address(self.server_host)
        except ValueError:
            pass
        else:
            return self.server_host
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.server_host, self.server_port,
                                           type=socket.SOCK_DGRAM)
        except OSError as exc:
            raise ProxyError(f"QUIC proxy {self._proxy}: cannot resolve: {exc}") from exc
        return str(infos[0][4][0])

    def refusal(self, status: int, headers: Headers, target: Target) -> OutboundError:
        text = f"{target}: QUIC proxy {self._proxy} answered {status}"
        if status == 407:
            if not self._told_token:
                self._told_token = True
                log.error("upstream %s: QUIC proxy %s refused the token (407): check 'token'",
                          self.name, self._proxy)
            return ProxyError(f"{target}: QUIC proxy {self._proxy} refused the token (407)")
        proxy_status = dict(headers).get(b"proxy-status", b"").decode("ascii", "replace")
        if proxy_status:
            text += f" ({proxy_status})"
        if "connection_refused" in proxy_status or "destination_ip_prohibited" in proxy_status:
            return ConnectRefused(text)
        if "timeout" in proxy_status:
            return ConnectTimeout(text)
        if "dns" in proxy_status or "unreachable" in proxy_status or status == 403:
            return Unreachable(text)
        if status in (502, 503):
            return ConnectRefused(text)
        return ProxyError(text)

    # -- Outbound -------------------------------------------------------------------------
    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        async with _deadline(timeout, target, self._proxy):
            connection = await self._connect(timeout)
            stream = _Stream(connection, protocol)
            status, headers = await stream.open(
                connect_request(target.host, target.port, self.token))
        if not 200 <= status < 300:
            stream.forget()
            raise self.refusal(status, headers, target)
        stream.established()
        return stream

    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        if not self.udp:
            raise ProxyError(f"{self.name}: UDP is disabled for QUIC proxy {self._proxy}")
        async with _deadline(timeout, target, self._proxy):
            connection = await self._connect(timeout)
            session = _UdpSession(connection, receiver, target)
            authority = self.tls.server_name or self.server_host
            authority = f"[{authority}]" if ":" in authority else authority
            status, headers = await session.open(connect_udp_request(
                f"{authority}:{self.server_port}", self.udp_template, target.host,
                target.port, self.token))
        if not 200 <= status < 300:
            session.forget()
            raise self.refusal(status, headers, target)
        return session

    async def aclose(self) -> None:
        if self._dialing is not None:
            self._dialing.cancel()
        connection = self._connection
        if connection is not None:
            connection.close("tunproxy stopping")


class _deadline:  # used as a context manager, like asyncio.timeout
    """asyncio.timeout whose TimeoutError becomes a ConnectTimeout naming the target."""

    def __init__(self, timeout: float, target: Target, proxy: str) -> None:
        self._timeout = asyncio.timeout(timeout)
        self._text = f"{target}: no answer within {timeout:g} s (via QUIC proxy {proxy})"

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise ConnectTimeout(self._text) from None


class _Connection:
    """The H3Handler of one QUIC connection: dispatches to its streams."""

    def __init__(self, outbound: QuicOutbound, link: H3Link) -> None:
        self.outbound = outbound
        self.link = link
        self.streams: dict[int, _Stream | _UdpSession] = {}
        self._keepalive: asyncio.TimerHandle | None = None

    def start_keepalive(self) -> None:
        interval = self.outbound.keepalive
        if interval > 0 and self.link.alive:
            self.link.send_keepalive()
            loop = asyncio.get_running_loop()
            self._keepalive = loop.call_later(interval, self.start_keepalive)

    def close(self, reason: str) -> None:
        self.link.shutdown(reason)
        self.h3_closed(reason)

    # H3Handler
    def h3_headers(self, stream_id: int, headers: Headers, ended: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.headers_received(headers, ended)

    def h3_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.data_received(data, ended)

    def h3_datagram(self, stream_id: int, data: bytes) -> None:
        stream = self.streams.get(stream_id)
        if isinstance(stream, _UdpSession):
            stream.http_datagram(data)

    def h3_reset(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.lost(ConnectionResetError("the proxy reset the stream"))

    def h3_stop_sending(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if isinstance(stream, _Stream) and stream.ready:
            # The proxy reads no more from us (h2o says so once the target has closed):
            # our side is over, what it still sends is not.
            stream.fin_sent = True
            if stream.write_paused:
                stream.writable()
            stream._maybe_finished()
        elif stream is not None:
            stream.lost(ConnectionResetError("the proxy stopped reading the stream"))

    def h3_writable(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if isinstance(stream, _Stream):
            stream.writable()

    def h3_closed(self, reason: str) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        outbound = self.outbound
        if outbound._connection is self:
            outbound._connection = None
            log.info("upstream %s: QUIC connection to %s closed: %s", outbound.name,
                     outbound._proxy, reason)
        if self.link.closed_alert in CERTIFICATE_ALERTS and not outbound._told_certificate:
            # Mutual TLS: the proxy checks our certificate after the handshake is done on
            # our side, and closes with an alert. Said once; each flow still gets its RST.
            outbound._told_certificate = True
            log.error("upstream %s: QUIC proxy %s refused our client certificate (%s): %s",
                      outbound.name, outbound._proxy, reason,
                      "it wants one: set 'cert' and 'key'" if outbound.tls.certfile is None
                      else "check 'cert' and 'key' (signed by a CA the proxy trusts?)")
        error = ConnectionResetError(f"QUIC connection to {outbound._proxy} lost: {reason}")
        for stream in list(self.streams.values()):
            stream.lost(error)
        self.streams.clear()
        self.link.close_transport()


class _Request:
    """What a CONNECT and a CONNECT-UDP share: the request and waiting for its answer."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection
        self.link = connection.link
        self.stream_id = -1  # allocated in open(), once the peer allows another stream
        self.response: asyncio.Future[tuple[int, Headers]] = (
            asyncio.get_running_loop().create_future())
        self.closed = False

    async def open(self, headers: Headers) -> tuple[int, Headers]:
        try:
            # The proxy caps concurrent streams (MAX_STREAMS, often 100): wait for a slot.
            await self.link.wait_stream_credit()
        except ConnectionError as exc:
            self.closed = True
            raise ProxyError(f"QUIC proxy {self.connection.outbound._proxy}: connection "
                             f"lost: {exc}") from None
        self.stream_id = self.link.new_stream_id()
        self.opened()
        self.connection.streams[self.stream_id] = cast(Any, self)
        self.link.send_headers(self.stream_id, headers)
        try:
            return await self.response
        except BaseException:
            self.forget()
            raise

    def opened(self) -> None:
        """The stream ID is known."""

    def forget(self) -> None:
        """Give up on the request (refused, timed out): reset the stream, drop it."""
        if not self.closed and self.stream_id >= 0:
            self.closed = True
            self.connection.streams.pop(self.stream_id, None)
            self.link.release(self.stream_id)
            if self.link.alive:
                self.link.reset(self.stream_id, H3_CONNECT_ERROR)

    def headers_received(self, headers: Headers, ended: bool) -> None:
        if self.response.done():
            return  # trailers
        try:
            status = response_status(headers)
        except MasqueError as exc:
            self.response.set_exception(ProxyError(f"QUIC proxy: {exc}"))
            return
        if 100 <= status < 200:
            return
        self.response.set_result((status, headers))

    def lost(self, exc: Exception) -> None:
        if not self.response.done():
            self.response.set_exception(ProxyError(f"QUIC proxy: {exc}"))


class _Stream(_Request, asyncio.Transport):
    """A TCP flow's CONNECT stream, as the asyncio transport the relay's protocol drives."""

    def __init__(self, connection: _Connection, protocol: StreamProtocol) -> None:
        _Request.__init__(self, connection)
        asyncio.Transport.__init__(self)
        self.protocol = protocol
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.taken = 0
        self.reading = True
        self.peer_fin = False
        self.peer_fin_delivered = False
        self.fin_sent = False
        self.write_paused = False
        self.ready = False

    def __repr__(self) -> str:
        return f"quic-stream {self.stream_id} via {self.connection.outbound._proxy}"

    def established(self) -> None:
        self.ready = True
        self.protocol.connection_made(self)
        self._deliver()

    # from the proxy
    def data_received(self, data: bytes, ended: bool) -> None:
        if self.closed:
            return
        if data:
            self.held.append(data)
            self.held_bytes += len(data)
        if ended:
            self.peer_fin = True
        if self.ready:
            self._deliver()

    def _taken(self) -> int:
        """Bytes the relay has taken from this stream (the local app's progress)."""
        return self.taken

    def _deliver(self) -> None:
        protocol = self.protocol
        while self.held and self.reading and not self.closed:
            data = self.held.pop(0)
            self.held_bytes -= len(data)
            self.taken += len(data)
            if isinstance(protocol, asyncio.BufferedProtocol):
                _feed_buffered(protocol, data)
            else:
                protocol.data_received(data)
        if self.closed:
            return
        if self.held_bytes > HOLD_LIMIT:
            self.link.hold(self.stream_id, self._taken)
        else:
            self.link.release(self.stream_id)
        if self.peer_fin and not self.held and not self.peer_fin_delivered:
            self.peer_fin_delivered = True
            protocol.eof_received()
            self._maybe_finished()

    def lost(self, exc: Exception) -> None:
        super().lost(exc)
        if self.closed:
            return
        self.closed = True
        self.connection.streams.pop(self.stream_id, None)
        self.link.release(self.stream_id)
        if self.ready:
            self.protocol.connection_lost(exc)

    def writable(self) -> None:
        if self.write_paused and not self.closed:
            self.write_paused = False
            self.protocol.resume_writing()

    def _maybe_finished(self) -> None:
        if self.fin_sent and self.peer_fin_delivered and not self.closed:
            self.closed = True
            self.connection.streams.pop(self.stream_id, None)
            self.link.release(self.stream_id)
            self.protocol.connection_lost(None)

    # asyncio.Transport, driven by the relay
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed or self.fin_sent:
            return
        if not self.link.send_data(self.stream_id, bytes(data)) and not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def write_eof(self) -> None:
        if self.closed or self.fin_sent:
            return
        self.fin_sent = True
        self.link.send_data(self.stream_id, b"", end=True)
        self._maybe_finished()

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        """The app's connection ended in order: finish ours, stop hearing from the proxy."""
        if self.closed:
            return
        self.write_eof()
        if not self.closed:
            self.closed = True
            self.connection.streams.pop(self.stream_id, None)
            self.link.release(self.stream_id)
            if self.link.alive and not self.peer_fin:
                self.link.reset(self.stream_id, H3_CONNECT_ERROR)
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        """RST: reset the stream both ways (RFC 9114 section 4.4: H3_CONNECT_ERROR)."""
        if self.closed:
            return
        self.closed = True
        self.connection.streams.pop(self.stream_id, None)
        self.link.release(self.stream_id)
        if self.link.alive:
            self.link.reset(self.stream_id, H3_CONNECT_ERROR)
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self._deliver()

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # the stream's limit is SEND_LIMIT, the link's

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.link.peer
        return default


def _feed_buffered(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


class _UdpSession(_Request, DatagramSession):
    """A UDP flow's CONNECT-UDP stream (RFC 9298)."""

    def __init__(self, connection: _Connection, receiver: DatagramReceiver,
                 target: Target) -> None:
        super().__init__(connection)
        self.receiver = receiver
        self.target = target
        self.capsules = CapsuleParser()
        self.prefix = b""  # quarter stream ID and context ID 0, once the stream is known
        self.dropped = 0

    def opened(self) -> None:
        self.prefix = datagram_prefix(self.stream_id)

    def __repr__(self) -> str:
        return f"quic-udp {self.connection.outbound._proxy} -> {self.target}"

    def http_datagram(self, data: bytes) -> None:
        if self.closed or not self.response.done():
            return
        try:
            context_id, payload = parse_http_datagram(data)
        except MasqueError:
            self.dropped += 1
            return
        if context_id != 0:
            self.dropped += 1  # RFC 9298 section 4: unknown contexts are dropped
            return
        self.receiver.datagram_received(payload)

    def data_received(self, data: bytes, ended: bool) -> None:
        if self.closed:
            return
        try:
            for value in self.capsules.feed(data):
                self.http_datagram(value)
        except MasqueError as exc:
            self.lost(ConnectionError(f"bad capsule from the proxy: {exc}"))
            self.forget()
            return
        if ended:
            self.lost(ConnectionError("the proxy ended the CONNECT-UDP stream"))

    def lost(self, exc: Exception) -> None:
        super().lost(exc)
        if self.closed:
            return
        self.closed = True
        self.connection.streams.pop(self.stream_id, None)
        if self.response.done() and not self.response.exception():
            self.receiver.session_lost(exc)

    # DatagramSession
    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.link.send_udp_payload(self.stream_id, self.prefix, data)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.connection.streams.pop(self.stream_id, None)
        if self.link.alive:
            self.link.reset(self.stream_id, H3_CONNECT_ERROR)
