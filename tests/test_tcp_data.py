"""Data both ways: segment sizes, ACK batching, window scaling, flow control, wraparound."""

from __future__ import annotations

import itertools
import os

from stack.events import DataReceived, FlowWritable
from stack.tcp import TcpState
from stack.wire.tcp import ACK, PSH, TcpRepr
from tests.tcp_peer import (
    CLIENT_ISS,
    SEND_TEMPL,
    SERVER_ISS,
    Conn,
    Peer,
    data_of,
    expect,
    make_config,
)

MASK = 0xFFFFFFFF


def test_send_is_cut_into_effective_mss_segments_without_gso() -> None:
    c = Conn()
    data = os.urandom(5000)
    c.ep.send(data, c.now)
    segs = c.from_server()
    mss = c.ep.effective_mss
    assert mss == 1448  # 1460 minus the timestamp option
    assert [len(p) for _, p in segs] == [mss, mss, mss, 5000 - 3 * mss]
    first, _ = segs[0]
    expect(first, SEND_TEMPL, seq=SERVER_ISS + 1, ack=CLIENT_ISS + 1, window=65536 >> 1)
    assert [s.flags for s, _ in segs] == [ACK, ACK, ACK, ACK | PSH]  # PSH on the last one
    assert all(s.seq == (SERVER_ISS + 1 + i * mss) & MASK for i, (s, _) in enumerate(segs))
    for seg, payload in segs:
        c.peer.receive(seg, payload)
    assert bytes(c.peer.received) == data


def test_gso_emits_super_segments_of_whole_mss_multiples() -> None:
    c = Conn(config=make_config(max_payload=65000, send_buffer=1 << 20), peer=Peer())
    c.peer.receive_window = 1 << 20
    c.to_server(*c.peer.ack())  # the peer advertises 1 MiB
    data = os.urandom(200_000)
    c.ep.send(data, c.now)
    segs = c.from_server()
    mss = c.ep.effective_mss
    sizes = [len(p) for _, p in segs]
    assert sizes[0] == 65000 // mss * mss  # as large as max_payload allows, whole segments
    assert all(n % mss == 0 for n in sizes[:-1])
    # Up to the initial congestion window, in whole segments (sender SWS avoidance).
    assert 65536 - mss < sum(sizes) <= 65536
    for seg, payload in segs:
        c.peer.receive(seg, payload)
    c.pump()
    assert bytes(c.peer.received) == data


def test_peer_data_is_delivered_per_segment_and_acked_once_per_batch() -> None:
    c = Conn()
    c.peer.write(b"a" * 3000)
    batch = c.peer.data_segments(c.now)
    assert len(batch) == 3
    for seg, payload in batch:
        c.to_server(seg, payload)
    events = c.take_events()
    assert [len(e.data) for e in events if isinstance(e, DataReceived)] == [1448, 1448, 104]
    [(ack, _)] = c.from_server()
    assert ack.ack == (CLIENT_ISS + 1 + 3000) & MASK and ack.flags == ACK


def test_window_stays_open_while_not_paused() -> None:
    c = Conn()
    c.peer.write(os.urandom(300_000))
    c.pump()
    assert data_of(c.take_events()) == bytes(c.peer.outgoing)
    ack = c.peer.log[-1][0]
    assert ack.window << 1 == 65536  # full window: nothing held


def test_backpressure_pause_closes_window_and_resume_reopens_it() -> None:
    c = Conn()
    c.ep.pause_receiving()
    payload = os.urandom(200_000)
    c.peer.write(payload)
    c.pump()
    assert c.take_events() == []  # nothing delivered while paused
    last_ack = c.peer.log[-1][0]
    assert last_ack.window == 0  # the window shrank to zero ...
    # ... after one receive window of data (less than one window scale unit).
    assert 65536 - 2 < c.peer.snd_nxt <= 65536
    assert c.ep.get_timer() is None  # (a zero window is the peer's to probe, not ours)
    # The peer probes the zero window (Linux: an old sequence number); we answer with ACK.
    c.to_server(*c.peer.ack(seq=(CLIENT_ISS + c.peer.snd_una) & MASK))
    [(probe_ack, _)] = c.from_server()
    held = c.peer.snd_nxt
    assert probe_ack.window == 0 and probe_ack.ack == (CLIENT_ISS + 1 + held) & MASK
    c.ep.resume_receiving(c.now)
    assert data_of(c.take_events()) == payload[:held]
    [(update, _)] = c.from_server()  # a window update without being asked
    assert update.window << 1 == 65536
    c.peer.receive(update, b"")
    c.pump()
    assert data_of(c.take_events()) == payload[held:]


def test_a_few_held_bytes_released_send_no_window_update() -> None:
    # RFC 9293 3.8.6.2.2: update the window when it grows by min(RCV.BUFF / 2, MSS); a
    # request held while the upstream connects does not earn a segment of its own.
    c = Conn()
    c.ep.pause_receiving()
    c.peer.write(b"GET / HTTP/1.1\r\n\r\n")
    c.pump()
    assert c.take_events() == []
    c.ep.resume_receiving(c.now)
    assert data_of(c.take_events()) == b"GET / HTTP/1.1\r\n\r\n"
    assert c.from_server() == []


def test_data_in_a_zero_window_is_refused_but_its_ack_is_used() -> None:
    c = Conn()
    c.ep.pause_receiving()
    c.peer.write(os.urandom(65536))
    c.pump()
    assert c.peer.snd_wnd == 0
    c.ep.send(b"reply", c.now)
    [(reply, data)] = c.from_server()
    c.peer.receive(reply, data)
    # The peer sends one byte into the zero window (an RFC 9293 style probe) that
    # acknowledges our reply.
    held = c.peer.snd_nxt
    c.to_server(c.peer.segment(ACK | PSH, offset=held), b"x")
    [(ack, _)] = c.from_server()
    assert ack.ack == (CLIENT_ISS + 1 + held) & MASK and ack.window == 0  # byte not taken
    assert c.ep.send_buffer_free() == c.config.send_buffer  # ... but our reply was acked


def test_zero_window_from_peer_is_probed_until_it_opens() -> None:
    c = Conn()
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())  # the peer closes its window
    c.ep.send(b"z" * 1000, c.now)
    assert c.from_server() == []  # nothing may be sent into a zero window
    t = c.ep.get_timer()
    assert t is not None  # the persist timer runs
    probes = []
    for _ in range(3):
        c.now = c.ep.get_timer() or c.now
        c.ep.handle_timer(c.now)
        [(probe, data)] = c.from_server()
        assert data == b"" and probe.seq == SERVER_ISS  # SND.UNA - 1: elicits an ACK
        probes.append(c.now)
        c.to_server(*c.peer.ack())  # still closed
        assert c.from_server() == []
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps[1] > gaps[0]  # backed off
    assert c.state() is TcpState.ESTABLISHED  # answered probes never time out
    c.peer.receive_window = 1 << 20
    c.to_server(*c.peer.ack())  # window update
    [(_seg, data)] = c.from_server()
    assert data == b"z" * 1000


def test_send_buffer_free_and_writable_event() -> None:
    c = Conn(config=make_config(send_buffer=100_000))
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())
    assert c.ep.send_buffer_free() == 100_000
    c.ep.send(b"a" * 60_000, c.now)
    assert c.ep.send_buffer_free() == 40_000
    c.ep.send(b"b" * 60_000, c.now)  # never refused, even beyond the buffer size
    assert c.ep.send_buffer_free() == 0
    c.peer.receive_window = 1 << 20
    c.to_server(*c.peer.ack())
    c.pump()
    assert c.peer.received == b"a" * 60_000 + b"b" * 60_000
    assert c.take_events() == [FlowWritable(7)]  # exactly once


def test_sequence_numbers_wrap_around_in_both_directions() -> None:
    peer = Peer(iss=MASK - 5000)
    c = Conn(peer=peer, iss=MASK - 3000)
    out = os.urandom(100_000)
    inp = os.urandom(100_000)
    c.ep.send(out, c.now)
    c.peer.write(inp)
    c.pump()
    assert bytes(c.peer.received) == out
    assert data_of(c.take_events()) == inp
    ack = c.peer.log[-1][0]
    assert ack.seq == (MASK - 3000 + 1 + 100_000) & MASK


def test_many_small_sends_are_coalesced_into_full_segments() -> None:
    c = Conn()
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())
    for i in range(1000):
        c.ep.send(bytes([i % 256]) * 10, c.now)
    c.peer.receive_window = 1 << 20
    c.to_server(*c.peer.ack())
    segs = c.from_server()
    assert len(segs) == -(-10_000 // c.ep.effective_mss)
    assert b"".join(p for _, p in segs) == b"".join(bytes([i % 256]) * 10 for i in range(1000))


def test_window_closed_with_data_outstanding_never_times_out_while_answered() -> None:
    c = Conn(config=make_config(max_retries=3))
    c.ep.send(b"q" * 3000, c.now)
    c.from_server()  # lost
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())  # the peer closes its window; our data is still outstanding
    for _ in range(8):  # more timeouts than max_retries, each answered
        c.now = c.ep.get_timer() or c.now
        c.ep.handle_timer(c.now)
        c.from_server()
        c.to_server(*c.peer.ack())
    assert c.state() is TcpState.ESTABLISHED and c.take_events() == []
    c.peer.receive_window = 1 << 20
    c.to_server(*c.peer.ack())
    c.run(lambda: len(c.peer.received) == 3000)
    assert c.peer.received == b"q" * 3000


def _right_edges(segs: list[tuple[TcpRepr, bytes]]) -> list[int]:
    return [(s.seq - SERVER_ISS - 1 + len(p)) & MASK for s, p in segs]


def test_an_ack_that_advances_takes_its_window_even_from_an_older_sequence() -> None:
    # The trace behind this test (Linux 6.18 client, 2 % loss): the client retransmits
    # an old segment of its own that also acknowledges our data and announces a window
    # of 1 KiB. By RFC 9293's SND.WL1 rule its window is older than that of the client's
    # earlier, higher-sequence segment, and the 1 KiB would be ignored while SND.UNA
    # moves, sliding a stale window to the right. Like Linux (tcp_may_update_window),
    # an ACK that moves SND.UNA updates the window.
    c = Conn()
    c.peer.write(b"p" * 2896)
    first, second = c.peer.data_segments(c.now)
    c.to_server(*second)  # the first is lost: out of order, SND.WL1 moves past it
    c.from_server()
    c.ep.send(b"d" * 10_000, c.now)
    for seg, payload in c.from_server():
        c.peer.receive(seg, payload)
    assert c.peer.rcv_nxt == 10_000
    c.peer.receive_window = 1024  # the app stopped reading
    # The retransmission: old sequence, new ACK, small window.
    c.to_server(c.peer.segment(ACK | PSH, offset=0), first[1])
    c.from_server()
    c.ep.send(b"e" * 10_000, c.now)
    sent = c.from_server()
    assert sent, "the 1 KiB window allows one small segment"
    assert max(_right_edges(sent)) <= 10_000 + 1024


def test_pure_acks_stay_inside_a_window_the_peer_shrank() -> None:
    # A segment beyond the receiver's window is dropped whole, ACK field and all
    # (RFC 9293 3.10.7.4; Linux since 6.16 even drops one that starts inside but ends
    # outside while its receive queue is not empty). After a peer shrinks its window
    # below what we already sent, our ACKs carry the window's right edge as their
    # sequence number (Linux tcp_acceptable_seq), so they still count.
    c = Conn()
    c.ep.send(b"d" * 8000, c.now)
    sent = c.from_server()
    assert max(_right_edges(sent)) == 8000
    c.peer.receive(*sent[0])
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())  # acknowledges 1448 and shrinks the window to nothing
    c.peer.write(b"q" * 100)
    for seg, payload in c.peer.data_segments(c.now):
        # Data into our open window: it must be acknowledged
        c.to_server(seg, payload)
    [(ack, data)] = c.from_server()
    assert data == b"" and ack.ack == (CLIENT_ISS + 1 + 100) & MASK
    assert ack.seq == (SERVER_ISS + 1 + c.ep.effective_mss) & MASK  # SND.UNA + 0


def test_retransmissions_are_cut_to_the_peers_window() -> None:
    c = Conn()
    mss = c.ep.effective_mss
    c.ep.send(b"d" * 8000, c.now)
    sent = c.from_server()
    c.peer.receive(*sent[0])
    c.peer.receive_window = 1000
    c.to_server(*c.peer.ack())  # acknowledges one segment; 1000 bytes of room after it
    c.now = c.ep.get_timer() or c.now  # the rest is lost: probe, then retransmission timer
    c.ep.handle_timer(c.now)
    resent = c.from_server()
    while not resent:
        c.now = c.ep.get_timer() or c.now
        c.ep.handle_timer(c.now)
        resent = c.from_server()
    assert all(edge <= mss + 1000 for edge in _right_edges(resent)), _right_edges(resent)
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())  # now closed: a timeout may only probe
    c.now = c.ep.get_timer() or c.now
    c.ep.handle_timer(c.now)
    [(probe, data)] = c.from_server()
    assert data == b"" and probe.seq == (SERVER_ISS + mss) & MASK  # SND.UNA - 1
