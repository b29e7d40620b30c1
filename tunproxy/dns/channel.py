"""Byte channels to upstream resolvers, opened through an ``Outbound``.

Upstream DNS is a flow like any other: the rules pick the outbound (DIRECT,
SOCKS5, ...) and the resolver talks through whatever transport it returns. TLS
therefore runs over that transport with ``ssl.MemoryBIO`` (like aioquic, the
TLS engine is fed bytes and asked for bytes), not with ``loop.start_tls``,
which only works on the loop's own transports.
"""

from __future__ import annotations

import asyncio
import ssl
from abc import ABC, abstractmethod

from tunproxy.errors import ConnectTimeout, OutboundError, ProxyError
from tunproxy.outbounds.base import Outbound, Target

__all__ = [
    "BufferedReader",
    "ByteChannel",
    "ChannelClosed",
    "StreamChannel",
    "TlsChannel",
    "make_ssl_context",
    "open_channel",
]


class ChannelClosed(OutboundError):
    """The upstream closed or reset the connection."""

    reason = "upstream-closed"


class ByteChannel(ABC):
    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def read(self) -> bytes:
        """Some bytes; b"" at end of stream."""

    @abstractmethod
    def close(self) -> None: ...

    @property
    @abstractmethod
    def closed(self) -> bool: ...


class StreamChannel(asyncio.Protocol, ByteChannel):
    """An asyncio.Protocol that turns callbacks into awaitable reads."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._eof = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ByteChannel side
    def write(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            raise ChannelClosed("connection closed")
        self._transport.write(data)

    async def read(self) -> bytes:
        while not self._buffer:
            if self._eof:
                if self._error is not None:
                    raise ChannelClosed(f"connection lost: {self._error}")
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._eof = True
        self._wake()

    @property
    def closed(self) -> bool:
        return self._eof or self._transport is None or self._transport.is_closing()


class TlsChannel(ByteChannel):
    """TLS over another channel, driven through memory BIOs."""

    def __init__(self, raw: ByteChannel, context: ssl.SSLContext, server_hostname: str) -> None:
        self._raw = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )

    def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._raw.write(data)

    async def _fill(self) -> None:
        data = await self._raw.read()
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if self._incoming.eof:
                    raise ChannelClosed("connection closed during TLS handshake") from None
                await self._fill()
                continue
            except ssl.SSLError as exc:
                raise ProxyError(f"TLS handshake failed: {exc}") from exc
            self._flush()
            return

    @property
    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol()

    def write(self, data: bytes) -> None:
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            raise ChannelClosed(f"TLS write failed: {exc}") from exc
        self._flush()

    async def read(self) -> bytes:
        while True:
            try:
                data = self._ssl.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                if self._incoming.eof:
                    return b""
                await self._fill()
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise ChannelClosed(f"TLS read failed: {exc}") from exc
            self._flush()  # key updates, tickets
            return data

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed


class BufferedReader:
    """Exact-length and delimiter reads over a channel."""

    def __init__(self, channel: ByteChannel) -> None:
        self.channel = channel
        self._buffer = bytearray()

    async def _more(self) -> None:
        data = await self.channel.read()
        if not data:
            raise ChannelClosed("connection closed by the upstream")
        self._buffer += data

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._more()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def read_to_eof(self, limit: int = 65536) -> bytes:
        """Everything up to the end of the stream (at most ``limit`` bytes)."""
        while True:
            if len(self._buffer) > limit:
                raise ProxyError("upstream sent more than expected")
            data = await self.channel.read()
            if not data:
                out = bytes(self._buffer)
                self._buffer.clear()
                return out
            self._buffer += data

    async def read_until(self, separator: bytes, limit: int = 65536) -> bytes:
        while True:
            index = self._buffer.find(separator)
            if index >= 0:
                end = index + len(separator)
                data = bytes(self._buffer[:end])
                del self._buffer[:end]
                return data
            if len(self._buffer) > limit:
                raise ProxyError("upstream sent an over-long header")
            await self._more()


def make_ssl_context(*, ca: str | None, insecure: bool, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca) if ca else ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def open_channel(
    outbound: Outbound,
    target: Target,
    *,
    timeout: float,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ByteChannel:
    """A connected (and, with ``tls``, handshaken) channel to ``target``."""
    stream = StreamChannel()
    await outbound.open_stream(target, stream, timeout=timeout)
    if tls is None:
        return stream
    channel = TlsChannel(stream, tls, server_hostname or target.host)
    try:
        async with asyncio.timeout(timeout):
            await channel.handshake()
    except TimeoutError as exc:
        stream.close()
        raise ConnectTimeout(f"TLS handshake with {target} timed out") from exc
    except BaseException:
        stream.close()
        raise
    return channel
