"""The stack: IP packets in, IP packets + events + one timer out. Sans-I/O.

Nothing here reads a clock or a socket: every call that needs the time takes
``now`` (seconds, monotonic, float).

Driving loop (see ``tunproxy/driver.py``)::

    for data in packets_read_from_tun:
        stack.receive_packet(data, now)
    while (event := stack.next_event()) is not None:
        handle(event)            # may call stack.accept/send/... which queue packets
    write_all(stack.packets_to_send())
    rearm(stack.get_timer())     # at that time: stack.handle_timer(now), then as above

How it works:

- Input: virtio-net header (when ``vnet_hdr``), IPv4 or IPv6 (extension
  headers skipped), fragments of either reassembled by ``stack.reassembly``
  under one memory bound (IPv6 strictly: any overlap drops the datagram,
  RFC 5722), then TCP / UDP / ICMP. L4 checksums are verified unless the virtio
  header says NEEDS_CSUM or DATA_VALID. GSO super-packets: TCPV4/TCPV6 are one
  big segment; UDP_L4 is split into ``gso_size`` datagrams.
- TCP: demultiplexed by 4-tuple to a ``stack.tcp.TcpEndpoint``. A SYN to an
  unknown 4-tuple opens a flow (``FlowOpened``); any other segment gets the
  RFC 9293 3.10.7.1 reset. Endpoints touched since the last
  ``packets_to_send()`` are kept in a dirty set, and only then asked for their
  segments, so a batch of input produces one ACK per flow.
- One timer: a heap of ``(deadline, flow)``. A flow's entry is pushed only when
  its deadline moves earlier than the entry already in the heap; when an entry
  pops, the flow's real deadline is re-read (lazy invalidation), so a
  retransmission timer restarted on every ACK costs no heap push.
- Output: ``stack.output.PacketBuilder`` (checksums or NEEDS_CSUM, GSO,
  fragmentation of large UDP/ICMP replies).

``counters`` (a live dict; read it, do not write it):
``packets.in``/``packets.out``, ``bytes.in``/``bytes.out``, ``drop.<reason>``,
``flows.open``/``flows.tcp``/``flows.udp``/``flows.half_open`` (gauges),
``flows.opened.tcp``/``flows.opened.udp`` (totals), ``tcp.rst_sent``,
``tcp.gso_in``/``tcp.gso_out``, ``udp.gso_in``, ``udp.datagrams_in``/``udp.datagrams_out``,
``icmp.echo``, ``icmp.ignored.<kind>``, ``reassembly.*``, and the TCP engine's
own (``tcp.retransmits``, ...).
"""

from __future__ import annotations

import heapq
import random
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Final

from stack.events import DatagramReceived, EchoRequest, Event, FlowClosed, FlowOpened
from stack.flow import TCP, UDP, FlowKey
from stack.icmp import (
    QUOTE_LIMIT_V4,
    QUOTE_LIMIT_V6,
    echo_reply_v4,
    echo_reply_v6,
    may_send_error,
    unreachable_v4,
    unreachable_v6,
)
from stack.output import PROTO_ICMP, PacketBuilder
from stack.reassembly import Ipv4Reassembler
from stack.tcp.endpoint import TcpConfig, TcpEndpoint, TcpState
from stack.udp import UdpSession
from stack.wire import WireError, icmpv4, icmpv6, ipv4, ipv6, tcp, udp, virtio
from stack.wire.checksum import ones_sum, pseudo_header_sum

__all__ = ["Refusal", "Stack", "StackConfig"]


class Refusal:
    """How to refuse a flow (``Stack.refuse``)."""

    RESET: Final = "reset"  # TCP RST; for UDP the same as UNREACHABLE
    # ICMP/ICMPv6 destination unreachable (port for UDP, host/address for TCP)
    UNREACHABLE: Final = "unreachable"
    DROP: Final = "drop"  # forget the flow silently; the application times out
    # ICMP "communication administratively prohibited" (ICMPv4 3/13, ICMPv6 1/1), TCP and UDP.
    PROHIBITED: Final = "prohibited"


@dataclass(slots=True)
class StackConfig:
    mtu: int = 1500
    # Packets in and out carry a 10-byte virtio-net header (TUN opened with IFF_VNET_HDR).
    vnet_hdr: bool = False
    # Emit TCP data as GSO super-packets (needs vnet_hdr and TSO offloads on the TUN).
    gso: bool = False
    # Largest super-packet emitted with gso (IP header included).
    gso_max_size: int = 65535
    # Answer ICMP/ICMPv6 echo requests to any address locally.
    answer_ping: bool = True
    # Hand echo requests to the application as EchoRequest events instead (it forwards
    # them and answers with send_echo_reply / refuse_echo); answer_ping is then unused.
    echo_events: bool = False
    max_flows: int = 65536
    max_half_open: int = 4096  # TCP flows in SYN_RECEIVED / awaiting accept
    # At the limit, a handshake whose SYN-ACK went unanswered this long (the first SYN-ACK
    # retransmission is due after 1 s) gives its slot to a new SYN.
    half_open_evict_after: float = 1.0
    # ... but at most this many a second (a token bucket holding a second's worth). Each
    # admitted SYN costs the relay an upstream connect: admitting a flood's SYNs as fast as
    # the table turned over (~1,300/s) left no time to read the TUN, whose queue then
    # dropped legitimate packets as readily as the flood's (bench/stress.py).
    half_open_evict_rate: float = 256.0
    reassembly_limit: int = 4 * 1024 * 1024  # bytes held for IPv4 fragments, all datagrams together
    reassembly_timeout: float = 30.0
    udp_idle_timeout: float = 60.0
    tcp_send_buffer: int = 512 * 1024  # per flow, bytes queued towards the application
    tcp_receive_window: int = 1024 * 1024  # per flow, bytes the application may send ahead
    tcp_time_wait: float = 2.0  # a short TIME_WAIT (we are never the server that is reused)
    accept_timeout: float = 30.0  # a SYN not accepted/refused by then is refused with RST
    # How long a TCP ACK may wait to ride on the reply (TcpConfig.delayed_ack); 0: at once.
    tcp_delayed_ack: float = 0.0
    # Seed for initial sequence numbers; None draws one from the system. Tests set it.
    seed: int | None = None
    # ICMP errors we originate (refusals), a token bucket: RFC 4443 2.4 (f) requires a
    # limit for ICMPv6, RFC 1812 4.3.2.8 recommends one for ICMPv4.
    icmp_error_rate: float = 100.0  # per second
    icmp_error_burst: int = 50


_TupleKey = tuple[bytes, int, bytes, int]

# RFC 9293 3.7.1: without an MSS option the peer's MSS is 536 (IPv4) / 1220 (IPv6, RFC 8200 5).
_DEFAULT_MSS_V4 = 536
_DEFAULT_MSS_V6 = 1220
_TCP_MAX_HEADER = 60


class _TcpFlow:
    __slots__ = ("armed", "dst", "endpoint", "flow", "forgotten", "half_open", "key", "opened",
                 "quote", "src", "tkey")  # fmt: skip

    def __init__(
        self, flow: int, key: FlowKey, tkey: _TupleKey, endpoint: TcpEndpoint, quote: bytes,
        opened: float = 0.0,
    ) -> None:
        self.flow = flow
        self.key = key
        self.tkey = tkey
        self.src = key.src  # the application's address
        self.dst = key.dst  # the address it wanted to reach: our source on output
        self.endpoint = endpoint
        self.armed: float | None = None  # deadline of this flow's live timer-heap entry
        self.half_open = True
        self.opened = opened  # when its SYN arrived
        self.forgotten = False  # refused/aborted: drop once its last segments are out
        self.quote: bytes | None = quote  # start of the SYN packet, for an ICMP refusal


_Flow = _TcpFlow | UdpSession


class Stack:
    """A catch-all TCP/IP endpoint for every address that enters the TUN."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config = config or StackConfig()
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._events: deque[Event] = deque()
        self._out: list[bytes] = []
        self._flows: dict[int, _Flow] = {}
        self._tcp: dict[_TupleKey, _TcpFlow] = {}
        self._udp: dict[_TupleKey, UdpSession] = {}
        self._dirty: dict[int, _TcpFlow] = {}
        self._timers: list[tuple[float, int]] = []
        self._next_flow = 1
        self._half_open = 0
        # Half-open TCP flows, oldest first (dicts keep insertion order): the victims when
        # the half-open limit is reached.
        self._half_open_flows: dict[int, _TcpFlow] = {}
        self._evict_tokens = config.half_open_evict_rate
        self._evict_refill = 0.0  # when the eviction bucket was last refilled
        self._now = 0.0
        self._rng = random.Random(config.seed)
        self._icmp_tokens = float(config.icmp_error_burst)
        self._icmp_refill = 0.0  # when the bucket was last refilled
        self._builder = PacketBuilder(config.mtu, config.vnet_hdr, config.gso, self._counters)
        self._reassembler = Ipv4Reassembler(
            config.reassembly_limit, config.reassembly_timeout, self._counters
        )
        self._publish_flows()

    # -- input ---------------------------------------------------------------
    def receive_packet(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """One packet read from the TUN (with its virtio-net header when ``vnet_hdr``).

        Never raises for bad input: a malformed packet is dropped and counted
        in ``counters`` by reason.

        The stack keeps no reference to ``data`` after returning, except what
        the TCP engine copies; the caller may reuse its buffer.
        """
        self._now = now
        c = self._counters
        c["packets.in"] += 1
        c["bytes.in"] += len(data)
        try:
            self._receive(memoryview(data), now)
        except WireError as exc:
            c["drop." + exc.reason] += 1

    def _receive(self, buf: memoryview, now: float) -> None:
        trusted = False
        gso = virtio.GSO_NONE
        gso_size = 0
        if self.config.vnet_hdr:
            vh = virtio.VirtioNetHdr(buf)
            trusted = vh.checksum_trusted
            gso = vh.gso_protocol
            gso_size = vh.gso_size
            buf = buf[virtio.HEADER_LEN :]
        if not buf:
            raise WireError("empty")
        version = buf[0] >> 4
        if version == 4:
            pkt = ipv4.Ipv4Packet(buf)
            if not pkt.verify_checksum():
                raise WireError("ipv4-checksum")
            src, dst, proto, tos = pkt.src, pkt.dst, pkt.protocol, pkt.tos
            if pkt.is_fragment:
                done = self._reassembler.receive(pkt, now)
                if done is None:
                    return
                header, payload = done
                l4 = memoryview(payload)
                # RFC 792: an error quotes the header and leading data of the datagram.
                packet: bytes | memoryview = header + payload[:QUOTE_LIMIT_V4]
                trusted = False  # no offload covers a datagram rebuilt from fragments
                gso = virtio.GSO_NONE
            else:
                l4 = pkt.payload
                packet = pkt.buffer  # the quote is cut from it only if a flow opens
        elif version == 6:
            pkt6 = ipv6.Ipv6Packet(buf)
            if pkt6.fragment is not None:
                done6 = self._reassemble_v6(pkt6, now)
                if done6 is None:
                    return
                pkt6 = done6
                trusted = False
                gso = virtio.GSO_NONE
            src, dst, proto, tos = pkt6.src, pkt6.dst, pkt6.protocol, pkt6.traffic_class
            l4 = pkt6.payload
            packet = pkt6.buffer
        else:
            raise WireError("ip-version", str(version))
        if proto == TCP:
            if gso in (virtio.GSO_TCPV4, virtio.GSO_TCPV6):
                self._counters["tcp.gso_in"] += 1
            self._receive_tcp(src, dst, l4, trusted, packet, tos, now)
        elif proto == UDP:
            self._receive_udp(src, dst, l4, trusted, gso, gso_size, packet, tos, now)
        elif proto == PROTO_ICMP and version == 4:
            self._receive_icmpv4(src, dst, l4, trusted, packet)
        elif proto == icmpv6.PROTOCOL and version == 6:
            self._receive_icmpv6(src, dst, l4, trusted, packet)
        else:
            # RFC 1122 3.2.2.1 would have us send protocol unreachable; a TUN catch-all
            # sees such packets only from odd software, so they are just dropped.
            raise WireError("unknown-protocol", str(proto))

    def _reassemble_v6(self, pkt: ipv6.Ipv6Packet, now: float) -> ipv6.Ipv6Packet | None:
        """RFC 8200 4.5: hold the fragment; once complete, rebuild the packet as a
        fixed header (next header from the offset-0 fragment's fragment header)
        followed by the fragmentable part, and parse it again. Extension headers
        before the fragment header only concern the route: they are not kept."""
        assert pkt.fragment is not None
        offset, more, ident = pkt.fragment
        header = None
        if offset == 0:
            first = bytearray(pkt.buffer[: ipv6.HEADER_LEN])
            first[ipv6.NEXT_HEADER] = pkt.protocol
            header = bytes(first)
        done = self._reassembler.add(
            (pkt.src, pkt.dst, ident), offset, bytes(pkt.payload), more, header, 0xFFFF, now,
            strict=True,
        )  # fmt: skip
        if done is None:
            return None
        fixed, payload = done
        rebuilt = bytearray(fixed)
        rebuilt[ipv6.PAYLOAD_LEN : ipv6.PAYLOAD_LEN + 2] = len(payload).to_bytes(2, "big")
        rebuilt += payload
        return ipv6.Ipv6Packet(memoryview(bytes(rebuilt)))

    # -- TCP input -------------------------------------------------------------
    def _receive_tcp(
        self, src: bytes, dst: bytes, l4: memoryview, trusted: bool, packet: bytes | memoryview,
        tos: int, now: float,
    ) -> None:  # fmt: skip
        if not trusted and ones_sum(l4, pseudo_header_sum(src, dst, TCP, len(l4))) != 0:
            raise WireError("tcp-checksum")
        seg, payload = tcp.parse(l4)
        tkey = (src, seg.src_port, dst, seg.dst_port)
        flow = self._tcp.get(tkey)
        if flow is not None:
            endpoint = flow.endpoint
            new_syn = seg.flags & (tcp.SYN | tcp.ACK) == tcp.SYN and (
                endpoint.closed or endpoint.accepts_new_syn(seg)
            )
            if not new_syn:
                endpoint.receive_segment(seg, payload, now)
                self._touch(flow)
                return
            # A new SYN on the 4-tuple of a flow that is over (or in TIME-WAIT and the SYN
            # is above its sequence space, RFC 9293 3.10.7.4 / RFC 6191): send what the old
            # one still had, forget it, open the new one.
            self._collect(flow)
        flags = seg.flags
        if flags & tcp.RST:
            # RFC 9293 3.10.7.1: "An incoming segment containing a RST is discarded."
            self._counters["tcp.rst_ignored"] += 1
            return
        if flags & (tcp.SYN | tcp.ACK) == tcp.SYN:
            self._open_tcp(tkey, seg, packet, tos, now)
            return
        self._counters["tcp.unknown_flow"] += 1
        # TCP has no multicast/broadcast connections (RFC 1122 4.2.3.10); like Linux, answer
        # nothing sent to or from such an address.
        if may_send_error(src, dst):
            self._reset_for(src, dst, seg, len(payload))

    def _open_tcp(
        self, tkey: _TupleKey, syn: tcp.TcpRepr, packet: bytes | memoryview, tos: int,
        now: float,
    ) -> None:  # fmt: skip
        src, sport, dst, dport = tkey
        c = self._counters
        if dport == 0 or sport == 0:
            raise WireError("port-zero")
        if not may_send_error(src, dst):
            # RFC 1122 4.2.3.10: a SYN from (or to) a broadcast/multicast address is ignored.
            raise WireError("tcp-multicast")
        if len(self._flows) >= self.config.max_flows:
            c["drop.limit.flows"] += 1
            self._reset_for(src, dst, syn, 0)
            return
        if self._half_open >= self.config.max_half_open and not self._evict_half_open(now):
            # Dropped, not reset: the sender retries (1 s, 3 s, ...) and finds room later, as
            # with a full listen queue in Linux; a RST would fail a legitimate connect at once.
            c["drop.limit.half_open"] += 1
            return
        v6 = len(src) == 16
        ip_len = ipv6.HEADER_LEN if v6 else ipv4.HEADER_LEN
        mss = self.config.mtu - ip_len - tcp.HEADER_LEN
        peer_mss = syn.mss or (_DEFAULT_MSS_V6 if v6 else _DEFAULT_MSS_V4)
        config = TcpConfig(
            mss=mss,
            max_payload=self._max_payload(min(mss, peer_mss), ip_len),
            send_buffer=self.config.tcp_send_buffer,
            receive_window=self.config.tcp_receive_window,
            time_wait=self.config.tcp_time_wait,
            accept_timeout=self.config.accept_timeout,
            delayed_ack=self.config.tcp_delayed_ack,
        )
        fid = self._new_flow_id()
        endpoint = TcpEndpoint(
            fid, config, syn, now, self._rng.getrandbits(32), self._events, self._counters
        )
        # The engine may reduce its segment size (e.g. for timestamps): keep GSO aligned to it.
        config.max_payload = self._max_payload(endpoint.effective_mss, ip_len)
        key = FlowKey(TCP, src, sport, dst, dport)
        flow = _TcpFlow(fid, key, tkey, endpoint, self._quote(packet, v6), now)
        self._flows[fid] = flow
        self._tcp[tkey] = flow
        self._half_open += 1
        self._half_open_flows[fid] = flow
        c["flows.opened.tcp"] += 1
        self._publish_flows()
        self._events.append(FlowOpened(fid, key, tos))
        self._arm(flow)

    def _evict_half_open(self, now: float) -> bool:
        """Make room for a SYN at the half-open limit: give up the oldest handshake whose
        SYN-ACK has gone out and stayed unanswered for ``half_open_evict_after``. The other
        end of a TUN is the local kernel, which answers a SYN-ACK within microseconds, so
        such a flow is almost surely a spoofed SYN; without eviction a SYN flood would
        hold every slot for the whole SYN-ACK retransmission schedule (about a minute)
        and refuse every legitimate connection meanwhile (bench/stress.py: 1 of 30
        legitimate connections got through a 100,000-SYN flood without eviction, 14 of
        14 and 20 of 21 with it). The age spares a fresh handshake whose ACK is merely
        late; under a flood the table's turnover (the limit over the SYN rate tunproxy
        keeps up with, ~3 s here) shields a legitimate handshake for longer than the
        age, and longer ages measured worse, as more SYNs were refused outright. Flows
        still waiting for their upstream (not accepted) are never evicted: that wait
        is legitimate. Looks at the oldest 64 only. At most ``half_open_evict_rate`` a
        second: beyond, SYNs are dropped cheaply and the TUN is read as fast as the flood
        comes, so a legitimate handshake's packets are not lost in the kernel's queue."""
        rate = self.config.half_open_evict_rate
        tokens = min(rate, self._evict_tokens + max(0.0, now - self._evict_refill) * rate)
        self._evict_refill = now
        self._evict_tokens = tokens
        if tokens < 1.0:
            self._counters["tcp.half_open_evict_limited"] += 1
            return False
        oldest = now - self.config.half_open_evict_after
        for index, flow in enumerate(self._half_open_flows.values()):
            if index >= 64 or flow.opened > oldest:
                break  # the rest are younger still
            if flow.endpoint.accepted:
                flow.endpoint.evict(now)
                self._evict_tokens = tokens - 1.0
                self._counters["tcp.half_open_evicted"] += 1
                self._touch(flow)
                return True
        return False

    def _max_payload(self, mss: int, ip_len: int) -> int:
        """Payload per emitted segment: the MSS, or with GSO the most whole MSS-sized
        pieces that fit a ``gso_max_size`` super-packet with the largest TCP header."""
        mss = max(1, mss)
        if not self._builder.gso:
            return mss
        return max(mss, (self.config.gso_max_size - ip_len - _TCP_MAX_HEADER) // mss * mss)

    def _reset_for(self, src: bytes, dst: bytes, seg: tcp.TcpRepr, payload_len: int) -> None:
        """RFC 9293 3.10.7.1 (CLOSED): if ACK is on, <SEQ=SEG.ACK><CTL=RST>;
        otherwise <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>."""
        if seg.flags & tcp.ACK:
            rst = tcp.TcpRepr(seg.dst_port, seg.src_port, seg.ack, 0, tcp.RST, 0)
        else:
            seg_len = payload_len + (1 if seg.flags & tcp.SYN else 0) + (
                1 if seg.flags & tcp.FIN else 0
            )
            ack = (seg.seq + seg_len) & 0xFFFFFFFF
            rst = tcp.TcpRepr(seg.dst_port, seg.src_port, 0, ack, tcp.RST | tcp.ACK, 0)
        self._counters["tcp.rst_sent"] += 1
        self._out.extend(self._builder.tcp(dst, src, rst, b"", 1))

    # -- UDP input -------------------------------------------------------------
    def _receive_udp(
        self, src: bytes, dst: bytes, l4: memoryview, trusted: bool, gso: int, gso_size: int,
        packet: bytes | memoryview, tos: int, now: float,
    ) -> None:  # fmt: skip
        c = self._counters
        dgram = udp.UdpPacket(l4, trust_length=gso != virtio.GSO_UDP_L4)
        if not trusted:
            if dgram.checksum == 0:
                if len(src) == 16:
                    # RFC 8200 8.1: a zero UDP checksum over IPv6 is invalid.
                    raise WireError("udp6-zero-checksum")
            elif ones_sum(dgram.buffer, pseudo_header_sum(src, dst, UDP, dgram.length)) != 0:
                raise WireError("udp-checksum")
        if dgram.dst_port == 0:
            raise WireError("port-zero")
        tkey = (src, dgram.src_port, dst, dgram.dst_port)
        session = self._udp.get(tkey)
        if session is None:
            if len(self._flows) >= self.config.max_flows:
                c["drop.limit.flows"] += 1
                return
            fid = self._new_flow_id()
            key = FlowKey(UDP, src, dgram.src_port, dst, dgram.dst_port)
            quote = self._quote(packet, len(src) == 16) if may_send_error(src, dst) else None
            session = UdpSession(fid, key, now, quote)
            self._flows[fid] = session
            self._udp[tkey] = session
            c["flows.opened.udp"] += 1
            self._publish_flows()
            self._events.append(FlowOpened(fid, key, tos))
            self._arm_udp(session)
        session.last_active = now
        payload = dgram.payload
        if gso == virtio.GSO_UDP_L4:
            # A USO super-packet: each gso_size bytes is one datagram (Linux
            # __udp_gso_segment), the last one possibly shorter.
            c["udp.gso_in"] += 1
            for start in range(0, len(payload), gso_size):
                self._events.append(
                    DatagramReceived(session.flow, bytes(payload[start : start + gso_size]))
                )
                c["udp.datagrams_in"] += 1
        else:
            self._events.append(DatagramReceived(session.flow, bytes(payload)))
            c["udp.datagrams_in"] += 1

    # -- ICMP input ------------------------------------------------------------
    def _receive_icmpv4(
        self, src: bytes, dst: bytes, l4: memoryview, trusted: bool, packet: bytes | memoryview
    ) -> None:
        msg = icmpv4.Icmpv4Packet(l4)
        if not trusted and not msg.verify_checksum():
            raise WireError("icmp-checksum")
        c = self._counters
        if msg.type == icmpv4.ECHO_REQUEST and msg.code == 0:
            if self.config.echo_events and may_send_error(src, dst):
                c["icmp.echo_events"] += 1
                self._events.append(EchoRequest(bytes(src), bytes(dst), msg.ident, msg.seq,
                                                bytes(msg.data), self._quote(packet, False)))
            elif not self.config.answer_ping:
                c["icmp.ignored.echo"] += 1
            elif not may_send_error(src, dst):
                c["icmp.ignored.echo_broadcast"] += 1
            else:
                c["icmp.echo"] += 1
                self._out.extend(self._builder.ip(dst, src, PROTO_ICMP, echo_reply_v4(msg)))
        elif msg.type in icmpv4.ERROR_TYPES:
            c["icmp.ignored.error"] += 1
        else:
            c["icmp.ignored.other"] += 1

    def _receive_icmpv6(
        self, src: bytes, dst: bytes, l4: memoryview, trusted: bool, packet: bytes | memoryview
    ) -> None:
        msg = icmpv6.Icmpv6Packet(l4)
        if not trusted and not msg.verify_checksum(src, dst):
            raise WireError("icmp6-checksum")
        c = self._counters
        t = msg.type
        if t == icmpv6.ECHO_REQUEST and msg.code == 0:
            if self.config.echo_events and may_send_error(src, dst):
                c["icmp.echo_events"] += 1
                self._events.append(EchoRequest(bytes(src), bytes(dst), msg.ident, msg.seq,
                                                bytes(msg.data), self._quote(packet, True)))
            elif not self.config.answer_ping:
                c["icmp.ignored.echo"] += 1
            elif not may_send_error(src, dst):
                c["icmp.ignored.echo_multicast"] += 1
            else:
                c["icmp.echo"] += 1
                reply = echo_reply_v6(msg, dst, src)
                self._out.extend(self._builder.ip(dst, src, icmpv6.PROTOCOL, reply))
        elif t in icmpv6.NDP_TYPES:
            c["icmp.ignored.ndp"] += 1
        elif t in icmpv6.MLD_TYPES:
            c["icmp.ignored.mld"] += 1
        elif msg.is_error:
            c["icmp.ignored.error"] += 1
        else:
            c["icmp.ignored.other"] += 1

    # -- timers ----------------------------------------------------------------
    def handle_timer(self, now: float) -> None:
        self._now = now
        heap = self._timers
        due: list[tuple[float, int]] = []
        while heap and heap[0][0] <= now:
            due.append(heapq.heappop(heap))
        for deadline, fid in due:
            flow = self._flows.get(fid)
            if flow is None or flow.armed != deadline:
                continue  # stale: the flow is gone or re-armed earlier
            flow.armed = None
            if isinstance(flow, _TcpFlow):
                endpoint = flow.endpoint
                timer = endpoint.get_timer()
                if timer is not None and timer <= now:
                    endpoint.handle_timer(now)
                self._dirty[fid] = flow  # segments due, or a closed flow to drop
                self._arm(flow)
            elif now >= flow.expires_at(self.config.udp_idle_timeout):
                self._remove_udp(flow)
                self._events.append(FlowClosed(fid, "idle"))
            else:
                self._arm_udp(flow)
        if (t := self._reassembler.get_timer()) is not None and t <= now:
            self._reassembler.expire(now)

    def get_timer(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None."""
        heap = self._timers
        flows = self._flows
        idle = self.config.udp_idle_timeout
        # Settle the top of the heap so the answer is exact: drop entries of gone
        # flows, and move entries whose flow's real deadline went later (or away).
        while heap:
            deadline, fid = heap[0]
            flow = flows.get(fid)
            if flow is None or flow.armed != deadline:
                heapq.heappop(heap)
                continue
            real = (
                flow.endpoint.get_timer()
                if isinstance(flow, _TcpFlow)
                else flow.expires_at(idle)
            )
            if real == deadline:
                break
            heapq.heappop(heap)
            flow.armed = real
            if real is not None:
                heapq.heappush(heap, (real, fid))
        first = heap[0][0] if heap else None
        reassembly = self._reassembler.get_timer()
        if reassembly is not None and (first is None or reassembly < first):
            return reassembly
        return first

    def _arm(self, flow: _TcpFlow) -> None:
        """Lazy invalidation: push only when the deadline moves earlier."""
        timer = flow.endpoint.get_timer()
        if timer is not None and (flow.armed is None or timer < flow.armed):
            flow.armed = timer
            self._push(timer, flow.flow)

    def _push(self, deadline: float, fid: int) -> None:
        heap = self._timers
        if len(heap) > 2 * len(self._flows) + 1024:
            # Stale entries (deadlines that moved earlier, flows gone) wait in the heap
            # until their time; when they outnumber live ones, rebuild from the live.
            heap[:] = [(f.armed, i) for i, f in self._flows.items() if f.armed is not None]
            heapq.heapify(heap)
            self._counters["timer.compactions"] += 1
        heapq.heappush(heap, (deadline, fid))

    def _arm_udp(self, session: UdpSession) -> None:
        deadline = session.expires_at(self.config.udp_idle_timeout)
        session.armed = deadline
        self._push(deadline, session.flow)

    def _touch(self, flow: _TcpFlow) -> None:
        """After every call into an endpoint: remember it for packets_to_send, re-arm."""
        self._dirty[flow.flow] = flow
        endpoint = flow.endpoint
        if flow.half_open and (endpoint.closed or endpoint.state is not TcpState.SYN_RECEIVED):
            self._leave_half_open(flow)
        timer = endpoint.get_timer()
        if timer is not None and (flow.armed is None or timer < flow.armed):
            flow.armed = timer
            self._push(timer, flow.flow)

    # -- output --------------------------------------------------------------
    def packets_to_send(self) -> list[bytes]:
        """Packets to write to the TUN (each with a virtio-net header when ``vnet_hdr``)."""
        if self._dirty:
            dirty = self._dirty
            self._dirty = {}
            now = self._now
            build = self._builder.tcp
            out = self._out
            for flow in dirty.values():
                if self._flows.get(flow.flow) is not flow:
                    continue
                endpoint = flow.endpoint
                mss = endpoint.effective_mss
                for seg, payload in endpoint.segments_to_send(now):
                    out.extend(build(flow.dst, flow.src, seg, payload, mss))
                self._arm(flow)
                if flow.half_open and (
                    endpoint.closed or endpoint.state is not TcpState.SYN_RECEIVED
                ):
                    self._leave_half_open(flow)
                if flow.forgotten or endpoint.closed:
                    self._remove_tcp(flow)
        out = self._out
        if not out:
            return out
        self._out = []
        c = self._counters
        c["packets.out"] += len(out)
        c["bytes.out"] += sum(map(len, out))
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- flow bookkeeping --------------------------------------------------------
    def _new_flow_id(self) -> int:
        fid = self._next_flow
        self._next_flow += 1
        return fid

    def _quote(self, packet: bytes | memoryview, v6: bool) -> bytes:
        """The start of the invoking packet an ICMP error will quote (RFC 1812 4.3.2.3,
        RFC 4443 2.4 (c))."""
        return bytes(packet[: QUOTE_LIMIT_V6 if v6 else QUOTE_LIMIT_V4])

    def _leave_half_open(self, flow: _TcpFlow) -> None:
        flow.half_open = False
        flow.quote = None
        self._half_open -= 1
        self._half_open_flows.pop(flow.flow, None)
        self._counters["flows.half_open"] = self._half_open

    def _collect(self, flow: _TcpFlow) -> None:
        """Emit a finished flow's last segments (a final ACK or RST) and drop it."""
        endpoint = flow.endpoint
        for seg, payload in endpoint.segments_to_send(self._now):
            self._out.extend(
                self._builder.tcp(flow.dst, flow.src, seg, payload, endpoint.effective_mss)
            )
        self._remove_tcp(flow)

    def _remove_tcp(self, flow: _TcpFlow) -> None:
        if flow.half_open:
            self._leave_half_open(flow)
        self._flows.pop(flow.flow, None)
        if self._tcp.get(flow.tkey) is flow:
            del self._tcp[flow.tkey]
        self._dirty.pop(flow.flow, None)
        self._publish_flows()

    def _remove_udp(self, session: UdpSession) -> None:
        self._flows.pop(session.flow, None)
        self._udp.pop(session.tuple_key, None)
        self._publish_flows()

    def _publish_flows(self) -> None:
        c = self._counters
        c["flows.open"] = len(self._flows)
        c["flows.tcp"] = len(self._tcp)
        c["flows.udp"] = len(self._udp)
        c["flows.half_open"] = self._half_open

    def _live(self, flow: int) -> _Flow | None:
        found = self._flows.get(flow)
        if isinstance(found, _TcpFlow) and found.forgotten:
            return None
        return found

    def _tcp_flow(self, flow: int) -> _TcpFlow | None:
        found = self._flows.get(flow)
        if isinstance(found, _TcpFlow) and not found.forgotten:
            return found
        return None

    def _send_unreachable(self, key: FlowKey, quote: bytes, code4: int, code6: int) -> None:
        now = self._now
        rate = self.config.icmp_error_rate
        tokens = min(
            float(self.config.icmp_error_burst),
            self._icmp_tokens + max(0.0, now - self._icmp_refill) * rate,
        )
        self._icmp_refill = now
        if tokens < 1.0:
            self._icmp_tokens = tokens
            self._counters["icmp.rate_limited"] += 1
            return
        self._icmp_tokens = tokens - 1.0
        # The error comes "from" the destination the application tried to reach.
        if key.version == 4:
            msg = unreachable_v4(code4, quote)
            self._out.extend(self._builder.ip(key.dst, key.src, PROTO_ICMP, msg))
        else:
            msg = unreachable_v6(code6, quote, key.dst, key.src)
            self._out.extend(self._builder.ip(key.dst, key.src, icmpv6.PROTOCOL, msg))
        self._counters["icmp.unreachable_sent"] += 1

    # -- commands ------------------------------------------------------------
    def accept(self, flow: int, now: float) -> None:
        """TCP: send the SYN-ACK. UDP: forget the first packet kept for a refusal
        (sessions are open once seen)."""
        self._now = now
        found = self._live(flow)
        if isinstance(found, _TcpFlow):
            found.quote = None
            found.endpoint.accept(now)
            self._touch(found)
        elif found is not None:
            found.quote = None

    def refuse(self, flow: int, how: str, now: float) -> None:
        """Refuse a pending flow (``Refusal.*``) and forget it.

        TCP: RESET sends RST (acknowledging the SYN); UNREACHABLE sends ICMP host
        unreachable (ICMPv6 address unreachable); PROHIBITED sends ICMP
        administratively prohibited; DROP sends nothing. UDP: RESET and
        UNREACHABLE send ICMP port unreachable, PROHIBITED administratively
        prohibited, DROP nothing. ICMP errors quote the flow's first packet and
        are only possible before ``accept`` (the quote is then released) and
        never about multicast/broadcast packets; a TCP flow refused by ICMP
        after ``accept`` gets an RST instead. No event follows.
        """
        self._now = now
        found = self._live(flow)
        if found is None:
            return
        if isinstance(found, _TcpFlow):
            if how == Refusal.RESET:
                found.endpoint.refuse(now)
                found.forgotten = True
                self._touch(found)  # the RST leaves at packets_to_send, then the flow goes
                return
            quote = found.quote
            if quote is None and how != Refusal.DROP:
                # Accepted already (no SYN left to quote): an RST is the only way to
                # tell the application, and leaving it hanging would be worse.
                self.refuse(flow, Refusal.RESET, now)
                return
            self._remove_tcp(found)
            if quote is not None and how == Refusal.UNREACHABLE:
                self._send_unreachable(found.key, quote, icmpv4.CODE_HOST_UNREACHABLE,
                                       icmpv6.CODE_ADDRESS_UNREACHABLE)  # fmt: skip
            elif quote is not None and how == Refusal.PROHIBITED:
                self._send_unreachable(found.key, quote, icmpv4.CODE_ADMIN_PROHIBITED,
                                       icmpv6.CODE_ADMIN_PROHIBITED)  # fmt: skip
            return
        quote = found.quote
        self._remove_udp(found)
        if quote is None:
            return
        if how in (Refusal.RESET, Refusal.UNREACHABLE):
            self._send_unreachable(found.key, quote, icmpv4.CODE_PORT_UNREACHABLE,
                                   icmpv6.CODE_PORT_UNREACHABLE)  # fmt: skip
        elif how == Refusal.PROHIBITED:
            self._send_unreachable(found.key, quote, icmpv4.CODE_ADMIN_PROHIBITED,
                                   icmpv6.CODE_ADMIN_PROHIBITED)  # fmt: skip

    def send(self, flow: int, data: bytes, now: float) -> None:
        """Queue TCP payload towards the application (never refused; see send_buffer_free).
        Ignored for UDP sessions (use ``send_datagram``)."""
        self._now = now
        found = self._tcp_flow(flow)
        if found is not None:
            found.endpoint.send(data, now)
            self._touch(found)

    def send_buffer_free(self, flow: int) -> int:
        """Bytes that can still be queued before the flow's send buffer is full (0 when full)."""
        found = self._tcp_flow(flow)
        return found.endpoint.send_buffer_free() if found is not None else 0

    def shutdown_write(self, flow: int, now: float) -> None:
        """Send FIN after the queued data (half-close towards the application)."""
        self._now = now
        found = self._tcp_flow(flow)
        if found is not None:
            found.endpoint.shutdown_write(now)
            self._touch(found)

    def abort(self, flow: int, now: float) -> None:
        """TCP: send RST and forget the flow. UDP: close the session. No event follows."""
        self._now = now
        found = self._live(flow)
        if isinstance(found, _TcpFlow):
            found.endpoint.abort(now)
            found.forgotten = True
            self._touch(found)
        elif found is not None:
            self._remove_udp(found)

    def pause_receiving(self, flow: int) -> None:
        """Stop delivering DataReceived for this flow; buffered data shrinks the
        advertised window, so the local sender slows down (backpressure)."""
        found = self._tcp_flow(flow)
        if found is not None:
            found.endpoint.pause_receiving()
            self._touch(found)

    def resume_receiving(self, flow: int, now: float) -> None:
        self._now = now
        found = self._tcp_flow(flow)
        if found is not None:
            found.endpoint.resume_receiving(now)
            self._touch(found)

    def send_datagram(self, flow: int, data: bytes, now: float) -> None:
        """UDP reply on session ``flow``: source is the session's original destination.

        Larger than the MTU: sent as IP fragments. Larger than an IP datagram can
        carry: dropped and counted (``drop.udp-too-large``).
        """
        self._now = now
        found = self._flows.get(flow)
        if not isinstance(found, UdpSession):
            return
        found.last_active = now
        self._counters["udp.datagrams_out"] += 1
        self._out.extend(
            self._builder.udp(found.dst, found.src, found.dst_port, found.src_port, data)
        )

    def send_echo_reply(self, request: EchoRequest, data: bytes, now: float) -> None:
        """Answer ``request`` with an echo reply from the address it pinged, carrying
        ``data`` (what the real destination echoed)."""
        self._now = now
        self._counters["icmp.echo_replies"] += 1
        if request.version == 4:
            buf = bytearray(icmpv4.HEADER_LEN + len(data))
            icmpv4.Icmpv4Repr(icmpv4.ECHO_REPLY, 0, request.ident, request.seq, data).emit(buf)
            self._out.extend(self._builder.ip(request.dst, request.src, PROTO_ICMP, buf))
        else:
            buf = bytearray(icmpv6.HEADER_LEN + len(data))
            icmpv6.Icmpv6Repr(icmpv6.ECHO_REPLY, 0, request.ident, request.seq, data).emit(
                buf, 0, request.dst, request.src
            )
            self._out.extend(self._builder.ip(request.dst, request.src, icmpv6.PROTOCOL, buf))

    def refuse_echo(self, request: EchoRequest, how: str, now: float) -> None:
        """Refuse ``request`` (``Refusal.*``): UNREACHABLE/RESET send host unreachable
        (ICMPv6 address unreachable), PROHIBITED administratively prohibited, DROP nothing.
        Rate-limited like every ICMP error the stack originates."""
        self._now = now
        if how == Refusal.DROP:
            return
        proto = PROTO_ICMP if request.version == 4 else icmpv6.PROTOCOL
        key = FlowKey(proto, request.src, 0, request.dst, 0)
        if how == Refusal.PROHIBITED:
            self._send_unreachable(key, request.quote, icmpv4.CODE_ADMIN_PROHIBITED,
                                   icmpv6.CODE_ADMIN_PROHIBITED)  # fmt: skip
        else:
            self._send_unreachable(key, request.quote, icmpv4.CODE_HOST_UNREACHABLE,
                                   icmpv6.CODE_ADDRESS_UNREACHABLE)  # fmt: skip

    def flow_key(self, flow: int) -> FlowKey | None:
        found = self._live(flow)
        return found.key if found is not None else None

    @property
    def counters(self) -> dict[str, int]:
        """Packets in/out, drops by reason (``drop.<reason>``), retransmissions, flows.

        The live dict (a ``defaultdict(int)``): read it, do not modify it.
        """
        return self._counters
