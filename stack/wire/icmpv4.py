"""ICMP for IPv4 (RFC 792), the messages a catch-all endpoint meets.

::

    0  type   1  code   2  checksum (over the whole ICMP message)   4  rest of header (4)
    8  data: echo payload, or the invoking datagram's IP header + leading bytes

Echo (types 8/0): rest of header = identifier, sequence number.
Destination unreachable (type 3): rest of header unused (zero; RFC 1191 puts the
next-hop MTU in the low 16 bits for code 4).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError
from stack.wire.checksum import checksum, ones_sum

__all__ = [
    "CODE_ADMIN_PROHIBITED",
    "CODE_HOST_UNREACHABLE",
    "CODE_PORT_UNREACHABLE",
    "DEST_UNREACHABLE",
    "ECHO_REPLY",
    "ECHO_REQUEST",
    "ERROR_TYPES",
    "HEADER_LEN",
    "Icmpv4Packet",
    "Icmpv4Repr",
]

HEADER_LEN = 8

# Field offsets, named once.
TYPE = 0
CODE = 1
CHECKSUM = 2
REST = 4  # identifier for echo
SEQUENCE = 6

ECHO_REPLY = 0
DEST_UNREACHABLE = 3
SOURCE_QUENCH = 4
REDIRECT = 5
ECHO_REQUEST = 8
TIME_EXCEEDED = 11
PARAMETER_PROBLEM = 12
# RFC 1122 3.2.2: an ICMP error message is never sent in response to one of these.
ERROR_TYPES = frozenset(
    (DEST_UNREACHABLE, SOURCE_QUENCH, REDIRECT, TIME_EXCEEDED, PARAMETER_PROBLEM)
)

CODE_HOST_UNREACHABLE = 1
CODE_PORT_UNREACHABLE = 3
CODE_ADMIN_PROHIBITED = 13  # RFC 1812 5.2.7.1

_HEADER = struct.Struct("!BBHHH")


class Icmpv4Packet:
    """Checked view of an ICMP message (the whole IP payload)."""

    __slots__ = ("buffer", "checksum", "code", "ident", "seq", "type")
    type: int
    code: int
    checksum: int
    ident: int
    seq: int

    def __init__(self, buffer: memoryview) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("icmp-truncated", f"{len(buffer)} bytes")
        self.type, self.code, self.checksum, self.ident, self.seq = _HEADER.unpack_from(buffer)
        self.buffer = buffer

    def verify_checksum(self) -> bool:
        return ones_sum(self.buffer) == 0

    @property
    def data(self) -> memoryview:
        return self.buffer[HEADER_LEN:]


@dataclass(frozen=True, slots=True)
class Icmpv4Repr:
    """``ident``/``seq`` for echo; for other types the rest-of-header is
    ``(ident << 16) | seq`` (zero for destination unreachable). ``data`` is the
    echo payload or the quoted datagram."""

    type: int
    code: int = 0
    ident: int = 0
    seq: int = 0
    data: bytes = b""

    @classmethod
    def parse(cls, packet: Icmpv4Packet, *, verify: bool = True) -> Icmpv4Repr:
        if verify and not packet.verify_checksum():
            raise WireError("icmp-checksum")
        return cls(packet.type, packet.code, packet.ident, packet.seq, bytes(packet.data))

    def buffer_len(self) -> int:
        return HEADER_LEN + len(self.data)

    def emit(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        """Message with its checksum at ``buf[offset:]``."""
        end = offset + HEADER_LEN + len(self.data)
        _HEADER.pack_into(buf, offset, self.type, self.code, 0, self.ident, self.seq)
        buf[offset + HEADER_LEN : end] = self.data
        csum = checksum(memoryview(buf)[offset:end])
        struct.pack_into("!H", buf, offset + CHECKSUM, csum)
        return end - offset
