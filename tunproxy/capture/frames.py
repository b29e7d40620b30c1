"""TUN packets as capture frames: what a sniffer on the TUN would see, and whose flow it is.

Sans-I/O. With ``IFF_VNET_HDR`` every TUN packet starts with a 10-byte virtio-net header,
and a packet with ``NEEDS_CSUM`` carries only the pseudo-header sum in its L4 checksum
field (the other side finishes it). ``frame`` drops the header and finishes that checksum,
so Wireshark's checksum validation, when turned on, passes. Super-packets (TSO/USO, up to
64 KB) are written whole, as tcpdump on the TUN shows them: one valid IP packet whose
length covers every segment; they are not split into MTU-sized frames.
"""

from __future__ import annotations

import functools
import ipaddress
import struct

from stack.wire.checksum import checksum

__all__ = ["FlowTuple", "flow_tuple", "frame", "ip_view"]

VNET_HDR_LEN = 10
_F_NEEDS_CSUM = 1
_CSUM = struct.Struct("<HH")  # csum_start, csum_offset in the virtio header (little-endian)
_PORTS = struct.Struct(">HH")
_TCP, _UDP = 6, 17

# (network, app address, app port, remote address, remote port)
FlowTuple = tuple[str, str, int, str, int]


def frame(packet: bytes, vnet_hdr: bool) -> bytes:
    """The IP packet inside a TUN packet, with a partial checksum completed."""
    if not vnet_hdr:
        return packet
    if len(packet) < VNET_HDR_LEN:
        return b""
    if not packet[0] & _F_NEEDS_CSUM:
        return packet[VNET_HDR_LEN:]
    start, offset = _CSUM.unpack_from(packet, 6)
    ip = bytearray(packet[VNET_HDR_LEN:])
    at = start + offset
    if start >= len(ip) or at + 2 > len(ip):
        return bytes(ip)  # nonsense offsets: leave the packet as it came
    # The field holds the pseudo-header sum: summing from csum_start with it in place and
    # storing the complement is exactly the device's job (virtio 1.2, 5.1.6.2).
    struct.pack_into(">H", ip, at, checksum(memoryview(ip)[start:]))
    return bytes(ip)


def ip_view(packet: bytes, vnet_hdr: bool) -> bytes | memoryview:
    """The IP packet inside a TUN packet, without a copy (its checksum left as it came)."""
    return memoryview(packet)[VNET_HDR_LEN:] if vnet_hdr else packet


def _address(data: bytes | memoryview, offset: int, size: int) -> str:
    return _text(bytes(data[offset:offset + size]))


@functools.lru_cache(maxsize=4096)
def _text(raw: bytes) -> str:
    # Every packet of a flow names the same two addresses: convert each once, not per packet.
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw))
    return str(ipaddress.IPv6Address(raw))


# IPv6 extension headers whose length is (Hdr Ext Len + 1) * 8 (RFC 8200 4.3-4.6, and the
# later ones built the same way, RFC 8200 4.8): Hop-by-Hop, Routing, Destination Options,
# Mobility (RFC 6275), HIP (RFC 7401), Shim6 (RFC 5533).
_EXT_8 = frozenset((0, 43, 60, 135, 139, 140))
_FRAGMENT, _AH = 44, 51
_MAX_EXT = 16  # more than any honest packet carries; a loop of headers ends here


def _ipv6_upper_layer(ip: bytes | memoryview) -> tuple[int, int] | None:
    """(protocol, offset) of an IPv6 packet's upper-layer header, past its extension
    headers; None when it cannot be reached (a non-first fragment, ESP, truncated)."""
    proto, at = ip[6], 40
    for _ in range(_MAX_EXT):
        if proto in _EXT_8:
            if len(ip) < at + 2:
                return None
            proto, at = ip[at], at + (ip[at + 1] + 1) * 8
        elif proto == _FRAGMENT:  # RFC 8200 4.5: 8 bytes, the offset in its top 13 bits
            if len(ip) < at + 8:
                return None
            if struct.unpack_from(">H", ip, at + 2)[0] & 0xFFF8:
                return None  # a later fragment: no ports here
            proto, at = ip[at], at + 8
        elif proto == _AH:  # RFC 4302 2.2: its length is in 4-byte units, minus 2
            if len(ip) < at + 2:
                return None
            proto, at = ip[at], at + (ip[at + 1] + 2) * 4
        else:
            return proto, at
    return None


def flow_tuple(ip: bytes | memoryview, *, from_app: bool) -> FlowTuple | None:
    """The flow a TCP/UDP packet belongs to, seen from the app's side; None otherwise."""
    if not ip:
        return None
    version = ip[0] >> 4
    if version == 4:
        if len(ip) < 20:
            return None
        header = (ip[0] & 0x0F) * 4
        proto = ip[9]
        src, dst = _address(ip, 12, 4), _address(ip, 16, 4)
        if struct.unpack_from(">H", ip, 6)[0] & 0x1FFF:
            return None  # a later fragment: no ports here
    elif version == 6:
        if len(ip) < 40:
            return None
        found = _ipv6_upper_layer(ip)
        if found is None:
            return None
        proto, header = found
        src, dst = _address(ip, 8, 16), _address(ip, 24, 16)
    else:
        return None
    if proto not in (_TCP, _UDP) or len(ip) < header + 4:
        return None
    sport, dport = _PORTS.unpack_from(ip, header)
    network = "tcp" if proto == _TCP else "udp"
    if from_app:
        return (network, src, sport, dst, dport)
    return (network, dst, dport, src, sport)
