"""One HTTP/3 connection over QUIC: the only module that imports the QUIC library.

tunproxy's QUIC upstream (``outbounds/quic.py``) and ``tunproxy server`` (``server.py``)
see an ``H3Link``: send headers, data, datagrams and resets on request streams, and get
the peer's back through an ``H3Handler``. Which library is underneath is this module's
business. It is qh3 (a maintained fork of aioquic whose packet path is Rust): on this
machine it moved a stream ~10x faster than aioquic with both ends in one process, and
the issue's measurement through h2o found ~30x; aioquic stays for the DoQ/DoH3
resolvers and QUIC sniffing, which need no speed.

Flow control. QUIC libraries grant stream credit when data is received, not when the
application consumes it, so a slow local reader cannot slow the sender through QUIC
flow control. The owner of a stream that holds more than it should calls
``hold(stream_id)``: while any stream of a ``ReadGate`` is held, the UDP socket is not
read, the kernel's buffer fills and drops, and the sender's congestion control backs
off. Memory stays bounded; the price is that other streams sharing the socket wait too.
Per-stream credit is out of reach with qh3 2.1: its Rust core raises MAX_STREAM_DATA in
``poll_event`` (``QuicConnectionCore.next_event``) as it hands a stream's data over, and
``QuicConnection._drain_core`` takes every event right after each datagram is received;
there is no call to read one stream later or to grant its credit by hand.

Datagrams. A QUIC DATAGRAM frame must fit one packet. aioquic queues one that does not
forever and every later datagram waits behind it (aiortc/aioquic#294); so
``send_udp_payload`` sends one that does not fit as a DATAGRAM capsule on the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

from qh3.asyncio.protocol import QuicConnectionProtocol
from qh3.asyncio.server import QuicServer
from qh3.h3.connection import H3Connection, Setting
from qh3.h3.events import (
    DatagramReceived,
    DataReceived,
    H3Event,
    HeadersReceived,
    StopSending,
    StreamReset,
)
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection
from qh3.quic.events import (
    ConnectionTerminated,
    DatagramFrameReceived,
    HandshakeCompleted,
    QuicEvent,
)
from qh3.tls import SessionTicket

from tunproxy import quicio
from tunproxy.masque.capsule import (
    CAPSULE_DATAGRAM,
    emit_capsule,
    emit_http_datagram,
    parse_quarter_stream_id,
)
from tunproxy.masque.request import (
    H3_CONNECT_ERROR,
    H3_DATAGRAM_ERROR,
    H3_NO_ERROR,
    H3_REQUEST_CANCELLED,
)
from tunproxy.varint import emit_varint, parse_varint

__all__ = [
    "H3_CONNECT_ERROR",
    "H3Handler",
    "H3Link",
    "H3Server",
    "Headers",
    "LinkSettings",
    "ReadGate",
    "SessionTicket",
    "dial",
    "listen",
]

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]


# A DATAGRAM frame's share of a packet besides its payload: short header (1 + 20-byte
# connection ID at most + 4-byte packet number), AEAD tag (16), frame type (1) and
# length (up to 4). qh3 2.1 was measured to need 30 with 8-byte connection IDs; a
# frame that does not fit is not queued there but fails the whole connection.
_DATAGRAM_OVERHEAD = 1 + 20 + 4 + 16 + 1 + 4


@dataclass(slots=True)
class LinkSettings:
    """What both ends set on a QUIC connection."""

    idle_timeout: float = 30.0
    # Flow-control windows sized for a bandwidth-delay product of ~1 Gbit/s x 50 ms.
    max_data: int = 16 * 1024 * 1024
    max_stream_data: int = 4 * 1024 * 1024
    # QUIC packet size: 1200 is the size every path must carry (RFC 9000 section 14).
    max_datagram_size: int = 1200
    # Congestion control: one of CONGESTION_CONTROL.
    congestion: str = "cubic"


# TLS alerts (RFC 8446 section 6) a peer closes a QUIC connection with as CRYPTO_ERROR
# 0x100 + alert (RFC 9001 section 4.8); the ones about certificates name what went wrong.
TLS_ALERTS = {
    40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
    48: "unknown_ca", 49: "access_denied", 80: "internal_error", 116: "certificate_required",
}
CERTIFICATE_ALERTS = frozenset({42, 43, 44, 45, 46, 48, 49, 116})


def close_reason(error_code: int, reason_phrase: str) -> str:
    """A connection close as a log line says it: a TLS alert by name."""
    if 0x100 <= error_code <= 0x1FF:
        alert = error_code - 0x100
        text = f"TLS alert {TLS_ALERTS.get(alert, str(alert))} (0x{error_code:x})"
        return f"{text}: {reason_phrase}" if reason_phrase else text
    return reason_phrase or f"error 0x{error_code:x}"


class H3Handler(Protocol):
    """What an ``H3Link`` reports, per request stream (client- or server-initiated)."""

    def h3_headers(self, stream_id: int, headers: Headers, ended: bool) -> None: ...

    def h3_data(self, stream_id: int, data: bytes, ended: bool) -> None: ...

    def h3_datagram(self, stream_id: int, data: bytes) -> None: ...

    def h3_reset(self, stream_id: int) -> None:
        """The peer reset its side of the stream (RESET_STREAM)."""

    def h3_stop_sending(self, stream_id: int) -> None:
        """The peer will read no more of our side (STOP_SENDING); its own side goes on."""

    def h3_writable(self, stream_id: int) -> None:
        """A stream that ``send_data`` reported as over its limit has drained."""

    def h3_closed(self, reason: str) -> None:
        """The connection is gone; every stream with it."""


class ReadGate:
    """Pauses reading a UDP socket while any stream sharing it is held."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self._held: set[tuple[int, int]] = set()

    def hold(self, key: tuple[int, int]) -> None:
        if not self._held and self.transport is not None:
            cast(asyncio.ReadTransport, self.transport).pause_reading()
        self._held.add(key)

    def release(self, key: tuple[int, int]) -> None:
        if key not in self._held:
            return
        self._held.discard(key)
        if not self._held and self.transport is not None and not self.transport.is_closing():
            cast(asyncio.ReadTransport, self.transport).resume_reading()


class _ServerH3(H3Connection):
    # qh3 announces SETTINGS_ENABLE_CONNECT_PROTOCOL only for WebTransport; CONNECT-UDP
    # is an extended CONNECT too (RFC 9298 section 3, RFC 9220 section 3).
    def _get_local_settings(self) -> dict[int, int]:
        settings = super()._get_local_settings()
        settings[Setting.ENABLE_CONNECT_PROTOCOL] = 1
        return settings


# RFC 9000 section 18.2: the transport parameter a QUIC endpoint announces the largest UDP
# payload it receives with, and the TLS extension that carries the parameters (RFC 9001).
_MAX_UDP_PAYLOAD_SIZE = 0x03
_QUIC_TRANSPORT_PARAMETERS_EXTENSION = 0x39


def set_transport_parameter(data: bytes, param_id: int, value: bytes) -> bytes:
    """Encoded transport parameters (RFC 9000 section 18: id, length, value, all varints
    but the value) with ``param_id``'s value replaced, or appended when absent; the
    others, GREASE ones included, as they were. ValueError on a truncated list."""
    out = bytearray()
    offset = 0
    while offset < len(data):
        parsed_id = parse_varint(data, offset)
        parsed_len = parse_varint(data, parsed_id[1]) if parsed_id is not None else None
        if parsed_id is None or parsed_len is None or parsed_len[1] + parsed_len[0] > len(data):
            raise ValueError("truncated transport parameters")
        end = parsed_len[1] + parsed_len[0]
        if parsed_id[0] != param_id:
            out += data[offset:end]
        offset = end
    return bytes(out + emit_varint(param_id) + emit_varint(len(value)) + value)


# What a qh3 2.1 client announces as max_udp_payload_size, whatever it is configured with.
QH3_CLIENT_MAX_UDP_PAYLOAD = 1472


class _ClientQuic(QuicConnection):
    """qh3's client connection, announcing as the largest UDP payload it receives its
    own ``max_datagram_size`` (when above qh3's fixed 1,472: ``QuicTlsBridge.
    serialize_transport_parameters`` hard-codes it and qh3 2.1 has no setting), so a
    server on a path configured for bigger packets (a jumbo-frame link, loopback) sends
    them too: per-packet work dominates a QUIC download. qh3 receives any size."""

    def _create_tls(self, remote_source_cid: bytes | None) -> Any:
        bridge = super()._create_tls(remote_source_cid)
        tls: Any = getattr(bridge, "tls", None)
        if not isinstance(getattr(tls, "handshake_extensions", None), list):
            # A qh3 release that builds its hello elsewhere: its own figure is announced,
            # which costs download speed, never the connection.
            return bridge
        size = emit_varint(max(self._configuration.max_datagram_size,
                               QH3_CLIENT_MAX_UDP_PAYLOAD))
        tls.handshake_extensions = [
            (kind, set_transport_parameter(value, _MAX_UDP_PAYLOAD_SIZE, size)
             if kind == _QUIC_TRANSPORT_PARAMETERS_EXTENSION else value)
            for kind, value in tls.handshake_extensions]
        return bridge


class H3Link(QuicConnectionProtocol):
    """A QUIC connection with HTTP/3 on it (client or server side)."""

    def __init__(
        self,
        quic: QuicConnection,
        stream_handler: Any = None,
        *,
        handler_factory: Callable[[H3Link], H3Handler],
        gate: ReadGate,
        send_limit: int,
    ) -> None:
        super().__init__(quic)
        self.is_client = quic.configuration.is_client
        self.h3 = H3Connection(quic) if self.is_client else _ServerH3(quic)
        self.gate = gate
        self.send_limit = send_limit
        self.max_datagram_size = quic.configuration.max_datagram_size
        self.closed_reason: str | None = None
        self.closed_alert: int | None = None  # the TLS alert the peer closed with, if any
        self.resumed = False  # the handshake resumed a TLS session (a ticket was accepted)
        self.peer: str = "?"
        self._blocked: set[int] = set()
        self._credit_waiters: list[asyncio.Future[None]] = []
        self._stalls: dict[int, asyncio.TimerHandle] = {}  # held streams' stall checks
        self._datagram_room: int | None = None
        self.handler = handler_factory(self)

    # -- commands -------------------------------------------------------------------------
    def has_stream_credit(self) -> bool:
        """Whether the peer lets us open another request stream now (RFC 9000 section 4.6:
        MAX_STREAMS counts streams ever opened; client-initiated bidi IDs are 0, 4, 8...)."""
        quic = self._quic
        return quic.get_next_available_stream_id() // 4 < quic.max_concurrent_bidi_streams

    async def wait_stream_credit(self) -> None:
        """Until a request stream may be opened; ConnectionError if the connection ends."""
        while not self.has_stream_credit():
            if not self.alive:
                raise ConnectionError(self.closed_reason)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._credit_waiters.append(waiter)
            await waiter
        if not self.alive:
            raise ConnectionError(self.closed_reason)

    def _wake_credit_waiters(self) -> None:
        if self._credit_waiters and (not self.alive or self.has_stream_credit()):
            waiters, self._credit_waiters = self._credit_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def new_stream_id(self) -> int:
        """The next request stream's ID (it opens with its first send_headers)."""
        return self._quic.get_next_available_stream_id()

    def send_headers(self, stream_id: int, headers: Headers, end: bool = False) -> None:
        try:
            self.h3.send_headers(stream_id, headers, end_stream=end)
        except Exception as exc:  # see _refused
            self._refused(exc)
            return
        self._transmit_soon()

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> bool:
        """Queue ``data``; False when the stream's unsent bytes passed ``send_limit``
        (``h3_writable`` says when they drained)."""
        try:
            self.h3.send_data(stream_id, data, end_stream=end)
        except Exception as exc:  # see _refused
            self._refused(exc)
            return True
        self._transmit_soon()
        if self._quic.get_send_buffer_size(stream_id) > self.send_limit:
            self._blocked.add(stream_id)
            return False
        return True

    def datagram_room(self) -> int:
        """The largest HTTP datagram (quarter stream ID included) a QUIC packet carries.
        Fixed once the handshake applied the peer's max_udp_payload_size: computed once
        then, not per datagram."""
        room = self._datagram_room
        if room is None:
            room = quicio.sendable_size(self._quic, self.max_datagram_size) - _DATAGRAM_OVERHEAD
            if self._connected:
                self._datagram_room = room
        return room

    def send_datagram(self, stream_id: int, payload: bytes) -> None:
        """An HTTP Datagram (RFC 9297 section 2.1: quarter stream ID, then payload)."""
        self.send_datagram_frame(emit_varint(stream_id // 4) + payload)

    def send_datagram_frame(self, frame: bytes) -> None:
        """An HTTP Datagram whose quarter stream ID the caller put in front already
        (a flow's datagrams share their prefix): one QUIC DATAGRAM frame, no copy."""
        try:
            self._quic.send_datagram_frame(frame)
        except Exception as exc:  # see _refused
            self._refused(exc)
            return
        self._transmit_soon()

    def send_udp_payload(self, stream_id: int, prefix: bytes, payload: bytes) -> None:
        """A UDP payload on CONNECT-UDP request ``stream_id`` (context ID 0; ``prefix`` is
        ``masque.datagram_prefix(stream_id)``): a QUIC DATAGRAM frame when it fits a
        packet, else a DATAGRAM capsule on the stream (RFC 9297 section 3.5), so it
        neither gets lost nor blocks the datagrams after it."""
        if len(prefix) + len(payload) <= self.datagram_room():
            self.send_datagram_frame(prefix + payload)
        else:
            self.send_data(stream_id, emit_capsule(CAPSULE_DATAGRAM, emit_http_datagram(payload)))

    def reset(self, stream_id: int, error_code: int = H3_REQUEST_CANCELLED) -> None:
        """Abort both directions of a stream."""
        self._blocked.discard(stream_id)
        # Either direction may have finished already; the library then refuses, which is fine.
        with contextlib.suppress(Exception):
            self._quic.reset_stream(stream_id, error_code)
        with contextlib.suppress(Exception):
            self._quic.stop_stream(stream_id, error_code)
        self._transmit_soon()

    def hold(self, stream_id: int, progress: Callable[[], int]) -> None:
        """Stop reading the socket for ``stream_id``'s sake. ``progress()`` counts the
        bytes its reader has taken so far: if it takes none for half the idle timeout,
        the stream is reset (``_check_stall``)."""
        self.gate.hold((id(self), stream_id))
        if stream_id not in self._stalls and self.alive:
            self._stalls[stream_id] = self._arm_stall(stream_id, progress, progress())

    def release(self, stream_id: int) -> None:
        self.gate.release((id(self), stream_id))
        timer = self._stalls.pop(stream_id, None)
        if timer is not None:
            timer.cancel()

    def stall_deadline(self) -> float:
        """Half the connection's idle timeout (the smaller of ours and the peer's)."""
        timeout = self._quic.configuration.idle_timeout
        bridge = self._quic._tls
        parameters = bridge.remote_transport_parameters if bridge is not None else None
        peer = parameters.max_idle_timeout if parameters is not None else None
        if peer:
            timeout = min(timeout, peer / 1000)
        return timeout / 2

    def _arm_stall(self, stream_id: int, progress: Callable[[], int],
                   seen: int) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(
            self.stall_deadline(), self._check_stall, stream_id, progress, seen)

    def _check_stall(self, stream_id: int, progress: Callable[[], int], seen: int) -> None:
        """While a stream is held the socket is not read, so nothing arrives and the
        connection would die of its idle timeout with every flow on it. A reader that
        took something since the last check keeps its stream; one that took nothing
        loses it (reset both ways), and the connection and its other flows go on."""
        if stream_id not in self._stalls or not self.alive:
            return
        now = progress()
        if now != seen:
            self._stalls[stream_id] = self._arm_stall(stream_id, progress, now)
            return
        del self._stalls[stream_id]
        self.gate.release((id(self), stream_id))
        log.warning("QUIC connection with %s: stream %d reset: its reader took nothing for "
                    "%g s while the connection waited for it (half the idle timeout)",
                    self.peer, stream_id, self.stall_deadline())
        self.reset(stream_id)
        self.handler.h3_reset(stream_id)

    def _cancel_stalls(self) -> None:
        for timer in self._stalls.values():
            timer.cancel()
        self._stalls.clear()

    def send_keepalive(self) -> None:
        self._quic.send_ping(0)
        self._transmit_soon()

    def shutdown(self, reason: str = "") -> None:
        if self.closed_reason is None:
            self._quic.close(error_code=H3_NO_ERROR, reason_phrase=reason)
            self.transmit()

    def close_transport(self) -> None:
        """Drop the socket (a client link that failed or finished)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is not None:
            transport.close()

    @property
    def alive(self) -> bool:
        return self.closed_reason is None

    def error_received(self, exc: Exception) -> None:
        # A client's socket is connected: an ICMP port unreachable surfaces here. Nothing
        # listens on the proxy's port any more (it was killed or restarted), so end the
        # connection now rather than after the idle timeout, and let its flows go.
        if isinstance(exc, ConnectionRefusedError) and self.is_client and self.alive:
            self.closed_reason = "the proxy's UDP port is closed (ICMP port unreachable)"
            self._blocked.clear()
            self._cancel_stalls()
            self._wake_credit_waiters()
            self.handler.h3_closed(self.closed_reason)

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if self.peer == "?":
            self.peer = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        if self.closed_reason is not None and self.closed_reason.startswith("QUIC library"):
            return
        try:
            super().datagram_received(data, addr)
        except Exception as exc:  # see _fail
            self._fail(exc)
        self._note_close()

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        if self.closed_reason is not None and self.closed_reason.startswith("QUIC library"):
            return
        try:
            super().datagrams_received(data, addr)
        except Exception as exc:  # see _fail
            self._fail(exc)
        self._note_close()

    def _note_close(self) -> None:
        """The connection is closing (the peer sent CONNECTION_CLOSE, or we did): qh3
        reports ConnectionTerminated only once its draining period is over (3 PTOs), and
        refuses every send meanwhile; its streams are over now."""
        close = self._quic._close_event
        if close is not None and self.closed_reason is None:
            self._end(close.error_code, close.reason_phrase)

    def _end(self, error_code: int, reason_phrase: str) -> None:
        core = self._quic._core
        by_peer = core is None or core.local_error is None
        if 0x100 <= error_code <= 0x1FF and by_peer:
            self.closed_alert = error_code - 0x100  # the peer's TLS alert, not ours
        self.closed_reason = close_reason(error_code, reason_phrase)
        self._blocked.clear()
        self._cancel_stalls()
        self._wake_credit_waiters()
        waiter = self._connected_waiter
        if waiter is not None and not waiter.done():
            # The handshake ended here (the owner may drop the socket before qh3's
            # draining period is over and it would say so itself).
            self._connected_waiter = None
            waiter.set_exception(ConnectionError(self.closed_reason))
        self.handler.h3_closed(self.closed_reason)

    def _refused(self, exc: Exception) -> None:
        """The library refused a send: the connection is closing (``_note_close``), or
        something else went wrong with it (``_fail``)."""
        self._note_close()
        if self.alive:
            self._fail(exc)

    # -- the library's side ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.gate.transport is None:
            self.gate.transport = transport

    def quic_event_received(self, event: QuicEvent) -> None:
        if type(event) is DatagramFrameReceived:
            self._datagram_frame(event.data)
            return
        if isinstance(event, HandshakeCompleted):
            self.resumed = event.session_resumed
            return
        if isinstance(event, ConnectionTerminated):
            if self.closed_reason is None:
                self._end(event.error_code, event.reason_phrase)
            return
        for h3_event in self.h3.handle_event(event):
            self._dispatch(h3_event)

    def _datagram_frame(self, data: bytes) -> None:
        """An HTTP Datagram, taken from its QUIC DATAGRAM frame here rather than through
        qh3's H3 layer, which builds a buffer, an event and a list for each one (the
        per-datagram path of every UDP flow). The same checks: nothing once the H3
        connection is done; a frame without a complete quarter stream ID is a connection
        error, H3_DATAGRAM_ERROR (RFC 9297 section 2.1)."""
        if self.h3._is_done:
            return
        parsed = parse_quarter_stream_id(data)
        if parsed is None:
            self.h3._is_done = True
            self._quic.close(error_code=H3_DATAGRAM_ERROR,
                             reason_phrase="HTTP datagram without a quarter stream ID")
            return
        quarter, offset = parsed
        self.handler.h3_datagram(quarter * 4, data[offset:])

    def _dispatch(self, event: H3Event) -> None:
        handler = self.handler
        if isinstance(event, DataReceived):
            handler.h3_data(event.stream_id, event.data, event.stream_ended)
        elif isinstance(event, DatagramReceived):
            handler.h3_datagram(event.flow_id * 4, event.data)
        elif isinstance(event, HeadersReceived):
            handler.h3_headers(event.stream_id, event.headers, event.stream_ended)
        elif isinstance(event, StreamReset):
            self._blocked.discard(event.stream_id)
            handler.h3_reset(event.stream_id)
        elif isinstance(event, StopSending):
            self._blocked.discard(event.stream_id)
            handler.h3_stop_sending(event.stream_id)

    # The library's entry points. Whatever it raises (a protocol state it cannot handle)
    # ends this connection, never the event loop.
    def _fail(self, exc: Exception) -> None:
        log.warning("QUIC connection with %s failed: %s", self.peer, exc)
        if self.alive:
            self.closed_reason = f"QUIC library error: {exc}"
            self._blocked.clear()
            self._cancel_stalls()
            self._wake_credit_waiters()
            self.handler.h3_closed(self.closed_reason)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiter = self._connected_waiter
        if waiter is not None and not waiter.done():
            self._connected_waiter = None
            waiter.set_exception(ConnectionError(str(exc)))
        if self.is_client:
            self.close_transport()
        else:
            self._closed.set()
            self._connection_terminated_handler()

    def _handle_timer(self) -> None:
        try:
            super()._handle_timer()
        except Exception as exc:  # see _fail
            self._fail(exc)
        self._note_close()

    def transmit(self) -> None:
        try:
            quicio.flush(self)  # qh3's transmit, minus its per-packet logging work
        except Exception as exc:  # see _fail
            self._fail(exc)
            return
        self._wake_credit_waiters()
        if self._blocked:
            for stream_id in list(self._blocked):
                if self._quic.get_send_buffer_size(stream_id) <= self.send_limit // 2:
                    self._blocked.discard(stream_id)
                    self.handler.h3_writable(stream_id)


# Socket buffers for a QUIC socket: the default (~200 KiB) overflows in a burst of packets
# while the event loop is busy, and every drop costs QUIC a loss-recovery round.
SOCKET_BUFFER = 4 * 1024 * 1024
# Linux's SO_RCVBUFFORCE and SO_SNDBUFFORCE (asm-generic/socket.h); Python does not name them.
_SO_RCVBUFFORCE = 33
_SO_SNDBUFFORCE = 32


def size_socket_buffers(sock: socket.socket) -> None:
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF),
                         (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)  # root: past rmem_max
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


# -- client ---------------------------------------------------------------------------------

@dataclass(slots=True)
class ClientTLS:
    server_name: str | None
    cafile: str | None = None
    insecure: bool = False
    session_ticket: SessionTicket | None = None
    certfile: str | None = None  # mutual TLS: our certificate chain and key (PEM)
    keyfile: str | None = None


# The congestion controllers the library offers. qh3 2.1's Rust core implements CUBIC
# (RFC 9438) with no setting to choose another (aioquic had Reno and CUBIC); the config
# (config.QUIC_CONGESTION) refuses anything else by name.
CONGESTION_CONTROL = ("cubic",)


def _configuration(settings: LinkSettings, *, is_client: bool) -> QuicConfiguration:
    """The QUIC settings both ends share: ALPN h3, the link's limits, DATAGRAM frames."""
    if settings.congestion not in CONGESTION_CONTROL:
        raise ValueError(f"congestion control {settings.congestion!r} is not available "
                         f"(only {', '.join(CONGESTION_CONTROL)})")
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=["h3"],
        idle_timeout=settings.idle_timeout,
        max_data=settings.max_data,
        max_stream_data=settings.max_stream_data,
        max_datagram_size=settings.max_datagram_size,
        max_datagram_frame_size=65536,
    )


async def dial(
    sock_factory: Callable[[str], Any],
    address: str,
    port: int,
    tls: ClientTLS,
    settings: LinkSettings,
    handler_factory: Callable[[H3Link], H3Handler],
    on_ticket: Callable[[SessionTicket], None],
    send_limit: int,
) -> H3Link:
    """Open a QUIC connection to ``address`` (an IP literal) from the socket that
    ``sock_factory(address)`` returns (marked, non-blocking, unbound); ALPN h3. Returns
    once the handshake is done; raises ConnectionError (or the socket's OSError)."""
    from qh3.asyncio._transport import create_optimized_datagram_transport

    configuration = _configuration(settings, is_client=True)
    configuration.server_name = tls.server_name
    configuration.session_ticket = tls.session_ticket
    if tls.insecure:
        configuration.verify_mode = ssl.CERT_NONE
    elif tls.cafile is not None:
        configuration.load_verify_locations(cafile=tls.cafile)
    if tls.certfile is not None:
        try:
            configuration.load_cert_chain(tls.certfile, tls.keyfile)
        except Exception as exc:  # the library's parse error, whatever its type
            raise ConnectionError(f"cannot load the client certificate {tls.certfile} "
                                  f"and key {tls.keyfile}: {exc}") from None
    quic = _ClientQuic(configuration=configuration, session_ticket_handler=on_ticket)
    gate = ReadGate()
    loop = asyncio.get_running_loop()
    sock = sock_factory(address)
    size_socket_buffers(sock)
    try:
        # Connected: the kernel filters other sources, and reports ICMP errors to us.
        sock.connect((address, port))
    except OSError:
        sock.close()
        raise
    _, protocol = await create_optimized_datagram_transport(
        loop,
        lambda: H3Link(quic, handler_factory=handler_factory, gate=gate, send_limit=send_limit),
        sock=sock,
    )
    link = cast(H3Link, protocol)
    link.peer = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    # The address as the socket reports senders, so qh3 sees replies on the same path:
    # IPv6 addresses come back as (host, port, flowinfo, scope_id).
    link.connect((address, port, 0, 0) if sock.family == socket.AF_INET6 else (address, port))
    try:
        await link.wait_connected()
    except BaseException:
        link.close_transport()
        raise
    return link


# -- server ---------------------------------------------------------------------------------

class H3Server:
    """A listening UDP socket with one ``H3Link`` per client connection."""

    def __init__(self, server: QuicServer, gate: ReadGate) -> None:
        self._server = server
        self.gate = gate

    @property
    def address(self) -> tuple[str, int]:
        transport = self._server._transport
        assert transport is not None
        sockname = transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def links(self) -> list[H3Link]:
        return list({id(p): cast(H3Link, p) for p in self._server._protocols.values()}.values())

    def close(self) -> None:
        for link in self.links():
            link.shutdown("server shutting down")
        transport = self._server._transport
        if transport is not None:
            transport.close()


class _BatchingServer(QuicServer):
    """qh3's server, fed batches by the optimized (GRO, recvmmsg) transport: the datagrams
    of one connection in a row go to it at once, so it processes events and transmits
    (ACKs) once per batch instead of once per datagram."""

    def datagrams_received(self, datagrams: list[bytes], addr: Any) -> None:
        cid_length = self._configuration.connection_id_length
        protocols = self._protocols
        batch: list[bytes] = []
        target: Any = None
        for data in datagrams:
            # A short header (RFC 9000 section 17.3): first bit 0, then our connection ID.
            protocol = None if not data or data[0] & 0x80 else protocols.get(
                data[1 : 1 + cid_length])
            if protocol is not target and batch:
                target.datagrams_received(batch, addr)
                batch = []
            if protocol is None:
                target = None
                self.datagram_received(data, addr)
            else:
                target = protocol
                batch.append(data)
        if batch:
            target.datagrams_received(batch, addr)


async def listen(
    host: str,
    port: int,
    certfile: str,
    keyfile: str,
    settings: LinkSettings,
    handler_factory: Callable[[H3Link], H3Handler],
    send_limit: int,
) -> H3Server:
    from qh3.asyncio._transport import create_optimized_datagram_transport

    configuration = _configuration(settings, is_client=False)
    configuration.load_cert_chain(certfile, keyfile)
    gate = ReadGate()
    tickets: dict[bytes, SessionTicket] = {}

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> H3Link:
        return H3Link(quic, handler_factory=handler_factory, gate=gate, send_limit=send_limit)

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        size_socket_buffers(sock)
    except OSError:
        sock.close()
        raise
    server = _BatchingServer(
        configuration=configuration, create_protocol=create_protocol,
        # A ticket from an earlier run of the server is unknown here: a full handshake.
        session_ticket_fetcher=lambda key: tickets.pop(key, None),
        session_ticket_handler=lambda ticket: tickets.__setitem__(ticket.ticket, ticket),
    )
    loop = asyncio.get_running_loop()
    await create_optimized_datagram_transport(loop, lambda: server, sock=sock)
    gate.transport = server._transport
    return H3Server(server, gate)
