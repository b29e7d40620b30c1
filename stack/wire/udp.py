"""UDP header (RFC 768).

::

    0  source port   2  destination port   4  length (header + data)   6  checksum
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError

__all__ = ["CHECKSUM_OFFSET", "HEADER_LEN", "UdpPacket", "UdpRepr", "emit_header"]

HEADER_LEN = 8

# Field offsets, named once.
SRC_PORT = 0
DST_PORT = 2
LENGTH = 4
CHECKSUM_OFFSET = 6

_HEADER = struct.Struct("!HHHH")


class UdpPacket:
    """Checked view of a UDP datagram.

    ``length`` must fit the buffer; bytes past it are ignored. With
    ``trust_length=False`` (a UDP_L4 GSO super-packet, whose length field the
    kernel leaves unspecified until it segments) the whole buffer is the datagram.
    """

    __slots__ = ("buffer", "checksum", "dst_port", "length", "src_port")

    def __init__(self, buffer: memoryview, *, trust_length: bool = True) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("udp-truncated", f"{len(buffer)} bytes")
        src_port, dst_port, length, csum = _HEADER.unpack_from(buffer)
        if not trust_length:
            length = len(buffer)
        elif length < HEADER_LEN:
            raise WireError("udp-length", str(length))
        elif length > len(buffer):
            raise WireError("udp-truncated", f"length {length} > {len(buffer)}")
        self.buffer = buffer[:length]
        self.src_port: int = src_port
        self.dst_port: int = dst_port
        self.length: int = length
        self.checksum: int = csum

    @property
    def payload(self) -> memoryview:
        return self.buffer[HEADER_LEN:]


@dataclass(frozen=True, slots=True)
class UdpRepr:
    src_port: int
    dst_port: int

    @classmethod
    def parse(cls, packet: UdpPacket) -> UdpRepr:
        """Does not verify the checksum (it needs the IP pseudo-header: the caller does)."""
        return cls(packet.src_port, packet.dst_port)

    def buffer_len(self, payload_len: int) -> int:
        return HEADER_LEN + payload_len

    def emit(
        self, buf: bytearray | memoryview, offset: int, payload: bytes | memoryview
    ) -> int:
        """Header (checksum field 0; the caller fills it) and payload at ``buf[offset:]``."""
        emit_header(buf, offset, self.src_port, self.dst_port, len(payload))
        end = offset + HEADER_LEN + len(payload)
        buf[offset + HEADER_LEN : end] = payload
        return end - offset


def emit_header(
    buf: bytearray | memoryview, offset: int, src_port: int, dst_port: int, payload_len: int,
    csum: int = 0,
) -> int:  # fmt: skip
    _HEADER.pack_into(buf, offset, src_port, dst_port, HEADER_LEN + payload_len, csum)
    return HEADER_LEN
