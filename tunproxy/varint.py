"""QUIC variable-length integers (RFC 9000 section 16), sans-I/O: the one codec that the
QUIC sniffer (``tunproxy.sniff``) and the MASQUE layer (``tunproxy.masque``) share. A
module of its own, so the sniffer, loaded for every config, does not load MASQUE."""

from __future__ import annotations

__all__ = ["VARINT_MAX", "emit_varint", "parse_varint"]

VARINT_MAX = (1 << 62) - 1


def emit_varint(value: int) -> bytes:
    """RFC 9000 section 16: the shortest encoding."""
    if value < 0x40:
        return bytes((value,))
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    if value <= VARINT_MAX:
        return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")
    raise ValueError(f"{value} does not fit a QUIC varint")


def parse_varint(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """(value, offset after it), or None when ``data`` ends inside the varint."""
    if offset >= len(data):
        return None
    first = data[offset]
    size = 1 << (first >> 6)
    if offset + size > len(data):
        return None
    value = first & 0x3F
    for i in range(offset + 1, offset + size):
        value = (value << 8) | data[i]
    return value, offset + size
