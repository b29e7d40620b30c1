"""One TCP connection, terminated here (RFC 9293). Sans-I/O: segments in, segments out.

The local application (through the Linux kernel on the far side of the TUN)
is the active opener; we are always the passive side. The endpoint is built
from the peer's SYN and holds the handshake open until ``accept()``.

Stream positions are unbounded Python ints ("offsets", see ``seqnum``): in each
direction, offset 0 is the first data byte and -1 the SYN; a FIN sits at the
offset just past the last data byte. Raw sequence numbers appear only when a
segment is parsed or built.

Sending (RFC 9293 3.8, RFC 5681, RFC 6582, RFC 6675, RFC 6298, RFC 8985):
  * ``send`` queues into a ``SendBuffer``; segments leave only from
    ``segments_to_send``, as large as the peer's window, the congestion window
    and ``config.max_payload`` allow (GSO super-segments).
  * Loss recovery is SACK-based when the peer allows SACK (a scoreboard of
    what the peer holds; only holes are retransmitted) and NewReno otherwise.
    Retransmission is driven by two pointers: ``_rtx_next`` walks the range
    ``[_rtx_next, _rtx_limit)`` that is deemed lost, skipping SACKed bytes;
    fast retransmit, the probe timer and the retransmission timer all just
    (re)set that range.
  * A hole is deemed lost once more than ``_reo_thresh`` bytes above it are
    SACKed (RFC 6675 IsLost). The threshold starts at 2 MSS and grows to the
    reordering depth that D-SACKs reveal (RFC 2883, RFC 3708); when every
    retransmission of an episode proves spurious, the window cut is undone.
  * A tail loss probe (RFC 8985 7) fires after ~2 RTTs of silence with data
    outstanding, long before the RTO: outside recovery it sends one segment so
    a lost tail gets SACKed; with SACK information or in recovery it declares
    the remaining holes (and unanswered retransmissions) lost by time.
  * A retransmission that is itself lost is also detected when data sent after
    it is SACKed far enough beyond it (the sequence half of RACK).
  * The congestion window starts at ``initial_window`` (the peer is local),
    grows by slow start / congestion avoidance with byte counting, and is cut
    by 0.7 on loss (CUBIC's beta; RFC 9438) or to one MSS on a timeout.

Receiving: in-order data is delivered at once as ``DataReceived`` unless the
application paused the flow; data held (paused, or out of order) shrinks the
window we advertise, which is how backpressure reaches the local sender. Out of
order data is SACKed on a pure ACK of its own (data segments carry no SACK
blocks: with GSO the segment size leaves no room for them).

Timestamps (RFC 7323): echoed when the peer offers them; our TSval ticks every
10 ms so the peer's PAWS survives milliseconds of reordering; our own PAWS
check is a "lite" one with one second of slack; RTT comes from one timed
segment per round trip (Karn).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from stack.events import (
    DataReceived,
    Event,
    FlowClosed,
    FlowHalfClosed,
    FlowReset,
    FlowWritable,
)
from stack.tcp.reassembly import Reassembly
from stack.tcp.rtt import RttEstimator
from stack.tcp.scoreboard import Scoreboard
from stack.tcp.sendbuf import SendBuffer
from stack.tcp.seqnum import MASK, delta, unwrap
from stack.tcp.state import RECEIVING, TcpEvent, TcpState, next_state
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, TcpRepr

__all__ = ["TcpConfig", "TcpEndpoint", "TcpState"]

Segment = tuple[TcpRepr, bytes | memoryview]


@dataclass(slots=True)
class TcpConfig:
    mss: int  # our MSS option, derived from the MTU by the stack (mtu-40 v4, mtu-60 v6)
    max_payload: int  # largest payload per emitted segment (a multiple of the MSS with GSO)
    send_buffer: int  # bytes queued towards the peer (unacknowledged included)
    receive_window: int  # bytes the peer may send ahead of what the application took
    time_wait: float  # a short TIME-WAIT: we never reuse the 4-tuple ourselves
    accept_timeout: float  # a SYN neither accepted nor refused by then is reset
    min_rto: float = 0.2  # RFC 6298 2.4 says 1 s; Linux uses 200 ms; the peer is local
    max_rto: float = 60.0  # RFC 6298 2.5
    max_retries: int = 10  # retransmission timeouts in a row before giving up (RFC 9293 3.8.3 R2)
    syn_retries: int = 5  # SYN-ACK retransmissions before giving up
    initial_window: int = 65536  # RFC 5681 allows 4 segments; the peer is on this machine
    # RFC 9293 3.8.6.3 / RFC 1122 4.2.3.2: how long the ACK of in-order data or a FIN may
    # wait to ride on our reply (data or FIN); 0: ACK at once. Never for more than one
    # full-sized segment's worth, nor for out-of-order data.
    delayed_ack: float = 0.0


# Which deadline ``_timer_at`` is.
_NO_TIMER = 0
_ACCEPT = 1  # accept_timeout of a held SYN
_RTX = 2  # retransmission timer (RFC 6298)
_PERSIST = 3  # zero-window probe (RFC 9293 3.8.6.1)
_TIME_WAIT = 4  # TIME-WAIT expiry (RFC 9293 3.10.8)
_PROBE = 5  # tail loss probe (RFC 8985 7), ahead of the retransmission timer

# Loss recovery phases.
_OPEN = 0
_FAST = 1  # fast retransmit / fast recovery (RFC 5681 3.2, RFC 6582, RFC 6675 5)
_LOSS = 2  # after a retransmission timeout (RFC 5681 3.1, RFC 6298 5)

_DUP_THRESH = 3  # RFC 5681 3.2
_MAX_REORDER_SEGMENTS = 300  # cap of the adaptive reordering threshold (Linux: tcp_max_reordering)
_RTX_LOG_LIMIT = 256  # retransmissions remembered per episode, to match D-SACKs against
_BETA = 0.7  # multiplicative decrease (RFC 9438 4.6: CUBIC's 0.7; Reno's is 0.5)
_DEFAULT_MSS = 536  # RFC 9293 3.7.1: the peer sent no MSS option
_TS_OPTION_LEN = 12  # NOP NOP TS(10), on every segment once timestamps are in use
_INFINITE = 1 << 62
_PAWS_SLACK = 1000  # peer TSval ticks (1 s with Linux's 1 ms clock)
_PTO_MIN = 0.01  # RFC 8985 7.2 (Linux: 10 ms)
_DELACK_ALLOWANCE = 0.04  # a lone segment may wait for the peer's delayed ACK (Linux: 40 ms)


def _count(counters: dict[str, int], key: str) -> None:
    counters[key] = counters.get(key, 0) + 1


class TcpEndpoint:
    """The passive side of one TCP connection. See the module docstring."""

    __slots__ = (
        "_ack_pending",
        "_adv_edge",
        "_board",
        "_buf",
        "_close_requested",
        "_counters",
        "_cwnd",
        "_delack_at",
        "_done",
        "_dsack",
        "_dup_bytes",
        "_dupacks",
        "_events",
        "_fin_off",
        "_force_rtx",
        "_half_close_pending",
        "_held",
        "_held_bytes",
        "_irs",
        "_iss",
        "_last_ack_sent",
        "_local_port",
        "_max_snd_wnd",
        "_ooo",
        "_paused",
        "_peer_fin_delivered",
        "_peer_fin_off",
        "_persist_backoff",
        "_probe_pending",
        "_probe_sent",
        "_probes",
        "_rcv_cap",
        "_rcv_nxt",
        "_rcv_shift",
        "_recover",
        "_recovery",
        "_remote_port",
        "_reo_thresh",
        "_retries",
        "_rst",
        "_rtt",
        "_rtt_off",
        "_rtt_time",
        "_rtx_by_time",
        "_rtx_limit",
        "_rtx_log",
        "_rtx_mark",
        "_rtx_next",
        "_sack_ok",
        "_snd_max",
        "_snd_shift",
        "_snd_una",
        "_snd_wnd",
        "_ssthresh",
        "_synack_pending",
        "_timer_at",
        "_timer_kind",
        "_tlp_high",
        "_tlp_new",
        "_ts_base",
        "_ts_ok",
        "_ts_recent",
        "_undo_cwnd",
        "_undo_retrans",
        "_undo_ssthresh",
        "_wl1",
        "_wl2",
        "_writable_wanted",
        "_ws_ok",
        "accepted",
        "config",
        "effective_mss",
        "flow",
        "state",
    )

    def __init__(
        self,
        flow: int,
        config: TcpConfig,
        syn: TcpRepr,
        now: float,
        iss: int,
        events: collections.deque[Event],
        counters: dict[str, int],
    ) -> None:
        self.flow = flow
        self.config = config
        self._events = events
        self._counters = counters
        self.state = TcpState.SYN_RECEIVED
        self.accepted = False  # SYN-ACK released by accept()
        self._done = False  # the final event was emitted, or the application asked for none
        self._local_port = syn.dst_port
        self._remote_port = syn.src_port

        # -- the peer's SYN and its options (RFC 9293 3.10.7.2, RFC 7323 2.2, RFC 2018 2)
        self._irs = syn.seq
        self._rcv_nxt = 0
        self._last_ack_sent = 0
        self._sack_ok = syn.sack_permitted
        self._ts_ok = syn.timestamp is not None
        self._ts_recent = syn.timestamp[0] if syn.timestamp is not None else 0
        self._ts_base = iss  # our TSval clock starts at an unpredictable point (RFC 7323 5.4)
        self._ws_ok = syn.window_scale is not None
        if syn.window_scale is not None:
            self._snd_shift = min(syn.window_scale, 14)  # RFC 7323 2.3
            shift = 0
            while shift < 14 and config.receive_window >> shift > 0xFFFF:
                shift += 1
            self._rcv_shift = shift
        else:
            self._snd_shift = 0
            self._rcv_shift = 0
        self._rcv_cap = min(config.receive_window, 0xFFFF << self._rcv_shift)
        self._adv_edge = 0
        peer_mss = syn.mss if syn.mss else _DEFAULT_MSS
        # RFC 9293 3.7.1: the payload per packet is the MSS minus the options we always send.
        eff = min(config.mss, peer_mss) - (_TS_OPTION_LEN if self._ts_ok else 0)
        self.effective_mss = max(eff, 32)

        # -- send side
        self._iss = iss
        self._snd_una = -1  # the SYN is unacknowledged
        self._snd_max = -1  # nothing sent yet; 0 once the SYN-ACK left
        self._snd_wnd = syn.window  # RFC 7323 2.2: the window of a SYN is never scaled
        self._max_snd_wnd = syn.window
        self._wl1 = -1
        self._wl2 = -1
        self._buf: SendBuffer | None = None
        self._fin_off: int | None = None
        self._close_requested = False
        self._writable_wanted = False

        # -- congestion control and loss recovery
        self._cwnd = max(config.initial_window, 2 * self.effective_mss)
        self._ssthresh = _INFINITE
        self._recovery = _OPEN
        self._recover = -1
        self._dupacks = 0
        self._dup_bytes = 0
        self._board: Scoreboard | None = None
        self._rtx_next = 0
        self._rtx_limit = 0
        self._rtx_mark = 0
        self._force_rtx = False
        # Reordering tolerance (RFC 6675 DupThresh in bytes), raised when D-SACKs show that
        # a retransmission was spurious (RFC 3708), together with the state to undo the
        # congestion response of such an episode (RFC 4015 style).
        self._reo_thresh = (_DUP_THRESH - 1) * self.effective_mss
        # (start, end, SACKed bytes above it then, or -1 when declared lost by a timer)
        # of each retransmission in the episode.
        self._rtx_log: list[tuple[int, int, int]] | None = None
        self._rtx_by_time = False  # the range deemed lost was set by a timer, not by SACKs
        self._undo_cwnd = 0
        self._undo_ssthresh = 0
        self._undo_retrans = 0
        self._rtt = RttEstimator(config.min_rto, config.max_rto)
        self._rtt_off: int | None = None
        self._rtt_time = 0.0
        self._retries = 0
        self._probe_sent = False  # a tail loss probe went out since the last new ACK
        self._tlp_high: int | None = None  # SND.MAX when that probe was sent
        self._tlp_new = False  # the probe is new data: one segment beyond cwnd
        self._probes = 0  # zero-window probes without any answer
        self._persist_backoff = 0  # reset when the window opens

        # -- receive side
        self._ooo: Reassembly | None = None
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        self._paused = False
        self._peer_fin_off: int | None = None
        self._half_close_pending = False
        self._peer_fin_delivered = False
        self._dsack: tuple[int, int] | None = None  # a duplicate to report once

        # -- output flags
        self._ack_pending = False
        self._delack_at: float | None = None  # a delayed ACK is due then (RFC 9293 3.8.6.3)
        self._synack_pending = False
        self._probe_pending = False
        self._rst: tuple[TcpRepr, ...] = ()  # the last segments: one or two RSTs

        self._timer_at: float | None = now + config.accept_timeout
        self._timer_kind = _ACCEPT

    # ------------------------------------------------------------------ queries

    @property
    def closed(self) -> bool:
        """Nothing more will happen: CLOSED and the final event (if any) emitted.

        The stack drops the endpoint once this is true and ``segments_to_send``
        returned what was still queued (a last RST or ACK).
        """
        return self.state is TcpState.CLOSED and self._done

    def get_timer(self) -> float | None:
        delack = self._delack_at
        if delack is not None:
            at = self._timer_at
            return delack if at is None or delack < at else at
        return self._timer_at

    def accepts_new_syn(self, syn: TcpRepr) -> bool:
        """True when ``syn`` (a SYN without ACK for this 4-tuple) may start a new
        connection in place of this one: we are in TIME-WAIT, the application has had
        the final event, and the SYN is above everything of the old connection
        (RFC 9293 3.10.7.4 TIME-WAIT note, RFC 6191). The stack then drops this
        endpoint and opens a new flow instead of feeding the SYN here (which would
        only get a challenge ACK and cost the peer a SYN retransmission)."""
        if self.state is not TcpState.TIME_WAIT or not self._done:
            return False
        return delta(syn.seq, (self._irs + 1 + self._rcv_nxt) & MASK) >= 0

    def send_buffer_free(self) -> int:
        used = len(self._buf) if self._buf is not None else 0
        free = self.config.send_buffer - used
        if free <= 0:
            self._writable_wanted = True
            return 0
        return free

    # ------------------------------------------------------------------ commands

    def accept(self, now: float) -> None:
        """Release the SYN-ACK (RFC 9293 3.10.7.2: LISTEN, rcv SYN, snd SYN,ACK)."""
        if self.accepted or self.state is not TcpState.SYN_RECEIVED:
            return
        self.accepted = True
        self._synack_pending = True
        self._timer_at = None  # the retransmission timer starts when the SYN-ACK leaves
        self._timer_kind = _NO_TIMER

    def refuse(self, now: float) -> None:
        """Answer the held SYN with RST (RFC 9293 3.10.7.1 form: <SEQ=0><ACK=SYN+1><RST,ACK>)."""
        if self.accepted:
            self.abort(now)
            return
        if self.state is TcpState.CLOSED:
            return
        self._rst = (self._syn_reset(),)
        self._done = True  # the application asked: no final event
        self._close(TcpEvent.ABORT)

    def abort(self, now: float) -> None:
        """RFC 9293 3.10.5: send RST, forget everything, report nothing."""
        state = self.state
        if state is TcpState.CLOSED:
            self._done = True
            return
        if not self.accepted:
            self._rst = (self._syn_reset(),)
        elif state is not TcpState.TIME_WAIT:
            self._rst = self._resets()
        self._done = True
        self._close(TcpEvent.ABORT)

    def send(self, data: bytes, now: float) -> None:
        """Queue ``data`` (never refused; see ``send_buffer_free``)."""
        if self._fin_off is not None or self._close_requested or self._done:
            return  # after shutdown_write or the end of the flow: nowhere to go
        if self.state is TcpState.CLOSED:
            return
        if not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse its buffer; this is the one copy
        buf = self._buf
        if buf is None:
            buf = self._buf = SendBuffer()
        buf.append(data)
        if len(buf) >= self.config.send_buffer:
            self._writable_wanted = True

    def shutdown_write(self, now: float) -> None:
        """Queue a FIN after the data (RFC 9293 3.10.4 CLOSE)."""
        if self._fin_off is not None or self._close_requested or self._done:
            return
        state = self.state
        if state is TcpState.SYN_RECEIVED:
            # RFC 9293 3.10.4: queued until ESTABLISHED.
            self._close_requested = True
        elif state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            self._queue_fin()

    def pause_receiving(self) -> None:
        self._paused = True

    def resume_receiving(self, now: float) -> None:
        """Deliver what was held, then advertise the reopened window."""
        if not self._paused:
            return
        self._paused = False
        held = self._held
        if held:
            for data in held:
                self._events.append(DataReceived(self.flow, data))
            freed = self._held_bytes
            self._held = None
            self._held_bytes = 0
            # A window update (RFC 9293 3.8.6.2.2) once the window grows by
            # min(RCV.BUFF / 2, MSS): a few held bytes (a request held while the upstream
            # connects) are not worth a segment of their own.
            if self.state in RECEIVING and freed >= min(self._rcv_cap // 2, self.effective_mss):
                self._ack_pending = True
        if self._half_close_pending:
            self._deliver_half_close()

    # ------------------------------------------------------------------ timers

    def handle_timer(self, now: float) -> None:
        delack = self._delack_at
        if delack is not None and now >= delack:
            self._delack_at = None
            self._ack_pending = True
        at = self._timer_at
        if at is None or now < at:
            return
        kind = self._timer_kind
        self._timer_at = None
        self._timer_kind = _NO_TIMER
        if kind == _ACCEPT:
            if not self.accepted and self.state is TcpState.SYN_RECEIVED:
                self._rst = (self._syn_reset(),)
                self._finish(FlowReset(self.flow, "accept-timeout"))
                self._close(TcpEvent.TIMEOUT)
        elif kind == _RTX:
            self._on_retransmission_timeout(now)
        elif kind == _PROBE:
            self._on_probe_timeout(now)
        elif kind == _PERSIST:
            self._on_persist_timeout(now)
        elif kind == _TIME_WAIT:
            if self._done:
                self._close(TcpEvent.TIME_WAIT_TIMEOUT)
            else:
                # Data or the FIN are still held for a paused application: stay until
                # it has them (the final event must follow them).
                self._arm(_TIME_WAIT, now + self.config.time_wait)

    def _arm(self, kind: int, at: float) -> None:
        self._timer_kind = kind
        self._timer_at = at

    def _disarm(self, kind: int) -> None:
        if self._timer_kind == kind:
            self._timer_kind = _NO_TIMER
            self._timer_at = None

    def _on_retransmission_timeout(self, now: float) -> None:
        """RFC 6298 5.4-5.7, RFC 5681 3.1 (loss window), RFC 2018 8 (forget SACK info)."""
        state = self.state
        if state is TcpState.SYN_RECEIVED:
            self._retries += 1
            if self._retries > self.config.syn_retries:
                self._give_up()
                return
            self._count("tcp.retransmits")
            self._rtt.backoff()
            self._rtt_off = None  # Karn: no sample from a retransmitted SYN-ACK
            self._synack_pending = True
            return
        una = self._snd_una
        snd_max = self._snd_max
        if una >= snd_max or state is TcpState.CLOSED:
            return
        if self._snd_wnd == 0:
            # The peer closed its window with data outstanding: our retransmissions are
            # window probes, and a peer that keeps answering them is alive (RFC 9293
            # 3.8.6.1; Linux tcp_retransmit_timer does the same).
            self._probes += 1
            if self._probes > self.config.max_retries:
                self._give_up()
                return
        else:
            self._retries += 1
            if self._retries > self.config.max_retries:
                self._give_up()
                return
        self._count("tcp.rto")
        mss = self.effective_mss
        if self._retries == 1:
            self._start_episode()
            # RFC 5681 (4): ssthresh from the flight, once per episode (held on repeats).
            self._ssthresh = max((snd_max - una) // 2, 2 * mss)
        self._cwnd = mss
        self._recovery = _LOSS
        self._recover = snd_max
        self._dupacks = 0
        self._dup_bytes = 0
        if self._board is not None and self._retries > 1:
            # RFC 2018 8 asks to forget SACK information after a timeout, in case the
            # receiver reneged. That is rare (Linux prunes its out-of-order queue only
            # under memory pressure), so the first timeout keeps it and resends only the
            # holes; a second one in a row forgets it.
            self._board.clear()
        self._rtx_next = una
        self._rtx_limit = snd_max
        self._rtx_mark = snd_max
        self._rtx_by_time = True
        self._force_rtx = True
        self._tlp_high = None
        self._rtt.backoff()
        self._rtt_off = None
        self._arm(_RTX, now + self._rtt.rto)

    def _arm_loss_timer(self, now: float) -> None:
        """Data is outstanding: a tail loss probe first (RFC 8985 7.2: PTO = 2*SRTT),
        then the retransmission timer (RFC 6298 5)."""
        rto = self._rtt.rto
        srtt = self._rtt.srtt
        if srtt is not None and not self._probe_sent:
            pto = max(2 * srtt, _PTO_MIN)
            if self._snd_max - self._snd_una <= self.effective_mss:
                pto += _DELACK_ALLOWANCE
            if pto < rto:
                self._arm(_PROBE, now + pto)
                return
        self._arm(_RTX, now + rto)

    def _on_probe_timeout(self, now: float) -> None:
        """RFC 8985 7.3: nothing heard for two round trips with data outstanding.

        Outside recovery, send one probe segment (new data if the window allows, else
        the last segment again) so that a lost tail is SACK-detected instead of waiting
        for the retransmission timer. In recovery, the retransmissions themselves went
        unanswered for two round trips: deem them lost and start the holes over (the
        time-based half of RACK, RFC 8985 6.2).
        """
        una = self._snd_una
        snd_max = self._snd_max
        if una >= snd_max or una < 0 or self.state is TcpState.CLOSED:
            return
        self._probe_sent = True
        self._count("tcp.tail_loss_probes")
        board = self._board
        if self._recovery != _OPEN:
            self._rtx_next = una
            self._rtx_mark = snd_max
            if board and board.highest > self._rtx_limit:
                self._rtx_limit = board.highest  # every hole below SACKed data, by time
            self._rtx_by_time = True
            self._force_rtx = True
        elif board:
            # Two round trips without news while the peer holds data above a hole: the
            # hole is lost whatever the reordering threshold says (RACK, RFC 8985 6.2).
            self._enter_recovery(board.highest)
            self._rtx_by_time = True
        else:
            self._tlp_high = snd_max
            data_end = self._buf.end if self._buf is not None else 0
            if snd_max < data_end and una + self._snd_wnd > snd_max:
                self._tlp_new = True
            else:
                self._rtx_next = max(una, snd_max - self.effective_mss)
                self._rtx_limit = snd_max
                self._force_rtx = True
        self._arm(_RTX, now + self._rtt.rto)

    def _on_persist_timeout(self, now: float) -> None:
        """RFC 9293 3.8.6.1: probe a zero window, backing off, while data waits."""
        if self.state is TcpState.CLOSED or self._snd_wnd > 0 or self._snd_una < self._snd_max:
            return
        self._probes += 1
        if self._probes > self.config.max_retries:
            self._give_up()
            return
        self._count("tcp.window_probes")
        self._probe_pending = True
        if self._persist_backoff < 16:
            self._persist_backoff += 1
        interval = min(self._rtt.rto * (1 << self._persist_backoff), self.config.max_rto)
        self._arm(_PERSIST, now + interval)

    def evict(self, now: float) -> None:
        """Give up an unanswered handshake to make room for another (the stack's half-open
        limit): RST, and ``FlowReset(reason="half-open-evicted")`` so the owner lets go
        of its upstream."""
        if self.state is TcpState.SYN_RECEIVED and not self.closed:
            self._give_up("half-open-evicted")

    def _give_up(self, reason: str = "retransmit-timeout") -> None:
        """RFC 9293 3.8.3 (R2 exceeded): reset the connection and tell the application."""
        if self.accepted:
            self._rst = self._resets()
        self._finish(FlowReset(self.flow, reason))
        self._close(TcpEvent.TIMEOUT)

    # ------------------------------------------------------------------ input

    def receive_segment(self, seg: TcpRepr, payload: memoryview, now: float) -> None:
        """RFC 9293 3.10.7.4 "SEGMENT ARRIVES", otherwise (synchronized) states."""
        state = self.state
        if state is TcpState.CLOSED:
            return
        flags = seg.flags
        if not self.accepted:
            # Held SYN: duplicates of it are absorbed. Only a RST exactly at RCV.NXT counts
            # (the local application gave up): nothing else can be valid before our SYN-ACK.
            if flags & RST and seg.seq == (self._irs + 1) & MASK:
                self._reset_by_peer()
            return

        rcv_nxt = self._rcv_nxt
        rel = delta(seg.seq, (self._irs + 1 + rcv_nxt) & MASK)
        ts = seg.timestamp
        # RFC 7323 5.3 (PAWS, without the idle-time rule): a much older TSval is an old
        # duplicate from a previous trip around the sequence space. "Much": _PAWS_SLACK
        # ticks, not Linux's one, so that reordering by a few ms costs no retransmission
        # (a wrapped duplicate is at least 2**31 bytes, i.e. seconds, old).
        if (
            ts is not None
            and self._ts_ok
            and not flags & RST
            and delta(ts[0], self._ts_recent) < -_PAWS_SLACK
            # A reordered pure ACK is harmless (its ACK and window checks protect us) and
            # its SACK blocks are useful: only text, FIN and SYN are subject to PAWS.
            and (len(payload) or flags & (FIN | SYN))
        ):
            self._count("tcp.paws_drops")
            self._ack_pending = True
            return
        if flags & SYN:
            if state is TcpState.SYN_RECEIVED and seg.seq == self._irs and not flags & ACK:
                # RFC 9293 3.8.1: our SYN-ACK was lost; the peer retransmitted its SYN.
                self._synack_pending = True
                return
            # RFC 5961 4.2: a SYN in a synchronized state gets a challenge ACK.
            self._challenge_ack()
            return

        plen = len(payload)
        seg_len = plen + (1 if flags & FIN else 0)
        wnd = self._adv_edge - rcv_nxt
        if wnd < 0:
            wnd = 0
        # RFC 9293 3.10.7.4 first check: the segment acceptability test.
        if seg_len == 0:
            acceptable = rel == 0 if wnd == 0 else 0 <= rel < wnd
        else:
            acceptable = wnd > 0 and rel < wnd and rel + seg_len > 0
        if not acceptable:
            if flags & RST:
                return  # RFC 5961 3.2: out-of-window RST, silently dropped
            self._ack_pending = True
            if plen and rel < 0 and rel + plen <= 0 and self._sack_ok:
                # Entirely old data: tell the sender its retransmission was not needed
                # (RFC 2883 D-SACK; Linux uses it to learn about reordering).
                self._dsack = (rcv_nxt + rel, rcv_nxt + rel + plen)
            if state is TcpState.TIME_WAIT and flags & FIN:
                # RFC 9293 3.10.7.4: a retransmitted FIN restarts the TIME-WAIT timeout.
                self._arm(_TIME_WAIT, now + self.config.time_wait)
            if wnd == 0 and rel == 0 and flags & ACK:
                # "Special allowance ... to accept valid ACKs" with a zero receive window.
                self._receive_ack(seg, rel, 0, now)
            return
        if flags & RST:
            if rel == 0:
                self._reset_by_peer()  # RFC 5961 3.2: exactly RCV.NXT
            else:
                self._challenge_ack()  # in the window but not exact
            return
        if not flags & ACK:
            return  # RFC 9293 3.10.7.4 fifth check: drop segments without ACK
        if (
            ts is not None
            and self._ts_ok
            and rel <= self._last_ack_sent - rcv_nxt
            and delta(ts[0], self._ts_recent) > 0
        ):
            # RFC 7323 4.3: remember the newest TSval of the segment our next ACK covers.
            self._ts_recent = ts[0]
        if not self._receive_ack(seg, rel, plen, now):
            return
        if self.state in RECEIVING and seg_len:
            self._receive_text(seg, payload, rel, now)

    def _challenge_ack(self) -> None:
        self._count("tcp.challenge_acks")
        self._ack_pending = True

    def _reset_by_peer(self) -> None:
        """RFC 9293 3.10.7.4 second check: a valid RST ends the connection."""
        self._finish(FlowReset(self.flow, "reset-by-peer"))
        self._close(TcpEvent.RCV_RST)

    def _receive_ack(self, seg: TcpRepr, rel: int, plen: int, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth check. False when the rest of the segment is to be dropped."""
        una = self._snd_una
        ack_off = unwrap(seg.ack, (self._iss + 1 + una) & MASK, una)
        snd_max = self._snd_max
        seg_off = self._rcv_nxt + rel
        if self.state is TcpState.SYN_RECEIVED:
            if ack_off != 0 or snd_max < 0:
                return False  # not the ACK of our SYN
            self._snd_una = 0
            self._state(TcpEvent.RCV_ACK_OF_SYN)
            self._snd_wnd = seg.window << self._snd_shift
            self._max_snd_wnd = max(self._max_snd_wnd, self._snd_wnd)
            self._wl1 = seg_off
            self._wl2 = 0
            self._rtt_sample(seg, 0, now)
            self._retries = 0
            self._rtt.reset_backoff()
            self._disarm(_RTX)
            if self._close_requested:
                self._close_requested = False
                self._queue_fin()
            return True
        if ack_off > snd_max:
            self._ack_pending = True  # RFC 9293: ACK of something never sent
            return False
        if ack_off < una:
            return True  # an old duplicate ACK: ignore it, keep the text
        self._probes = 0
        # RFC 9293 3.10.7.4: update the send window only from newer segments (SND.WL1/WL2),
        # and, like Linux (tcp_may_update_window), from any ACK that moves SND.UNA: the
        # window is relative to that ACK, and a peer's retransmission of its own old data
        # carries its newest ACK and window. Kept, the old window would slide right with
        # SND.UNA and our data would overrun a window the peer has long since closed.
        window_changed = False
        if (
            ack_off > una
            or self._wl1 < seg_off
            or (self._wl1 == seg_off and self._wl2 <= ack_off)
        ):
            wnd = seg.window << self._snd_shift
            if wnd != self._snd_wnd:
                window_changed = True
                self._snd_wnd = wnd
                if wnd:
                    self._persist_backoff = 0
                if wnd > self._max_snd_wnd:
                    self._max_snd_wnd = wnd
            self._wl1 = seg_off
            self._wl2 = ack_off
        new_sack = False
        if seg.sack_blocks and self._sack_ok:
            # (Even with nothing outstanding: a D-SACK may report a spurious retransmission.)
            new_sack = self._receive_sack(seg.sack_blocks, ack_off)
        if ack_off > una:
            self._on_new_ack(ack_off, seg, now)
        else:
            if (
                una < snd_max
                and plen == 0
                and not seg.flags & FIN
                and (not window_changed or new_sack)
            ):
                # RFC 5681 2 "duplicate acknowledgment" (RFC 6675: or one with new SACK).
                self._dupacks += 1
                if self._recovery == _FAST and not self._sack_ok:
                    self._dup_bytes += self.effective_mss  # RFC 6582 3.2 step 3: inflate
            if new_sack and self._timer_kind == _PROBE:
                # News from the peer: the probe waits for two round trips of silence.
                self._arm_loss_timer(now)
        if self._snd_una < self._snd_max:
            self._detect_loss()
        return True

    def _receive_sack(self, blocks: tuple[tuple[int, int], ...], ack_off: int) -> bool:
        board = self._board
        if board is None:
            board = self._board = Scoreboard()
        ref_seq = (self._iss + 1 + ack_off) & MASK
        snd_max = self._snd_max
        new = False
        for i, (left, right) in enumerate(blocks):
            lo = unwrap(left, ref_seq, ack_off)
            hi = lo + delta(right, left)
            if i == 0 and lo < hi and (
                hi <= ack_off
                or (len(blocks) > 1 and self._contains(blocks[1], left, right))
            ):
                # RFC 2883: a first block below the cumulative ACK, or inside the second
                # block, reports a duplicate the peer received (a D-SACK).
                self._on_dsack(lo, hi)
                continue
            # RFC 6675: ignore blocks that report data never sent.
            if ack_off < lo < hi <= snd_max and board.add(lo, hi):
                new = True
        return new

    @staticmethod
    def _contains(block: tuple[int, int], left: int, right: int) -> bool:
        return delta(left, block[0]) >= 0 and delta(block[1], right) >= 0

    def _on_dsack(self, lo: int, hi: int) -> None:
        """RFC 3708: a D-SACK for one of our retransmissions shows it was spurious
        (reordering, not loss): tolerate more reordering, and once every retransmission
        of the episode proved spurious, undo its congestion response (RFC 4015)."""
        self._count("tcp.dsacks")
        log = self._rtx_log
        if not log:
            return
        for i, entry in enumerate(log):
            if entry[0] < hi and lo < entry[1]:
                above = log.pop(i)[2]
                break
        else:
            return  # a duplicate made by the network, not by us
        self._count("tcp.spurious_retransmits")
        # The original arrived although ``above`` bytes beyond it had been SACKed when we
        # called it lost: reordering is at least that deep (Linux tcp_check_sack_reordering).
        # A timer's verdict says nothing about depth.
        mss = self.effective_mss
        if above >= self._reo_thresh:
            self._reo_thresh = min(above + mss, _MAX_REORDER_SEGMENTS * mss)
        self._undo_retrans -= 1
        if self._undo_retrans <= 0 and self._undo_cwnd:
            self._count("tcp.undo")
            self._cwnd = max(self._cwnd, self._undo_cwnd)
            self._ssthresh = max(self._ssthresh, self._undo_ssthresh)
            self._undo_cwnd = 0
            if self._recovery == _FAST:
                self._recovery = _OPEN
                self._rtx_next = self._rtx_limit = self._snd_una

    def _start_episode(self) -> None:
        """Remember what a loss response changes, in case D-SACKs prove it spurious."""
        self._undo_cwnd = self._cwnd
        self._undo_ssthresh = self._ssthresh
        self._undo_retrans = 0
        self._rtx_log = []

    def _on_new_ack(self, ack_off: int, seg: TcpRepr, now: float) -> None:
        una = self._snd_una
        acked = ack_off - una
        self._snd_una = ack_off
        buf = self._buf
        if buf is not None:
            buf.release(ack_off)
        board = self._board
        if board is not None:
            board.ack(ack_off)
        self._retries = 0
        self._probe_sent = False
        if self._tlp_high is not None and ack_off >= self._tlp_high:
            self._tlp_high = None
        self._rtt.reset_backoff()
        self._rtt_sample(seg, ack_off, now)
        mss = self.effective_mss
        recovery = self._recovery
        if recovery != _OPEN and ack_off >= self._recover:
            # RFC 6582 3.2 step 3 (full acknowledgment): recovery is over.
            if recovery == _FAST:
                self._cwnd = self._ssthresh
            self._recovery = _OPEN
            self._dup_bytes = 0
        elif recovery == _FAST:
            # Partial acknowledgment (RFC 6582 3.2 step 4): the next hole is lost too.
            if not self._sack_ok:
                self._rtx_next = ack_off
                self._rtx_limit = min(ack_off + mss, self._snd_max)
                self._force_rtx = True
                self._dup_bytes = 0
        else:
            # RFC 5681 3.1: slow start below ssthresh, then about one MSS per RTT.
            # Byte counting (RFC 3465) with no per-ACK limit: the peer is local.
            cwnd = self._cwnd
            if cwnd < self._ssthresh:
                cwnd += acked
            else:
                cwnd += max(1, mss * acked // cwnd)
            self._cwnd = min(cwnd, 4 * max(self.config.send_buffer, self._max_snd_wnd))
        self._dupacks = 0
        if self._rtx_next < ack_off:
            self._rtx_next = ack_off
        if self._rtx_limit < ack_off:
            self._rtx_limit = ack_off
        fin_off = self._fin_off
        if fin_off is not None and una <= fin_off < ack_off:
            self._state(TcpEvent.RCV_ACK_OF_FIN)
            if self.state is TcpState.TIME_WAIT:
                self._arm(_TIME_WAIT, now + self.config.time_wait)
            self._maybe_closed()
        # RFC 6298 5.2 / 5.3: restart the timer for what is still outstanding.
        if self.state is not TcpState.CLOSED and self._timer_kind != _TIME_WAIT:
            if ack_off < self._snd_max:
                self._arm_loss_timer(now)
            else:
                self._disarm(_RTX)
                self._disarm(_PROBE)
        if (
            self._writable_wanted
            and self._fin_off is None  # after shutdown_write nobody is waiting to write
            and self._buf is not None
            and len(self._buf) <= self.config.send_buffer // 2
        ):
            self._writable_wanted = False
            self._events.append(FlowWritable(self.flow))

    def _rtt_sample(self, seg: TcpRepr, ack_off: int, now: float) -> None:
        """RFC 6298 3: one timed segment at a time, never a retransmitted one (Karn).

        Timestamps (RFC 7323 4) are not used for RTTM: our TSval clock is coarse on
        purpose (see ``_ts_now``), and a timed segment per round trip is enough for
        the RTO and the probe timeout.
        """
        if self._rtt_off is not None and ack_off >= self._rtt_off:
            self._rtt.sample(now - self._rtt_time)
            self._rtt_off = None

    def _detect_loss(self) -> None:
        """Enter fast recovery (RFC 5681 3.2, RFC 6675 5) or extend the range deemed lost."""
        board = self._board
        una = self._snd_una
        if self._recovery == _OPEN:
            if una < self._recover:
                return  # RFC 6582 4.1: dupacks for data sent before the last timeout
            lost = board.lost_limit(self._reo_thresh) if board else None
            if lost is None:
                if board and self._tlp_high is not None:
                    # After a tail loss probe, any hole the peer reports is a loss
                    # (RFC 8985 7.4).
                    self._enter_recovery(board.highest)
                    self._rtx_by_time = True
                    return
                elif self._sack_ok or self._dupacks < _DUP_THRESH:
                    return
            self._enter_recovery(lost)
            return
        if not board:
            return
        highest = board.highest
        lost = board.lost_limit(self._reo_thresh)
        if lost is not None and lost > self._rtx_limit:
            self._rtx_limit = lost
            self._rtx_by_time = False
        if (
            self._rtx_next < self._rtx_limit
            and board.next_hole(self._rtx_next, self._rtx_limit) is None
        ):
            self._rtx_next = self._rtx_limit  # every hole has been retransmitted
        if (
            self._rtx_next >= self._rtx_limit
            and highest > self._rtx_mark + self._reo_thresh
            and board.next_hole(una, self._rtx_mark) is not None
        ):
            # Data sent after our last retransmission has been SACKed while a hole below
            # that retransmission remains: the retransmission was lost too. Go again.
            self._count("tcp.lost_retransmits")
            self._rtx_next = una
            self._rtx_mark = self._snd_max

    def _enter_recovery(self, lost: int | None) -> None:
        """RFC 6675 5 / RFC 6582 3.2: fast retransmit, then recovery until SND.MAX now.

        ``lost``: un-SACKed data below it is deemed lost (None without SACK: only the
        first segment, NewReno style)."""
        self._count("tcp.fast_retransmits")
        una = self._snd_una
        snd_max = self._snd_max
        mss = self.effective_mss
        self._start_episode()
        self._rtx_by_time = False
        self._recovery = _FAST
        self._recover = snd_max
        self._ssthresh = max(int((snd_max - una) * _BETA), 2 * mss)
        self._cwnd = self._ssthresh
        self._rtx_next = una
        if lost is not None:
            self._rtx_limit = lost
        else:
            self._rtx_limit = min(una + mss, snd_max)
            self._dup_bytes = self._dupacks * mss  # RFC 6582 3.2 step 2 (cwnd + 3*SMSS)
        self._rtx_mark = snd_max
        self._force_rtx = True  # RFC 6675 5 step 4: the first one goes regardless of pipe
        self._rtt_off = None
        self._tlp_high = None

    def _receive_text(self, seg: TcpRepr, payload: memoryview, rel: int, now: float) -> None:
        """RFC 9293 3.10.7.4 seventh (text) and eighth (FIN) checks."""
        rcv_nxt = self._rcv_nxt
        start = rcv_nxt + rel
        data: bytes | memoryview = payload
        fin = bool(seg.flags & FIN)
        gap = bool(self._ooo)  # data beyond a hole was waiting: this may fill it
        if start < rcv_nxt:
            data = data[rcv_nxt - start :]
            start = rcv_nxt
        right = self._adv_edge
        if start + len(data) > right:
            # Beyond the window we advertised: trimmed (and the FIN with it).
            data = data[: max(right - start, 0)]
            fin = False
            self._count("tcp.beyond_window")
        if fin:
            self._peer_fin_off = start + len(data)
        if data:
            if start == rcv_nxt:
                self._deliver(bytes(data))
                rcv_nxt += len(data)
                ooo = self._ooo
                if ooo:
                    for block in ooo.pop_in_order(rcv_nxt):
                        self._deliver(block)
                        rcv_nxt += len(block)
                self._rcv_nxt = rcv_nxt
            else:
                ooo = self._ooo
                if ooo is None:
                    ooo = self._ooo = Reassembly()
                ooo.add(start, data)
                self._count("tcp.out_of_order")
        delay = self.config.delayed_ack
        if (
            delay
            and self._fin_off is None  # our FIN is out: nothing left for the ACK to ride on
            and not gap
            and not self._ooo
            and not self._ack_pending
            and self._rcv_nxt + (1 if fin else 0) - self._last_ack_sent < 2 * self.effective_mss
        ):
            # In order, no hole filled (RFC 5681 4.2 wants those ACKed at once), less than
            # two full segments unacknowledged: the ACK may wait for our reply (RFC 9293
            # 3.8.6.3), at most ``delay``.
            if self._delack_at is None:
                self._delack_at = now + delay
        else:
            self._ack_pending = True
        if self._peer_fin_off is not None and self._peer_fin_off == self._rcv_nxt:
            # The FIN, in order: it takes one sequence number (RFC 9293 3.10.7.4 eighth check).
            self._rcv_nxt += 1
            self._ooo = None
            self._state(TcpEvent.RCV_FIN)
            if self.state is TcpState.TIME_WAIT:
                self._arm(_TIME_WAIT, now + self.config.time_wait)
            self._half_close_pending = True
            if not self._held:
                self._deliver_half_close()

    def _deliver(self, data: bytes) -> None:
        if self._paused or self._held:
            held = self._held
            if held is None:
                held = self._held = []
            held.append(data)
            self._held_bytes += len(data)
        else:
            self._events.append(DataReceived(self.flow, data))

    def _deliver_half_close(self) -> None:
        self._half_close_pending = False
        self._peer_fin_delivered = True
        if not self._done:
            self._events.append(FlowHalfClosed(self.flow))
        self._maybe_closed()

    # ------------------------------------------------------------------ state changes

    def _state(self, event: TcpEvent) -> None:
        self.state = state = next_state(self.state, event)
        if state is TcpState.CLOSED:
            self._release()

    def _queue_fin(self) -> None:
        self._fin_off = self._buf.end if self._buf is not None else 0
        self._state(TcpEvent.CLOSE)

    def _maybe_closed(self) -> None:
        """Both FINs exchanged and acknowledged, and the application has seen the peer's."""
        if self._done or not self._peer_fin_delivered:
            return
        fin_off = self._fin_off
        if fin_off is None or self._snd_una <= fin_off:
            return
        self._finish(FlowClosed(self.flow, "closed"))

    def _finish(self, event: Event) -> None:
        if not self._done:
            self._done = True
            self._events.append(event)

    def _close(self, event: TcpEvent) -> None:
        """Enter CLOSED (anything but a last RST already queued is forgotten)."""
        self._state(event)

    def _release(self) -> None:
        """CLOSED: free the buffers and stop the timer. Data held for a paused application
        stays until it resumes (the final event must come after it)."""
        self._buf = None
        self._ooo = None
        self._board = None
        if self._done:
            self._held = None
            self._held_bytes = 0
        self._ack_pending = False
        self._delack_at = None
        self._synack_pending = False
        self._probe_pending = False
        self._timer_at = None
        self._timer_kind = _NO_TIMER

    def _count(self, key: str) -> None:
        counters = self._counters
        counters[key] = counters.get(key, 0) + 1

    # ------------------------------------------------------------------ output

    def _ts_now(self, now: float) -> int:
        """Our TSval: 10 ms per tick (RFC 7323 5.4 allows 1 ms to 1 s).

        The peer applies PAWS with one tick of slack (Linux TCP_PAWS_WINDOW): a 1 ms
        clock would make it drop any of our segments that a few milliseconds of
        reordering (a fault injector's jitter, a busy event loop) put behind a later one.
        """
        return (int(now * 100) + self._ts_base) & MASK

    def _window(self) -> int:
        """The raw window field: the free space, rounded down to the scale unit.

        The acceptance limit ``_adv_edge`` is the highest right edge ever advertised
        and never moves left (RFC 9293 3.8.6.2.2), so rounding down can only make
        the advertised window look up to 2**shift - 1 bytes smaller than what we
        still accept (RFC 7323 2.4); rounding up instead would let a trickling peer
        creep the edge past the memory bound.
        """
        wnd = self._rcv_cap - self._held_bytes
        if wnd <= 0:
            return 0
        shift = self._rcv_shift
        raw = wnd >> shift
        if raw > 0xFFFF:
            raw = 0xFFFF
        edge = self._rcv_nxt + (raw << shift)
        if edge > self._adv_edge:
            self._adv_edge = edge
        return raw

    def _make(
        self,
        flags: int,
        seq_off: int,
        now: float | None,
        with_ts: bool = True,
        sack: bool = False,
    ) -> TcpRepr:
        """Build one outgoing header at send offset ``seq_off`` carrying our current ACK."""
        rcv_nxt = self._rcv_nxt
        if flags & ACK:
            ack = (self._irs + 1 + rcv_nxt) & MASK
            window = self._window() if not flags & RST else 0
            self._last_ack_sent = rcv_nxt
            self._delack_at = None  # this segment carries the ACK a delayed one waited for
        else:
            ack = 0
            window = 0
        timestamp = None
        if with_ts and self._ts_ok and now is not None:
            timestamp = (self._ts_now(now), self._ts_recent)
        blocks: tuple[tuple[int, int], ...] = ()
        if sack:
            blocks = self._sack_blocks()
        return TcpRepr(
            self._local_port,
            self._remote_port,
            (self._iss + 1 + seq_off) & MASK,
            ack,
            flags,
            window,
            timestamp=timestamp,
            sack_blocks=blocks,
        )

    def _resets(self) -> tuple[TcpRepr, ...]:
        """The RST(s) that end a synchronized connection we abort (RFC 9293 3.10.5).

        The peer acts on a RST only at exactly its RCV.NXT (RFC 5961 3.2; one elsewhere
        in its window earns a challenge ACK, one outside it is dropped silently, and a
        zero window admits RCV.NXT alone, RFC 9293 3.10.7.4). Its RCV.NXT is somewhere
        in [SND.UNA, SND.MAX]: SND.UNA when what is in flight was lost or dropped (a
        closed window), SND.MAX when it all arrived. So SND.UNA first, then SND.MAX
        when they differ: whichever the peer has, one of the two is exact, the other
        falls below its window or lands after the connection is gone. (Between the two,
        the second earns a challenge ACK, which the stack answers for the forgotten
        4-tuple with <SEQ=SEG.ACK><RST>, exact again.) Linux sends one, at SND.NXT.
        Before the SYN-ACK is acknowledged (SND.UNA = -1) the peer is in SYN-SENT,
        where the ACK field alone decides, or has RCV.NXT = ISS+1 (offset 0)."""
        high = self._snd_max
        low = min(max(self._snd_una, 0), high)
        if low == high:
            return (self._make(RST | ACK, high, None, with_ts=False),)
        return (
            self._make(RST | ACK, low, None, with_ts=False),
            self._make(RST | ACK, high, None, with_ts=False),
        )

    def _syn_reset(self) -> TcpRepr:
        return TcpRepr(
            self._local_port, self._remote_port, 0, (self._irs + 1) & MASK, RST | ACK, 0
        )

    def _sack_blocks(self) -> tuple[tuple[int, int], ...]:
        """RFC 2883: a duplicate first (once). Then RFC 2018 4: the block holding the
        latest segment, then the blocks that led the previous SACK options (most recent
        first), then any others: so every block is reported again soon even when many
        holes are open and some of our ACKs are lost."""
        if not self._sack_ok:
            return ()
        limit = 3 if self._ts_ok else 4  # 40 bytes of options
        chosen: list[tuple[int, int]] = []
        if self._dsack is not None:
            chosen.append(self._dsack)
            self._dsack = None
        ooo = self._ooo
        if ooo:
            ranges = ooo.ranges()
            last_start, last_end = ooo.last_block
            first = next(
                (r for r in ranges if r[0] <= last_start and last_end <= r[1]), ranges[0]
            )
            chosen.append(first)
            history = ooo.sack_history
            for start in history:
                if len(chosen) >= limit:
                    break
                r = next((r for r in ranges if r[0] <= start < r[1]), None)
                if r is not None and r not in chosen:
                    chosen.append(r)
            for r in ranges:
                if len(chosen) >= limit:
                    break
                if r not in chosen:
                    chosen.append(r)
            # Remember which blocks led: the freshest first, a few of them.
            if first[0] in history:
                history.remove(first[0])
            history.insert(0, first[0])
            del history[limit:]
        base = self._irs + 1
        return tuple(((base + s) & MASK, (base + e) & MASK) for s, e in chosen)

    def segments_to_send(self, now: float) -> list[Segment]:
        """Everything due now: RST, SYN-ACK, data and FIN, ACK (with SACK), window probe."""
        out: list[Segment] = []
        if self._rst:
            out.extend((rst, b"") for rst in self._rst)
            self._rst = ()
            return out
        if not self.accepted or self.state is TcpState.CLOSED:
            return out
        if self._synack_pending:
            self._synack_pending = False
            self._ack_pending = False
            out.append((self._synack(now), b""))
            self._snd_max = 0
            if self._timer_kind != _RTX:
                self._arm(_RTX, now + self._rtt.rto)
                if self._retries == 0:
                    self._rtt_off = 0
                    self._rtt_time = now
            return out
        if self.state is TcpState.SYN_RECEIVED:
            return out
        sack_ack = (
            self._ack_pending and (bool(self._ooo) or self._dsack is not None) and self._sack_ok
        )
        if self._buf is not None or self._fin_off is not None:
            self._send_data(out, now)
        if self._probe_pending:
            self._probe_pending = False
            # Linux-style probe: an old sequence number, which the peer must answer with
            # an ACK carrying its current window (RFC 9293 3.8.6.1, 3.10.7.4).
            out.append((self._make(ACK, self._snd_una - 1, now), b""))
            self._ack_pending = False
        if self._ack_pending or sack_ack:
            # Data segments never carry SACK blocks: the GSO size (effective_mss) leaves no
            # room for them, so the SACK information goes on a pure ACK of its own.
            self._ack_pending = False
            out.append((self._make(ACK, self._ack_seq(), now, sack=sack_ack), b""))
        return out

    def _ack_seq(self) -> int:
        """The sequence offset of a pure ACK: SND.NXT, or the peer's window edge if lower.

        A peer that shrank its window (or a window we overran) drops a segment that
        starts beyond it, ACK field and all (RFC 9293 3.10.7.4), so the ACK would never
        count; Linux's tcp_acceptable_seq does the same.
        """
        return min(self._snd_max, self._snd_una + self._snd_wnd)

    def _synack(self, now: float) -> TcpRepr:
        """RFC 9293 3.10.7.2: <SEQ=ISS><ACK=RCV.NXT><CTL=SYN,ACK> with our options."""
        # RFC 7323 2.2: the window field of a SYN is not scaled.
        window = min(self._rcv_cap - self._held_bytes, 0xFFFF)
        self._adv_edge = max(self._adv_edge, window)
        self._last_ack_sent = 0
        return TcpRepr(
            self._local_port,
            self._remote_port,
            self._iss & MASK,
            (self._irs + 1) & MASK,
            SYN | ACK,
            window,
            mss=self.config.mss,
            window_scale=self._rcv_shift if self._ws_ok else None,
            sack_permitted=self._sack_ok,
            timestamp=(self._ts_now(now), self._ts_recent) if self._ts_ok else None,
        )

    def _pipe(self) -> int:
        """RFC 6675 4 "pipe": bytes sent, not SACKed, not deemed lost unless resent."""
        una = self._snd_una
        pipe = self._snd_max - una
        board = self._board
        if board is not None:
            pipe -= board.sacked
        rtx_next = self._rtx_next
        rtx_limit = self._rtx_limit
        if rtx_next < rtx_limit:
            lost = rtx_limit - rtx_next
            if board is not None:
                lost -= board.sacked_between(rtx_next, rtx_limit)
            pipe -= lost
        pipe -= self._dup_bytes
        return pipe if pipe > 0 else 0

    def _send_data(self, out: list[Segment], now: float) -> None:
        una = self._snd_una
        buf = self._buf
        data_end = buf.end if buf is not None else 0
        fin_off = self._fin_off
        mss = self.effective_mss
        # Read live: the stack may align config.max_payload to effective_mss after __init__.
        max_payload = self.config.max_payload
        max_seg = max_payload // mss * mss if max_payload > self.config.mss else mss
        if max_seg < mss:
            max_seg = mss
        cwnd = self._cwnd
        pipe = self._pipe()
        board = self._board

        # 1. Retransmissions of what is deemed lost (RFC 6675 NextSeg rule 1), cut to the
        # peer's window: a receiver drops a segment that ends beyond it whole (Linux since
        # 6.16 when its receive queue holds data), ACK field included.
        force = self._force_rtx
        self._force_rtx = False
        wnd_edge = una + self._snd_wnd
        while self._rtx_next < self._rtx_limit and (force or pipe < cwnd):
            start = self._rtx_next
            if board:
                hole = board.next_hole(start, self._rtx_limit)
                if hole is None:
                    self._rtx_next = self._rtx_limit
                    break
                start, stop = hole
            else:
                stop = self._rtx_limit
            if start < una:
                start = una
            data_stop = min(stop, data_end, start + max_seg, wnd_edge)
            fin = (
                fin_off is not None
                and data_stop == fin_off
                and stop > fin_off
                and fin_off < wnd_edge
            )
            if data_stop <= start and not fin:
                if start == una:
                    # The window is closed at SND.UNA: ask for it instead (an old sequence
                    # number, which any receiver answers with an ACK and its window).
                    self._probe_pending = True
                break
            self._emit(out, start, data_stop, fin, now)
            self._count("tcp.retransmits")
            self._rtt_off = None  # Karn (RFC 6298 3)
            seg_end = data_stop + (1 if fin else 0)
            log = self._rtx_log
            if log is not None and self._recovery != _OPEN:
                if len(log) < _RTX_LOG_LIMIT:
                    above = -1
                    if board and not self._rtx_by_time:
                        above = board.sacked - board.sacked_between(una, start)
                    log.append((start, seg_end, above))
                    self._undo_retrans += 1
                else:
                    self._undo_cwnd = 0  # too many to track: no undo for this episode
            self._rtx_next = seg_end
            self._rtx_mark = self._snd_max
            pipe += seg_end - start
            force = False
            if seg_end <= start:
                break  # nothing could be sent (defensive: never loop forever)

        # 2. New data within the peer's window and the congestion window.
        if una < 0:
            return
        if self._tlp_new:
            self._tlp_new = False
            cwnd = max(cwnd, pipe + mss)  # RFC 8985 7.3: the probe may exceed cwnd
        while True:
            nxt = self._snd_max
            if nxt < data_end:
                n = min(data_end - nxt, wnd_edge - nxt, cwnd - pipe, max_seg)
                if n <= 0:
                    break
                remaining = data_end - nxt
                if n < remaining:
                    # RFC 9293 3.8.6.2.1 (sender SWS avoidance): wait for a full segment
                    # unless nothing is in flight to bring the ACK that would open room.
                    if n < mss and nxt > una:
                        break
                    if n > mss:
                        n -= n % mss  # whole segments, so GSO leaves no runt in the middle
                fin = fin_off is not None and nxt + n == fin_off
                self._emit(out, nxt, nxt + n, fin, now)
                if self._rtt_off is None and self._recovery == _OPEN:
                    self._rtt_off = nxt + n
                    self._rtt_time = now
                pipe += n
                if fin:
                    break
            elif fin_off is not None and nxt == fin_off and wnd_edge > nxt:
                # The FIN alone. It needs a window too: Linux drops even a bare FIN at a
                # zero window, so a closed window is probed like data (RFC 9293 3.8.6.1).
                self._emit(out, nxt, nxt, True, now)
                break
            else:
                break

        # RFC 6298 5.1: the timer runs while anything is outstanding; otherwise the
        # persist timer runs while data waits for a zero window (RFC 9293 3.8.6.1).
        if self._snd_una < self._snd_max:
            if self._timer_kind != _RTX and self._timer_kind != _PROBE:
                self._arm_loss_timer(now)
        elif self._snd_wnd == 0 and (
            self._snd_max < data_end or (fin_off is not None and self._snd_max <= fin_off)
        ):
            if self._timer_kind != _PERSIST:
                self._arm(_PERSIST, now + self._rtt.rto)
        else:
            self._disarm(_RTX)
            self._disarm(_PROBE)
            self._disarm(_PERSIST)

    def _emit(self, out: list[Segment], start: int, stop: int, fin: bool, now: float) -> None:
        """One segment with data [start, stop) and maybe the FIN; advances SND.MAX."""
        buf = self._buf
        payload: bytes | memoryview = b""
        if stop > start and buf is not None:
            payload = buf.get(start, stop)
        flags = ACK
        if fin:
            flags |= FIN
        if payload and stop == (buf.end if buf is not None else 0):
            flags |= PSH
        out.append((self._make(flags, start, now), payload))
        self._ack_pending = False
        end = stop + (1 if fin else 0)
        if end > self._snd_max:
            self._snd_max = end
