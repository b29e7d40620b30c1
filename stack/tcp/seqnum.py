"""Sequence-number arithmetic modulo 2**32 (RFC 9293 3.4, RFC 1982 style).

Inside the endpoint, positions in each direction's byte stream are unbounded
Python ints ("offsets": 0 is the first data byte, -1 the SYN). Raw 32-bit
sequence numbers only appear at the boundary: ``unwrap`` turns a sequence
number from the wire into the offset nearest to a known reference, so every
comparison inside is a plain ``<`` that cannot be fooled by wraparound.
"""

from __future__ import annotations

__all__ = ["MASK", "delta", "unwrap"]

MASK = 0xFFFFFFFF
_HALF = 0x80000000


def delta(a: int, b: int) -> int:
    """Signed distance a - b in sequence space, in [-2**31, 2**31)."""
    return ((a - b + _HALF) & MASK) - _HALF


def unwrap(seq: int, ref_seq: int, ref_offset: int) -> int:
    """The offset of ``seq`` given that ``ref_seq`` is at offset ``ref_offset``."""
    return ref_offset + (((seq - ref_seq + _HALF) & MASK) - _HALF)
