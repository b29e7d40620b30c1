"""A TCP transfer both ways through the whole Stack with the seeded fault injector
on both directions (drop, duplicate, reorder, delay) and a hand-set clock.

The peer is a deliberately simple go-back-N sender / in-order-only receiver:
everything the stack gets right (retransmission timers through its single heap,
recovery, reordering, duplicate handling, one ACK per batch, FIN exchange) is
exercised by the stack's side; the peer only has to be correct, not clever.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stack import (
    DataReceived,
    FlowClosed,
    FlowHalfClosed,
    FlowOpened,
    FlowWritable,
    Stack,
    StackConfig,
)
from stack.fault import FaultInjector
from stack.wire import tcp
from tests.ippeer import A4, A6, B4, B6, Out, ip_packet, parse_out, tcp_l4, with_vnet

MASK = 0xFFFFFFFF


class GoBackNPeer:
    MSS = 1000
    WINDOW = 32 * 1024
    RTO = 0.2

    def __init__(self, src: bytes, dst: bytes, data: bytes, vnet: bool) -> None:
        self.src, self.dst, self.vnet = src, dst, vnet
        self.sport, self.dport = 45678, 8080
        self.isn = 77
        self.data = data
        self.una = 0  # offsets into data; the FIN is at len(data)
        self.nxt = 0
        self.fin_acked = False
        self.fin_sent = False
        self.synced = False
        self.stack_isn = 0
        self.rcv = bytearray()
        self.got_fin = False
        self.last_progress = 0.0
        self.last_syn = -1.0
        self.ack_due = False

    def _packet(self, flags: int, seq_off: int, payload: bytes = b"") -> bytes:
        seq = (self.isn + 1 + seq_off) & MASK if flags & tcp.SYN == 0 else self.isn
        ack = (self.stack_isn + 1 + len(self.rcv) + int(self.got_fin)) & MASK
        seg = tcp.TcpRepr(self.sport, self.dport, seq, ack if flags & tcp.ACK else 0, flags,
                          65535, mss=1460 if flags & tcp.SYN else None)  # fmt: skip
        pkt = ip_packet(self.src, self.dst, 6, tcp_l4(self.src, self.dst, seg, payload))
        return with_vnet(pkt) if self.vnet else pkt

    def tick(self, now: float) -> list[bytes]:
        if not self.synced:
            if now - self.last_syn >= 1.0:
                self.last_syn = now
                return [self._packet(tcp.SYN, -1)]
            return []
        out = []
        if now - self.last_progress > self.RTO and (self.una < self.nxt or not self.fin_acked):
            self.nxt = self.una  # go back N
            self.last_progress = now
        while self.nxt < len(self.data) and self.nxt - self.una < self.WINDOW:
            chunk = self.data[self.nxt : self.nxt + self.MSS]
            out.append(self._packet(tcp.ACK, self.nxt, chunk))
            self.nxt += len(chunk)
        if self.nxt == len(self.data) and not self.fin_acked and self.una == self.nxt:
            out.append(self._packet(tcp.ACK | tcp.FIN, self.nxt))
            self.fin_sent = True
        if self.ack_due:
            # After our FIN, our sequence number is one past it (RFC 9293 3.4).
            out.append(self._packet(tcp.ACK, self.nxt + int(self.fin_sent)))
            self.ack_due = False
        return out

    def receive(self, o: Out, now: float) -> None:
        seg = o.tcp
        assert seg is not None and o.dst == self.src and seg.dst_port == self.sport
        assert not seg.flags & tcp.RST, "the stack reset the connection"
        if seg.flags & tcp.SYN:
            assert seg.ack == self.isn + 1
            self.stack_isn = seg.seq
            self.synced = True
            self.last_progress = now
            self.ack_due = True
            return
        if seg.flags & tcp.ACK:
            acked = (seg.ack - self.isn - 1) & MASK
            if acked > len(self.data):  # our FIN is acknowledged
                self.fin_acked = True
                acked = len(self.data)
            if acked > self.una:
                self.una = acked
                self.nxt = max(self.nxt, acked)
                self.last_progress = now
        off = (seg.seq - self.stack_isn - 1) & MASK
        if o.payload:
            if off == len(self.rcv):
                self.rcv += o.payload
            elif off < len(self.rcv) < off + len(o.payload):  # partly new
                self.rcv += o.payload[len(self.rcv) - off :]
            self.ack_due = True
        if seg.flags & tcp.FIN and off + len(o.payload) == len(self.rcv):
            self.got_fin = True
            self.ack_due = True


@pytest.mark.parametrize(
    ("a", "b", "vnet", "gso", "seed"),
    [
        pytest.param(A4, B4, False, False, 1, id="v4-plain"),
        pytest.param(A6, B6, True, True, 2, id="v6-gso"),
        pytest.param(A4, B4, True, True, 3, id="v4-gso"),
    ],
)
def test_transfer_both_ways_under_faults(a: bytes, b: bytes, vnet: bool, gso: bool,
                                         seed: int) -> None:  # fmt: skip
    dropped = transfer(a, b, vnet, gso, seed)
    assert dropped[0] > 0 and dropped[1] > 0  # these seeds do lose packets both ways


@settings(max_examples=int(os.environ.get("TUNPROXY_FAULT_EXAMPLES", "8")), deadline=None)
# Found by hypothesis in CI-like runs: it took 103 s of simulated time (see transfer's limit).
@example(seed=1_808_660_309, v6=False, gso=False, drop=0.08)
@given(
    seed=st.integers(4, 2**32),
    v6=st.booleans(),
    gso=st.booleans(),
    drop=st.sampled_from([0.0, 0.02, 0.08]),
)
def test_transfer_under_random_faults(seed: int, v6: bool, gso: bool, drop: float) -> None:
    a, b = (A6, B6) if v6 else (A4, B4)
    transfer(a, b, gso, gso, seed, drop, size=60_000)


def transfer(a: bytes, b: bytes, vnet: bool, gso: bool, seed: int, drop: float = 0.03,
             size: int = 150_000) -> tuple[int, int]:  # fmt: skip
    """Run one transfer; returns the packets dropped (towards the stack, towards the peer)."""
    rng = random.Random(seed)
    upload = rng.randbytes(size)
    download = rng.randbytes(2 * size)
    s = Stack(StackConfig(vnet_hdr=vnet, gso=gso, seed=seed, tcp_send_buffer=64 * 1024))
    peer = GoBackNPeer(a, b, upload, vnet)
    faults = dict(drop=drop, duplicate=0.02, reorder=0.03, delay=(0.0005, 0.003))
    to_stack = FaultInjector(seed * 2, **faults)  # type: ignore[arg-type]
    to_peer = FaultInjector(seed * 2 + 1, **faults)  # type: ignore[arg-type]
    got = bytearray()
    pushed: dict[int, bytes] = {}  # every packet the stack emitted (kept alive: ids stay unique)
    delivered: set[int] = set()
    flow = None
    pending = memoryview(download)
    closed = half_closed = shut = False
    now = 0.0
    # A liveness bound in simulated time, not a speed figure. At 8 % loss each way the
    # go-back-N peer, which throws away out-of-order data and sends no SACK, makes every
    # hole cost a retransmission timeout; when the handshake itself was retransmitted the
    # stack has no RTT sample (Karn) and that timeout stays at the initial 1 s. Over 300
    # random examples: median 1.3 s, p99 21 s, max 39 s; one seed took 103 s.
    while not (closed and peer.got_fin and peer.fin_acked) and now < 600.0:
        for p in peer.tick(now):
            to_stack.push(p, now)
        for p in to_stack.pop_due(now):
            s.receive_packet(p, now)
        if (t := s.get_timer()) is not None and t <= now:
            s.handle_timer(now)
        while (ev := s.next_event()) is not None:
            if isinstance(ev, FlowOpened):
                flow = ev.flow
                s.accept(flow, now)
            elif isinstance(ev, DataReceived):
                got += ev.data
            elif isinstance(ev, FlowHalfClosed):
                half_closed = True
            elif isinstance(ev, FlowClosed):
                closed = True
            elif isinstance(ev, FlowWritable):
                pass  # the loop below offers data whenever there is room anyway
            else:
                raise AssertionError(f"unexpected {ev}")
        if flow is not None and pending:
            free = s.send_buffer_free(flow)
            if free:
                s.send(flow, bytes(pending[:free]), now)
                pending = pending[free:]
        if flow is not None and not pending and not shut:
            s.shutdown_write(flow, now)
            shut = True
        for p in s.packets_to_send():
            pushed[id(p)] = p
            to_peer.push(p, now)
        for p in to_peer.pop_due(now):
            delivered.add(id(p))
            peer.receive(parse_out(p, vnet), now)
        now = round(now + 0.001, 6)
    assert bytes(got) == upload
    assert bytes(peer.rcv) == download
    assert half_closed and closed and peer.got_fin and peer.fin_acked
    lost = [p for i, p in pushed.items() if i not in delivered]
    if any(parse_out(p, vnet).payload for p in lost):  # the stack lost data: it recovered
        recovery = ("tcp.retransmits", "tcp.fast_retransmits", "tcp.rto", "tcp.tail_loss_probes")
        assert sum(s.counters[k] for k in recovery) > 0
        emitted = sum(len(parse_out(p, vnet).payload) for p in pushed.values())
        assert emitted > len(download)
    # Collected once closed (or after a short TIME-WAIT): nothing left behind.
    for _ in range(10):
        if (t := s.get_timer()) is None:
            break
        s.handle_timer(t)
        s.packets_to_send()
    assert s.counters["flows.open"] == 0
    return to_stack.counters["dropped"], to_peer.counters["dropped"]
