"""The TCP engine's parts on their own: sequence arithmetic, state table, buffers, RTT."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stack.tcp.reassembly import Reassembly
from stack.tcp.rtt import RttEstimator
from stack.tcp.scoreboard import Scoreboard
from stack.tcp.sendbuf import SendBuffer
from stack.tcp.seqnum import delta, unwrap
from stack.tcp.state import TRANSITIONS, TcpEvent, TcpState, TcpStateError, next_state


def test_delta_and_unwrap_across_the_wrap() -> None:
    assert delta(5, 0xFFFFFFFB) == 10
    assert delta(0xFFFFFFFB, 5) == -10
    assert unwrap(3, 0xFFFFFFFF, 1000) == 1004
    assert unwrap(0xFFFFFFF0, 0x10, 50) == 18


@given(st.integers(0, 2**32 - 1), st.integers(-(2**31), 2**31 - 1), st.integers(-5, 2**40))
def test_unwrap_inverts_wrapping(ref_seq: int, distance: int, ref_off: int) -> None:
    seq = (ref_seq + distance) & 0xFFFFFFFF
    assert unwrap(seq, ref_seq, ref_off) == ref_off + distance


def test_state_table_names_rfc_transitions() -> None:
    s, e = TcpState, TcpEvent
    assert next_state(s.SYN_RECEIVED, e.RCV_ACK_OF_SYN) is s.ESTABLISHED
    assert next_state(s.FIN_WAIT_1, e.RCV_FIN) is s.CLOSING
    assert next_state(s.CLOSING, e.RCV_ACK_OF_FIN) is s.TIME_WAIT
    assert all(
        TRANSITIONS[(state, e.RCV_RST)] is s.CLOSED for state in s if state is not s.CLOSED
    )
    with pytest.raises(TcpStateError):
        next_state(s.CLOSED, e.RCV_FIN)
    with pytest.raises(TcpStateError):
        next_state(s.CLOSE_WAIT, e.RCV_FIN)  # a second FIN is a bug to catch, not a state


def test_send_buffer_slices_without_copy_inside_a_chunk() -> None:
    buf = SendBuffer()
    a, b = b"a" * 10_000, b"b" * 10_000
    buf.append(a)
    buf.append(b)
    view = buf.get(100, 200)
    assert isinstance(view, memoryview) and view.obj is a
    assert buf.get(0, 10_000) is a
    assert buf.get(9_990, 10_010) == b"a" * 10 + b"b" * 10
    buf.release(15_000)
    assert len(buf) == 5_000 and buf.get(15_000, 20_000) == b"b" * 5_000


@given(st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=200), st.data())
def test_send_buffer_matches_a_flat_copy(chunks: list[bytes], data: st.DataObject) -> None:
    buf = SendBuffer()
    flat = b""
    for chunk in chunks:
        buf.append(chunk)
        flat += chunk
    start = 0
    for _ in range(20):
        a = data.draw(st.integers(start, len(flat)))
        b = data.draw(st.integers(a, len(flat)))
        assert bytes(buf.get(a, b)) == flat[a:b]
        start = data.draw(st.integers(start, a))
        buf.release(start)
    assert len(buf) == len(flat) - start


@given(st.lists(st.tuples(st.integers(0, 500), st.integers(1, 200)), max_size=40))
def test_reassembly_keeps_first_bytes_and_pops_in_order(pieces: list[tuple[int, int]]) -> None:
    stream = bytes(random.Random(1).randbytes(800))
    ooo = Reassembly()
    covered: set[int] = set()
    for start, length in pieces:
        start += 1  # above rcv_nxt = 0
        ooo.add(start, memoryview(stream)[start : start + length])
        covered.update(range(start, min(start + length, 800)))
    assert ooo.held == len(covered)
    ranges = ooo.ranges()
    assert sum(e - s for s, e in ranges) == len(covered)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges))
    got = b"".join(ooo.pop_in_order(0))
    assert got == b""  # byte 0 missing: nothing is in order
    if 1 in covered:
        run = 1
        while run in covered:
            run += 1
        assert b"".join(ooo.pop_in_order(1)) == stream[1:run]


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 100)), max_size=30))
def test_scoreboard_merges_blocks(blocks: list[tuple[int, int]]) -> None:
    board = Scoreboard()
    covered: set[int] = set()
    for start, length in blocks:
        board.add(start, start + length)
        covered.update(range(start, start + length))
    assert board.sacked == len(covered)
    board.ack(500)
    covered = {x for x in covered if x >= 500}
    assert board.sacked == len(covered)
    pos, holes = 500, 0
    while (hole := board.next_hole(pos, 1200)) is not None:
        assert all(x not in covered for x in range(*hole))
        holes += hole[1] - hole[0]
        pos = hole[1]
    assert holes == 700 - len({x for x in covered if x < 1200})
    assert board.sacked_between(500, 1200) == len({x for x in covered if x < 1200})


def test_rto_follows_rfc6298() -> None:
    rtt = RttEstimator(min_rto=0.2, max_rto=60.0)
    assert rtt.rto == 1.0  # before any sample
    rtt.sample(0.5)
    assert rtt.srtt == 0.5 and rtt.rttvar == 0.25 and rtt.rto == pytest.approx(1.5)
    rtt.sample(0.001)
    assert rtt.rto >= 0.2
    rtt.backoff()
    rtt.backoff()
    assert rtt.srtt is not None
    assert rtt.rto == pytest.approx(4 * max(0.2, rtt.srtt + 4 * rtt.rttvar))
    for _ in range(30):
        rtt.backoff()
    assert rtt.rto == 60.0


def test_scoreboard_lost_limit_counts_sacked_bytes_above() -> None:
    board = Scoreboard()
    for start in (10, 30, 50):
        board.add(start, start + 10)  # holes at 0-10, 20-30, 40-50
    assert board.lost_limit(30) is None  # 30 bytes SACKed in all: not more than 30
    assert board.lost_limit(19) == 30  # holes below 30 have 20 bytes SACKed above
    assert board.lost_limit(9) == 50
