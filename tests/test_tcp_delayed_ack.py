"""Delayed ACK (TcpConfig.delayed_ack, RFC 9293 3.8.6.3): the ACK of in-order data or a FIN
waits for our reply to ride on, at most ``delayed_ack`` seconds; never for two full-sized
segments, nor for out-of-order data. Driven with a hand-set clock."""

from __future__ import annotations

from stack.wire.tcp import ACK, FIN
from tests.tcp_peer import Conn, data_of, make_config

DELAY = 0.04


def acked_all(c: Conn) -> int:
    """The ACK field that acknowledges everything the peer sent (its FIN included)."""
    return c.peer.seq(c.peer.snd_nxt + (1 if c.peer.fin_sent else 0))


def delayed() -> Conn:
    return Conn(make_config(delayed_ack=DELAY))


def test_the_ack_of_a_request_rides_on_the_reply() -> None:
    c = delayed()
    c.peer.write(b"request")
    c.pump()
    assert data_of(c.take_events()) == b"request"
    assert c.ep.get_timer() == c.now + DELAY  # the ACK waits, with a deadline
    c.ep.send(b"reply", c.now)
    [(seg, payload)] = c.from_server()
    assert payload == b"reply" and seg.flags & ACK
    assert seg.ack == acked_all(c)  # acknowledges the request
    assert c.ep.get_timer() != c.now + DELAY  # nothing left to wait for


def test_without_a_reply_the_ack_goes_when_the_delay_is_over() -> None:
    c = delayed()
    c.peer.write(b"request")
    c.pump()
    c.take_events()
    assert c.from_server() == []
    deadline = c.ep.get_timer()
    assert deadline == c.now + DELAY
    c.now = deadline - DELAY / 2
    c.ep.handle_timer(c.now)
    assert c.from_server() == []
    c.now = deadline
    c.ep.handle_timer(c.now)
    [(seg, payload)] = c.from_server()
    assert payload == b"" and seg.flags == ACK and seg.ack == acked_all(c)


def test_the_ack_of_a_fin_rides_on_our_fin() -> None:
    c = delayed()
    c.peer.write(b"bye")
    c.peer.fin_queued = True
    c.pump()
    c.take_events()
    c.ep.send(b"ok", c.now)
    c.ep.shutdown_write(c.now)
    out = c.from_server()
    assert len(out) == 1, out  # data, FIN and the ACK of the peer's FIN in one segment
    seg, payload = out[0]
    assert payload == b"ok" and seg.flags & FIN and seg.ack == acked_all(c)


def test_after_our_fin_the_peers_fin_is_acknowledged_at_once() -> None:
    # Nothing more will ever leave here for the ACK to ride on.
    c = delayed()
    c.ep.shutdown_write(c.now)
    c.pump()
    c.peer.fin_queued = True
    for seg, data in c.peer.data_segments(c.now):
        c.to_server(seg, data)
    [(seg, payload)] = c.from_server()
    assert payload == b"" and seg.flags == ACK and seg.ack == acked_all(c)


def test_two_full_segments_are_acknowledged_at_once() -> None:
    c = delayed()
    c.peer.write(bytes(2 * 1460))
    for seg, data in c.peer.data_segments(c.now):
        c.to_server(seg, data)
    out = c.from_server()
    assert [s.flags for s, _ in out] == [ACK]
    assert out[0][0].ack == acked_all(c)


def test_out_of_order_data_is_acknowledged_at_once() -> None:
    c = delayed()
    c.peer.write(bytes(500))
    (first,) = c.peer.data_segments(c.now)
    c.peer.write(bytes(500))
    (second,) = c.peer.data_segments(c.now)
    c.to_server(*second)  # a hole before it
    out = c.from_server()
    assert len(out) == 1 and out[0][1] == b""  # a duplicate ACK (with SACK) at once
    c.to_server(*first)  # fills the hole: ACK at once too (RFC 5681 4.2)
    assert len(c.from_server()) == 1
    assert len(data_of(c.take_events())) == 1000


def test_off_acks_at_once() -> None:
    c = Conn(make_config(delayed_ack=0.0))
    c.peer.write(b"request")
    for seg, data in c.peer.data_segments(c.now):
        c.to_server(seg, data)
    [(seg, payload)] = c.from_server()
    assert payload == b"" and seg.ack == acked_all(c)
