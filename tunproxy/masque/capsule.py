"""RFC 9297 capsules and HTTP Datagram payloads, sans-I/O.

A capsule is ``type (varint) | length (varint) | value``. On a CONNECT-UDP stream the
DATAGRAM capsule (type 0x00) carries an HTTP Datagram payload for datagrams that cannot
go in a QUIC DATAGRAM frame (too big for the packet); every other capsule type is
skipped (RFC 9297 section 3.2: unknown capsules MUST be silently dropped), streamed
past without buffering its value.

An HTTP Datagram payload on a CONNECT-UDP request is ``context ID (varint) | payload``;
context ID 0 is a UDP payload (RFC 9298 section 4). Other contexts are dropped by the
caller. In a QUIC DATAGRAM frame, HTTP/3 puts the request stream's quarter stream ID in
front (RFC 9297 section 2.1): every datagram of a flow starts with the same bytes,
``datagram_prefix``, built once per flow.
"""

from __future__ import annotations

from tunproxy.varint import emit_varint, parse_varint

__all__ = [
    "CAPSULE_DATAGRAM",
    "CapsuleParser",
    "MasqueError",
    "datagram_prefix",
    "emit_capsule",
    "emit_http_datagram",
    "emit_varint",
    "parse_http_datagram",
    "parse_quarter_stream_id",
    "parse_varint",
]

CAPSULE_DATAGRAM = 0x00
# A DATAGRAM capsule longer than this is refused: a UDP payload is at most 65,527 bytes,
# plus its context ID.
MAX_DATAGRAM_CAPSULE = 65_535 + 8


class MasqueError(Exception):
    """The peer sent bytes this layer refuses: every parse either succeeds or raises this."""


def emit_capsule(capsule_type: int, value: bytes) -> bytes:
    return emit_varint(capsule_type) + emit_varint(len(value)) + value


def emit_http_datagram(payload: bytes, context_id: int = 0) -> bytes:
    return emit_varint(context_id) + payload


def parse_http_datagram(data: bytes) -> tuple[int, bytes]:
    """(context ID, payload) of an HTTP Datagram payload."""
    if data and data[0] == 0:  # context ID 0, a UDP payload: every datagram of a flow
        return 0, data[1:]
    head = parse_varint(data)
    if head is None:
        raise MasqueError("HTTP datagram without a complete context ID")
    context_id, offset = head
    return context_id, data[offset:]


# RFC 9297 section 2.1: quarter stream IDs are below 2^60 (stream IDs below 2^62).
MAX_QUARTER_STREAM_ID = (1 << 60) - 1


def datagram_prefix(stream_id: int, context_id: int = 0) -> bytes:
    """What every HTTP/3 datagram of request stream ``stream_id`` with ``context_id``
    starts with: its quarter stream ID (RFC 9297 section 2.1), then the context ID."""
    return emit_varint(stream_id // 4) + emit_varint(context_id)


def parse_quarter_stream_id(frame: bytes) -> tuple[int, int] | None:
    """(quarter stream ID, offset of the HTTP Datagram payload) of an HTTP/3 datagram (a
    QUIC DATAGRAM frame's content); None when it is malformed: it ends inside the varint,
    or the value is 2^60 or more (RFC 9297 section 2.1: H3_DATAGRAM_ERROR)."""
    if frame and frame[0] < 0x40:  # a 1-byte varint: streams 0 to 252, the common case
        return frame[0], 1
    parsed = parse_varint(frame)
    if parsed is None or parsed[0] > MAX_QUARTER_STREAM_ID:
        return None
    return parsed


class CapsuleParser:
    """Feed the stream's bytes, in any pieces; ``feed`` returns the value of each
    complete DATAGRAM capsule. Other capsule types are skipped as they stream past."""

    __slots__ = ("_buffer", "_skip", "skipped")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip = 0  # bytes left of an unknown capsule's value
        self.skipped = 0  # unknown capsules seen

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buffer += data
        buffer = self._buffer
        offset = 0
        while offset < len(buffer):
            head = parse_varint(buffer, offset)
            if head is None:
                break
            capsule_type, after_type = head
            length_field = parse_varint(buffer, after_type)
            if length_field is None:
                break
            length, start = length_field
            if capsule_type != CAPSULE_DATAGRAM:
                self.skipped += 1
                available = len(buffer) - start
                if length > available:
                    self._skip = length - available
                    offset = len(buffer)
                    break
                offset = start + length
                continue
            if length > MAX_DATAGRAM_CAPSULE:
                raise MasqueError(f"DATAGRAM capsule of {length} bytes")
            if start + length > len(buffer):
                break
            value = bytes(buffer[start : start + length])
            offset = start + length
            out.append(value)
        del buffer[:offset]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buffer)
