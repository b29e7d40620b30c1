"""The RST that ends a flow we abort must reach the peer's application.

A peer acts on a RST only at exactly its RCV.NXT (RFC 5961 3.2): one elsewhere in
its window earns a challenge ACK, one outside it is dropped, and a zero window
admits RCV.NXT alone (RFC 9293 3.10.7.4). Its RCV.NXT lies in [SND.UNA, SND.MAX]
of ours, so the endpoint resets at SND.UNA and, when different, at SND.MAX too.
``verdict`` is that acceptance test, as Linux's tcp_validate_incoming applies it.
"""

from __future__ import annotations

from stack import FlowOpened, FlowReset, Stack, StackConfig
from stack.tcp import TcpState
from stack.tcp.seqnum import MASK, delta
from stack.wire import tcp
from stack.wire.tcp import ACK, RST, TcpRepr
from tests.ippeer import A4, B4, Out, TcpPeer, drain, events, ip_packet, tcp_l4
from tests.tcp_peer import Conn, Peer, make_config


def verdict(rst: TcpRepr, rcv_nxt: int, window: int) -> str:
    """What a synchronized peer with ``rcv_nxt`` and ``window`` (bytes) does with ``rst``."""
    assert rst.flags & RST
    off = delta(rst.seq, rcv_nxt)
    if off == 0:
        return "reset"
    if 0 < off < window:
        return "challenge-ack"
    return "dropped"


def peer_window(c: Conn) -> int:
    """The window the test peer advertises now, in bytes."""
    p = c.peer
    return max(p.receive_window - p.unread, 0)


def resets(segs: list[tuple[TcpRepr, bytes]]) -> list[TcpRepr]:
    assert segs and all(seg.flags == RST | ACK for seg, _ in segs), segs
    return [seg for seg, _ in segs]


def lose_from(c: Conn, offset: int) -> None:
    """Segments to the peer that start at or beyond ``offset`` (our send offset) are lost."""
    base = c.peer.irs + 1
    c.drop_to_peer = lambda seg, data: delta(seg.seq, base & MASK) >= offset


def test_abort_with_data_lost_in_flight_and_a_closed_window_resets_at_rcv_nxt() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    c.peer.app_reading = False
    lose_from(c, mss)  # the first segment arrives, the rest of the flight is lost
    c.ep.send(b"x" * (4 * mss), c.now)
    c.pump()
    # The peer's application stopped reading and its buffer is full: window zero.
    c.peer.receive_window = c.peer.unread
    c.to_server(*c.peer.ack())
    assert c.peer.rcv_nxt == mss and peer_window(c) == 0
    c.ep.abort(c.now)
    rsts = resets(c.from_server())
    rcv_nxt = c.peer.ack_seq()
    verdicts = [verdict(r, rcv_nxt, peer_window(c)) for r in rsts]
    assert verdicts[0] == "reset", verdicts  # SND.UNA: exactly the peer's RCV.NXT
    # The SND.MAX reset alone (what Linux sends) would have been dropped.
    assert len(rsts) == 2 and verdicts[1] == "dropped", verdicts
    assert c.ep.closed and c.take_events() == []


def test_abort_after_the_acks_were_lost_resets_at_snd_max() -> None:
    c = Conn(config=make_config(send_buffer=1 << 20))
    mss = c.ep.effective_mss
    c.drop_to_server = lambda seg, data: True  # everything arrives, no ACK comes back
    c.ep.send(b"y" * (3 * mss), c.now)
    c.pump()
    assert c.peer.rcv_nxt == 3 * mss
    c.ep.abort(c.now)
    low, high = resets(c.from_server())
    rcv_nxt = c.peer.ack_seq()
    # SND.UNA lies below the peer's window (dropped silently: no challenge ACK);
    # SND.MAX is exact.
    assert verdict(low, rcv_nxt, peer_window(c)) == "dropped"
    assert verdict(high, rcv_nxt, peer_window(c)) == "reset"


def test_abort_with_nothing_in_flight_sends_one_reset() -> None:
    c = Conn()
    c.ep.send(b"z" * 100, c.now)
    c.pump()
    c.ep.abort(c.now)
    [rst] = resets(c.from_server())
    assert verdict(rst, c.peer.ack_seq(), peer_window(c)) == "reset"


def test_retransmission_give_up_resets_at_the_peers_rcv_nxt() -> None:
    c = Conn(config=make_config(max_retries=3), peer=Peer())
    mss = c.ep.effective_mss
    c.ep.send(b"a" * mss, c.now)
    c.pump()
    c.drop_to_peer = lambda seg, data: True  # the peer goes silent ...
    c.drop_to_server = lambda seg, data: True
    c.ep.send(b"b" * (2 * mss), c.now)
    c.pump()
    rcv_nxt = c.peer.ack_seq()
    out: list[tuple[TcpRepr, bytes]] = []
    while c.state() is not TcpState.CLOSED:
        timer = c.ep.get_timer()
        assert timer is not None
        c.now = max(c.now, timer)
        c.ep.handle_timer(c.now)
        out = c.from_server()
    assert c.take_events() == [FlowReset(7, "retransmit-timeout")]
    verdicts = [verdict(r, rcv_nxt, peer_window(c)) for r in resets(out)]
    assert verdicts == ["reset", "challenge-ack"], verdicts


# -- through the whole Stack, IP packets in and out --------------------------------


def _ack_with_window(peer: TcpPeer, window: int) -> bytes:
    seg = tcp.TcpRepr(peer.sport, peer.dport, peer.seq, peer.ack, ACK, window)
    return ip_packet(peer.src, peer.dst, 6, tcp_l4(peer.src, peer.dst, seg))


def _open(s: Stack, peer: TcpPeer) -> int:
    peer.deliver(tcp.SYN, now=0.0, mss=1000)  # no window scaling: fields are bytes
    (opened,) = events(s)
    assert isinstance(opened, FlowOpened)
    s.accept(opened.flow, 0.0)
    peer.take(drain(s))
    peer.deliver(ACK)
    assert drain(s) == []
    return opened.flow


def _rsts(outs: list[Out]) -> list[TcpRepr]:
    segs = [o.tcp for o in outs if o.tcp is not None]
    assert segs and all(seg.flags & RST for seg in segs), segs
    return segs


def test_stack_abort_zero_window_unacked_data_emits_a_reset_at_rcv_nxt() -> None:
    s = Stack(StackConfig(seed=11))
    peer = TcpPeer(s, A4, B4, sport=41000, dport=80, isn=5000)
    flow = _open(s, peer)
    s.send(flow, b"d" * 3000, 0.1)
    flight = drain(s)
    assert len(flight) == 3
    peer.take(flight[:1])  # 1000 bytes arrive, the other 2000 are lost
    # The peer's application stopped reading: it acknowledges 1000 with a zero window.
    s.receive_packet(_ack_with_window(peer, 0), 0.2)
    assert drain(s) == []  # nothing to send into a closed window yet
    s.abort(flow, 0.3)
    rsts = _rsts(drain(s))
    verdicts = [verdict(r, peer.ack, 0) for r in rsts]
    assert verdicts[0] == "reset", verdicts
    assert [r.seq for r in rsts] == [peer.ack, (peer.ack + 2000) & MASK]
    assert s.counters["flows.open"] == 0


def test_stack_answers_the_challenge_ack_with_an_exact_reset() -> None:
    """The peer got part of the flight: SND.UNA is below its window, SND.MAX in it
    but not exact; its challenge ACK reaches a forgotten 4-tuple, and the stack's
    <SEQ=SEG.ACK><RST> is exact."""
    s = Stack(StackConfig(seed=12))
    peer = TcpPeer(s, A4, B4, sport=41001, dport=80, isn=9000)
    flow = _open(s, peer)
    s.send(flow, b"e" * 3000, 0.1)
    flight = drain(s)
    peer.take(flight[:2])  # 2000 of 3000 arrive; no ACK reaches the stack
    s.abort(flow, 0.2)
    low, high = _rsts(drain(s))
    assert verdict(low, peer.ack, 65535) == "dropped"
    assert verdict(high, peer.ack, 65535) == "challenge-ack"
    peer.deliver(ACK, now=0.3)  # the challenge ACK (RFC 5961 3.2)
    [answer] = _rsts(drain(s))
    assert answer.flags == RST and verdict(answer, peer.ack, 65535) == "reset"
