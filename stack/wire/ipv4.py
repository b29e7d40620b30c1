"""IPv4 header (RFC 791 3.1).

::

    0  version(4) | IHL(4)     1  DSCP(6) | ECN(2)     2  total length
    4  identification          6  flags(3) | fragment offset(13, in 8-byte units)
    8  TTL   9  protocol      10  header checksum
   12  source address         16  destination address      20  options (IHL > 5)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError
from stack.wire.checksum import checksum, ones_sum

__all__ = [
    "HEADER_LEN",
    "Ipv4Packet",
    "Ipv4Repr",
    "emit_header",
    "is_multicast_or_broadcast",
]

HEADER_LEN = 20  # without options; we never emit options

# Field offsets, named once.
VER_IHL = 0
TOS = 1
TOTAL_LEN = 2
IDENT = 4
FLAGS_FRAG = 6
TTL = 8
PROTOCOL = 9
CHECKSUM = 10
SRC = 12
DST = 16

FLAG_DF = 0x4000
FLAG_MF = 0x2000
FRAG_MASK = 0x1FFF
_FLAG_RESERVED = 0x8000

_HEADER = struct.Struct("!BBHHHBBH4s4s")


class Ipv4Packet:
    """Checked view of an IPv4 packet.

    The constructor validates version, IHL and total length against the
    buffer; trailing bytes past the total length are ignored (``packet``).
    """

    __slots__ = (
        "buffer",
        "checksum",
        "dst",
        "flags_frag",
        "header_len",
        "ident",
        "protocol",
        "src",
        "tos",
        "total_len",
        "ttl",
    )

    def __init__(self, buffer: memoryview) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("ipv4-truncated", f"{len(buffer)} bytes")
        vihl, tos, total, ident, flags_frag, ttl, proto, csum, src, dst = _HEADER.unpack_from(
            buffer
        )
        if vihl >> 4 != 4:
            raise WireError("ipv4-version", str(vihl >> 4))
        header_len = (vihl & 0x0F) * 4
        if header_len < HEADER_LEN:
            raise WireError("ipv4-header-len", str(header_len))
        if total < header_len:
            raise WireError("ipv4-total-len", f"{total} < {header_len}")
        if total > len(buffer):
            raise WireError("ipv4-truncated", f"total {total} > {len(buffer)}")
        self.buffer = buffer[:total]
        self.header_len: int = header_len
        self.tos: int = tos
        self.total_len: int = total
        self.ident: int = ident
        self.flags_frag: int = flags_frag
        self.ttl: int = ttl
        self.protocol: int = proto
        self.checksum: int = csum
        self.src: bytes = src
        self.dst: bytes = dst

    def verify_checksum(self) -> bool:
        return ones_sum(self.buffer[: self.header_len]) == 0

    @property
    def dont_fragment(self) -> bool:
        return bool(self.flags_frag & FLAG_DF)

    @property
    def more_fragments(self) -> bool:
        return bool(self.flags_frag & FLAG_MF)

    @property
    def frag_offset(self) -> int:
        """In bytes."""
        return (self.flags_frag & FRAG_MASK) * 8

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags_frag & (FLAG_MF | FRAG_MASK))

    @property
    def header(self) -> memoryview:
        return self.buffer[: self.header_len]

    @property
    def payload(self) -> memoryview:
        return self.buffer[self.header_len :]


@dataclass(frozen=True, slots=True)
class Ipv4Repr:
    src: bytes
    dst: bytes
    protocol: int
    payload_len: int
    ttl: int = 64
    ident: int = 0
    dont_fragment: bool = True
    more_fragments: bool = False
    frag_offset: int = 0  # bytes, a multiple of 8
    tos: int = 0

    @classmethod
    def parse(cls, packet: Ipv4Packet, *, verify: bool = True) -> Ipv4Repr:
        """Options are skipped (RFC 791 options carry nothing a catch-all endpoint uses)."""
        if verify and not packet.verify_checksum():
            raise WireError("ipv4-checksum")
        if packet.flags_frag & _FLAG_RESERVED:
            # RFC 791: the reserved flag "must be zero"; RFC 3514 jokes aside, a set bit is junk.
            raise WireError("ipv4-reserved-flag")
        return cls(
            src=packet.src,
            dst=packet.dst,
            protocol=packet.protocol,
            payload_len=packet.total_len - packet.header_len,
            ttl=packet.ttl,
            ident=packet.ident,
            dont_fragment=packet.dont_fragment,
            more_fragments=packet.more_fragments,
            frag_offset=packet.frag_offset,
            tos=packet.tos,
        )

    def buffer_len(self) -> int:
        return HEADER_LEN

    def emit(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        flags_frag = (self.frag_offset // 8) & FRAG_MASK
        if self.dont_fragment:
            flags_frag |= FLAG_DF
        if self.more_fragments:
            flags_frag |= FLAG_MF
        return emit_header(
            buf,
            offset,
            self.src,
            self.dst,
            self.protocol,
            self.payload_len,
            self.ident,
            self.ttl,
            flags_frag,
            self.tos,
        )


def emit_header(
    buf: bytearray | memoryview,
    offset: int,
    src: bytes,
    dst: bytes,
    protocol: int,
    payload_len: int,
    ident: int,
    ttl: int = 64,
    flags_frag: int = FLAG_DF,
    tos: int = 0,
) -> int:
    """Write a 20-byte header with its checksum at ``buf[offset:]`` (the per-packet path)."""
    _HEADER.pack_into(
        buf, offset, 0x45, tos, HEADER_LEN + payload_len, ident, flags_frag, ttl, protocol, 0,
        src, dst,
    )  # fmt: skip
    csum = checksum(memoryview(buf)[offset : offset + HEADER_LEN])
    buf[offset + CHECKSUM] = csum >> 8
    buf[offset + CHECKSUM + 1] = csum & 0xFF
    return HEADER_LEN


def is_multicast_or_broadcast(addr: bytes) -> bool:
    """224.0.0.0/4 (RFC 5771), 240.0.0.0/4 reserved, and the limited broadcast address.

    Subnet-directed broadcasts cannot be told apart without knowing the subnet.
    """
    return addr[0] >= 224
