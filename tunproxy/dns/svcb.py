"""SVCB / HTTPS records (RFC 9460) with the address hints and ECH removed.

An HTTPS answer may carry ``ipv4hint``/``ipv6hint`` (real addresses a client
may connect to without asking A/AAAA) and ``ech`` (Encrypted Client Hello,
which hides the name a flow is for). Either lets a client route around
fake-ip / real-ip mapping and SNI sniffing, so forwarded answers lose them.

RFC 9460 section 8: a key listed in ``mandatory`` must be understood or the
record ignored; if the server made a stripped key mandatory (``ech`` in
particular: "never connect without ECH"), the whole record is dropped rather
than silently weakened.

Operates on raw RDATA: SvcPriority(2) TargetName(uncompressed, RFC 9460 2.2)
then SvcParams as key(2) length(2) value, keys in strictly increasing order.
"""

from __future__ import annotations

import struct

__all__ = ["KEY_ECH", "KEY_IPV4HINT", "KEY_IPV6HINT", "STRIPPED_KEYS", "strip_svc_params"]

KEY_MANDATORY = 0
KEY_IPV4HINT = 4
KEY_ECH = 5
KEY_IPV6HINT = 6
STRIPPED_KEYS = frozenset({KEY_IPV4HINT, KEY_ECH, KEY_IPV6HINT})

_U16 = struct.Struct("!H")


class SvcbError(ValueError):
    """RDATA that is not a well-formed SVCB/HTTPS record."""


def _target_end(rdata: bytes, offset: int) -> int:
    while True:
        if offset >= len(rdata):
            raise SvcbError("TargetName runs past the RDATA")
        length = rdata[offset]
        if length & 0xC0:
            raise SvcbError("compressed TargetName (RFC 9460 2.2 forbids it)")
        offset += 1 + length
        if length == 0:
            return offset


def strip_svc_params(rdata: bytes, keys: frozenset[int] = STRIPPED_KEYS) -> bytes | None:
    """RDATA without the SvcParams in ``keys``; None if the record must be dropped
    (a stripped key was mandatory). Raises ``SvcbError`` on malformed RDATA."""
    if len(rdata) < 3:
        raise SvcbError("RDATA too short")
    (priority,) = _U16.unpack_from(rdata, 0)
    params_start = _target_end(rdata, 2)
    if priority == 0:
        return rdata  # AliasMode: no SvcParams to carry hints (RFC 9460 2.4.2)
    out = bytearray(rdata[:params_start])
    offset = params_start
    while offset < len(rdata):
        if offset + 4 > len(rdata):
            raise SvcbError("truncated SvcParam header")
        key, length = struct.unpack_from("!HH", rdata, offset)
        value = rdata[offset + 4 : offset + 4 + length]
        if len(value) != length:
            raise SvcbError("truncated SvcParam value")
        offset += 4 + length
        if key == KEY_MANDATORY:
            if length % 2:
                raise SvcbError("odd mandatory list length")
            listed = {_U16.unpack_from(value, i)[0] for i in range(0, length, 2)}
            if listed & keys:
                return None
        if key in keys:
            continue
        out += rdata[offset - 4 - length : offset]
    return bytes(out)
