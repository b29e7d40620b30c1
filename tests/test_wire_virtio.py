"""virtio-net header codec: fixture, construct into junk, truncated, round trip."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.wire import WireError, virtio

# NEEDS_CSUM, TCPV4 GSO, hdr_len 52, gso_size 1448, csum_start 20, csum_offset 16
# (little-endian u16s), as the kernel hands a TSO super-packet to a TUN reader.
FIXTURE = bytes.fromhex("01" "01" "3400" "a805" "1400" "1000")
REPR = virtio.VirtioNetHdrRepr(
    flags=virtio.F_NEEDS_CSUM,
    gso_type=virtio.GSO_TCPV4,
    hdr_len=52,
    gso_size=1448,
    csum_start=20,
    csum_offset=16,
)


def test_deconstruct() -> None:
    view = virtio.VirtioNetHdr(memoryview(FIXTURE + b"IP..."))
    assert view.flags == 1 and view.needs_csum and not view.data_valid and view.checksum_trusted
    assert view.gso_type == 1 and view.gso_protocol == virtio.GSO_TCPV4
    assert (view.hdr_len, view.gso_size, view.csum_start, view.csum_offset) == (52, 1448, 20, 16)
    assert bytes(view.payload) == b"IP..."
    assert virtio.VirtioNetHdrRepr.parse(view) == REPR


def test_construct_into_junk() -> None:
    buf = bytearray(b"\xcc" * 14)
    assert REPR.emit(buf, 2) == 10 == REPR.buffer_len()
    assert bytes(buf[2:12]) == FIXTURE and buf[:2] == b"\xcc\xcc" and buf[12:] == b"\xcc\xcc"


@pytest.mark.parametrize("cut", range(10))
def test_truncated(cut: int) -> None:
    with pytest.raises(WireError, match="virtio-truncated"):
        virtio.VirtioNetHdr(memoryview(FIXTURE[:cut]))


def test_ecn_bit_and_data_valid() -> None:
    buf = bytearray(10)
    virtio.emit_header(buf, 0, virtio.F_DATA_VALID, virtio.GSO_TCPV6 | virtio.GSO_ECN, 0, 1000)
    view = virtio.VirtioNetHdr(memoryview(buf))
    assert view.data_valid and view.checksum_trusted and view.gso_protocol == virtio.GSO_TCPV6


def test_rejects_unknown_gso_and_missing_size() -> None:
    with pytest.raises(WireError, match="virtio-gso-type"):
        virtio.VirtioNetHdr(memoryview(bytes([0, 2]) + bytes(8)))
    with pytest.raises(WireError, match="virtio-gso-size"):
        virtio.VirtioNetHdr(memoryview(bytes([0, virtio.GSO_UDP_L4]) + bytes(8)))


@given(
    st.builds(
        virtio.VirtioNetHdrRepr,
        flags=st.integers(0, 255),
        gso_type=st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84]),
        hdr_len=st.integers(0, 0xFFFF),
        gso_size=st.integers(1, 0xFFFF),
        csum_start=st.integers(0, 0xFFFF),
        csum_offset=st.integers(0, 0xFFFF),
    )
)
def test_round_trip(r: virtio.VirtioNetHdrRepr) -> None:
    buf = bytearray(10)
    r.emit(buf)
    assert virtio.VirtioNetHdrRepr.parse(virtio.VirtioNetHdr(memoryview(buf))) == r


@given(st.binary(max_size=20))
def test_random_bytes_only_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        virtio.VirtioNetHdr(memoryview(data))
