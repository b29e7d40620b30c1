"""A small test-only TCP *client* that talks to a ``TcpEndpoint`` in memory.

It behaves like the Linux side of the TUN where it matters for the tests: its
SYN carries MSS, SACK-permitted, timestamps and window scale 7; it ACKs every
batch it receives (cumulative + SACK blocks for out-of-order data); it sends
its own data within the endpoint's window and goes back to SND.UNA when its
own retransmission timer expires. With ``strict_window`` it also does what
Linux does since 6.16 while its application is not reading (``app_reading``
False, unread bytes queued): it never moves its window's right edge left, and
it drops a segment that ends beyond that edge whole, ACK field included,
answering with a duplicate ACK (tcp_sequence(), SKB_DROP_REASON_TCP_INVALID_END_SEQUENCE);
it answers an old segment (a window probe) with an ACK, and sends a window
update when its application reads. Everything is driven by ``Conn`` with a
hand-set clock; segments cross through the real codec (``emit`` then
``parse``) so the wire format is exercised on every hop.

Expected segments are built from ``SEND_TEMPL``-style templates with
``dataclasses.replace`` and compared with ``expect``, whose failure message
prints both segments tcpdump-style.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable

from stack.events import Event
from stack.tcp import TcpConfig, TcpEndpoint, TcpState
from stack.tcp.seqnum import MASK, delta
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpRepr, emit, parse

CLIENT_PORT = 40000
SERVER_PORT = 443
CLIENT_ISS = 0x1000
SERVER_ISS = 0x90000000
FLOW = 7

Segment = tuple[TcpRepr, bytes]
Filter = Callable[[TcpRepr, bytes], bool]

# What the peer's SYN looks like (Linux defaults), to be adjusted with dataclasses.replace.
SYN_TEMPL = TcpRepr(
    src_port=CLIENT_PORT,
    dst_port=SERVER_PORT,
    seq=CLIENT_ISS,
    ack=0,
    flags=SYN,
    window=64240,
    mss=1460,
    window_scale=7,
    sack_permitted=True,
    timestamp=(1000, 0),
)
# A segment from the endpoint, to be adjusted per test.
SEND_TEMPL = TcpRepr(
    src_port=SERVER_PORT, dst_port=CLIENT_PORT, seq=SERVER_ISS, ack=0, flags=ACK, window=0
)


def make_config(**changes: object) -> TcpConfig:
    base = TcpConfig(
        mss=1460,
        max_payload=1460,
        send_buffer=64 * 1024,
        receive_window=64 * 1024,
        time_wait=2.0,
        accept_timeout=30.0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def wire(seg: TcpRepr, payload: bytes | memoryview) -> tuple[TcpRepr, bytes]:
    """Send a segment through the codec, as the stack would (emit, then parse again)."""
    buf = bytearray(seg.header_len() + len(payload))
    emit(seg, payload, buf, 0)
    parsed, data = parse(memoryview(bytes(buf)))
    return parsed, bytes(data)


def expect(seg: TcpRepr, template: TcpRepr, **fields: object) -> None:
    """Assert that ``seg`` equals ``template`` with ``fields`` replaced; ignore the timestamp
    unless it is given."""
    want = dataclasses.replace(template, **fields)  # type: ignore[arg-type]
    if "timestamp" not in fields:
        want = dataclasses.replace(want, timestamp=seg.timestamp)
    assert seg == want, f"\n  got  {seg}\n  want {want}"


class Peer:
    """The client side. Sequence numbers are raw 32-bit values, as on the wire."""

    def __init__(
        self,
        iss: int = CLIENT_ISS,
        window_scale: int | None = 7,
        sack: bool = True,
        timestamps: bool = True,
        mss: int = 1460,
        receive_window: int = 1 << 20,
        rto: float = 0.5,
        strict_window: bool = False,
    ) -> None:
        self.iss = iss
        self.window_scale = window_scale
        self.sack = sack
        self.timestamps = timestamps
        self.mss = mss
        self.receive_window = receive_window
        self.rto = rto
        self.strict_window = strict_window
        self.app_reading = True  # False: in-order bytes wait in ``unread`` until read()
        self.unread = 0
        self.adv_right = 0  # offset of the right edge of the window last advertised
        self.min_window = receive_window  # smallest window advertised once established
        self.over_window_drops = 0
        # send side
        self.outgoing = bytearray()  # everything the application wrote, from offset 0
        self.snd_una = 0  # offsets into outgoing
        self.snd_nxt = 0
        self.fin_queued = False
        self.fin_sent = False
        self.fin_acked = False
        self.snd_wnd = 0  # bytes (scaled)
        self.peer_shift = 0
        self.peer_sack = False
        self.peer_ts = False
        self.rtx_deadline: float | None = None
        # receive side
        self.irs = 0
        self.rcv_nxt = 0  # offset
        self.received = bytearray()
        self.ooo: dict[int, bytes] = {}
        self.dsack: tuple[int, int] | None = None  # a duplicate to report (RFC 2883)
        self.last_ooo = -1  # offset of the latest out-of-order segment (RFC 2018 4)
        self.fin_received = False
        self.reset_received = False
        self.ts_recent = 0
        self.ts_clock = 1000
        self.established = False
        self.need_ack = False
        self.log: list[Segment] = []  # everything received, for assertions

    # -- building segments -----------------------------------------------------
    def ts(self) -> tuple[int, int] | None:
        if not (self.timestamps and (self.peer_ts or not self.established)):
            return None
        self.ts_clock += 1
        return (self.ts_clock, self.ts_recent)

    def syn(self) -> TcpRepr:
        return dataclasses.replace(
            SYN_TEMPL,
            seq=self.iss,
            mss=self.mss,
            window_scale=self.window_scale,
            sack_permitted=self.sack,
            timestamp=(self.ts_clock, 0) if self.timestamps else None,
        )

    def seq(self, offset: int) -> int:
        return (self.iss + 1 + offset) & MASK

    def ack_seq(self) -> int:
        return (self.irs + 1 + self.rcv_nxt + (1 if self.fin_received else 0)) & MASK

    def window_field(self) -> int:
        shift = (self.window_scale or 0) if self.established else 0
        # Like Linux, out-of-order data does not shrink the advertised window (so that
        # duplicate ACKs stay duplicates for a sender without SACK).
        free = max(self.receive_window - self.unread, 0)
        if self.strict_window:
            # Linux never moves the right edge left (tcp_select_window).
            free = max(free, self.adv_right - self.rcv_nxt)
        field = min(0xFFFF, free >> shift)
        if self.established:
            self.adv_right = max(self.adv_right, self.rcv_nxt + (field << shift))
            self.min_window = min(self.min_window, field << shift)
        return field

    def read(self, n: int | None = None) -> None:
        """The application reads ``n`` queued bytes (all of them by default)."""
        before = self.unread
        self.unread -= self.unread if n is None else min(n, self.unread)
        if self.strict_window and self.unread < before:
            self.need_ack = True  # the window update tcp_cleanup_rbuf() sends

    def _beyond_window(self, seg: TcpRepr, payload: bytes) -> bool:
        """Linux >= 6.16 tcp_sequence(): with data queued unread, a segment whose end
        lies beyond the advertised right edge is not acceptable at all."""
        if not (self.strict_window and self.established and self.unread):
            return False
        start = self.rcv_nxt + delta(seg.seq, (self.irs + 1 + self.rcv_nxt) & MASK)
        end = start + len(payload) + (1 if seg.flags & FIN else 0)
        return end > self.adv_right

    def sack_blocks(self) -> tuple[tuple[int, int], ...]:
        if not (self.sack and self.peer_sack) or not (self.ooo or self.dsack):
            return ()
        ranges: list[list[int]] = []
        for start in sorted(self.ooo):
            end = start + len(self.ooo[start])
            if ranges and ranges[-1][1] >= start:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([start, end])
        base = self.irs + 1
        limit = 3 if self.peer_ts else 4
        # RFC 2018 4: the block holding the latest segment first, then the highest others.
        latest = [r for r in ranges if r[0] <= self.last_ooo < r[1]]
        ranges = latest + [r for r in reversed(ranges) if r not in latest]
        if self.dsack is not None:
            # Like Linux (tcp_dsack=1): the duplicate first, once.
            ranges = [list(self.dsack), *ranges[: limit - 1]]
            self.dsack = None
        else:
            ranges = ranges[:limit]
        return tuple(((base + s) & MASK, (base + e) & MASK) for s, e in ranges)

    def segment(self, flags: int = ACK, offset: int | None = None, **changes: object) -> TcpRepr:
        seg = TcpRepr(
            CLIENT_PORT,
            SERVER_PORT,
            self.seq(self.snd_nxt + (1 if self.fin_sent else 0) if offset is None else offset),
            self.ack_seq(),
            flags,
            self.window_field(),
            timestamp=self.ts(),
            sack_blocks=self.sack_blocks() if flags & ACK else (),
        )
        return dataclasses.replace(seg, **changes)  # type: ignore[arg-type]

    def ack(self, **changes: object) -> Segment:
        self.need_ack = False
        return dataclasses.replace(self.segment(ACK), **changes), b""  # type: ignore[arg-type]

    def write(self, data: bytes) -> None:
        self.outgoing += data

    def data_segments(self, now: float, limit: int | None = None) -> list[Segment]:
        """New data (and the FIN) within the endpoint's window, MSS-sized."""
        out: list[Segment] = []
        edge = self.snd_una + self.snd_wnd
        while self.snd_nxt < len(self.outgoing) and self.snd_nxt < edge:
            if limit is not None and len(out) >= limit:
                break
            n = min(self.mss - (12 if self.peer_ts else 0), len(self.outgoing) - self.snd_nxt,
                    edge - self.snd_nxt)
            payload = bytes(self.outgoing[self.snd_nxt : self.snd_nxt + n])
            fin = self.fin_queued and self.snd_nxt + n == len(self.outgoing)
            flags = ACK | PSH | (FIN if fin else 0)
            out.append((self.segment(flags, self.snd_nxt), payload))
            self.snd_nxt += n
            if fin:
                self.fin_sent = True
        if (
            self.fin_queued
            and not self.fin_sent
            and self.snd_nxt == len(self.outgoing)
            and (limit is None or len(out) < limit)
        ):
            out.append((self.segment(ACK | FIN, self.snd_nxt), b""))
            self.fin_sent = True
        if out:
            self.need_ack = False
            if self.rtx_deadline is None:
                self.rtx_deadline = now + self.rto
        return out

    def retransmit(self, now: float) -> list[Segment]:
        """Go back to SND.UNA (what the peer's retransmission timer does)."""
        self.snd_nxt = self.snd_una
        self.fin_sent = self.fin_sent and self.fin_acked
        self.rtx_deadline = None
        return self.data_segments(now)

    # -- receiving -------------------------------------------------------------
    def receive(self, seg: TcpRepr, payload: bytes, now: float = 0.0) -> None:
        self.log.append((seg, payload))
        if seg.flags & RST:
            self.reset_received = True
            return
        if seg.timestamp is not None:
            self.ts_recent = seg.timestamp[0]
        if seg.flags & SYN:
            self.irs = seg.seq
            self.peer_shift = seg.window_scale or 0
            if seg.window_scale is None:
                self.window_scale = None
            self.peer_sack = bool(seg.sack_permitted and self.sack)
            self.peer_ts = seg.timestamp is not None and self.timestamps
            self.snd_wnd = seg.window
            self.established = True
            self.need_ack = True
            return
        if self._beyond_window(seg, payload):
            self.over_window_drops += 1
            self.need_ack = True  # tcp_send_dupack
            return
        if seg.flags & ACK:
            acked = delta(seg.ack, self.seq(self.snd_una))
            fin_unacked = self.fin_sent and not self.fin_acked
            sent = self.snd_nxt - self.snd_una + (1 if fin_unacked else 0)
            if 0 < acked <= sent:
                self.rtx_deadline = None
                if fin_unacked and acked == len(self.outgoing) + 1 - self.snd_una:
                    self.fin_acked = True
                    acked -= 1
                self.snd_una += acked
                if self.snd_una < self.snd_nxt or (self.fin_sent and not self.fin_acked):
                    self.rtx_deadline = now + self.rto
            self.snd_wnd = seg.window << self.peer_shift
        rel = delta(seg.seq, (self.irs + 1 + self.rcv_nxt) & MASK)
        start = self.rcv_nxt + rel
        if payload:
            self.need_ack = True
            if start <= self.rcv_nxt < start + len(payload):
                before = self.rcv_nxt
                self.received += payload[self.rcv_nxt - start :]
                self.rcv_nxt = start + len(payload)
                while True:
                    nxt = next(
                        (s for s in sorted(self.ooo) if s <= self.rcv_nxt), None
                    )
                    if nxt is None:
                        break
                    block = self.ooo.pop(nxt)
                    if nxt + len(block) > self.rcv_nxt:
                        self.received += block[self.rcv_nxt - nxt :]
                        self.rcv_nxt = nxt + len(block)
                if not self.app_reading:
                    self.unread += self.rcv_nxt - before
            elif start > self.rcv_nxt:
                self.ooo[start] = payload
                self.last_ooo = start
            else:
                self.dsack = (start, start + len(payload))
        elif self.strict_window and start < self.rcv_nxt and not seg.flags & FIN:
            self.need_ack = True  # an old sequence number: tcp_send_dupack()
        if seg.flags & FIN and start + len(payload) == self.rcv_nxt and not self.fin_received:
            self.fin_received = True
            self.need_ack = True
        elif seg.flags & FIN:
            self.need_ack = True


class Conn:
    """An endpoint and a ``Peer`` with a hand-set clock and a controllable wire."""

    def __init__(
        self,
        config: TcpConfig | None = None,
        peer: Peer | None = None,
        accept: bool = True,
        iss: int = SERVER_ISS,
        now: float = 100.0,
        syn: TcpRepr | None = None,
    ) -> None:
        self.now = now
        self.config = config or make_config()
        self.peer = peer or Peer()
        self.events: collections.deque[Event] = collections.deque()
        self.counters: dict[str, int] = {}
        parsed, _ = wire(syn or self.peer.syn(), b"")
        self.ep = TcpEndpoint(
            FLOW, self.config, parsed, self.now, iss, self.events, self.counters
        )
        self.drop_to_peer: Filter = lambda seg, data: False
        self.drop_to_server: Filter = lambda seg, data: False
        if accept:
            self.ep.accept(self.now)
            self.pump()

    def state(self) -> TcpState:
        """The endpoint's state (a call, so that type checkers do not narrow it)."""
        return self.ep.state

    # -- moving segments ------------------------------------------------------
    def from_server(self) -> list[Segment]:
        """The endpoint's output now, through the codec (no loss applied)."""
        return [wire(seg, payload) for seg, payload in self.ep.segments_to_send(self.now)]

    def to_server(self, seg: TcpRepr, payload: bytes = b"") -> None:
        parsed, data = wire(seg, payload)
        self.ep.receive_segment(parsed, memoryview(data), self.now)

    def take_events(self) -> list[Event]:
        out = list(self.events)
        self.events.clear()
        return out

    def pump(self, rounds: int = 10_000) -> None:
        """Exchange segments until both sides are quiet (no timers are advanced)."""
        peer = self.peer
        for _ in range(rounds):
            moved = False
            for seg, data in self.from_server():
                moved = True
                if not self.drop_to_peer(seg, data):
                    peer.receive(seg, data, self.now)
            batch = peer.data_segments(self.now)
            if peer.need_ack:
                batch.append(peer.ack())
            for seg, data in batch:
                moved = True
                if not self.drop_to_server(seg, data):
                    self.to_server(seg, data)
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def advance(self, dt: float) -> None:
        """Let ``dt`` seconds pass, firing both sides' timers in order, pumping after each."""
        end = self.now + dt
        while True:
            deadlines = [
                t for t in (self.ep.get_timer(), self.peer.rtx_deadline) if t is not None
            ]
            nxt = min(deadlines) if deadlines else None
            if nxt is None or nxt > end:
                break
            self.now = max(self.now, nxt)
            if self.ep.get_timer() is not None and self.ep.get_timer() <= self.now:  # type: ignore[operator]
                self.ep.handle_timer(self.now)
            if self.peer.rtx_deadline is not None and self.peer.rtx_deadline <= self.now:
                for seg, data in self.peer.retransmit(self.now):
                    if not self.drop_to_server(seg, data):
                        self.to_server(seg, data)
            self.pump()
        self.now = end
        self.pump()

    def run(self, until: Callable[[], bool], limit: float = 600.0, step: float = 0.05) -> None:
        """Advance time in small steps until ``until()`` holds (or fail after ``limit``)."""
        start = self.now
        self.pump()
        while not until():
            if self.now - start > limit:
                raise AssertionError("condition not reached in time")
            self.advance(step)


def data_of(events: Iterable[Event]) -> bytes:
    from stack.events import DataReceived

    return b"".join(e.data for e in events if isinstance(e, DataReceived))
