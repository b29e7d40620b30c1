"""ICMPv6 (RFC 4443), the messages a catch-all endpoint meets.

Same layout as ICMPv4 (type, code, checksum, 4 bytes, data) but the checksum
covers an IPv6 pseudo-header (RFC 4443 2.3, RFC 8200 8.1) with next header 58.
Echo request 128 / reply 129 carry identifier and sequence number; destination
unreachable (type 1) has 4 unused bytes then as much of the invoking packet as
fits in the minimum MTU (RFC 4443 2.4 (c)).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError
from stack.wire.checksum import checksum, ones_sum, pseudo_header_sum

__all__ = [
    "CODE_ADDRESS_UNREACHABLE",
    "CODE_ADMIN_PROHIBITED",
    "CODE_PORT_UNREACHABLE",
    "DEST_UNREACHABLE",
    "ECHO_REPLY",
    "ECHO_REQUEST",
    "HEADER_LEN",
    "MLD_TYPES",
    "NDP_TYPES",
    "PROTOCOL",
    "Icmpv6Packet",
    "Icmpv6Repr",
]

PROTOCOL = 58
HEADER_LEN = 8

# Field offsets, named once.
TYPE = 0
CODE = 1
CHECKSUM = 2
REST = 4
SEQUENCE = 6

DEST_UNREACHABLE = 1
PACKET_TOO_BIG = 2
TIME_EXCEEDED = 3
PARAMETER_PROBLEM = 4
ECHO_REQUEST = 128
ECHO_REPLY = 129
# RFC 4861 4: router/neighbour solicitation and advertisement, redirect.
NDP_TYPES = frozenset((133, 134, 135, 136, 137))
# RFC 2710 / RFC 3810: multicast listener query, report, done, v2 report.
MLD_TYPES = frozenset((130, 131, 132, 143))

CODE_ADMIN_PROHIBITED = 1
CODE_ADDRESS_UNREACHABLE = 3
CODE_PORT_UNREACHABLE = 4

_HEADER = struct.Struct("!BBHHH")


class Icmpv6Packet:
    """Checked view of an ICMPv6 message (the whole upper-layer payload)."""

    __slots__ = ("buffer", "checksum", "code", "ident", "seq", "type")
    type: int
    code: int
    checksum: int
    ident: int
    seq: int

    def __init__(self, buffer: memoryview) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("icmp6-truncated", f"{len(buffer)} bytes")
        self.type, self.code, self.checksum, self.ident, self.seq = _HEADER.unpack_from(buffer)
        self.buffer = buffer

    @property
    def is_error(self) -> bool:
        """RFC 4443 2.1: types 0-127 are errors, 128-255 informational."""
        return self.type < 128

    def verify_checksum(self, src: bytes, dst: bytes) -> bool:
        initial = pseudo_header_sum(src, dst, PROTOCOL, len(self.buffer))
        return ones_sum(self.buffer, initial) == 0

    @property
    def data(self) -> memoryview:
        return self.buffer[HEADER_LEN:]


@dataclass(frozen=True, slots=True)
class Icmpv6Repr:
    type: int
    code: int = 0
    ident: int = 0
    seq: int = 0
    data: bytes = b""

    @classmethod
    def parse(
        cls, packet: Icmpv6Packet, src: bytes, dst: bytes, *, verify: bool = True
    ) -> Icmpv6Repr:
        if verify and not packet.verify_checksum(src, dst):
            raise WireError("icmp6-checksum")
        return cls(packet.type, packet.code, packet.ident, packet.seq, bytes(packet.data))

    def buffer_len(self) -> int:
        return HEADER_LEN + len(self.data)

    def emit(self, buf: bytearray | memoryview, offset: int, src: bytes, dst: bytes) -> int:
        """Message with its checksum (pseudo-header from ``src``/``dst``) at ``buf[offset:]``."""
        length = HEADER_LEN + len(self.data)
        end = offset + length
        _HEADER.pack_into(buf, offset, self.type, self.code, 0, self.ident, self.seq)
        buf[offset + HEADER_LEN : end] = self.data
        csum = checksum(memoryview(buf)[offset:end], pseudo_header_sum(src, dst, PROTOCOL, length))
        struct.pack_into("!H", buf, offset + CHECKSUM, csum)
        return end - offset
