"""Loss, reordering and duplication: timers, fast retransmit with SACK, reassembly."""

from __future__ import annotations

import dataclasses
import itertools
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack.events import DataReceived, Event, FlowClosed, FlowHalfClosed, FlowReset
from stack.tcp import TcpState
from stack.wire.tcp import ACK, PSH, RST, TcpRepr
from tests.tcp_peer import CLIENT_ISS, Conn, Peer, data_of, make_config

MASK = 0xFFFFFFFF


def server_offset(c: Conn, seg: TcpRepr) -> int:
    return (seg.seq - c.peer.irs - 1) & MASK


def sent_offsets(c: Conn, segs: list[tuple[TcpRepr, bytes]]) -> list[int]:
    return [server_offset(c, s) for s, p in segs if p]


def test_tail_loss_is_repaired_by_a_probe_before_the_timer() -> None:
    c = Conn()
    c.ep.send(b"only segment", c.now)
    [(seg, data)] = c.from_server()  # lost
    probe_at = c.ep.get_timer()
    # RFC 8985 7.2: PTO = 2*SRTT (here ~0), at least 10 ms, plus a delayed-ACK allowance
    # because a single segment is outstanding; far earlier than the 200 ms minimum RTO.
    assert probe_at is not None and probe_at - c.now == pytest.approx(0.05)
    c.now = probe_at
    c.ep.handle_timer(c.now)
    [(again, data2)] = c.from_server()
    assert (again.seq, data2) == (seg.seq, data)  # the last segment, sent again
    assert c.counters["tcp.tail_loss_probes"] == 1 and "tcp.rto" not in c.counters
    c.peer.receive(again, data2)
    c.pump()
    assert c.peer.received == b"only segment"
    assert c.ep.get_timer() is None  # nothing outstanding: timer stopped


def test_lost_probe_leaves_it_to_the_retransmission_timer() -> None:
    c = Conn()
    c.ep.send(b"only segment", c.now)
    c.from_server()  # lost
    c.now = c.ep.get_timer() or c.now
    c.ep.handle_timer(c.now)
    c.from_server()  # the probe, lost too
    rto_at = c.ep.get_timer()
    assert rto_at is not None and rto_at - c.now >= 0.2  # min RTO
    c.now = rto_at
    c.ep.handle_timer(c.now)
    [(_, data)] = c.from_server()
    assert data == b"only segment"
    assert c.counters["tcp.rto"] == 1 and c.counters["tcp.retransmits"] == 2


def test_rto_backs_off_and_gives_up_with_reset() -> None:
    c = Conn(config=make_config(max_retries=4))
    c.ep.send(b"into the void", c.now)
    c.from_server()
    times = []
    while c.state() is not TcpState.CLOSED:
        c.now = c.ep.get_timer() or c.now
        times.append(c.now)
        c.ep.handle_timer(c.now)
        out = c.from_server()
        if c.state() is not TcpState.CLOSED:
            assert [p for _, p in out] == [b"into the void"]
    gaps = [b - a for a, b in itertools.pairwise(times[1:])]  # times[0] is the probe
    assert all(abs(later - 2 * earlier) < 1e-6 for earlier, later in itertools.pairwise(gaps))
    assert c.take_events() == [FlowReset(7, "retransmit-timeout")]
    assert out and out[0][0].flags & RST
    assert c.counters["tcp.retransmits"] == 1 + 4  # one probe, four timeouts
    assert c.ep.closed


def test_fast_retransmit_with_sack_resends_only_the_hole() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    c.ep.send(os.urandom(30 * mss), c.now)
    segs = c.from_server()
    lost = segs[3]
    for seg, data in segs:
        if seg is not lost[0]:
            c.peer.receive(seg, data)
            c.to_server(*c.peer.ack())  # one ACK per segment: dupacks with SACK
    retransmitted = c.from_server()
    offsets = sent_offsets(c, retransmitted)
    assert offsets[0] == 3 * mss and retransmitted[0][1] == lost[1]  # the hole, first
    assert 3 * mss not in offsets[1:]
    assert all(off >= 30 * mss or off == 3 * mss for off in offsets)  # no SACKed data resent
    assert c.counters["tcp.fast_retransmits"] == 1
    assert c.counters["tcp.retransmits"] == 1
    assert "tcp.rto" not in c.counters
    for seg, data in retransmitted:
        c.peer.receive(seg, data)
    c.pump()
    assert len(c.peer.received) == 30 * mss


def test_several_holes_are_each_resent_once() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    payload = os.urandom(40 * mss)
    c.ep.send(payload, c.now)
    segs = c.from_server()
    holes = {2, 9, 17}
    for i, (seg, data) in enumerate(segs):
        if i not in holes:
            c.peer.receive(seg, data)
            c.to_server(*c.peer.ack())
    out = c.from_server()
    assert sorted(sent_offsets(c, out)) == [h * mss for h in sorted(holes)]
    for seg, data in out:
        c.peer.receive(seg, data)
    c.pump()
    assert c.peer.received == payload
    assert "tcp.rto" not in c.counters


def test_newreno_without_sack_recovers_two_losses_without_timeout() -> None:
    c = Conn(peer=Peer(sack=False), config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    payload = os.urandom(30 * mss)
    c.ep.send(payload, c.now)
    segs = c.from_server()
    for i, (seg, data) in enumerate(segs):
        if i not in (4, 8):
            c.peer.receive(seg, data)
            c.to_server(*c.peer.ack())
    first = c.from_server()
    assert sent_offsets(c, first)[0] == 4 * mss  # after three duplicate ACKs
    for seg, data in first:
        c.peer.receive(seg, data)
    c.to_server(*c.peer.ack())  # a partial ACK up to the second hole
    second = c.from_server()
    assert sent_offsets(c, second)[0] == 8 * mss  # RFC 6582: resent at once
    for seg, data in second:
        c.peer.receive(seg, data)
    c.pump()
    assert c.peer.received == payload
    assert "tcp.rto" not in c.counters


def test_lost_retransmission_is_detected_without_waiting_for_the_timer() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    payload = os.urandom(200 * mss)
    c.ep.send(payload, c.now)
    dropped: list[int] = []

    def drop(seg: TcpRepr, data: bytes) -> bool:
        # Drop the segment at offset 5*mss twice: the original and its first retransmission.
        if data and server_offset(c, seg) == 5 * mss and len(dropped) < 2:
            dropped.append(1)
            return True
        return False

    c.drop_to_peer = drop
    c.pump()
    assert c.peer.received == payload
    assert len(dropped) == 2
    assert c.counters["tcp.lost_retransmits"] >= 1
    assert "tcp.rto" not in c.counters  # the pump never advanced the clock


def test_loss_reduces_the_congestion_window() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    c.ep.send(os.urandom(40 * mss), c.now)
    segs = c.from_server()
    flight = sum(len(p) for _, p in segs)
    for i, (seg, data) in enumerate(segs):
        if i != 0:
            c.peer.receive(seg, data)
            c.to_server(*c.peer.ack())
    c.from_server()
    assert c.ep._cwnd < flight  # multiplicative decrease
    assert c.ep._cwnd >= 2 * mss


def test_out_of_order_data_is_sacked_with_the_latest_block_first() -> None:
    c = Conn()
    c.peer.write(os.urandom(10_000))
    segs = c.peer.data_segments(c.now)
    mss = len(segs[0][1])
    for i in (2, 5, 4):
        c.to_server(*segs[i])
    assert c.take_events() == []
    [(ack, _)] = c.from_server()
    base = CLIENT_ISS + 1
    assert ack.ack == base
    assert ack.sack_blocks == (
        (base + 4 * mss, base + 6 * mss),  # holds the segment received last
        (base + 2 * mss, base + 3 * mss),
    )
    for i in (0, 1, 3, 6):
        c.to_server(*segs[i])
    assert data_of(c.take_events()) == bytes(c.peer.outgoing)[: 7 * mss]


def test_paws_drops_an_old_duplicate_and_acks() -> None:
    c = Conn()
    c.peer.write(b"fresh data")
    [(seg, data)] = c.peer.data_segments(c.now)
    assert seg.timestamp is not None
    old = dataclasses.replace(seg, timestamp=((seg.timestamp[0] - 5000) & MASK, seg.timestamp[1]))
    c.to_server(old, data)
    assert c.take_events() == []
    [(ack, _)] = c.from_server()
    assert ack.ack == (CLIENT_ISS + 1) & MASK
    assert c.counters["tcp.paws_drops"] == 1
    c.to_server(seg, data)
    assert c.take_events() == [DataReceived(7, b"fresh data")]


def test_out_of_order_bytes_are_bounded_by_the_window() -> None:
    c = Conn(config=make_config(receive_window=16 * 1024))
    c.peer.write(os.urandom(100_000))
    c.peer.snd_wnd = 100_000  # a misbehaving peer ignores our window
    segs = c.peer.data_segments(c.now)
    for seg, data in segs[1:]:
        c.to_server(seg, data)
    ooo = c.ep._ooo
    assert ooo is not None and ooo.held <= 16 * 1024
    assert c.counters["tcp.beyond_window"] > 0


# -- properties -------------------------------------------------------------------------


@st.composite
def cut_stream(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]]]:
    """A stream and a list of overlapping-allowed [start, end) pieces covering it."""
    n = draw(st.integers(1, 20_000))
    cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), max_size=30)) if n > 1 else []))
    bounds = [0, *cuts, n]
    pieces = [(a, b) for a, b in itertools.pairwise(bounds)]
    # A few extra pieces that overlap the others (repacketized retransmissions).
    for _ in range(draw(st.integers(0, 5))):
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, min(n, a + 3000)))
        pieces.append((a, b))
    return bytes(random.Random(n).randbytes(n)), pieces


@given(cut_stream(), st.randoms(use_true_random=False), st.integers(0, 2**32 - 1))
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example],
)
def test_stream_cut_reordered_duplicated_and_dropped_arrives_intact(
    stream: tuple[bytes, list[tuple[int, int]]], rnd: random.Random, iss: int
) -> None:
    data, pieces = stream
    c = Conn(peer=Peer(iss=iss), config=make_config(receive_window=1 << 20))
    base = (iss + 1) & MASK

    def segment(a: int, b: int) -> tuple[TcpRepr, bytes]:
        seg = c.peer.segment(ACK | PSH, offset=a)
        return dataclasses.replace(seg, seq=(base + a) & MASK), data[a:b]

    order = pieces[:]
    rnd.shuffle(order)
    order += rnd.sample(order, k=min(len(order), rnd.randint(0, 5)))  # duplicates
    dropped = []
    for a, b in order:
        if rnd.random() < 0.2:
            dropped.append((a, b))
        else:
            c.to_server(*segment(a, b))
    # The peer's retransmission timer: resend what was dropped (maybe dropped again).
    while dropped:
        c.now += 1.0
        again, dropped = dropped, []
        for a, b in again:
            if rnd.random() < 0.1:
                dropped.append((a, b))
            else:
                c.to_server(*segment(a, b))
    events = c.take_events()
    assert all(isinstance(e, DataReceived) for e in events)
    assert data_of(events) == data
    [(ack, _)] = c.from_server()
    assert ack.ack == (base + len(data)) & MASK
    # Nothing is held out of order any more; at most a D-SACK for a duplicate is left.
    assert all(((right - base) & MASK) <= len(data) for _, right in ack.sack_blocks)


@given(
    st.integers(0, 2**32 - 1),
    st.floats(0.0, 0.3),
    st.floats(0.0, 0.3),
    st.sampled_from([1460, 65000]),
)
@settings(max_examples=40, deadline=None)
def test_bidirectional_transfer_survives_random_loss(
    seed: int, loss_out: float, loss_in: float, max_payload: int
) -> None:
    """Both directions lossy (up to 30% each way), data and FINs both ways."""
    c = Conn(
        peer=Peer(iss=seed ^ 0x5A5A5A5A, rto=0.3),
        iss=seed,
        config=make_config(max_payload=max_payload, send_buffer=1 << 20, max_retries=20),
    )
    out = random.Random(seed).randbytes(150_000)
    inp = random.Random(seed + 1).randbytes(80_000)
    rnd = random.Random(seed + 2)
    c.drop_to_peer = lambda seg, data: rnd.random() < loss_out
    c.drop_to_server = lambda seg, data: rnd.random() < loss_in
    c.ep.send(out, c.now)
    c.ep.shutdown_write(c.now)
    c.peer.write(inp)
    c.peer.fin_queued = True
    events: list[Event] = []

    def finished() -> bool:
        events.extend(c.take_events())
        return c.ep.closed or (
            c.state() is TcpState.TIME_WAIT and c.peer.fin_acked and c.peer.fin_received
        )

    c.run(finished, limit=5000.0, step=0.1)
    assert not any(isinstance(e, FlowReset) for e in events), events[-1]
    assert bytes(c.peer.received) == out
    assert data_of(events) == inp
    assert events[-2:] == [FlowHalfClosed(7), FlowClosed(7, "closed")]


def test_tail_loss_is_found_by_the_probe_and_repaired_by_sack() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    payload = os.urandom(20 * mss)
    c.ep.send(payload, c.now)
    segs = c.from_server()
    for seg, data in segs[:-2]:  # the last two segments are lost
        c.peer.receive(seg, data)
    c.to_server(*c.peer.ack())
    assert c.from_server() == []  # nothing new to send, no duplicate ACKs to count
    start = c.now
    c.run(lambda: len(c.peer.received) == len(payload), step=0.005)
    assert c.peer.received == payload
    assert c.now - start < 0.2  # well before the minimum RTO
    assert c.counters["tcp.tail_loss_probes"] == 1
    assert c.counters["tcp.fast_retransmits"] == 1  # the probe's SACK exposed the hole
    assert "tcp.rto" not in c.counters


def test_probe_sends_new_data_when_the_whole_flight_is_lost() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20, initial_window=10 * 1448))
    mss = c.ep.effective_mss
    payload = os.urandom(30 * mss)
    c.ep.send(payload, c.now)
    flight = c.from_server()
    assert len(flight) == 10  # all lost
    c.now = c.ep.get_timer() or c.now
    c.ep.handle_timer(c.now)
    [(probe, data)] = c.from_server()
    assert server_offset(c, probe) == 10 * mss and len(data) == mss  # new data, beyond cwnd
    c.peer.receive(probe, data)
    c.to_server(*c.peer.ack())  # SACKs the probe: everything below it is lost
    resent = c.from_server()
    assert sent_offsets(c, resent)[0] == 0
    for seg, data in resent:
        c.peer.receive(seg, data)
    c.pump()
    c.run(lambda: len(c.peer.received) == len(payload), step=0.005)
    assert c.peer.received == payload
    assert "tcp.rto" not in c.counters


def test_dsack_of_a_spurious_retransmission_undoes_the_window_cut() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    c.ep.send(os.urandom(20 * mss), c.now)
    segs = c.from_server()
    cwnd_before = c.ep._cwnd
    late = segs[0]
    for seg, data in segs[1:]:  # segment 0 is only delayed (reordered)
        c.peer.receive(seg, data)
        c.to_server(*c.peer.ack())
    [(rtx, rdata)] = [(s, d) for s, d in c.from_server() if server_offset(c, s) == 0]
    assert c.ep._cwnd < cwnd_before  # reacted as to a loss
    c.peer.receive(*late)  # the original arrives after all ...
    c.to_server(*c.peer.ack())
    c.peer.receive(rtx, rdata)  # ... so the retransmission is a duplicate:
    ack, _ = c.peer.ack()
    assert ack.sack_blocks[0] == (rtx.seq, (rtx.seq + mss) & MASK)  # a D-SACK below the ACK
    c.to_server(ack, b"")
    assert c.counters["tcp.spurious_retransmits"] == 1 and c.counters["tcp.undo"] == 1
    assert c.ep._cwnd >= cwnd_before  # RFC 4015: the cut is undone
    assert c.ep._reo_thresh > 2 * mss  # and more reordering is tolerated from now on


def test_reordering_within_the_threshold_causes_no_retransmission() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    c.ep._reo_thresh = 10 * mss  # as if D-SACKs had shown reordering before
    c.ep.send(os.urandom(20 * mss), c.now)
    segs = c.from_server()
    order = [1, 2, 3, 4, 5, 6, 0, *range(7, 20)]  # segment 0 overtaken by six others
    for i in order:
        c.peer.receive(*segs[i])
        c.to_server(*c.peer.ack())
    assert "tcp.retransmits" not in c.counters
    assert len(c.peer.received) == 20 * mss


def test_old_timestamp_on_a_pure_ack_is_still_used() -> None:
    c = Conn()
    c.ep.send(b"data", c.now)
    [(seg, data)] = c.from_server()
    c.peer.receive(seg, data)
    ack, _ = c.peer.ack()
    assert ack.timestamp is not None
    stale = dataclasses.replace(ack, timestamp=((ack.timestamp[0] - 5000) & MASK, 0))
    c.to_server(stale)
    assert c.ep.send_buffer_free() == c.config.send_buffer  # acknowledged all the same


def test_duplicate_data_is_reported_with_a_dsack() -> None:
    c = Conn()
    c.peer.write(b"x" * 1000)
    [(seg, data)] = c.peer.data_segments(c.now)
    c.to_server(seg, data)
    c.from_server()
    c.to_server(seg, data)  # the same segment again (a spurious retransmission)
    [(ack, _)] = c.from_server()
    base = CLIENT_ISS + 1
    assert ack.sack_blocks == ((base, base + 1000),)  # RFC 2883: below the ACK
    c.to_server(*c.peer.ack())
    assert c.from_server() == []  # reported once


def test_sack_repeats_the_most_recently_reported_blocks() -> None:
    c = Conn()
    c.peer.write(os.urandom(20_000))
    segs = c.peer.data_segments(c.now)
    mss = len(segs[0][1])
    base = CLIENT_ISS + 1

    def block(i: int) -> tuple[int, int]:
        return ((base + i * mss) & MASK, (base + (i + 1) * mss) & MASK)

    for i in (2, 4, 6, 8, 10):
        c.to_server(*segs[i])
        [(ack, _)] = c.from_server()
        assert ack.sack_blocks[0] == block(i)  # the newest block leads
    # RFC 2018 4: then the blocks that led the previous options, newest first.
    assert ack.sack_blocks == (block(10), block(8), block(6))
    c.to_server(*segs[3])  # extends the block at 2 (now 2..4) which leads again
    [(ack, _)] = c.from_server()
    assert ack.sack_blocks == (
        ((base + 2 * mss) & MASK, (base + 5 * mss) & MASK),
        block(10),
        block(8),
    )
