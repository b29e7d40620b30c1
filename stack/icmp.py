"""ICMP and ICMPv6 handling: echo answered locally, destination-unreachable
emitted on request, everything else ignored and counted.

What must be ignored:

- ICMP errors of any kind: we never answer an error with an error (RFC 1122
  3.2.2, RFC 4443 2.4 (e)); tunproxy has no use for them either (a UDP reply
  we sent that the app rejects just goes nowhere);
- neighbour discovery (RFC 4861), router solicitations and MLD (RFC 2710/3810):
  a TUN is a point-to-point layer-3 link with nobody to discover;
- echo requests to multicast or broadcast addresses (Linux's
  icmp_echo_ignore_broadcasts default; RFC 1122 3.2.2.6 allows it).
"""

from __future__ import annotations

from stack.wire import icmpv4, icmpv6, ipv4, ipv6

__all__ = [
    "QUOTE_LIMIT_V4",
    "QUOTE_LIMIT_V6",
    "echo_reply_v4",
    "echo_reply_v6",
    "may_send_error",
    "unreachable_v4",
    "unreachable_v6",
]

# RFC 1812 4.3.2.3: the whole error datagram within 576 bytes (IP 20 + ICMP 8 + quote).
QUOTE_LIMIT_V4 = 576 - ipv4.HEADER_LEN - icmpv4.HEADER_LEN
# RFC 4443 2.4 (c): within the IPv6 minimum MTU (1280) (IPv6 40 + ICMPv6 8 + quote).
QUOTE_LIMIT_V6 = 1280 - ipv6.HEADER_LEN - icmpv6.HEADER_LEN


def echo_reply_v4(request: icmpv4.Icmpv4Packet) -> bytearray:
    """RFC 792 "Echo or Echo Reply": same identifier, sequence and data."""
    data = request.data
    buf = bytearray(icmpv4.HEADER_LEN + len(data))
    icmpv4.Icmpv4Repr(icmpv4.ECHO_REPLY, 0, request.ident, request.seq, bytes(data)).emit(buf)
    return buf


def echo_reply_v6(request: icmpv6.Icmpv6Packet, src: bytes, dst: bytes) -> bytearray:
    """RFC 4443 4.2; ``src``/``dst`` are the reply's addresses."""
    data = request.data
    buf = bytearray(icmpv6.HEADER_LEN + len(data))
    icmpv6.Icmpv6Repr(icmpv6.ECHO_REPLY, 0, request.ident, request.seq, bytes(data)).emit(
        buf, 0, src, dst
    )
    return buf


def unreachable_v4(code: int, quote: bytes) -> bytearray:
    """RFC 792 destination unreachable quoting the invoking datagram."""
    quote = quote[:QUOTE_LIMIT_V4]
    buf = bytearray(icmpv4.HEADER_LEN + len(quote))
    icmpv4.Icmpv4Repr(icmpv4.DEST_UNREACHABLE, code, data=quote).emit(buf)
    return buf


def unreachable_v6(code: int, quote: bytes, src: bytes, dst: bytes) -> bytearray:
    """RFC 4443 3.1 destination unreachable quoting the invoking packet."""
    quote = quote[:QUOTE_LIMIT_V6]
    buf = bytearray(icmpv6.HEADER_LEN + len(quote))
    icmpv6.Icmpv6Repr(icmpv6.DEST_UNREACHABLE, code, data=quote).emit(buf, 0, src, dst)
    return buf


def may_send_error(src: bytes, dst: bytes) -> bool:
    """RFC 1122 3.2.2 / RFC 4443 2.4 (e): no ICMP error about a packet sent to a
    multicast or broadcast address, or from an address that is not one host."""
    if len(src) == 4:
        return not (
            ipv4.is_multicast_or_broadcast(dst)
            or ipv4.is_multicast_or_broadcast(src)
            or src == b"\x00\x00\x00\x00"
        )
    return not (ipv6.is_multicast(dst) or ipv6.is_multicast(src) or src == bytes(16))
