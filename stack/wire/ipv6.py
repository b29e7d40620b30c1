"""IPv6 fixed header (RFC 8200 3) and the extension headers a receiver must skip (RFC 8200 4).

::

    0  version(4) | traffic class(8) | flow label(20)
    4  payload length   6  next header   7  hop limit
    8  source address (16)   24  destination address (16)   40  extension headers / upper layer

The checked view walks the extension header chain (hop-by-hop, routing,
destination options, fragment) up to the upper-layer header. The stack never
emits extension headers except the fragment header for its own fragments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError

__all__ = [
    "FRAGMENT_HEADER_LEN",
    "HEADER_LEN",
    "Ipv6Packet",
    "Ipv6Repr",
    "emit_fragment_header",
    "emit_header",
    "is_multicast",
]

HEADER_LEN = 40
FRAGMENT_HEADER_LEN = 8

# Field offsets, named once.
VER_TC_FLOW = 0
PAYLOAD_LEN = 4
NEXT_HEADER = 6
HOP_LIMIT = 7
SRC = 8
DST = 24

# Next-header values (IANA "Assigned Internet Protocol Numbers").
HOP_BY_HOP = 0
ROUTING = 43
FRAGMENT = 44
NO_NEXT_HEADER = 59
DEST_OPTIONS = 60

# A bound on the chain length: RFC 8200 4.1 recommends each header at most once
# (destination options twice); anything longer is hostile.
MAX_EXTENSION_HEADERS = 8

_HEADER = struct.Struct("!IHBB16s16s")
_EXT = struct.Struct("!BB")  # next header, header extension length (8-octet units, minus 1)
_FRAGMENT = struct.Struct("!BBHI")  # next header, reserved, offset(13)|res(2)|M(1), ident


class Ipv6Packet:
    """Checked view of an IPv6 packet, extension headers walked.

    ``protocol`` is the upper-layer protocol (or 59 for "no next header"),
    ``upper_offset`` where its header starts, ``payload`` the upper-layer bytes.
    When a fragment header is present ``fragment`` is ``(offset_bytes, more,
    ident)``, the walk stops after it: ``protocol`` is the fragment header's
    next header and ``payload`` the fragmentable part. An atomic fragment
    (offset 0, M=0, RFC 6946) is no fragment: reported as None, walked through.
    """

    __slots__ = (
        "buffer",
        "dst",
        "flow_label",
        "fragment",
        "hop_limit",
        "payload_len",
        "protocol",
        "src",
        "traffic_class",
        "upper_offset",
    )

    def __init__(self, buffer: memoryview) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("ipv6-truncated", f"{len(buffer)} bytes")
        vtf, payload_len, next_header, hop_limit, src, dst = _HEADER.unpack_from(buffer)
        if vtf >> 28 != 6:
            raise WireError("ipv6-version", str(vtf >> 28))
        if payload_len == 0 and next_header == HOP_BY_HOP:
            # RFC 2675 jumbograms: cannot come through a 64 KB TUN.
            raise WireError("ipv6-jumbogram")
        end = HEADER_LEN + payload_len
        if end > len(buffer):
            raise WireError("ipv6-truncated", f"payload {payload_len} > {len(buffer) - HEADER_LEN}")
        buffer = buffer[:end]
        offset = HEADER_LEN
        fragment: tuple[int, bool, int] | None = None
        count = 0
        while next_header in (HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTIONS):
            if next_header == HOP_BY_HOP and offset != HEADER_LEN:
                # RFC 8200 4.3: hop-by-hop only immediately after the fixed header.
                raise WireError("ipv6-hop-by-hop-position")
            count += 1
            if count > MAX_EXTENSION_HEADERS:
                raise WireError("ipv6-too-many-extension-headers")
            if next_header == FRAGMENT:
                # RFC 8200 4.5: fixed 8 bytes.
                if offset + FRAGMENT_HEADER_LEN > end:
                    raise WireError("ipv6-truncated", "fragment header")
                nh, _, off_m, ident = _FRAGMENT.unpack_from(buffer, offset)
                next_header = nh
                offset += FRAGMENT_HEADER_LEN
                if off_m & 0xFFF9:  # offset != 0 or M set: a real fragment
                    # What follows is the fragmentable part, not headers we can walk
                    # (RFC 8200 4.5): stop; reassembly re-parses the whole packet.
                    fragment = (off_m & 0xFFF8, bool(off_m & 1), ident)
                    break
                continue
            if offset + 2 > end:
                raise WireError("ipv6-truncated", "extension header")
            nh, ext_len = _EXT.unpack_from(buffer, offset)
            length = (ext_len + 1) * 8
            if offset + length > end:
                raise WireError("ipv6-truncated", "extension header body")
            if next_header == ROUTING and buffer[offset + 3] != 0:
                # RFC 8200 4.4: segments left != 0 means the packet is not for its final
                # destination yet; we are no router, so such a packet is not ours to take.
                raise WireError("ipv6-routing-segments-left")
            next_header = nh
            offset += length
        self.buffer = buffer
        self.traffic_class: int = (vtf >> 20) & 0xFF
        self.flow_label: int = vtf & 0xFFFFF
        self.payload_len: int = payload_len
        self.hop_limit: int = hop_limit
        self.src: bytes = src
        self.dst: bytes = dst
        self.protocol: int = next_header
        self.upper_offset: int = offset
        self.fragment: tuple[int, bool, int] | None = fragment

    @property
    def payload(self) -> memoryview:
        """The upper-layer header and payload."""
        return self.buffer[self.upper_offset :]


@dataclass(frozen=True, slots=True)
class Ipv6Repr:
    src: bytes
    dst: bytes
    protocol: int  # upper-layer protocol (extension headers already skipped)
    payload_len: int  # upper-layer length (what the pseudo-header carries)
    hop_limit: int = 64
    traffic_class: int = 0
    flow_label: int = 0

    @classmethod
    def parse(cls, packet: Ipv6Packet) -> Ipv6Repr:
        return cls(
            src=packet.src,
            dst=packet.dst,
            protocol=packet.protocol,
            payload_len=len(packet.buffer) - packet.upper_offset,
            hop_limit=packet.hop_limit,
            traffic_class=packet.traffic_class,
            flow_label=packet.flow_label,
        )

    def buffer_len(self) -> int:
        return HEADER_LEN

    def emit(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        return emit_header(
            buf,
            offset,
            self.src,
            self.dst,
            self.protocol,
            self.payload_len,
            self.hop_limit,
            self.traffic_class,
            self.flow_label,
        )


def emit_header(
    buf: bytearray | memoryview,
    offset: int,
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> int:
    """Write the fixed header at ``buf[offset:]`` (IPv6 has no header checksum)."""
    vtf = (6 << 28) | ((traffic_class & 0xFF) << 20) | (flow_label & 0xFFFFF)
    _HEADER.pack_into(buf, offset, vtf, payload_len, next_header, hop_limit, src, dst)
    return HEADER_LEN


def emit_fragment_header(
    buf: bytearray | memoryview, offset: int, next_header: int, frag_offset: int, more: bool,
    ident: int,
) -> int:  # fmt: skip
    """RFC 8200 4.5; ``frag_offset`` in bytes (a multiple of 8)."""
    _FRAGMENT.pack_into(buf, offset, next_header, 0, (frag_offset & 0xFFF8) | int(more), ident)
    return FRAGMENT_HEADER_LEN


def is_multicast(addr: bytes) -> bool:
    """ff00::/8 (RFC 4291 2.7)."""
    return addr[0] == 0xFF
