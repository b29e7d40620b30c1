"""The held handshake: SYN -> (accept | refuse | accept timeout) -> ESTABLISHED."""

from __future__ import annotations

import dataclasses

from stack.events import DataReceived, FlowReset
from stack.tcp import TcpState
from stack.wire.tcp import ACK, RST, SYN
from tests.tcp_peer import (
    CLIENT_ISS,
    SEND_TEMPL,
    SERVER_ISS,
    Conn,
    Peer,
    expect,
    make_config,
)

SYNACK_TEMPL = dataclasses.replace(
    SEND_TEMPL,
    flags=SYN | ACK,
    seq=SERVER_ISS,
    ack=CLIENT_ISS + 1,
    window=0xFFFF,
    mss=1460,
    window_scale=1,  # 64 KiB receive window needs one bit of scaling
    sack_permitted=True,
)


def test_nothing_is_sent_before_accept() -> None:
    c = Conn(accept=False)
    assert c.state() is TcpState.SYN_RECEIVED and not c.ep.accepted
    assert c.from_server() == []
    # Duplicate SYNs while held are absorbed, not answered.
    c.to_server(c.peer.syn())
    c.to_server(c.peer.syn())
    assert c.from_server() == []
    assert c.take_events() == []


def test_accept_sends_synack_with_our_options_then_established() -> None:
    c = Conn(accept=False)
    c.ep.accept(c.now)
    [(synack, payload)] = c.from_server()
    assert payload == b""
    assert synack.timestamp is not None and synack.timestamp[1] == 1000  # echoes the SYN's TSval
    expect(synack, SYNACK_TEMPL)
    c.peer.receive(synack, b"")
    c.to_server(*c.peer.ack())
    assert c.state() is TcpState.ESTABLISHED
    assert c.ep.get_timer() is None  # no retransmission timer once the SYN-ACK is acked
    assert c.from_server() == []  # the handshake ACK needs no answer


def test_effective_mss_accounts_for_timestamps_and_peer_mss() -> None:
    c = Conn(peer=Peer(mss=1200), accept=False)
    assert c.ep.effective_mss == 1200 - 12
    c = Conn(peer=Peer(timestamps=False), accept=False)
    assert c.ep.effective_mss == 1460


def test_peer_without_options_gets_none_and_default_mss() -> None:
    peer = Peer(window_scale=None, sack=False, timestamps=False)
    c = Conn(peer=peer, accept=False, syn=dataclasses.replace(peer.syn(), mss=None))
    c.ep.accept(c.now)
    [(synack, _)] = c.from_server()
    assert synack.window_scale is None and not synack.sack_permitted and synack.timestamp is None
    assert synack.window == 0xFFFF  # 64 KiB window clamped: no scaling available
    assert c.ep.effective_mss == 536  # RFC 9293 3.7.1 default


def test_large_receive_window_chooses_a_shift() -> None:
    c = Conn(config=make_config(receive_window=4 << 20), accept=False)
    c.ep.accept(c.now)
    [(synack, _)] = c.from_server()
    assert synack.window_scale == 7  # 4 MiB >> 7 = 32768 fits in 16 bits
    assert synack.window == 0xFFFF  # the SYN-ACK's own window is never scaled


def test_refuse_answers_rst_ack_and_reports_nothing() -> None:
    c = Conn(accept=False)
    c.ep.refuse(c.now)
    [(rst, _)] = c.from_server()
    expect(rst, SEND_TEMPL, flags=RST | ACK, seq=0, ack=CLIENT_ISS + 1)
    assert c.ep.closed and c.state() is TcpState.CLOSED
    assert c.take_events() == []
    assert c.from_server() == []


def test_accept_timeout_resets_with_an_event() -> None:
    c = Conn(config=make_config(accept_timeout=5.0), accept=False)
    assert c.ep.get_timer() == c.now + 5.0
    c.now += 4.9
    c.ep.handle_timer(c.now)  # early: lazy timers must tolerate it
    assert c.state() is TcpState.SYN_RECEIVED
    c.now += 0.2
    c.ep.handle_timer(c.now)
    [(rst, _)] = c.from_server()
    assert rst.flags == RST | ACK and rst.ack == CLIENT_ISS + 1
    assert c.take_events() == [FlowReset(7, "accept-timeout")]
    assert c.ep.closed


def test_rst_from_peer_while_held_is_a_reset() -> None:
    c = Conn(accept=False)
    c.to_server(c.peer.segment(RST, offset=0))
    assert c.take_events() == [FlowReset(7, "reset-by-peer")]
    assert c.ep.closed


def test_lost_synack_is_retransmitted_on_rto_with_backoff() -> None:
    c = Conn(accept=False)
    c.ep.accept(c.now)
    [(first, _)] = c.from_server()  # lost
    t0 = c.now
    assert c.ep.get_timer() == t0 + 1.0  # RFC 6298 2.1: initial RTO 1 s
    c.now = t0 + 1.0
    c.ep.handle_timer(c.now)
    [(second, _)] = c.from_server()
    assert second.flags == SYN | ACK and second.seq == first.seq
    assert c.ep.get_timer() == c.now + 2.0  # backed off
    assert c.counters["tcp.retransmits"] == 1


def test_duplicate_syn_after_accept_gets_the_synack_again() -> None:
    c = Conn(accept=False)
    c.ep.accept(c.now)
    c.from_server()  # lost
    c.to_server(c.peer.syn())
    [(again, _)] = c.from_server()
    assert again.flags == SYN | ACK


def test_synack_gives_up_after_retries() -> None:
    c = Conn(config=make_config(syn_retries=2), accept=False)
    c.ep.accept(c.now)
    c.from_server()
    while not c.ep.closed:
        c.now = c.ep.get_timer() or c.now
        c.ep.handle_timer(c.now)
        c.from_server()
    assert c.take_events() == [FlowReset(7, "retransmit-timeout")]
    assert c.counters["tcp.retransmits"] == 2


def test_data_with_the_handshake_ack_is_delivered() -> None:
    c = Conn(accept=False)
    c.ep.accept(c.now)
    for seg, data in c.from_server():
        c.peer.receive(seg, data)
    c.peer.need_ack = False
    c.peer.write(b"GET / HTTP/1.1\r\n\r\n")
    [(seg, data)] = c.peer.data_segments(c.now)
    c.to_server(seg, data)  # carries the ACK of our SYN
    assert c.state() is TcpState.ESTABLISHED
    assert c.take_events() == [DataReceived(7, b"GET / HTTP/1.1\r\n\r\n")]
    [(ack, _)] = c.from_server()
    assert ack.flags == ACK and ack.ack == (CLIENT_ISS + 1 + len(data)) & 0xFFFFFFFF


def test_ack_without_accept_is_ignored() -> None:
    c = Conn(accept=False)
    c.to_server(c.peer.segment(ACK, offset=0, ack=SERVER_ISS + 1))
    assert c.state() is TcpState.SYN_RECEIVED
    assert c.from_server() == []
