"""IPv4 and IPv6 codecs: fixtures deconstructed, constructed, truncated; round trips;
random bytes raise only WireError."""

from __future__ import annotations

import contextlib
import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.flow import ip_text
from stack.wire import WireError, ipv4, ipv6
from stack.wire.checksum import checksum

# 192.168.0.1 -> 192.168.0.254, UDP, ident 0x0abc, DF, TTL 64, 16 bytes of payload.
IPV4_HEADER = bytes.fromhex("450000240abc40004011adbdc0a80001c0a800fe")
IPV4_PAYLOAD = bytes(range(16))
IPV4_PACKET = IPV4_HEADER + IPV4_PAYLOAD
IPV4_REPR = ipv4.Ipv4Repr(
    src=bytes([192, 168, 0, 1]),
    dst=bytes([192, 168, 0, 254]),
    protocol=17,
    payload_len=16,
    ttl=64,
    ident=0x0ABC,
)


def test_ipv4_deconstruct() -> None:
    pkt = ipv4.Ipv4Packet(memoryview(IPV4_PACKET))
    assert pkt.header_len == 20
    assert pkt.total_len == 36
    assert pkt.ident == 0x0ABC
    assert pkt.dont_fragment and not pkt.more_fragments and pkt.frag_offset == 0
    assert not pkt.is_fragment
    assert pkt.ttl == 64 and pkt.protocol == 17
    assert pkt.checksum == 0xADBD
    assert pkt.verify_checksum()
    assert bytes(pkt.payload) == IPV4_PAYLOAD
    assert ipv4.Ipv4Repr.parse(pkt) == IPV4_REPR


def test_ipv4_construct_into_junk() -> None:
    buf = bytearray(b"\xa5" * 40)
    assert IPV4_REPR.emit(buf, 0) == 20
    assert bytes(buf[:20]) == IPV4_HEADER
    assert IPV4_REPR.buffer_len() == 20


def test_ipv4_trailing_bytes_ignored() -> None:
    pkt = ipv4.Ipv4Packet(memoryview(IPV4_PACKET + b"junk"))
    assert bytes(pkt.payload) == IPV4_PAYLOAD


@pytest.mark.parametrize("cut", range(len(IPV4_PACKET)))
def test_ipv4_truncated(cut: int) -> None:
    with pytest.raises(WireError) as err:
        ipv4.Ipv4Packet(memoryview(IPV4_PACKET[:cut]))
    assert err.value.reason == "ipv4-truncated"


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [(0, 0x65, "ipv4-version"), (0, 0x44, "ipv4-header-len"), (3, 0x10, "ipv4-total-len")],
)
def test_ipv4_malformed(offset: int, value: int, reason: str) -> None:
    bad = bytearray(IPV4_PACKET)
    bad[offset] = value
    with pytest.raises(WireError) as err:
        ipv4.Ipv4Packet(memoryview(bad))
    assert err.value.reason == reason


def test_ipv4_bad_checksum_and_reserved_flag() -> None:
    bad = bytearray(IPV4_PACKET)
    bad[8] = 63  # TTL changed, checksum not
    with pytest.raises(WireError, match="ipv4-checksum"):
        ipv4.Ipv4Repr.parse(ipv4.Ipv4Packet(memoryview(bad)))
    r = ipv4.Ipv4Repr(IPV4_REPR.src, IPV4_REPR.dst, 17, 0)
    buf = bytearray(20)
    ipv4.emit_header(buf, 0, r.src, r.dst, 17, 0, 1, 64, 0x8000)
    with pytest.raises(WireError, match="ipv4-reserved-flag"):
        ipv4.Ipv4Repr.parse(ipv4.Ipv4Packet(memoryview(buf)))


def test_ipv4_options_skipped() -> None:
    # IHL 6: one 4-byte option word (NOP NOP NOP EOL).
    buf = bytearray(24 + 4)
    ipv4.emit_header(buf, 0, b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 6, 8, 7)
    buf[0] = 0x46
    buf[2:4] = (28).to_bytes(2, "big")
    buf[20:24] = b"\x01\x01\x01\x00"
    buf[24:28] = b"abcd"
    buf[10:12] = b"\x00\x00"
    buf[10:12] = checksum(buf[:24]).to_bytes(2, "big")
    pkt = ipv4.Ipv4Packet(memoryview(buf))
    assert pkt.header_len == 24 and bytes(pkt.payload) == b"abcd"
    assert ipv4.Ipv4Repr.parse(pkt).payload_len == 4


def test_ipv4_fragment_fields() -> None:
    buf = bytearray(28)
    ipv4.emit_header(buf, 0, b"\x01" * 4, b"\x02" * 4, 17, 8, 9, 64, ipv4.FLAG_MF | 185)
    pkt = ipv4.Ipv4Packet(memoryview(buf))
    assert pkt.more_fragments and pkt.frag_offset == 1480 and pkt.is_fragment
    assert not pkt.dont_fragment


addr4 = st.binary(min_size=4, max_size=4)
addr6 = st.binary(min_size=16, max_size=16)


@given(
    st.builds(
        ipv4.Ipv4Repr,
        src=addr4,
        dst=addr4,
        protocol=st.integers(0, 255),
        payload_len=st.integers(0, 65515),
        ttl=st.integers(0, 255),
        ident=st.integers(0, 0xFFFF),
        dont_fragment=st.booleans(),
        more_fragments=st.booleans(),
        frag_offset=st.integers(0, 0x1FFF).map(lambda x: x * 8),
        tos=st.integers(0, 255),
    )
)
def test_ipv4_round_trip(r: ipv4.Ipv4Repr) -> None:
    buf = bytearray(20 + r.payload_len)
    r.emit(buf, 0)
    assert ipv4.Ipv4Repr.parse(ipv4.Ipv4Packet(memoryview(buf))) == r


# -- IPv6 ----------------------------------------------------------------------

SRC6 = bytes.fromhex("fe800000000000000000000000000001")
DST6 = bytes.fromhex("20010db8000000000000000000000002")
IPV6_HEADER = (
    bytes.fromhex("6ab12345" "0008" "11" "40") + SRC6 + DST6
)  # tc 0xab, flow 0x12345, UDP, 8 bytes, hop limit 64
IPV6_PACKET = IPV6_HEADER + b"12345678"
IPV6_REPR = ipv6.Ipv6Repr(SRC6, DST6, 17, 8, 64, 0xAB, 0x12345)


def test_ipv6_deconstruct() -> None:
    pkt = ipv6.Ipv6Packet(memoryview(IPV6_PACKET))
    assert pkt.traffic_class == 0xAB and pkt.flow_label == 0x12345
    assert pkt.payload_len == 8 and pkt.protocol == 17 and pkt.hop_limit == 64
    assert pkt.src == SRC6 and pkt.dst == DST6
    assert pkt.upper_offset == 40 and pkt.fragment is None
    assert bytes(pkt.payload) == b"12345678"
    assert ipv6.Ipv6Repr.parse(pkt) == IPV6_REPR


def test_ipv6_construct_into_junk() -> None:
    buf = bytearray(b"\x5a" * 48)
    assert IPV6_REPR.emit(buf, 0) == 40
    assert bytes(buf[:40]) == IPV6_HEADER


@pytest.mark.parametrize("cut", range(len(IPV6_PACKET)))
def test_ipv6_truncated(cut: int) -> None:
    with pytest.raises(WireError) as err:
        ipv6.Ipv6Packet(memoryview(IPV6_PACKET[:cut]))
    assert err.value.reason == "ipv6-truncated"


def _with_extensions(*exts: tuple[int, bytes], upper: int = 17, payload: bytes = b"UDPHDR!!"
                     ) -> bytes:  # fmt: skip
    """Chain (kind, body) extension headers; body excludes the 2-byte next/len prefix
    for generic headers, and is the whole 8 bytes for fragment headers (first byte patched)."""
    kinds = [k for k, _ in exts] + [upper]
    chain = b""
    for i, (_kind, body) in enumerate(exts):
        nxt = kinds[i + 1]
        if _kind == ipv6.FRAGMENT:
            chain += bytes([nxt]) + body[1:]
        else:
            total = 2 + len(body)
            assert total % 8 == 0
            chain += bytes([nxt, total // 8 - 1]) + body
    rest = chain + payload
    first = kinds[0]
    return bytes.fromhex("60000000") + len(rest).to_bytes(2, "big") + bytes([first, 64]) + (
        SRC6 + DST6 + rest
    )


def test_ipv6_extension_headers_skipped() -> None:
    pkt_bytes = _with_extensions(
        (ipv6.HOP_BY_HOP, bytes(6)),
        (ipv6.DEST_OPTIONS, b"\x01\x0c" + bytes(12)),  # PadN, 14 bytes -> 16 total
        (ipv6.ROUTING, bytes([0, 0]) + bytes(4)),  # type 0, segments left 0
        (ipv6.FRAGMENT, bytes(8)),  # atomic fragment (offset 0, M=0, RFC 6946)
    )
    pkt = ipv6.Ipv6Packet(memoryview(pkt_bytes))
    assert pkt.protocol == 17
    assert pkt.upper_offset == 40 + 8 + 16 + 8 + 8
    assert bytes(pkt.payload) == b"UDPHDR!!"
    assert pkt.fragment is None
    assert ipv6.Ipv6Repr.parse(pkt).payload_len == 8


def test_ipv6_fragment_reported() -> None:
    frag = bytes([0, 0]) + ((1448 << 0) | 1).to_bytes(2, "big") + (0xDEADBEEF).to_bytes(4, "big")
    pkt = ipv6.Ipv6Packet(memoryview(_with_extensions((ipv6.FRAGMENT, frag))))
    assert pkt.fragment == (1448, True, 0xDEADBEEF)


@pytest.mark.parametrize(
    ("exts", "reason"),
    [
        (((ipv6.DEST_OPTIONS, bytes(6)), (ipv6.HOP_BY_HOP, bytes(6))), "ipv6-hop-by-hop-position"),
        (((ipv6.ROUTING, bytes([0, 1]) + bytes(4)),), "ipv6-routing-segments-left"),
        (tuple((ipv6.DEST_OPTIONS, bytes(6)) for _ in range(9)), "ipv6-too-many-extension-headers"),
    ],
)
def test_ipv6_bad_extension_chains(exts: tuple[tuple[int, bytes], ...], reason: str) -> None:
    with pytest.raises(WireError) as err:
        ipv6.Ipv6Packet(memoryview(_with_extensions(*exts)))
    assert err.value.reason == reason


def test_ipv6_extension_header_overrunning_payload() -> None:
    good = bytearray(_with_extensions((ipv6.DEST_OPTIONS, bytes(6)), payload=b""))
    good[41] = 3  # claims 32 bytes, 8 present
    with pytest.raises(WireError, match="ipv6-truncated"):
        ipv6.Ipv6Packet(memoryview(good))


def test_ipv6_fragment_header_emit() -> None:
    buf = bytearray(b"\xff" * 8)
    ipv6.emit_fragment_header(buf, 0, 17, 2896, True, 7)
    assert bytes(buf) == bytes([17, 0]) + (2896 | 1).to_bytes(2, "big") + (7).to_bytes(4, "big")


@given(
    st.builds(
        ipv6.Ipv6Repr,
        src=addr6,
        dst=addr6,
        protocol=st.sampled_from([6, 17, 58, 59, 132]),
        payload_len=st.integers(0, 2000),
        hop_limit=st.integers(0, 255),
        traffic_class=st.integers(0, 255),
        flow_label=st.integers(0, 0xFFFFF),
    )
)
def test_ipv6_round_trip(r: ipv6.Ipv6Repr) -> None:
    buf = bytearray(40 + r.payload_len)
    r.emit(buf, 0)
    assert ipv6.Ipv6Repr.parse(ipv6.Ipv6Packet(memoryview(buf))) == r


@given(st.binary(max_size=200))
def test_random_bytes_only_wire_error(data: bytes) -> None:
    for parse in (ipv4.Ipv4Packet, ipv6.Ipv6Packet):
        with contextlib.suppress(WireError):
            parse(memoryview(data))


@given(st.binary(min_size=0, max_size=120), st.sampled_from([4, 6]))
def test_random_bodies_behind_valid_version(body: bytes, version: int) -> None:
    data = bytes([version << 4 | 5]) + body
    with contextlib.suppress(WireError):
        if version == 4:
            ipv4.Ipv4Repr.parse(ipv4.Ipv4Packet(memoryview(data)))
        else:
            ipv6.Ipv6Repr.parse(ipv6.Ipv6Packet(memoryview(data)))


@given(st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16))
def test_ip_text_matches_ipaddress(addr: bytes) -> None:
    assert ip_text(addr) == str(ipaddress.ip_address(addr))
