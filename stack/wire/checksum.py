"""The Internet checksum (RFC 1071), computed without a Python loop.

The one's complement sum of 16-bit big-endian words equals the value of the
whole buffer read as one big-endian integer, modulo 0xFFFF (because 2**16 is
congruent to 1 modulo 0xFFFF). ``int.from_bytes`` and ``%`` run in C, so a
64 KiB super-packet is summed in microseconds.
"""

from __future__ import annotations

__all__ = ["checksum", "finish", "ones_sum", "pseudo_header_sum", "verify"]

_MOD = 0xFFFF


def ones_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """One's complement sum of ``data`` (padded with a zero byte if odd), plus ``initial``.

    The result is in ``0 .. 0xFFFE``; it can be fed back as ``initial``.
    """
    value = int.from_bytes(data, "big")
    if len(data) & 1:
        value <<= 8  # pad with a zero byte
    return (value + initial) % _MOD


def finish(total: int) -> int:
    """Turn a one's complement sum into the checksum field value (never 0 for a non-zero sum)."""
    return _MOD - (total % _MOD) if total % _MOD else _MOD


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The checksum field value for ``data`` with ``initial`` (e.g. a pseudo-header sum)."""
    return finish(ones_sum(data, initial))


def verify(data: bytes | bytearray | memoryview, initial: int = 0) -> bool:
    """True when ``data`` (checksum field included) sums to all-ones."""
    return ones_sum(data, initial) == 0


def pseudo_header_sum(src: bytes, dst: bytes, protocol: int, length: int) -> int:
    """Sum of the IPv4 (RFC 9293 3.1) or IPv6 (RFC 8200 8.1) pseudo-header.

    ``src`` and ``dst`` are packed addresses (4 or 16 bytes); ``length`` is the
    upper-layer length (header plus payload).
    """
    value = int.from_bytes(src, "big") + int.from_bytes(dst, "big") + protocol + length
    return value % _MOD
