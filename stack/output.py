"""Building outgoing packets: virtio-net header + IP header + L4 header + payload.

Each packet is assembled as one small header ``bytearray`` and joined with the
payload in a single copy (``b"".join``), so a 64 KB TCP super-packet costs one
memcpy of its payload. L4 checksums are either computed in full without a
Python loop (``stack.wire.checksum``) or, with a virtio-net header, left to the
kernel: the field holds the pseudo-header sum and the header says NEEDS_CSUM
with ``csum_start``/``csum_offset`` (virtio spec 5.1.6.2).

Emitted packets carry TTL/hop limit 64 (RFC 1122 3.2.1.7 / RFC 8200 3 suggest
the default), the IPv4 DF bit (RFC 1191 path-MTU discovery) except on our own
fragments, and a per-stack incrementing IPv4 identification (RFC 6864 4.1
permits any value on atomic datagrams; fragments need a fresh one).
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import replace

from stack.wire import ipv4, ipv6, virtio
from stack.wire import tcp as tcp_wire
from stack.wire import udp as udp_wire
from stack.wire.checksum import finish, ones_sum, pseudo_header_sum

__all__ = ["DEFAULT_TTL", "PROTO_ICMP", "PROTO_TCP", "PROTO_UDP", "PacketBuilder"]

DEFAULT_TTL = 64
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17

_U16 = struct.Struct("!H")
_NO_VNET = bytes(virtio.HEADER_LEN)


class PacketBuilder:
    """Per-stack output state: virtio header on/off, GSO on/off, MTU, IPv4 ident."""

    __slots__ = ("_ident", "_ident6", "counters", "gso", "mtu", "vnet")

    def __init__(
        self, mtu: int, vnet_hdr: bool, gso: bool, counters: defaultdict[str, int]
    ) -> None:
        if mtu < 1280:
            raise ValueError(f"mtu {mtu} < 1280 (the IPv6 minimum)")
        self.mtu = mtu
        self.vnet = vnet_hdr
        self.gso = gso and vnet_hdr
        self._ident = 0
        self._ident6 = 0
        self.counters = counters

    def _next_ident(self) -> int:
        self._ident = (self._ident + 1) & 0xFFFF
        return self._ident

    # -- TCP -----------------------------------------------------------------
    def tcp(
        self, src: bytes, dst: bytes, seg: tcp_wire.TcpRepr, payload: bytes | memoryview, mss: int
    ) -> list[bytes]:
        """One packet, a GSO super-packet when ``payload`` exceeds ``mss`` and GSO is
        on, else the payload cut into ``mss``-sized segments in software (FIN and
        PSH on the last only, as the kernel's GSO does)."""
        if len(payload) <= mss or self.gso:
            return [self._tcp_packet(src, dst, seg, payload, mss)]
        out = []
        view = memoryview(payload)
        last_flags = seg.flags
        middle_flags = last_flags & ~(tcp_wire.FIN | tcp_wire.PSH)
        seq = seg.seq
        for start in range(0, len(view), mss):
            chunk = view[start : start + mss]
            flags = last_flags if start + mss >= len(view) else middle_flags
            piece = replace(seg, seq=seq, flags=flags)
            out.append(self._tcp_packet(src, dst, piece, chunk, mss))
            seq = (seq + len(chunk)) & 0xFFFFFFFF
        return out

    def _tcp_packet(
        self, src: bytes, dst: bytes, seg: tcp_wire.TcpRepr, payload: bytes | memoryview, mss: int
    ) -> bytes:
        vh = virtio.HEADER_LEN if self.vnet else 0
        v6 = len(src) == 16
        ip_len = ipv6.HEADER_LEN if v6 else ipv4.HEADER_LEN
        th_len = seg.header_len()
        plen = len(payload)
        l4_len = th_len + plen
        hdr = bytearray(vh + ip_len + th_len)
        if v6:
            ipv6.emit_header(hdr, vh, src, dst, PROTO_TCP, l4_len, DEFAULT_TTL)
        else:
            ipv4.emit_header(hdr, vh, src, dst, PROTO_TCP, l4_len, self._next_ident(), DEFAULT_TTL)
        l4 = vh + ip_len
        tcp_wire.emit(seg, b"", hdr, l4)
        psum = pseudo_header_sum(src, dst, PROTO_TCP, l4_len)
        if vh:
            # NEEDS_CSUM: the field holds the (uncomplemented) pseudo-header sum; the
            # kernel adds header + payload and complements (like skb CHECKSUM_PARTIAL).
            _U16.pack_into(hdr, l4 + tcp_wire.CHECKSUM_OFFSET, psum)
            if plen > mss:
                gso_type = virtio.GSO_TCPV6 if v6 else virtio.GSO_TCPV4
                virtio.emit_header(hdr, 0, virtio.F_NEEDS_CSUM, gso_type, ip_len + th_len, mss,
                                   ip_len, tcp_wire.CHECKSUM_OFFSET)  # fmt: skip
                self.counters["tcp.gso_out"] += 1
            else:
                virtio.emit_header(hdr, 0, virtio.F_NEEDS_CSUM, virtio.GSO_NONE, 0, 0, ip_len,
                                   tcp_wire.CHECKSUM_OFFSET)  # fmt: skip
        else:
            # The TCP header length is a multiple of 4, so summing it and the payload
            # separately gives the same 16-bit alignment as summing them together.
            csum = finish(ones_sum(payload, ones_sum(memoryview(hdr)[l4:], psum)))
            _U16.pack_into(hdr, l4 + tcp_wire.CHECKSUM_OFFSET, csum)
        return b"".join((hdr, payload)) if plen else bytes(hdr)

    # -- UDP -----------------------------------------------------------------
    def udp(
        self, src: bytes, dst: bytes, src_port: int, dst_port: int, payload: bytes | memoryview
    ) -> list[bytes]:
        """One datagram; fragmented (IPv4 RFC 791 3.2, IPv6 RFC 8200 4.5) when it
        does not fit the MTU. Too large for any IP datagram: dropped, counted."""
        v6 = len(src) == 16
        ip_len = ipv6.HEADER_LEN if v6 else ipv4.HEADER_LEN
        plen = len(payload)
        l4_len = udp_wire.HEADER_LEN + plen
        if l4_len > 0xFFFF - (0 if v6 else ipv4.HEADER_LEN):
            self.counters["drop.udp-too-large"] += 1
            return []
        psum = pseudo_header_sum(src, dst, PROTO_UDP, l4_len)
        if ip_len + l4_len > self.mtu:
            dgram = bytearray(l4_len)
            udp_wire.emit_header(dgram, 0, src_port, dst_port, plen)
            dgram[udp_wire.HEADER_LEN :] = payload
            _U16.pack_into(dgram, udp_wire.CHECKSUM_OFFSET, finish(ones_sum(dgram, psum)))
            return self.ip(src, dst, PROTO_UDP, dgram)
        vh = virtio.HEADER_LEN if self.vnet else 0
        hdr = bytearray(vh + ip_len + udp_wire.HEADER_LEN)
        if v6:
            ipv6.emit_header(hdr, vh, src, dst, PROTO_UDP, l4_len, DEFAULT_TTL)
        else:
            ipv4.emit_header(hdr, vh, src, dst, PROTO_UDP, l4_len, self._next_ident(), DEFAULT_TTL)
        l4 = vh + ip_len
        udp_wire.emit_header(hdr, l4, src_port, dst_port, plen)
        if vh:
            _U16.pack_into(hdr, l4 + udp_wire.CHECKSUM_OFFSET, psum)
            virtio.emit_header(hdr, 0, virtio.F_NEEDS_CSUM, virtio.GSO_NONE, 0, 0, ip_len,
                               udp_wire.CHECKSUM_OFFSET)  # fmt: skip
        else:
            # finish() never yields 0, which RFC 768 reserves for "no checksum".
            csum = finish(ones_sum(payload, ones_sum(memoryview(hdr)[l4:], psum)))
            _U16.pack_into(hdr, l4 + udp_wire.CHECKSUM_OFFSET, csum)
        return [b"".join((hdr, payload))] if plen else [bytes(hdr)]

    # -- any L4 message with its checksum already in place --------------------
    def ip(self, src: bytes, dst: bytes, protocol: int, l4: bytes | bytearray) -> list[bytes]:
        """Wrap a complete L4 message (checksum filled) in IP, fragmenting if needed."""
        v6 = len(src) == 16
        ip_len = ipv6.HEADER_LEN if v6 else ipv4.HEADER_LEN
        vnet = _NO_VNET if self.vnet else b""
        if ip_len + len(l4) <= self.mtu:
            hdr = bytearray(ip_len)
            if v6:
                ipv6.emit_header(hdr, 0, src, dst, protocol, len(l4), DEFAULT_TTL)
            else:
                ipv4.emit_header(hdr, 0, src, dst, protocol, len(l4), self._next_ident())
            return [b"".join((vnet, hdr, l4))]
        self.counters["ip.fragmented"] += 1
        view = memoryview(l4)
        out = []
        if v6:
            # RFC 8200 4.5: fragmentable part in multiples of 8 bytes, fragment header
            # after the fixed header, a 32-bit identification per original packet.
            self._ident6 = (self._ident6 + 1) & 0xFFFFFFFF
            step = (self.mtu - ipv6.HEADER_LEN - ipv6.FRAGMENT_HEADER_LEN) & ~7
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                more = start + step < len(view)
                hdr = bytearray(ipv6.HEADER_LEN + ipv6.FRAGMENT_HEADER_LEN)
                ipv6.emit_header(hdr, 0, src, dst, ipv6.FRAGMENT,
                                 ipv6.FRAGMENT_HEADER_LEN + len(chunk), DEFAULT_TTL)  # fmt: skip
                ipv6.emit_fragment_header(hdr, ipv6.HEADER_LEN, protocol, start, more,
                                          self._ident6)  # fmt: skip
                out.append(b"".join((vnet, hdr, chunk)))
        else:
            # RFC 791 3.2: DF clear, same identification, offsets in 8-byte units.
            ident = self._next_ident()
            step = (self.mtu - ipv4.HEADER_LEN) & ~7
            for start in range(0, len(view), step):
                chunk = view[start : start + step]
                flags_frag = start >> 3
                if start + step < len(view):
                    flags_frag |= ipv4.FLAG_MF
                hdr = bytearray(ipv4.HEADER_LEN)
                ipv4.emit_header(hdr, 0, src, dst, protocol, len(chunk), ident, DEFAULT_TTL,
                                 flags_frag)  # fmt: skip
                out.append(b"".join((vnet, hdr, chunk)))
        return out
