"""A small test peer for the stack: builds the IP packets the Linux kernel would
write into the TUN, and parses/checks what the stack writes back.

Every packet the stack emits goes through ``parse_out``, which verifies the IP
header checksum and the L4 checksum: in full, or, when the virtio header says
NEEDS_CSUM, by completing the partial sum on a copy exactly as the kernel
would (the checker style of gVisor's ``checker`` package).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from stack import Stack
from stack.wire import icmpv4, icmpv6, ipv4, ipv6, tcp, udp, virtio
from stack.wire.checksum import checksum, ones_sum, pseudo_header_sum

A4 = bytes([10, 0, 0, 2])  # the "local application"
B4 = bytes([93, 184, 216, 34])  # a destination on the internet
A6 = bytes.fromhex("fd000000000000000000000000000002")
B6 = bytes.fromhex("2606280000000000000000000000abcd")


def ip_packet(
    src: bytes, dst: bytes, proto: int, l4: bytes, *, ident: int = 1, flags_frag: int = 0x4000,
    ttl: int = 64, tos: int = 0,
) -> bytes:  # fmt: skip
    if len(src) == 4:
        hdr = bytearray(20)
        ipv4.emit_header(hdr, 0, src, dst, proto, len(l4), ident, ttl, flags_frag, tos)
    else:
        hdr = bytearray(40)
        ipv6.emit_header(hdr, 0, src, dst, proto, len(l4), ttl, traffic_class=tos)
    return bytes(hdr) + l4


def udp_l4(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    buf = bytearray(8 + len(payload))
    udp.UdpRepr(sport, dport).emit(buf, 0, payload)
    struct.pack_into("!H", buf, 6, checksum(buf, pseudo_header_sum(src, dst, 17, len(buf))))
    return bytes(buf)


def tcp_l4(src: bytes, dst: bytes, seg: tcp.TcpRepr, payload: bytes = b"") -> bytes:
    buf = bytearray(seg.header_len() + len(payload))
    tcp.emit(seg, payload, buf, 0)
    struct.pack_into("!H", buf, 16, checksum(buf, pseudo_header_sum(src, dst, 6, len(buf))))
    return bytes(buf)


def icmp4_echo(ident: int, seq: int, data: bytes, type_: int = icmpv4.ECHO_REQUEST) -> bytes:
    buf = bytearray(8 + len(data))
    icmpv4.Icmpv4Repr(type_, 0, ident, seq, data).emit(buf)
    return bytes(buf)


def icmp6_msg(src: bytes, dst: bytes, type_: int, ident: int = 0, seq: int = 0,
              data: bytes = b"", code: int = 0) -> bytes:  # fmt: skip
    buf = bytearray(8 + len(data))
    icmpv6.Icmpv6Repr(type_, code, ident, seq, data).emit(buf, 0, src, dst)
    return bytes(buf)


def with_vnet(packet: bytes, flags: int = 0, gso_type: int = 0, gso_size: int = 0,
              hdr_len: int = 0, csum_start: int = 0, csum_offset: int = 0) -> bytes:  # fmt: skip
    hdr = bytearray(10)
    virtio.emit_header(hdr, 0, flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
    return bytes(hdr) + packet


@dataclass
class Out:
    """One emitted packet, checked and taken apart."""

    raw: bytes
    vnet: virtio.VirtioNetHdrRepr | None
    version: int
    src: bytes
    dst: bytes
    proto: int
    l4: bytes  # with a completed checksum when it was NEEDS_CSUM
    ttl: int
    ip4: ipv4.Ipv4Repr | None = None
    frag: tuple[int, bool, int] | None = None  # IPv6 fragment header, if any
    tcp: tcp.TcpRepr | None = None
    payload: bytes = b""
    sport: int = 0
    dport: int = 0
    icmp: tuple[int, int, int, int, bytes] | None = None  # type, code, ident, seq, data
    extra: dict[str, object] = field(default_factory=dict)


def parse_out(raw: bytes, vnet: bool = False) -> Out:
    view = memoryview(raw)
    vh = None
    if vnet:
        vh = virtio.VirtioNetHdrRepr.parse(virtio.VirtioNetHdr(view))
        view = view[10:]
    version = view[0] >> 4
    ip4 = None
    frag = None
    if version == 4:
        pkt = ipv4.Ipv4Packet(view)
        assert pkt.verify_checksum(), "bad IPv4 header checksum"
        assert pkt.total_len == len(view), "IPv4 total length != packet length"
        ip4 = ipv4.Ipv4Repr.parse(pkt)
        src, dst, proto, ttl = pkt.src, pkt.dst, pkt.protocol, pkt.ttl
        l4 = bytearray(pkt.payload)
        l4_offset = pkt.header_len
    else:
        pkt6 = ipv6.Ipv6Packet(view)
        assert pkt6.payload_len + 40 == len(view)
        src, dst, proto, ttl = pkt6.src, pkt6.dst, pkt6.protocol, pkt6.hop_limit
        frag = pkt6.fragment
        l4 = bytearray(pkt6.payload)
        l4_offset = pkt6.upper_offset
    out = Out(raw, vh, version, src, dst, proto, bytes(l4), ttl, ip4, frag)
    is_fragment = (ip4 is not None and (ip4.more_fragments or ip4.frag_offset)) or frag
    if is_fragment:
        return out  # checksums are checked on the reassembled datagram by the test
    psum = pseudo_header_sum(src, dst, proto, len(l4))
    if vh is not None and vh.flags & virtio.F_NEEDS_CSUM:
        # Complete the partial checksum as the kernel would (skb_checksum_help).
        assert vh.csum_start == l4_offset, (vh.csum_start, l4_offset)
        at = vh.csum_offset
        partial = struct.unpack_from("!H", l4, at)[0]
        assert partial == psum, f"partial sum {partial:#x} != pseudo-header sum {psum:#x}"
        struct.pack_into("!H", l4, at, 0)
        struct.pack_into("!H", l4, at, checksum(l4, psum))
        out.l4 = bytes(l4)
    if proto == 6:
        assert ones_sum(l4, psum) == 0, "bad TCP checksum"
        seg, payload = tcp.parse(memoryview(out.l4))
        out.tcp, out.payload = seg, bytes(payload)
        out.sport, out.dport = seg.src_port, seg.dst_port
    elif proto == 17:
        assert ones_sum(l4, psum) == 0, "bad UDP checksum"
        d = udp.UdpPacket(memoryview(out.l4))
        out.sport, out.dport, out.payload = d.src_port, d.dst_port, bytes(d.payload)
    elif proto == 1:
        m = icmpv4.Icmpv4Packet(memoryview(out.l4))
        assert m.verify_checksum(), "bad ICMP checksum"
        out.icmp = (m.type, m.code, m.ident, m.seq, bytes(m.data))
    elif proto == 58:
        m6 = icmpv6.Icmpv6Packet(memoryview(out.l4))
        assert m6.verify_checksum(src, dst), "bad ICMPv6 checksum"
        out.icmp = (m6.type, m6.code, m6.ident, m6.seq, bytes(m6.data))
    return out


def drain(stack: Stack) -> list[Out]:
    return [parse_out(p, stack.config.vnet_hdr) for p in stack.packets_to_send()]


def events(stack: Stack) -> list[object]:
    out = []
    while (ev := stack.next_event()) is not None:
        out.append(ev)
    return out


class TcpPeer:
    """The kernel's side of one TCP connection, driven by hand: it tracks its own
    sequence numbers and what it acknowledged, and builds real IP packets."""

    def __init__(self, stack: Stack, src: bytes = A4, dst: bytes = B4, sport: int = 40000,
                 dport: int = 443, isn: int = 1000, mss: int = 1460) -> None:  # fmt: skip
        self.stack = stack
        self.src, self.dst, self.sport, self.dport = src, dst, sport, dport
        self.seq = isn
        self.ack = 0
        self.mss = mss
        self.received = bytearray()

    def packet(self, flags: int, payload: bytes = b"", **options: object) -> bytes:
        seg = tcp.TcpRepr(self.sport, self.dport, self.seq, self.ack, flags, 65535,
                          **options)  # type: ignore[arg-type]  # fmt: skip
        pkt = ip_packet(self.src, self.dst, 6, tcp_l4(self.src, self.dst, seg, payload))
        if self.stack.config.vnet_hdr:
            pkt = with_vnet(pkt)
        return pkt

    def deliver(
        self, flags: int, payload: bytes = b"", now: float = 0.0, **options: object
    ) -> None:
        self.stack.receive_packet(self.packet(flags, payload, **options), now)
        length = len(payload) + (1 if flags & (tcp.SYN | tcp.FIN) else 0)
        self.seq = (self.seq + length) & 0xFFFFFFFF

    def syn(self, now: float = 0.0) -> None:
        self.deliver(tcp.SYN, now=now, mss=self.mss, window_scale=7, sack_permitted=True)

    def take(self, outs: list[Out]) -> None:
        """Absorb the stack's segments addressed to this peer (in-order data only)."""
        for o in outs:
            seg = o.tcp
            if seg is None or o.dst != self.src or seg.dst_port != self.sport:
                continue
            if seg.flags & tcp.SYN:
                self.ack = (seg.seq + 1) & 0xFFFFFFFF
            if o.payload and seg.seq == self.ack:
                self.received += o.payload
                self.ack = (self.ack + len(o.payload)) & 0xFFFFFFFF
            if seg.flags & tcp.FIN and (seg.seq + len(o.payload)) & 0xFFFFFFFF == self.ack:
                self.ack = (self.ack + 1) & 0xFFFFFFFF
