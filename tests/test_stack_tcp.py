"""TCP through the whole Stack: a test peer produces the IP packets the kernel
would, the stack answers with real packets (checksums verified by parse_out)."""

from __future__ import annotations

import pytest

from stack import (
    DataReceived,
    FlowClosed,
    FlowHalfClosed,
    FlowKey,
    FlowOpened,
    FlowReset,
    Refusal,
    Stack,
    StackConfig,
)
from stack.tcp import TcpState
from stack.wire import tcp, virtio
from stack.wire.checksum import pseudo_header_sum
from tests.ippeer import A4, A6, B4, B6, TcpPeer, drain, events, ip_packet, tcp_l4, with_vnet

VARIANTS = [
    pytest.param(A4, B4, False, id="v4"),
    pytest.param(A6, B6, False, id="v6"),
    pytest.param(A4, B4, True, id="v4-vnet"),
    pytest.param(A6, B6, True, id="v6-vnet"),
]


def open_flow(s: Stack, peer: TcpPeer, now: float = 0.0) -> int:
    peer.syn(now)
    (opened,) = events(s)
    assert isinstance(opened, FlowOpened)
    s.accept(opened.flow, now)
    out = drain(s)
    peer.take(out)
    peer.deliver(tcp.ACK, now=now)
    assert drain(s) == []
    return opened.flow


@pytest.mark.parametrize(("a", "b", "vnet"), VARIANTS)
def test_lifecycle(a: bytes, b: bytes, vnet: bool) -> None:
    s = Stack(StackConfig(vnet_hdr=vnet, seed=3))
    peer = TcpPeer(s, a, b, sport=51000, dport=443, isn=7777)
    peer.syn(0.0)
    (opened,) = events(s)
    assert opened == FlowOpened(1, FlowKey(6, a, 51000, b, 443))
    assert s.counters["flows.half_open"] == 1
    assert drain(s) == []  # the handshake is held until accept
    s.accept(1, 0.01)
    (synack,) = drain(s)
    assert synack.tcp is not None and synack.tcp.flags == tcp.SYN | tcp.ACK
    assert (synack.src, synack.dst, synack.sport, synack.dport) == (b, a, 443, 51000)
    assert synack.tcp.ack == 7778 and synack.ttl == 64
    assert synack.tcp.mss == (1460 if len(a) == 4 else 1440)
    if synack.ip4 is not None:
        assert synack.ip4.dont_fragment
    if vnet:
        assert synack.vnet is not None and synack.vnet.flags == virtio.F_NEEDS_CSUM
    peer.take([synack])
    peer.deliver(tcp.ACK, b"GET / HTTP/1.1\r\n\r\n", 0.02)
    assert events(s) == [DataReceived(1, b"GET / HTTP/1.1\r\n\r\n")]
    assert s.counters["flows.half_open"] == 0
    out = drain(s)  # the ACK of the request
    assert len(out) == 1 and out[0].tcp is not None and out[0].tcp.ack == peer.seq
    response = bytes(range(256)) * 40
    s.send(1, response, 0.03)
    out = drain(s)
    assert all(len(o.payload) <= (1460 if len(a) == 4 else 1440) for o in out)
    peer.take(out)
    assert bytes(peer.received) == response
    peer.deliver(tcp.ACK | tcp.FIN, now=0.04)
    assert events(s) == [FlowHalfClosed(1)]
    peer.take(drain(s))
    s.shutdown_write(1, 0.05)
    out = drain(s)
    assert out[-1].tcp is not None and out[-1].tcp.flags & tcp.FIN
    peer.take(out)
    peer.deliver(tcp.ACK, now=0.06)
    assert events(s) == [FlowClosed(1, "closed")]
    assert drain(s) == []
    assert s.counters["flows.open"] == 0 and s.flow_key(1) is None
    assert s.counters["drop.tcp-checksum"] == 0


def test_one_ack_per_batch() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s)
    fid = open_flow(s, peer)
    for i in range(10):
        peer.deliver(tcp.ACK, bytes([i]) * 100, 0.1)
    assert b"".join(e.data for e in events(s) if isinstance(e, DataReceived)) == b"".join(
        bytes([i]) * 100 for i in range(10)
    )
    out = drain(s)
    assert len(out) == 1 and out[0].tcp is not None
    assert out[0].tcp.ack == peer.seq and not out[0].payload
    assert s.flow_key(fid) is not None


def test_retransmission_driven_by_the_stack_timer() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s)
    fid = open_flow(s, peer)
    s.send(fid, b"lost data", 1.0)
    (first,) = drain(s)
    deadline = s.get_timer()
    assert deadline is not None and deadline > 1.0
    s.handle_timer(deadline - 0.001)
    assert drain(s) == []
    s.handle_timer(deadline)
    (again,) = drain(s)
    assert again.tcp is not None and first.tcp is not None
    assert again.tcp.seq == first.tcp.seq and again.payload == b"lost data"
    assert s.counters["tcp.retransmits"] >= 1


def test_timer_heap_does_not_grow_with_rearms() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s)
    fid = open_flow(s, peer)
    now = 1.0
    for _ in range(500):
        now += 0.001
        s.send(fid, b"x" * 100, now)
        peer.take(drain(s))
        peer.deliver(tcp.ACK, now=now)
        drain(s)
    assert len(s._timers) < 10  # an RTO restarted on every ACK costs no heap push


def test_duplicate_syn_opens_nothing_new() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s)
    peer.syn(0.0)
    peer.seq -= 1
    peer.syn(0.5)  # the kernel retransmits its SYN
    assert len(events(s)) == 1 and s.counters["flows.open"] == 1


def test_unknown_tuple_gets_rfc9293_reset() -> None:
    s = Stack()
    peer = TcpPeer(s, isn=5000)
    peer.ack = 123456
    peer.deliver(tcp.ACK, b"data")
    (rst,) = drain(s)
    assert rst.tcp is not None and rst.tcp.flags == tcp.RST and rst.tcp.seq == 123456
    peer.deliver(tcp.FIN, b"abc")  # no ACK: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><RST,ACK>
    (rst,) = drain(s)
    assert rst.tcp is not None and rst.tcp.flags == tcp.RST | tcp.ACK
    assert rst.tcp.seq == 0 and rst.tcp.ack == 5004 + 3 + 1
    peer.deliver(tcp.RST)
    assert drain(s) == [] and s.counters["tcp.rst_ignored"] == 1
    assert s.counters["flows.open"] == 0 and events(s) == []


def test_half_open_limit_drops_syns_and_flow_limit_resets_them() -> None:
    """A SYN at the half-open limit is dropped, not reset (its sender retries later, as
    with Linux's full listen queue); one at the flow limit is reset."""
    s = Stack(StackConfig(max_half_open=2, max_flows=3, seed=1))
    peers = [TcpPeer(s, sport=1000 + i) for i in range(4)]
    for p in peers[:3]:
        p.syn()
    assert s.counters["flows.half_open"] == 2 and s.counters["drop.limit.half_open"] == 1
    assert drain(s) == [] and s.counters["tcp.rst_sent"] == 0
    # Accepting one frees a half-open slot once its handshake completes.
    s.accept(1, 0.0)
    peers[0].take(drain(s))
    peers[0].deliver(tcp.ACK)
    drain(s)
    assert s.counters["flows.half_open"] == 1
    peers[3].syn()
    assert s.counters["flows.open"] == 3
    extra = TcpPeer(s, sport=2000)
    extra.syn()
    assert s.counters["drop.limit.flows"] == 1
    assert [o.dport for o in drain(s)] == [2000]


def test_refuse_with_reset() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s, isn=99)
    peer.syn()
    events(s)
    s.refuse(1, Refusal.RESET, 0.0)
    assert s.flow_key(1) is None
    (rst,) = drain(s)
    assert rst.tcp is not None and rst.tcp.flags & tcp.RST and rst.tcp.ack == 100
    assert s.counters["flows.open"] == 0 and s.counters["flows.half_open"] == 0
    s.refuse(1, Refusal.RESET, 0.0)  # a dead handle is ignored
    assert drain(s) == [] and events(s) == []


def test_refuse_drop_is_silent() -> None:
    s = Stack(StackConfig(seed=1))
    TcpPeer(s).syn()
    s.refuse(1, Refusal.DROP, 0.0)
    assert drain(s) == [] and s.counters["flows.open"] == 0 and s.get_timer() is None


def test_abort_established_sends_rst_and_forgets() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s)
    fid = open_flow(s, peer)
    s.abort(fid, 1.0)
    assert s.send_buffer_free(fid) == 0 and s.flow_key(fid) is None
    (rst,) = drain(s)
    assert rst.tcp is not None and rst.tcp.flags & tcp.RST
    assert events(s) == [] and s.counters["flows.open"] == 0
    peer.deliver(tcp.ACK, b"late")  # now an unknown tuple
    (again,) = drain(s)
    assert again.tcp is not None and again.tcp.flags == tcp.RST


def test_accept_timeout() -> None:
    s = Stack(StackConfig(accept_timeout=5.0, seed=1))
    TcpPeer(s).syn(1.0)
    events(s)
    assert s.get_timer() == 6.0
    s.handle_timer(6.0)
    evs = events(s)
    assert len(evs) == 1 and isinstance(evs[0], FlowReset)
    out = drain(s)
    assert all(o.tcp is not None and o.tcp.flags & tcp.RST for o in out)
    assert s.counters["flows.open"] == 0 and s.counters["flows.half_open"] == 0


def test_bad_checksum_dropped_and_needs_csum_trusted() -> None:
    s = Stack(StackConfig(vnet_hdr=True, seed=1))
    peer = TcpPeer(s)
    raw = bytearray(peer.packet(tcp.SYN, mss=1460))
    raw[10 + 20 + 16] ^= 0x55
    s.receive_packet(bytes(raw), 0.0)
    assert s.counters["drop.tcp-checksum"] == 1 and events(s) == []
    seg = tcp.TcpRepr(peer.sport, peer.dport, peer.seq, 0, tcp.SYN, 65535, mss=1460)
    l4 = bytearray(tcp_l4(A4, B4, seg))
    l4[16:18] = pseudo_header_sum(A4, B4, 6, len(l4)).to_bytes(2, "big")  # partial
    s.receive_packet(with_vnet(ip_packet(A4, B4, 6, bytes(l4)), flags=virtio.F_NEEDS_CSUM,
                               csum_start=20, csum_offset=16), 0.0)  # fmt: skip
    assert len(events(s)) == 1


@pytest.mark.parametrize(("a", "b"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_gso_out(a: bytes, b: bytes) -> None:
    s = Stack(StackConfig(vnet_hdr=True, gso=True, seed=1))
    peer = TcpPeer(s, a, b, mss=1400)
    fid = open_flow(s, peer)
    data = bytes(range(251)) * 1000  # 251 KB
    s.send(fid, data, 1.0)
    total = bytearray()
    now = 1.0
    gso_seen = 0
    while len(total) < len(data):
        out = drain(s)
        assert out, "stalled"
        for o in out:
            assert o.vnet is not None and o.vnet.flags == virtio.F_NEEDS_CSUM
            assert o.tcp is not None
            ip_len = 20 if len(a) == 4 else 40
            assert o.vnet.csum_start == ip_len and o.vnet.csum_offset == 16
            assert len(o.raw) - 10 <= 65535
            if len(o.payload) > 1400:
                gso_seen += 1
                expected = virtio.GSO_TCPV4 if len(a) == 4 else virtio.GSO_TCPV6
                assert o.vnet.gso_type == expected and o.vnet.gso_size <= 1400
                assert o.vnet.hdr_len == ip_len + o.tcp.header_len()
            else:
                assert o.vnet.gso_type == virtio.GSO_NONE
        before = len(peer.received)
        peer.take(out)
        total = peer.received
        assert len(total) > before
        now += 0.01
        peer.deliver(tcp.ACK, now=now)
    assert bytes(total) == data
    assert gso_seen > 0 and s.counters["tcp.gso_out"] == gso_seen


def test_gso_in_super_segment() -> None:
    s = Stack(StackConfig(vnet_hdr=True, seed=1))
    peer = TcpPeer(s)
    open_flow(s, peer)
    big = bytes(range(256)) * 117  # 29952 bytes: one TSO super-segment
    seg = tcp.TcpRepr(peer.sport, peer.dport, peer.seq, peer.ack, tcp.ACK | tcp.PSH, 65535)
    l4 = bytearray(tcp_l4(A4, B4, seg, big))
    l4[16:18] = pseudo_header_sum(A4, B4, 6, len(l4)).to_bytes(2, "big")
    s.receive_packet(with_vnet(ip_packet(A4, B4, 6, bytes(l4)), flags=virtio.F_NEEDS_CSUM,
                               gso_type=virtio.GSO_TCPV4, gso_size=1448, hdr_len=40,
                               csum_start=20, csum_offset=16), 1.0)  # fmt: skip
    got = b"".join(e.data for e in events(s) if isinstance(e, DataReceived))
    assert got == big and s.counters["tcp.gso_in"] == 1
    (ack,) = drain(s)
    assert ack.tcp is not None and ack.tcp.ack == (peer.seq + len(big)) & 0xFFFFFFFF


def test_software_segmentation_when_no_gso() -> None:
    """Payloads beyond the MSS are cut by the builder when GSO is off (FIN/PSH last)."""
    from stack.output import PacketBuilder
    from tests.ippeer import parse_out

    counters: dict[str, int] = {}
    builder = PacketBuilder(1500, False, False, counters)  # type: ignore[arg-type]
    seg = tcp.TcpRepr(443, 1000, 4294967000, 5, tcp.ACK | tcp.PSH | tcp.FIN, 100)
    packets = [parse_out(p) for p in builder.tcp(B4, A4, seg, bytes(3000), 1000)]
    assert [len(p.payload) for p in packets] == [1000, 1000, 1000]
    assert [p.tcp.seq for p in packets if p.tcp] == [4294967000, 704, 1704]
    assert [p.tcp.flags for p in packets if p.tcp] == [tcp.ACK, tcp.ACK, seg.flags]


def test_icmp_refusal_after_accept_becomes_reset() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s)
    fid = open_flow(s, peer)
    s.refuse(fid, Refusal.UNREACHABLE, 1.0)
    (rst,) = drain(s)
    assert rst.tcp is not None and rst.tcp.flags & tcp.RST and rst.icmp is None
    assert s.counters["flows.open"] == 0


def test_new_syn_on_a_finished_tuple_opens_a_new_flow() -> None:
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s, isn=1000)
    fid = open_flow(s, peer)
    flow = s._flows[fid]
    # Finish the flow without collecting it (no packets_to_send in between).
    peer.deliver(tcp.RST | tcp.ACK, now=1.0)
    assert flow.endpoint.closed  # type: ignore[union-attr]
    assert isinstance(events(s)[-1], FlowReset)
    again = TcpPeer(s, isn=50000)
    again.syn(1.1)
    (opened,) = events(s)
    assert isinstance(opened, FlowOpened) and opened.flow != fid
    assert s.counters["flows.open"] == 1 and s.flow_key(fid) is None


def test_stale_timer_entries_are_compacted() -> None:
    s = Stack(StackConfig(seed=1, max_half_open=100_000))
    for i in range(3000):
        peer = TcpPeer(s, sport=10000 + i)
        fid = open_flow(s, peer)  # accept-timeout entry, then an earlier SYN-ACK timer
        s.abort(fid, 0.0)
        drain(s)
    assert s.counters["flows.open"] == 0
    assert len(s._timers) <= 1024 + 2 and s.counters["timer.compactions"] > 0
    assert s.get_timer() is None


def test_new_syn_on_a_time_wait_tuple_opens_a_new_flow() -> None:
    # We close first, so our endpoint sits in TIME-WAIT; a client reusing the port with a
    # higher ISN must get a new flow at once, not a challenge ACK (RFC 9293 3.10.7.4).
    s = Stack(StackConfig(seed=1))
    peer = TcpPeer(s, isn=1000)
    fid = open_flow(s, peer)
    s.shutdown_write(fid, 0.5)
    peer.take(drain(s))
    peer.deliver(tcp.ACK | tcp.FIN, now=0.6)
    assert [type(e) for e in events(s)] == [FlowHalfClosed, FlowClosed]
    peer.take(drain(s))
    assert s._flows[fid].endpoint.state is TcpState.TIME_WAIT  # type: ignore[union-attr]
    again = TcpPeer(s, isn=peer.seq + 100_000)
    again.syn(0.7)
    (opened,) = events(s)
    assert isinstance(opened, FlowOpened) and opened.flow != fid
    assert s.flow_key(fid) is None
    # A SYN below the old sequence space is still only an old duplicate: no new flow.
    stale = TcpPeer(s, sport=40001, isn=5000)
    fid2 = open_flow(s, stale)
    s.shutdown_write(fid2, 1.0)
    stale.take(drain(s))
    stale.deliver(tcp.ACK | tcp.FIN, now=1.1)
    events(s)
    stale.take(drain(s))
    old = TcpPeer(s, sport=40001, isn=10)
    old.syn(1.2)
    assert events(s) == []


def key(peer: TcpPeer) -> FlowKey:
    return FlowKey(6, peer.src, peer.sport, peer.dst, peer.dport)


def test_half_open_limit_evicts_the_oldest_unanswered_handshake() -> None:
    """At the limit, a SYN takes the slot of the oldest flow whose SYN-ACK went unanswered
    for ``half_open_evict_after`` (a SYN flood's spoofed sources never answer); flows still
    waiting for their upstream (not accepted), and younger handshakes, keep theirs."""
    s = Stack(StackConfig(max_half_open=3, half_open_evict_after=3.0, seed=1))
    peers = [TcpPeer(s, sport=1000 + i) for i in range(5)]
    for p in peers[:3]:
        p.syn(0.0)
    opened = events(s)
    assert [e.flow for e in opened if isinstance(e, FlowOpened)] == [1, 2, 3]
    s.accept(2, 0.1)
    s.accept(3, 0.1)
    assert [o.dport for o in drain(s)] == [1001, 1002]  # SYN-ACKs, never answered
    # Too young to give up: the new SYN is refused, as without eviction.
    early = TcpPeer(s, sport=2000)
    early.syn(2.9)
    assert events(s) == [] and s.counters["drop.limit.half_open"] == 1
    assert drain(s) == []  # dropped: its sender retries
    s.handle_timer(3.0)
    drain(s)  # SYN-ACK retransmissions
    # Flow 1 waits for its upstream: flow 2, the oldest accepted one, makes room.
    peers[3].syn(3.0)
    assert events(s) == [FlowReset(2, "half-open-evicted"), FlowOpened(4, key(peers[3]))]
    (rst,) = drain(s)
    assert rst.dport == 1001 and rst.tcp is not None and rst.tcp.flags & tcp.RST
    assert s.counters["tcp.half_open_evicted"] == 1
    assert s.counters["flows.half_open"] == 3 and s.counters["flows.tcp"] == 3
    # Flow 1 still waits; flow 3 is the oldest unanswered SYN-ACK now.
    peers[4].syn(3.1)
    assert events(s) == [FlowReset(3, "half-open-evicted"), FlowOpened(5, key(peers[4]))]
    drain(s)
    # No accepted handshake old enough is left: the next SYN is refused.
    late = TcpPeer(s, sport=2001)
    late.syn(3.2)
    assert events(s) == [] and s.counters["drop.limit.half_open"] == 2
    assert drain(s) == []


def test_half_open_evictions_are_rate_limited() -> None:
    """At most ``half_open_evict_rate`` evictions a second (a second's worth in the bucket):
    beyond, a SYN at the limit is dropped even though an old unanswered handshake could
    make room, so a flood is not admitted as fast as the table turns over."""
    s = Stack(StackConfig(max_half_open=8, half_open_evict_after=1.0,
                          half_open_evict_rate=2.0, seed=1))
    first = [TcpPeer(s, sport=1000 + i) for i in range(8)]
    for p in first:
        p.syn(0.0)
    for flow in range(1, 9):
        s.accept(flow, 0.0)
    drain(s)
    events(s)
    late = [TcpPeer(s, sport=2000 + i) for i in range(6)]
    for p in late[:4]:
        p.syn(5.0)  # all 8 are old enough, but the bucket holds 2
    assert s.counters["tcp.half_open_evicted"] == 2
    assert s.counters["drop.limit.half_open"] == 2
    assert s.counters["tcp.half_open_evict_limited"] == 2
    assert s.counters["flows.half_open"] == 8
    drain(s)
    late[4].syn(5.4)  # 0.4 s refill 0.8 tokens: still dropped
    assert s.counters["tcp.half_open_evicted"] == 2
    late[5].syn(5.6)  # 1.2 tokens by now
    assert s.counters["tcp.half_open_evicted"] == 3
    assert s.counters["flows.half_open"] == 8
