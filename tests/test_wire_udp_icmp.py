"""UDP, ICMPv4 and ICMPv6 codecs: fixtures deconstructed, constructed, truncated;
round trips; random bytes raise only WireError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.wire import WireError, icmpv4, icmpv6, udp
from stack.wire.checksum import ones_sum, pseudo_header_sum

SRC4 = bytes([192, 168, 0, 1])
DST4 = bytes([192, 168, 0, 254])
SRC6 = bytes.fromhex("fe800000000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")


def rfc1071(data: bytes, pseudo: bytes = b"") -> int:
    """Reference checksum, the textbook loop (an oracle independent of stack.wire.checksum)."""
    data = pseudo + data + (b"\0" if len(data) % 2 else b"")
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# UDP 0x1234 -> 53, "payload!", checksum over the IPv4 pseudo-header SRC4 -> DST4.
UDP_DATAGRAM = bytes.fromhex("12340035" "0010" "adc4") + b"payload!"


def test_udp_fixture_checksum_is_right() -> None:
    pseudo = SRC4 + DST4 + bytes([0, 17]) + (16).to_bytes(2, "big")
    zeroed = UDP_DATAGRAM[:6] + b"\0\0" + UDP_DATAGRAM[8:]
    assert rfc1071(zeroed, pseudo) == 0xADC4
    assert ones_sum(UDP_DATAGRAM, pseudo_header_sum(SRC4, DST4, 17, 16)) == 0


def test_udp_deconstruct() -> None:
    d = udp.UdpPacket(memoryview(UDP_DATAGRAM + b"trailing"))
    assert (d.src_port, d.dst_port, d.length, d.checksum) == (0x1234, 53, 16, 0xADC4)
    assert bytes(d.payload) == b"payload!"
    assert udp.UdpRepr.parse(d) == udp.UdpRepr(0x1234, 53)


def test_udp_construct_into_junk() -> None:
    buf = bytearray(b"\xee" * 30)
    n = udp.UdpRepr(0x1234, 53).emit(buf, 2, b"payload!")
    assert n == 16 == udp.UdpRepr(0x1234, 53).buffer_len(8)
    assert bytes(buf[2:18]) == UDP_DATAGRAM[:6] + b"\0\0" + UDP_DATAGRAM[8:]


@pytest.mark.parametrize("cut", range(len(UDP_DATAGRAM)))
def test_udp_truncated(cut: int) -> None:
    with pytest.raises(WireError) as err:
        udp.UdpPacket(memoryview(UDP_DATAGRAM[:cut]))
    assert err.value.reason == "udp-truncated"


def test_udp_bad_length_and_gso_length() -> None:
    bad = bytearray(UDP_DATAGRAM)
    bad[5] = 7
    with pytest.raises(WireError, match="udp-length"):
        udp.UdpPacket(memoryview(bad))
    # A UDP_L4 super-packet: the length field is not trusted, the buffer is the datagram.
    d = udp.UdpPacket(memoryview(bytes(bad) + b"more"), trust_length=False)
    assert bytes(d.payload) == b"payload!more"


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.binary(max_size=300))
def test_udp_round_trip(sport: int, dport: int, payload: bytes) -> None:
    r = udp.UdpRepr(sport, dport)
    buf = bytearray(r.buffer_len(len(payload)))
    r.emit(buf, 0, payload)
    d = udp.UdpPacket(memoryview(buf))
    assert udp.UdpRepr.parse(d) == r and bytes(d.payload) == payload


# ICMPv4 echo request, ident 0x4242, seq 7, "ping".
ICMP_ECHO = bytes.fromhex("0800" "d6e5" "4242" "0007") + b"ping"


def test_icmpv4_fixture() -> None:
    assert rfc1071(ICMP_ECHO[:2] + b"\0\0" + ICMP_ECHO[4:]) == 0xD6E5
    m = icmpv4.Icmpv4Packet(memoryview(ICMP_ECHO))
    assert (m.type, m.code, m.checksum, m.ident, m.seq) == (8, 0, 0xD6E5, 0x4242, 7)
    assert m.verify_checksum() and bytes(m.data) == b"ping"
    r = icmpv4.Icmpv4Repr.parse(m)
    assert r == icmpv4.Icmpv4Repr(icmpv4.ECHO_REQUEST, 0, 0x4242, 7, b"ping")
    buf = bytearray(b"\x77" * 20)
    assert r.emit(buf, 4) == 12 == r.buffer_len()
    assert bytes(buf[4:16]) == ICMP_ECHO


def test_icmpv4_truncated_and_bad_checksum() -> None:
    for cut in range(8):
        with pytest.raises(WireError, match="icmp-truncated"):
            icmpv4.Icmpv4Packet(memoryview(ICMP_ECHO[:cut]))
    bad = bytearray(ICMP_ECHO)
    bad[-1] ^= 1
    with pytest.raises(WireError, match="icmp-checksum"):
        icmpv4.Icmpv4Repr.parse(icmpv4.Icmpv4Packet(memoryview(bad)))


# ICMPv6 echo request SRC6 -> DST6, ident 0x4242, seq 7, "ping".
ICMP6_ECHO = bytes.fromhex("8000" "3262" "4242" "0007") + b"ping"


def test_icmpv6_fixture() -> None:
    pseudo = SRC6 + DST6 + (12).to_bytes(4, "big") + bytes([0, 0, 0, 58])
    assert rfc1071(ICMP6_ECHO[:2] + b"\0\0" + ICMP6_ECHO[4:], pseudo) == 0x3262
    m = icmpv6.Icmpv6Packet(memoryview(ICMP6_ECHO))
    assert (m.type, m.ident, m.seq) == (128, 0x4242, 7) and not m.is_error
    assert m.verify_checksum(SRC6, DST6)
    r = icmpv6.Icmpv6Repr.parse(m, SRC6, DST6)
    assert r == icmpv6.Icmpv6Repr(icmpv6.ECHO_REQUEST, 0, 0x4242, 7, b"ping")
    buf = bytearray(b"\x77" * 12)
    r.emit(buf, 0, SRC6, DST6)
    assert bytes(buf) == ICMP6_ECHO
    wrong_dst = bytes(15) + b"\x09"
    with pytest.raises(WireError, match="icmp6-checksum"):
        icmpv6.Icmpv6Repr.parse(m, SRC6, wrong_dst)


@given(
    st.sampled_from([0, 3, 8, 11]), st.integers(0, 255), st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF), st.binary(max_size=100),
)  # fmt: skip
def test_icmpv4_round_trip(t: int, code: int, ident: int, seq: int, data: bytes) -> None:
    r = icmpv4.Icmpv4Repr(t, code, ident, seq, data)
    buf = bytearray(r.buffer_len())
    r.emit(buf)
    assert icmpv4.Icmpv4Repr.parse(icmpv4.Icmpv4Packet(memoryview(buf))) == r
    assert rfc1071(bytes(buf)) == 0


@given(
    st.sampled_from([1, 2, 128, 129, 135]), st.integers(0, 255), st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF), st.binary(max_size=100),
)  # fmt: skip
def test_icmpv6_round_trip(t: int, code: int, ident: int, seq: int, data: bytes) -> None:
    r = icmpv6.Icmpv6Repr(t, code, ident, seq, data)
    buf = bytearray(r.buffer_len())
    r.emit(buf, 0, SRC6, DST6)
    assert icmpv6.Icmpv6Repr.parse(icmpv6.Icmpv6Packet(memoryview(buf)), SRC6, DST6) == r
    pseudo = SRC6 + DST6 + len(buf).to_bytes(4, "big") + bytes([0, 0, 0, 58])
    assert rfc1071(bytes(buf), pseudo) == 0


@given(st.binary(max_size=64))
def test_random_bytes_only_wire_error(data: bytes) -> None:
    view = memoryview(data)
    for attempt in (
        lambda: udp.UdpPacket(view),
        lambda: icmpv4.Icmpv4Repr.parse(icmpv4.Icmpv4Packet(view)),
        lambda: icmpv6.Icmpv6Repr.parse(icmpv6.Icmpv6Packet(view), SRC6, DST6),
    ):
        with contextlib.suppress(WireError):
            attempt()


def test_rest_of_header_layout() -> None:
    # Destination unreachable: 4 unused bytes, then the quote.
    r = icmpv4.Icmpv4Repr(icmpv4.DEST_UNREACHABLE, icmpv4.CODE_PORT_UNREACHABLE, data=b"Q" * 28)
    buf = bytearray(r.buffer_len())
    r.emit(buf)
    assert struct.unpack_from("!BBHI", buf)[0:2] == (3, 3)
    assert bytes(buf[4:8]) == bytes(4) and bytes(buf[8:]) == b"Q" * 28
