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
- ``quic://`` and ``h3://`` live in ``tunproxy.dns.quic``, imported on first use.
- ``quic://``: RFC 9250, one QUIC connection (ALPN ``doq``), one bidirectional
  stream per query, ID 0 (RFC 9250 4.2.1), 2-byte length prefix (4.2).
- ``h3://``: RFC 8484 POST over HTTP/3 (aioquic's H3Connection), one QUIC
  connection, one request stream per query, ID 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

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
    "HttpsResolver",
    "Reconnecting",
    "Resolver",
    "ResolverError",
    "TcpResolver",
    "UdpResolver",
    "make_resolver",
]

OutboundFor = Callable[[str, Target], Outbound]
C = TypeVar("C")
_U16 = struct.Struct("!H")
HEADER_LEN = 12
TC_BIT = 0x0200
UDP_RETRANSMIT = 1.0  # seconds between UDP retransmissions of the same query


class ResolverError(Exception):
    """This upstream could not answer this query (the caller answers SERVFAIL)."""


def with_id(message: bytes, ident: int) -> bytes:
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
            message = with_id(query, ident)
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
        return with_id(answer, _U16.unpack_from(query, 0)[0])

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
            self.channel.write(_U16.pack(len(query)) + with_id(query, ident))
            answer = await future
        finally:
            self.pending.pop(ident, None)
        return with_id(answer, _U16.unpack_from(query, 0)[0])

    def close(self) -> None:
        self.reader.cancel()
        self.channel.close()


class Reconnecting(Generic[C]):
    """A resolver's one connection: opened on demand, again once it is no longer
    ``alive``; concurrent queries share one connection attempt."""

    def __init__(
        self, connect: Callable[[float], Awaitable[C]], alive: Callable[[C], bool]
    ) -> None:
        self._connect = connect
        self._alive = alive
        self._current: C | None = None
        self._connecting: asyncio.Future[C] | None = None

    async def get(self, timeout: float) -> C:
        current = self._current
        if current is not None and self._alive(current):
            return current
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect(timeout))
        connecting = self._connecting
        try:
            # Shielded: one caller's timeout must not cancel the attempt the others share.
            current = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._current = current
        return current

    def drop(self) -> C | None:
        """Cancel an attempt in progress; return the connection (for the caller to close)."""
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        current, self._current = self._current, None
        return current


class TcpResolver(Resolver):
    alpn: list[str] | None = None

    def __init__(self, spec: ServerSpec, outbound_for: OutboundFor) -> None:
        super().__init__(spec, outbound_for)
        self._connection = Reconnecting(self._connect, lambda pipeline: pipeline.alive)
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

    async def _exchange(self, query: bytes, timeout: float) -> bytes:
        pipeline = await self._connection.get(timeout)
        reused = pipeline.used
        try:
            return await pipeline.exchange(query)
        except ChannelClosed:
            if not reused:
                raise
        # The server closed an idle connection under us (RFC 7766 6.2.3): once more.
        return await (await self._connection.get(timeout)).exchange(query)

    async def aclose(self) -> None:
        pipeline = self._connection.drop()
        if pipeline is not None:
            pipeline.close()
            with contextlib.suppress(BaseException):
                await pipeline.reader


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
        body = with_id(query, 0)  # RFC 8484 4.1: ID 0 keeps HTTP caches useful
        answer: bytes | None = None
        while answer is None and self._idle:
            conn = self._idle.pop()
            if conn.channel.closed:
                continue
            try:
                answer = await self._request(conn, body)
            except ChannelClosed:
                conn.channel.close()  # stale keep-alive connection: try another
        if answer is None:
            conn = await self._connect(timeout)
            answer = await self._request(conn, body)
        return with_id(answer, original_id)

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


RESOLVERS: dict[str, type[Resolver]] = {
    "udp": UdpResolver,
    "tcp": TcpResolver,
    "tls": TlsResolver,
    "https": HttpsResolver,
}


def make_resolver(spec: ServerSpec, outbound_for: OutboundFor) -> Resolver:
    resolver = RESOLVERS.get(spec.scheme)
    if resolver is None:
        # quic:// and h3://. aioquic (and the cryptography package under it) is about
        # 12 MiB of RSS and 70 ms of start-up: loaded only when such a server is configured.
        from tunproxy.dns import quic

        resolver = quic.RESOLVERS[spec.scheme]
    return resolver(spec, outbound_for)
