"""The virtio-net header (``struct virtio_net_hdr``, 10 bytes) a TUN device opened
with ``IFF_VNET_HDR`` puts before every packet, in both directions.

Layout (virtio spec 1.2, 5.1.6 "Device Operation"; Linux include/uapi/linux/virtio_net.h)::

    0  flags        u8    NEEDS_CSUM=1: the L4 checksum field holds only the pseudo-header
                          sum; complete it from csum_start, store at csum_start+csum_offset.
                          DATA_VALID=2: the checksum was already verified.
    1  gso_type     u8    NONE=0, TCPV4=1, UDP=3 (UFO), TCPV6=4, UDP_L4=5 (USO); |0x80 = ECN
    2  hdr_len      u16   length of the headers to replicate in each GSO segment
    4  gso_size     u16   payload bytes per GSO segment
    6  csum_start   u16   offset of the L4 header from the start of the packet
    8  csum_offset  u16   offset of the checksum field inside the L4 header

The u16 fields are in the host's byte order for a TUN device whose vnet header is
not set to big-endian (TUNSETVNETLE/BE): little-endian on x86 and arm64, which is
all tunproxy targets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError

__all__ = [
    "F_DATA_VALID",
    "F_NEEDS_CSUM",
    "GSO_ECN",
    "GSO_NONE",
    "GSO_TCPV4",
    "GSO_TCPV6",
    "GSO_UDP",
    "GSO_UDP_L4",
    "HEADER_LEN",
    "VirtioNetHdr",
    "VirtioNetHdrRepr",
    "emit_header",
]

HEADER_LEN = 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

# Field offsets, named once.
FLAGS = 0
GSO_TYPE = 1
HDR_LEN = 2
GSO_SIZE = 4
CSUM_START = 6
CSUM_OFFSET = 8

_HEADER = struct.Struct("<BBHHHH")
_KNOWN_GSO = frozenset((GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_UDP_L4))


class VirtioNetHdr:
    """Checked view of the header at the start of ``buffer``.

    The constructor reads and validates all fields at once; the attributes
    cannot fail afterwards. ``payload`` is the packet after the header.
    """

    __slots__ = ("buffer", "csum_offset", "csum_start", "flags", "gso_size", "gso_type", "hdr_len")

    def __init__(self, buffer: memoryview) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("virtio-truncated", f"{len(buffer)} bytes")
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HEADER.unpack_from(buffer)
        if gso_type & ~GSO_ECN not in _KNOWN_GSO:
            raise WireError("virtio-gso-type", str(gso_type))
        if gso_type & ~GSO_ECN != GSO_NONE and gso_size == 0:
            raise WireError("virtio-gso-size", "gso without gso_size")
        self.buffer = buffer
        self.flags: int = flags
        self.gso_type: int = gso_type
        self.hdr_len: int = hdr_len
        self.gso_size: int = gso_size
        self.csum_start: int = csum_start
        self.csum_offset: int = csum_offset

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & F_NEEDS_CSUM)

    @property
    def data_valid(self) -> bool:
        return bool(self.flags & F_DATA_VALID)

    @property
    def checksum_trusted(self) -> bool:
        """The L4 checksum must not be verified (partial) or need not be (verified)."""
        return bool(self.flags & (F_NEEDS_CSUM | F_DATA_VALID))

    @property
    def gso_protocol(self) -> int:
        """``gso_type`` without the ECN bit."""
        return self.gso_type & ~GSO_ECN

    @property
    def payload(self) -> memoryview:
        return self.buffer[HEADER_LEN:]


@dataclass(frozen=True, slots=True)
class VirtioNetHdrRepr:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, view: VirtioNetHdr) -> VirtioNetHdrRepr:
        return cls(
            view.flags,
            view.gso_type,
            view.hdr_len,
            view.gso_size,
            view.csum_start,
            view.csum_offset,
        )

    def buffer_len(self) -> int:
        return HEADER_LEN

    def emit(self, buf: bytearray | memoryview, offset: int = 0) -> int:
        return emit_header(
            buf,
            offset,
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )


def emit_header(
    buf: bytearray | memoryview,
    offset: int,
    flags: int = 0,
    gso_type: int = GSO_NONE,
    hdr_len: int = 0,
    gso_size: int = 0,
    csum_start: int = 0,
    csum_offset: int = 0,
) -> int:
    """Write a header at ``buf[offset:]`` without building a Repr (the per-packet path)."""
    _HEADER.pack_into(buf, offset, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    return HEADER_LEN
