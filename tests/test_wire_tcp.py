"""TCP codec: byte fixtures (deconstruct, construct, truncated) and round-trip properties."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.wire import WireError
from stack.wire.tcp import (
    ACK,
    CHECKSUM_OFFSET,
    PSH,
    SYN,
    TcpRepr,
    emit,
    flags_str,
    parse,
)

# A SYN as Linux sends it: MSS 1460, SACK-permitted, timestamps, NOP, window scale 7.
LINUX_SYN = bytes.fromhex(
    "9c40 01bb 00001000 00000000 a0 02 faf0 1234 0000"
    "020405b4 0402 080a 0001e240 00000000 01 030307"
)
LINUX_SYN_REPR = TcpRepr(
    src_port=40000,
    dst_port=443,
    seq=0x1000,
    ack=0,
    flags=SYN,
    window=64240,
    mss=1460,
    window_scale=7,
    sack_permitted=True,
    timestamp=(123456, 0),
)

# Our SYN-ACK, in the layout emit() writes (every option 4-byte aligned), checksum 0.
SYNACK = bytes.fromhex(
    "01bb 9c40 90000000 00001001 b0 12 ffff 0000 0000"
    "020405b4 01030305 01010402 0101080a 00000064 0001e240"
)
SYNACK_REPR = TcpRepr(
    src_port=443,
    dst_port=40000,
    seq=0x90000000,
    ack=0x1001,
    flags=SYN | ACK,
    window=0xFFFF,
    mss=1460,
    window_scale=5,
    sack_permitted=True,
    timestamp=(100, 123456),
)

# A data segment carrying timestamps and two SACK blocks, with a 3-byte payload.
DATA_SACK = bytes.fromhex(
    "01bb 9c40 90000001 00001001 d0 18 0200 0000 0000"
    "0101080a 00000065 0001e241"
    "0101051 2 00002001 00002101 00003001 00003801".replace(" ", "")
) + b"abc"
DATA_SACK_REPR = TcpRepr(
    src_port=443,
    dst_port=40000,
    seq=0x90000001,
    ack=0x1001,
    flags=ACK | PSH,
    window=0x200,
    sack_blocks=((0x2001, 0x2101), (0x3001, 0x3801)),
    timestamp=(101, 123457),
)


def test_deconstruct_linux_syn() -> None:
    seg, payload = parse(memoryview(LINUX_SYN))
    assert seg == LINUX_SYN_REPR
    assert bytes(payload) == b""
    assert flags_str(seg.flags) == "S"


def test_deconstruct_synack_and_data_with_sack() -> None:
    assert parse(memoryview(SYNACK))[0] == SYNACK_REPR
    seg, payload = parse(memoryview(DATA_SACK))
    assert seg == DATA_SACK_REPR
    assert bytes(payload) == b"abc"


@pytest.mark.parametrize(
    ("repr_", "payload", "fixture"),
    [(SYNACK_REPR, b"", SYNACK), (DATA_SACK_REPR, b"abc", DATA_SACK)],
    ids=["synack", "data-sack"],
)
def test_construct_into_junk(repr_: TcpRepr, payload: bytes, fixture: bytes) -> None:
    buf = bytearray(b"\xa5" * (len(fixture) + 16))
    n = emit(repr_, payload, buf, 8)
    assert n == len(fixture) == repr_.header_len() + len(payload)
    assert bytes(buf[8 : 8 + n]) == fixture
    assert buf[:8] == b"\xa5" * 8 and buf[8 + n :] == b"\xa5" * 8  # nothing outside touched
    assert buf[8 + CHECKSUM_OFFSET : 8 + CHECKSUM_OFFSET + 2] == b"\0\0"


@pytest.mark.parametrize("fixture", [LINUX_SYN, SYNACK, DATA_SACK[:-3]])
def test_truncated_headers_raise_wire_error(fixture: bytes) -> None:
    for cut in range(len(fixture)):
        with pytest.raises(WireError):
            parse(memoryview(fixture[:cut]))


def test_truncated_payload_is_just_shorter() -> None:
    seg, payload = parse(memoryview(DATA_SACK[:-1]))
    assert seg == DATA_SACK_REPR and bytes(payload) == b"ab"


@pytest.mark.parametrize("offset_words", [0, 1, 2, 3, 4])
def test_data_offset_below_five_words(offset_words: int) -> None:
    bad = bytearray(LINUX_SYN)
    bad[12] = offset_words << 4
    with pytest.raises(WireError, match="tcp-data-offset"):
        parse(memoryview(bytes(bad)))


def test_data_offset_beyond_buffer() -> None:
    bad = bytearray(LINUX_SYN[:20])
    bad[12] = 6 << 4
    with pytest.raises(WireError, match="tcp-truncated"):
        parse(memoryview(bytes(bad)))


@pytest.mark.parametrize(
    "options",
    [
        "0205 05b4 0000 0000",  # MSS with length 5
        "0201 0000",  # length below 2
        "0800 0000",  # length 0: would loop forever if accepted
        "0504 0000",  # SACK without a whole block
        "080a 0000 0000 0000",  # timestamp running past the option area
        "0102 0103",  # a kind with its length byte missing at the end
    ],
)
def test_bad_options(options: str) -> None:
    opts = bytes.fromhex(options.replace(" ", ""))
    header = bytearray(LINUX_SYN[:20])
    header[12] = ((20 + len(opts)) // 4) << 4
    with pytest.raises(WireError, match="tcp-option"):
        parse(memoryview(bytes(header) + opts))


def test_unknown_option_and_eol_are_skipped() -> None:
    opts = bytes.fromhex("1e04abcd 020405b4 00ffffff")  # kind 30 len 4, MSS, EOL, junk after
    header = bytearray(LINUX_SYN[:20])
    header[12] = ((20 + len(opts)) // 4) << 4
    seg, _ = parse(memoryview(bytes(header) + opts))
    assert seg.mss == 1460 and seg.window_scale is None and seg.timestamp is None


def test_emit_refuses_more_than_40_bytes_of_options() -> None:
    too_many = TcpRepr(1, 2, 3, 4, ACK, 5, timestamp=(1, 2), sack_blocks=((1, 2),) * 4)
    with pytest.raises(ValueError):
        emit(too_many, b"", bytearray(100), 0)


u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def tcp_reprs(draw: st.DrawFn) -> TcpRepr:
    ts = draw(st.none() | st.tuples(u32, u32))
    fixed = (
        (4 if draw(st.booleans()) else 0)
        + (4 if draw(st.booleans()) else 0)
        + (4 if draw(st.booleans()) else 0)
        + (12 if ts else 0)
    )
    # Room left in 40 bytes for SACK blocks (4 + 8n).
    max_blocks = max(0, min(4, (40 - fixed - 4) // 8))
    blocks = draw(st.lists(st.tuples(u32, u32), max_size=max_blocks))
    return TcpRepr(
        src_port=draw(u16),
        dst_port=draw(u16),
        seq=draw(u32),
        ack=draw(u32),
        flags=draw(st.integers(0, 0xFF)),
        window=draw(u16),
        mss=draw(st.none() | u16),
        window_scale=draw(st.none() | st.integers(0, 0xFF)),
        sack_permitted=draw(st.booleans()),
        sack_blocks=tuple(blocks),
        timestamp=ts,
    )


@given(tcp_reprs(), st.binary(max_size=64))
def test_parse_emit_round_trip(repr_: TcpRepr, payload: bytes) -> None:
    if repr_.options_len() > 40:
        with pytest.raises(ValueError):
            emit(repr_, payload, bytearray(100 + len(payload)), 0)
        return
    buf = bytearray(repr_.header_len() + len(payload))
    assert emit(repr_, payload, buf, 0) == len(buf)
    parsed, data = parse(memoryview(bytes(buf)))
    assert parsed == repr_
    assert bytes(data) == payload


@given(st.binary(max_size=80))
def test_random_bytes_only_raise_wire_error(data: bytes) -> None:
    try:
        seg, payload = parse(memoryview(data))
    except WireError:
        return
    assert seg.header_len() <= 60
    assert len(payload) <= len(data) - 20


@given(st.binary(min_size=20, max_size=80))
def test_random_options_only_raise_wire_error(tail: bytes) -> None:
    # A valid fixed header whose option area is random: reaches the option parser.
    header = bytearray(LINUX_SYN[:20])
    opts = tail[: (len(tail) // 4) * 4][:40]
    header[12] = ((20 + len(opts)) // 4) << 4
    with contextlib.suppress(WireError):
        parse(memoryview(bytes(header) + opts))
