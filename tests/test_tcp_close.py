"""Closing: half-close both orders, simultaneous close, TIME-WAIT, RST validation, abort."""

from __future__ import annotations

import dataclasses

from stack.events import DataReceived, FlowClosed, FlowHalfClosed, FlowReset
from stack.tcp import TcpState
from stack.wire.tcp import ACK, FIN, RST, SYN
from tests.tcp_peer import (
    CLIENT_ISS,
    SEND_TEMPL,
    SERVER_ISS,
    Conn,
    data_of,
    expect,
    make_config,
)

MASK = 0xFFFFFFFF


def test_peer_closes_first_we_keep_sending_then_close() -> None:
    c = Conn()
    c.peer.write(b"request")
    c.peer.fin_queued = True
    c.pump()
    assert c.take_events() == [DataReceived(7, b"request"), FlowHalfClosed(7)]
    assert c.state() is TcpState.CLOSE_WAIT
    # Half-closed: our direction still flows.
    c.ep.send(b"response" * 1000, c.now)
    c.pump()
    assert c.peer.received == b"response" * 1000
    c.ep.shutdown_write(c.now)
    assert c.state() is TcpState.LAST_ACK
    c.pump()
    assert c.peer.fin_received
    assert c.take_events() == [FlowClosed(7, "closed")]
    assert c.state() is TcpState.CLOSED and c.ep.closed  # no TIME-WAIT for the passive closer
    assert c.ep.get_timer() is None


def test_we_close_first_peer_keeps_sending_then_time_wait() -> None:
    c = Conn(config=make_config(time_wait=2.0))
    c.ep.send(b"bye", c.now)
    c.ep.shutdown_write(c.now)
    [(seg, data)] = c.from_server()
    assert seg.flags & FIN and data == b"bye"  # the FIN rides on the last data segment
    c.peer.receive(seg, data)
    c.pump()
    assert c.state() is TcpState.FIN_WAIT_2
    c.ep.send(b"ignored after shutdown", c.now)
    c.peer.write(b"more from the peer")
    c.pump()
    assert c.take_events() == [DataReceived(7, b"more from the peer")]
    assert c.peer.received == b"bye"
    c.peer.fin_queued = True
    c.pump()
    assert c.take_events() == [FlowHalfClosed(7), FlowClosed(7, "closed")]
    assert c.state() is TcpState.TIME_WAIT and not c.ep.closed
    assert c.ep.get_timer() == c.now + 2.0
    # A retransmitted FIN (our ACK was lost) is answered again and restarts TIME-WAIT.
    c.now += 1.0
    c.to_server(c.peer.segment(ACK | FIN, offset=len(c.peer.outgoing)))
    [(ack, _)] = c.from_server()
    assert ack.flags == ACK and ack.ack == c.peer.seq(len(c.peer.outgoing) + 1)
    assert c.ep.get_timer() == c.now + 2.0
    c.advance(2.0)
    assert c.state() is TcpState.CLOSED and c.ep.closed
    assert c.take_events() == []  # TIME-WAIT ends silently


def test_simultaneous_close() -> None:
    c = Conn()
    c.ep.shutdown_write(c.now)
    c.peer.fin_queued = True
    [(our_fin, _)] = c.from_server()
    [(their_fin, _)] = c.peer.data_segments(c.now)
    assert our_fin.flags == ACK | FIN and their_fin.flags == ACK | FIN
    c.peer.receive(our_fin, b"")
    c.to_server(their_fin)  # it does not acknowledge our FIN
    assert c.state() is TcpState.CLOSING
    assert c.take_events() == [FlowHalfClosed(7)]
    c.pump()
    assert c.state() is TcpState.TIME_WAIT
    assert c.take_events() == [FlowClosed(7, "closed")]


def test_held_data_and_fin_are_delivered_before_the_close() -> None:
    c = Conn()
    c.ep.pause_receiving()
    c.peer.write(b"last words")
    c.peer.fin_queued = True
    c.pump()
    c.ep.shutdown_write(c.now)
    c.pump()
    assert c.state() is TcpState.CLOSED
    assert c.take_events() == []  # everything waits for the paused application
    assert not c.ep.closed  # so the stack must keep the flow
    c.ep.resume_receiving(c.now)
    assert c.take_events() == [
        DataReceived(7, b"last words"),
        FlowHalfClosed(7),
        FlowClosed(7, "closed"),
    ]
    assert c.ep.closed


def test_valid_rst_resets_the_flow() -> None:
    c = Conn()
    c.to_server(c.peer.segment(RST | ACK))
    assert c.take_events() == [FlowReset(7, "reset-by-peer")]
    assert c.ep.closed
    assert c.from_server() == []  # a RST is never answered


def test_in_window_rst_with_wrong_seq_gets_a_challenge_ack() -> None:
    c = Conn()
    c.to_server(c.peer.segment(RST, seq=(CLIENT_ISS + 1 + 100) & MASK))
    [(ack, _)] = c.from_server()
    # A plain ACK of what we have, from where we are (RFC 5961 3.2).
    expect(ack, SEND_TEMPL, seq=SERVER_ISS + 1, ack=CLIENT_ISS + 1, window=32768)
    assert c.state() is TcpState.ESTABLISHED
    assert c.counters["tcp.challenge_acks"] == 1
    assert c.take_events() == []


def test_out_of_window_rst_is_ignored_silently() -> None:
    c = Conn()
    c.to_server(c.peer.segment(RST, seq=(CLIENT_ISS + 1 + 10_000_000) & MASK))
    c.to_server(c.peer.segment(RST, seq=(CLIENT_ISS - 5) & MASK))
    assert c.from_server() == []
    assert c.state() is TcpState.ESTABLISHED


def test_syn_on_an_established_flow_gets_a_challenge_ack() -> None:
    c = Conn()
    c.to_server(c.peer.syn())
    [(ack, _)] = c.from_server()
    assert ack.flags == ACK and ack.ack == (CLIENT_ISS + 1) & MASK
    assert c.state() is TcpState.ESTABLISHED


def test_abort_sends_rst_and_reports_nothing() -> None:
    c = Conn()
    c.ep.send(b"x" * 100, c.now)
    c.pump()
    c.ep.abort(c.now)
    [(rst, _)] = c.from_server()
    assert rst.flags == RST | ACK
    assert rst.seq == (c.peer.irs + 1 + 100) & MASK
    assert c.ep.closed and c.take_events() == []
    c.to_server(*c.peer.ack())  # late segments are ignored
    assert c.from_server() == [] and c.take_events() == []


def test_shutdown_before_established_sends_fin_after_handshake() -> None:
    c = Conn(accept=False)
    c.ep.accept(c.now)
    c.ep.send(b"banner", c.now)
    c.ep.shutdown_write(c.now)
    [(synack, _)] = c.from_server()
    assert synack.flags == SYN | ACK
    c.peer.receive(synack, b"")
    c.to_server(*c.peer.ack())
    assert c.state() is TcpState.FIN_WAIT_1
    [(seg, data)] = c.from_server()
    assert data == b"banner" and seg.flags & FIN


def test_fin_out_of_order_waits_for_the_data_before_it() -> None:
    c = Conn()
    c.peer.write(b"0123456789")
    c.peer.fin_queued = True
    [(seg, data)] = c.peer.data_segments(c.now)
    assert seg.flags & FIN
    # Deliver the second half (with the FIN) first, then the first half.
    tail = dataclasses.replace(seg, seq=(seg.seq + 5) & MASK)
    c.to_server(tail, data[5:])
    assert c.state() is TcpState.ESTABLISHED and c.take_events() == []
    head = dataclasses.replace(seg, flags=ACK)
    c.to_server(head, data[:5])
    events = c.take_events()
    assert data_of(events) == b"0123456789" and events[-1] == FlowHalfClosed(7)
    assert c.state() is TcpState.CLOSE_WAIT


def test_fin_waits_for_an_open_window() -> None:
    c = Conn()
    c.peer.receive_window = 0
    c.to_server(*c.peer.ack())
    c.ep.shutdown_write(c.now)
    assert c.from_server() == []  # Linux would drop a bare FIN at a zero window
    assert c.ep.get_timer() is not None  # ... so the window is probed
    c.peer.receive_window = 1 << 20
    c.to_server(*c.peer.ack())
    [(fin, _)] = c.from_server()
    assert fin.flags == ACK | FIN


def test_time_wait_lets_a_new_syn_replace_the_flow() -> None:
    c = Conn()
    c.ep.shutdown_write(c.now)
    c.pump()
    c.peer.fin_queued = True
    c.pump()
    assert c.state() is TcpState.TIME_WAIT
    new_syn = dataclasses.replace(c.peer.syn(), seq=(c.peer.seq(0) + 100_000) & MASK)
    assert c.ep.accepts_new_syn(new_syn)
    old_syn = c.peer.syn()  # the old connection's own SYN, retransmitted
    assert not c.ep.accepts_new_syn(old_syn)
    assert not Conn().ep.accepts_new_syn(new_syn)  # only in TIME-WAIT
