"""Upstream resolvers: one class per transport, one method: ``exchange``.

``exchange(query, timeout=...)`` takes a wire-format query and returns the
wire-format answer, or raises ``ResolverError`` (any failure: timeout, closed
connection, garbage, mismatched answer). Each resolver opens its flows through
``outbound_for(network, target)``, the rules' choice for that server.

- ``udp://``: a fresh datagram session (a fresh source port) per query and a
  random ID (RFC 5452 section 9); retransmitted once a second; an answer with
  TC=1 is asked again over TCP (RFC 1035 4.2.1, RFC 7766 section 5).
- ``tcp://`` and ``tls://``: one long-lived connection, queries pipelined and
  matched by ID (RFC 7766 6.2.1.1, RFC 7858 3.3); reconnect on demand.
- ``https://``: RFC 8484 POST over HTTP/1.1 with keep-alive, ID 0 (RFC 8484 4.1),
  a small pool of idle connections.
- ``quic://``: RFC 9250, one QUIC connection (ALPN ``doq``), one bidirectional
  stream per query, ID 0 (RFC 9250 4.2.1), 2-byte length prefix (4.2).
- ``h3://``: RFC 8484 POST over HTTP/3 (aioquic's H3Connection), one QUIC
  connection, one request stream per query, ID 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    StreamDataReceived,
    StreamReset,
)

from tunproxy.dns.channel import (
    BufferedReader,
    ByteChannel,
    ChannelClosed,
    make_ssl_context,
    open_channel,
)
from tunproxy.dns.config import ServerSpec
from tunproxy.errors import OutboundError
from tunproxy.outbounds.base import DatagramReceiver, DatagramSession, Outbound, Target

__all__ = [
    "H3Resolver",
    "HttpsResolver",
    "QuicResolver",
    "Resolver",
    "ResolverError",
    "TcpResolver",
    "UdpResolver",
    "make_resolver",
]

OutboundFor = Callable[[str, Target], Outbound]
_U16 = struct.Struct("!H")
HEADER_LEN = 12
TC_BIT = 0x0200
UDP_RETRANSMIT = 1.0  # seconds between UDP retransmissions of the same query


class ResolverError(Exception):
    """This upstream could not answer this query (the caller answers SERVFAIL)."""


def _with_id(message: bytes, ident: int) -> bytes:
    return _U16.pack(ident) + message[2:]


def _target(spec: ServerSpec) -> Target:
    address = spec.address
    return Target(port=spec.port, address=address, domain=None if address else spec.host)


def _check_answer(query: bytes, answer: bytes) -> None:
    """The answer is for this query: QR set and the same question section bytes
    (compared case-insensitively; RFC 5452 section 9.1)."""
    if len(answer) < HEADER_LEN or not answer[2] & 0x80:
        raise ResolverError("upstream sent something that is not a DNS answer")
    qdcount = _U16.unpack_from(query, 4)[0]
    if _U16.unpack_from(answer, 4)[0] != qdcount:
        raise ResolverError("upstream answer has another question count")
    end = _question_end(query)
    if answer[HEADER_LEN:end].lower() != query[HEADER_LEN:end].lower():
        raise ResolverError("upstream answered another question")


def _question_end(message: bytes) -> int:
    offset = HEADER_LEN
    for _ in range(_U16.unpack_from(message, 4)[0]):
        while True:
            length = message[offset]
            offset += 1
            if length == 0:
                break
            offset += length
        offset += 4
    return offset


class Resolver(ABC):
    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        self.spec = spec
        self.outbound_for = outbound_for
        self.target = _target(spec)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.url or self.target}>"

    async def exchange(self, query: bytes, *, timeout: float) -> bytes:
        """Answer ``query`` (wire format) within ``timeout`` seconds or raise ResolverError."""
        try:
            async with asyncio.timeout(timeout):
                answer = await self._exchange(query, timeout)
        except TimeoutError as exc:
            raise ResolverError(f"{self}: no answer within {timeout:g}s") from exc
        except (OutboundError, OSError, ValueError, IndexError, struct.error) as exc:
            raise ResolverError(f"{self}: {exc}") from exc
        _check_answer(query, answer)
        return answer

    @abstractmethod
    async def _exchange(self, query: bytes, timeout: float) -> bytes: ...

    async def aclose(self) -> None:  # noqa: B027 - stateless resolvers hold nothing
        pass


# --- udp:// -------------------------------------------------------------------------


class _OneAnswer(DatagramReceiver):
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes) -> None:
        # Anything without our random ID is noise or a spoofing attempt: keep waiting.
        if (
            len(data) >= HEADER_LEN
            and _U16.unpack_from(data, 0)[0] == self.ident
            and not self.answer.done()
        ):
            self.answer.set_result(data)

    def session_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ChannelClosed(f"datagram session lost: {exc}"))


class UdpResolver(Resolver):
    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        super().__init__(spec, outbound_for)
        self.tcp = TcpResolver(spec, outbound_for)  # fallback for TC=1
        self.truncated = 0

    async def _exchange(self, query: bytes, timeout: float) -> bytes:
        ident = secrets.randbelow(65536)
        receiver = _OneAnswer(ident)
        outbound = self.outbound_for("udp", self.target)
        session: DatagramSession = await outbound.open_datagram(
            self.target, receiver, timeout=timeout
        )
        try:
            message = _with_id(query, ident)
            while True:
                session.send(message)
                done, _ = await asyncio.wait({receiver.answer}, timeout=UDP_RETRANSMIT)
                if done:
                    break
            answer = receiver.answer.result()
        finally:
            session.close()
        if _U16.unpack_from(answer, 2)[0] & TC_BIT:
            # RFC 7766 section 5: a truncated answer is asked again over TCP.
            self.truncated += 1
            return await self.tcp._exchange(query, timeout)
        return _with_id(answer, _U16.unpack_from(query, 0)[0])

    async def aclose(self) -> None:
        await self.tcp.aclose()


# --- tcp:// and tls:// --------------------------------------------------------------


class _Pipeline:
    """One TCP/TLS connection carrying many queries at once, matched by ID."""

    def __init__(self, channel: ByteChannel) -> None:
        self.channel = channel
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.reader = asyncio.ensure_future(self._read_loop())
        self.used = False

    async def _read_loop(self) -> None:
        reader = BufferedReader(self.channel)
        error: Exception
        try:
            while True:
                (length,) = _U16.unpack(await reader.read_exactly(2))
                message = await reader.read_exactly(length)
                if length < HEADER_LEN:
                    raise ChannelClosed("upstream sent a runt message")
                future = self.pending.pop(_U16.unpack_from(message, 0)[0], None)
                if future is not None and not future.done():
                    future.set_result(message)
        except asyncio.CancelledError:
            error = ChannelClosed("connection closed")
        except Exception as exc:  # report the connection's end to every waiter
            error = exc if isinstance(exc, ChannelClosed) else ChannelClosed(str(exc))
        self.channel.close()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    @property
    def alive(self) -> bool:
        return not self.reader.done() and not self.channel.closed

    async def exchange(self, query: bytes) -> bytes:
        self.used = True
        ident = secrets.randbelow(65536)
        while ident in self.pending:
            ident = secrets.randbelow(65536)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        try:
            self.channel.write(_U16.pack(len(query)) + _with_id(query, ident))
            answer = await future
        finally:
            self.pending.pop(ident, None)
        return _with_id(answer, _U16.unpack_from(query, 0)[0])

    def close(self) -> None:
        self.reader.cancel()
        self.channel.close()


class TcpResolver(Resolver):
    alpn: list[str] | None = None

    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        super().__init__(spec, outbound_for)
        self._pipeline: _Pipeline | None = None
        self._connecting: asyncio.Future[_Pipeline] | None = None
        self.connections = 0

    def _ssl(self) -> Any:
        return None

    async def _connect(self, timeout: float) -> _Pipeline:
        outbound = self.outbound_for("tcp", self.target)
        channel = await open_channel(
            outbound, self.target, timeout=timeout, tls=self._ssl(),
            server_hostname=self.spec.server_name,
        )  # fmt: skip
        self.connections += 1
        return _Pipeline(channel)

    async def _get_pipeline(self, timeout: float) -> _Pipeline:
        if self._pipeline is not None and self._pipeline.alive:
            return self._pipeline
        if self._connecting is None:
            # Concurrent queries share one connection attempt.
            self._connecting = asyncio.ensure_future(self._connect(timeout))
        connecting = self._connecting
        try:
            pipeline = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._pipeline = pipeline
        return pipeline

    async def _exchange(self, query: bytes, timeout: float) -> bytes:
        pipeline = await self._get_pipeline(timeout)
        reused = pipeline.used
        try:
            return await pipeline.exchange(query)
        except ChannelClosed:
            if not reused:
                raise
        # The server closed an idle connection under us (RFC 7766 6.2.3): once more.
        return await (await self._get_pipeline(timeout)).exchange(query)

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._pipeline is not None:
            self._pipeline.close()
            with contextlib.suppress(BaseException):
                await self._pipeline.reader
            self._pipeline = None


class TlsResolver(TcpResolver):
    def _ssl(self) -> Any:
        # RFC 7858 section 3.2 / RFC 9461: ALPN "dot".
        return make_ssl_context(ca=self.spec.ca, insecure=self.spec.insecure, alpn=["dot"])


# --- https:// (RFC 8484, HTTP/1.1) --------------------------------------------------


class HttpsResolver(Resolver):
    MAX_IDLE = 4

    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        super().__init__(spec, outbound_for)
        self._idle: list[BufferedReader] = []
        self._context = make_ssl_context(ca=spec.ca, insecure=spec.insecure, alpn=["http/1.1"])
        self.connections = 0
        host = spec.host if ":" not in spec.host else f"[{spec.host}]"
        self._authority = host if spec.port == 443 else f"{host}:{spec.port}"

    async def _connect(self, timeout: float) -> BufferedReader:
        outbound = self.outbound_for("tcp", self.target)
        channel = await open_channel(
            outbound, self.target, timeout=timeout, tls=self._context,
            server_hostname=self.spec.server_name,
        )  # fmt: skip
        self.connections += 1
        return BufferedReader(channel)

    async def _exchange(self, query: bytes, timeout: float) -> bytes:
        original_id = _U16.unpack_from(query, 0)[0]
        body = _with_id(query, 0)  # RFC 8484 4.1: ID 0 keeps HTTP caches useful
        while self._idle:
            conn = self._idle.pop()
            if conn.channel.closed:
                continue
            try:
                answer = await self._request(conn, body)
                break
            except ChannelClosed:
                conn.channel.close()  # stale keep-alive connection: try another
        else:
            conn = await self._connect(timeout)
            answer = await self._request(conn, body)
        return _with_id(answer, original_id)

    async def _request(self, conn: BufferedReader, body: bytes) -> bytes:
        request = (
            f"POST {self.spec.path} HTTP/1.1\r\n"
            f"Host: {self._authority}\r\n"
            "Content-Type: application/dns-message\r\n"
            "Accept: application/dns-message\r\n"
            f"Content-Length: {len(body)}\r\n"
            "\r\n"
        ).encode("ascii")
        try:
            conn.channel.write(request + body)
            head = await conn.read_until(b"\r\n\r\n")
        except BaseException:
            conn.channel.close()
            raise
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            conn.channel.close()
            raise ResolverError(f"{self}: not an HTTP/1.x response")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep_alive = headers.get("connection", "").lower() != "close" and parts[0] != "HTTP/1.0"
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                data = await self._read_chunked(conn)
            elif "content-length" in headers:
                data = await conn.read_exactly(int(headers["content-length"]))
            else:
                keep_alive = False
                data = await conn.read_to_eof(65535)
        except BaseException:
            conn.channel.close()
            raise
        if keep_alive and len(self._idle) < self.MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.channel.close()
        if parts[1] != "200":
            raise ResolverError(f"{self}: HTTP status {parts[1]}")
        if headers.get("content-type", "").split(";")[0].strip() != "application/dns-message":
            raise ResolverError(f"{self}: answer is not application/dns-message")
        return data

    @staticmethod
    async def _read_chunked(conn: BufferedReader) -> bytes:
        data = bytearray()
        while True:
            size_line = await conn.read_until(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await conn.read_until(b"\r\n")  # no trailers expected; the final CRLF
                return bytes(data)
            data += await conn.read_exactly(size)
            await conn.read_exactly(2)
            if len(data) > 65535:
                raise ResolverError("DoH answer larger than a DNS message")

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.channel.close()
        self._idle.clear()


# --- quic:// (RFC 9250) and h3:// (RFC 8484 over HTTP/3, RFC 9114) ------------------------

DOQ_NO_ERROR = 0x0  # RFC 9250 4.3
H3_NO_ERROR = 0x100  # RFC 9114 8.1


@dataclass
class _QuicStream:
    future: asyncio.Future[tuple[int, str, bytes]]  # (HTTP status or 0, content type, body)
    body: bytearray = field(default_factory=bytearray)
    status: int = 0
    content_type: str = ""


class _QuicClient(DatagramReceiver):
    """An aioquic QuicConnection driven over an outbound's datagram session, with the
    H3 layer on top for ``h3``; the same shape as aioquic.asyncio.QuicConnectionProtocol."""

    def __init__(self, spec: ServerSpec, target: Target, alpn: str) -> None:
        configuration = QuicConfiguration(
            is_client=True, alpn_protocols=[alpn], server_name=spec.server_name,
            idle_timeout=30.0,
        )  # fmt: skip
        if spec.insecure:
            configuration.verify_mode = ssl.CERT_NONE
        elif spec.ca:
            configuration.load_verify_locations(cafile=spec.ca)
        self.quic = QuicConnection(configuration=configuration)
        self.h3 = H3Connection(self.quic) if alpn == "h3" else None
        self.addr = (target.host, target.port)
        self.loop = asyncio.get_running_loop()
        self.session: DatagramSession | None = None
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.streams: dict[int, _QuicStream] = {}
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None

    async def connect(self, outbound: Outbound, target: Target, timeout: float) -> None:
        self.session = await outbound.open_datagram(target, self, timeout=timeout)
        self.quic.connect(self.addr, now=self.loop.time())
        self._transmit()
        await asyncio.shield(self.connected)

    # DatagramReceiver
    def datagram_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.quic.receive_datagram(data, self.addr, now=self.loop.time())
        self._process()

    def session_lost(self, exc: Exception | None) -> None:
        self._terminate(ChannelClosed(f"datagram session lost: {exc}"))

    def _process(self) -> None:
        event = self.quic.next_event()
        while event is not None:
            if isinstance(event, HandshakeCompleted):
                if not self.connected.done():
                    self.connected.set_result(None)
            elif isinstance(event, ConnectionTerminated):
                self._terminate(ChannelClosed(f"QUIC connection closed: {event.reason_phrase}"))
            elif isinstance(event, StreamReset):
                self._fail(event.stream_id, ChannelClosed("stream reset by the server"))
            if self.h3 is not None:
                for h3_event in self.h3.handle_event(event):
                    self._h3_event(h3_event)
            elif isinstance(event, StreamDataReceived):
                self._data(event.stream_id, event.data, event.end_stream)
            event = self.quic.next_event()
        self._transmit()

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, HeadersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                for name, value in event.headers:
                    if name == b":status" and value.isdigit():
                        stream.status = int(value)
                    elif name == b"content-type":
                        stream.content_type = value.decode("latin-1")
            self._data(event.stream_id, b"", event.stream_ended)
        elif isinstance(event, DataReceived):
            self._data(event.stream_id, event.data, event.stream_ended)

    def _data(self, stream_id: int, data: bytes, end: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.body += data
        if len(stream.body) > 65537:
            self._fail(stream_id, ChannelClosed("answer larger than a DNS message"))
        elif end and not stream.future.done():
            stream.future.set_result((stream.status, stream.content_type, bytes(stream.body)))

    def _fail(self, stream_id: int, exc: Exception) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.future.done():
            stream.future.set_exception(exc)

    def _transmit(self) -> None:
        if self.session is None:
            return
        for data, _addr in self.quic.datagrams_to_send(now=self.loop.time()):
            self.session.send(data)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.quic.get_timer()
        if when is not None and not self.closed:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.quic.handle_timer(now=self.loop.time())
        self._process()

    def _terminate(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.connected.done():
            self.connected.set_exception(exc)
            self.connected.exception()  # retrieved here; connect() re-raises via shield
        for stream in self.streams.values():
            if not stream.future.done():
                stream.future.set_exception(exc)
        self.streams.clear()
        if self.session is not None:
            self.session.close()

    async def _request(self, send: Callable[[int], None]) -> tuple[int, str, bytes]:
        if self.closed:
            raise ChannelClosed("QUIC connection closed")
        stream_id = self.quic.get_next_available_stream_id()
        stream = _QuicStream(self.loop.create_future())
        self.streams[stream_id] = stream
        try:
            send(stream_id)
            self._transmit()
            return await stream.future
        finally:
            self.streams.pop(stream_id, None)

    async def exchange_doq(self, query: bytes) -> bytes:
        def send(stream_id: int) -> None:
            # RFC 9250 4.2: 2-byte length prefix; the client ends its side (FIN).
            self.quic.send_stream_data(stream_id, _U16.pack(len(query)) + query, end_stream=True)

        _, _, data = await self._request(send)
        if len(data) < 2 or _U16.unpack_from(data, 0)[0] != len(data) - 2:
            raise ChannelClosed("DoQ answer length prefix does not match")
        return data[2:]

    async def exchange_h3(self, authority: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        h3 = self.h3
        assert h3 is not None

        def send(stream_id: int) -> None:
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", authority.encode()),
                (b":path", path.encode()),
                (b"content-type", b"application/dns-message"),
                (b"accept", b"application/dns-message"),
                (b"content-length", str(len(body)).encode()),
            ]
            h3.send_headers(stream_id, headers)
            h3.send_data(stream_id, body, end_stream=True)

        return await self._request(send)

    def close(self) -> None:
        if not self.closed:
            self.quic.close(error_code=H3_NO_ERROR if self.h3 is not None else DOQ_NO_ERROR)
            self._transmit()
            self._terminate(ChannelClosed("closed"))


class QuicResolver(Resolver):
    """DoQ; subclassed for DoH over HTTP/3 (one QUIC connection, reconnect on demand)."""

    alpn = "doq"

    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        super().__init__(spec, outbound_for)
        self._client: _QuicClient | None = None
        self._connecting: asyncio.Future[_QuicClient] | None = None
        self.connections = 0

    async def _connect(self, timeout: float) -> _QuicClient:
        client = _QuicClient(self.spec, self.target, self.alpn)
        try:
            await client.connect(self.outbound_for("udp", self.target), self.target, timeout)
        except BaseException:
            client.close()
            raise
        self.connections += 1
        return client

    async def _get_client(self, timeout: float) -> _QuicClient:
        if self._client is not None and not self._client.closed:
            return self._client
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect(timeout))
        connecting = self._connecting
        try:
            client = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._client = client
        return client

    async def _exchange(self, query: bytes, timeout: float) -> bytes:
        original_id = _U16.unpack_from(query, 0)[0]
        client = await self._get_client(timeout)
        answer = await self._ask(client, _with_id(query, 0))  # RFC 9250 4.2.1, RFC 8484 4.1
        return _with_id(answer, original_id)

    async def _ask(self, client: _QuicClient, query: bytes) -> bytes:
        return await client.exchange_doq(query)

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._client is not None:
            self._client.close()
            self._client = None


class H3Resolver(QuicResolver):
    alpn = "h3"

    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        super().__init__(spec, outbound_for)
        host = spec.host if ":" not in spec.host else f"[{spec.host}]"
        self._authority = host if spec.port == 443 else f"{host}:{spec.port}"

    async def _ask(self, client: _QuicClient, query: bytes) -> bytes:
        status, content_type, body = await client.exchange_h3(
            self._authority, self.spec.path, query
        )
        if status != 200:
            raise ResolverError(f"{self}: HTTP status {status}")
        if content_type.split(";")[0].strip() != "application/dns-message":
            raise ResolverError(f"{self}: answer is not application/dns-message")
        return body


RESOLVERS: dict[str, type[Resolver]] = {
    "udp": UdpResolver,
    "tcp": TcpResolver,
    "tls": TlsResolver,
    "https": HttpsResolver,
    "quic": QuicResolver,
    "h3": H3Resolver,
}


def make_resolver(spec: ServerSpec, outbound_for: OutboundFor) -> Resolver:
    return RESOLVERS[spec.scheme](spec, outbound_for)
