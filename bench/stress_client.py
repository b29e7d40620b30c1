"""Load generators for ``bench/stress.py``; each runs inside the client namespace.

Standalone (stdlib only), like ``bench/client.py``: ``ip netns exec NS python3
bench/stress_client.py MODE ...``. Every mode prints JSON lines on stdout; the last one is
its result (``"error"`` in it and exit status 1 on failure). Modes:

``inject``  hostile packets written straight into tunproxy's TUN with a packet socket
            (AF_PACKET bound to the TUN: the kernel neither checks nor fixes what it
            sends, unlike a raw IP socket, which rewrites the IPv4 length and checksum):
            random bytes, mutated IPv4/IPv6/TCP/UDP packets, overlapping and endless
            fragments, and hostile segments on flows it opened itself (every flag
            combination, zero windows, SACK blocks outside the window, bad options).
            Paced on the TUN's own counters so the packets reach tunproxy instead of
            overflowing the TUN queue (what still overflowed is reported).
``flood``   TCP SYNs from random spoofed sources and ports, as fast as it can.
``flows``   COUNT TCP connections opened and held; prints ``{"ready": N}``; on a line on
            stdin, every flow echoes SIZE bytes once; prints the result and holds the
            flows until stdin closes.
``active``  COUNT TCP connections, each echoing SIZE bytes every INTERVAL; prints
            ``{"ready": N}``, then records the CLOCK_MONOTONIC time each flow ends (reset,
            EOF, timeout) until all ended, stdin closed or MAX_SECONDS.
``slow``    COUNT TCP connections to a server that sends without end; each reads its first
            bytes, then never reads again. Prints ``{"ready": N}``; holds until stdin closes.
``dnsq``    COUNT DNS queries (distinct names, WINDOW at once): the time to each answer
            and its RCODE.

Spoofed sources come from ``SPOOF_NET`` (10.77.0.0/16): not an address of the client
namespace, whose kernel (forwarding off) drops tunproxy's answers to them, so a SYN flood
leaves true half-open flows behind, and the injector reads the answers it needs (SYN-ACKs)
from the same packet socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import random
import resource
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
PACKET_HOST = 0
SPOOF_NET = (10, 77)
SPOOF_NET6 = bytes.fromhex("fd00007700000000")
TCP, UDP, ICMP, FRAG6 = 6, 17, 1, 44
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 1, 2, 4, 8, 16, 32, 64, 128


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- packets ------------------------------------------------------------------------------


def csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, *, ident: int = 0,
         frag: int = 0, options: bytes = b"", ttl: int = 64) -> bytes:
    ihl = 5 + len(options) // 4
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(options) + len(payload),
                         ident, frag, ttl, proto, 0, src, dst) + options
    return header[:10] + struct.pack("!H", csum(header)) + header[12:] + payload


def ipv6(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), proto, 64, src, dst) + payload


def pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def tcp(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
        window: int = 65535, options: bytes = b"", payload: bytes = b"", urg: int = 0,
        good_csum: bool = True, offset: int | None = None) -> bytes:
    if len(options) % 4:
        options += b"\0" * (4 - len(options) % 4)
    words = offset if offset is not None else 5 + len(options) // 4
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      (words & 15) << 4 | (flags >> 8 & 1), flags & 0xFF, window & 0xFFFF, 0,
                      urg) + options + payload
    check = csum(pseudo(src, dst, TCP, len(seg)) + seg) if good_csum else random.getrandbits(16)
    return seg[:16] + struct.pack("!H", check) + seg[18:]


def udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
        length: int | None = None, good_csum: bool = True) -> bytes:
    size = 8 + len(payload)
    seg = struct.pack("!HHHH", sport, dport, size if length is None else length, 0) + payload
    check = csum(pseudo(src, dst, UDP, size) + seg) if good_csum else random.getrandbits(16)
    return seg[:6] + struct.pack("!H", check or 0xFFFF) + seg[8:]


def ip_for(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    return ipv4(src, dst, proto, payload) if len(src) == 4 else ipv6(src, dst, proto, payload)


def syn_options(rng: random.Random) -> bytes:
    # MSS 1460, SACK permitted, timestamps, window scale 7 (what Linux sends).
    return (b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + struct.pack("!II", rng.getrandbits(32), 0)
            + b"\x01\x03\x03\x07")


class Hostile:
    """Builds one hostile packet at a time; ``kinds`` counts what was built."""

    def __init__(self, rng: random.Random, dst4: bytes, dst6: bytes, port: int) -> None:
        self.rng = rng
        self.dst4 = dst4
        self.dst6 = dst6
        self.port = port
        self.kinds: dict[str, int] = {}
        self._frag_id = 0

    def src4(self) -> bytes:
        return bytes([*SPOOF_NET, self.rng.randrange(256), self.rng.randrange(1, 255)])

    def src6(self) -> bytes:
        return SPOOF_NET6 + self.rng.randbytes(8)

    def count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def valid(self, v6: bool) -> bytes:
        """A well-formed TCP or UDP packet from a spoofed source, to be mutated."""
        r = self.rng
        src, dst = (self.src6(), self.dst6) if v6 else (self.src4(), self.dst4)
        sport = r.randrange(1024, 65536)
        dport = self.port if r.random() < 0.5 else r.randrange(1, 65536)
        if r.random() < 0.6:
            flags = r.choice([SYN, ACK, ACK | PSH, FIN | ACK, RST])
            body = tcp(src, dst, sport, dport, r.getrandbits(32), r.getrandbits(32), flags,
                       options=syn_options(r) if flags == SYN else b"",
                       payload=r.randbytes(r.randrange(0, 64)) if flags & ACK else b"")
            return ip_for(src, dst, TCP, body)
        body = udp(src, dst, sport, dport, r.randbytes(r.randrange(0, 96)))
        return ip_for(src, dst, UDP, body)

    def next_stateless(self) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.10:
            self.count("random-bytes")
            data = bytearray(r.randbytes(r.randrange(0, 200)))
            if data and r.random() < 0.7:  # mostly a plausible version nibble
                data[0] = (r.choice((4, 6)) << 4) | (data[0] & 15)
            return bytes(data)
        if pick < 0.20:
            self.count("truncated")
            whole = self.valid(r.random() < 0.3)
            return whole[: r.randrange(0, len(whole))]
        if pick < 0.30:
            self.count("wrong-length")
            pkt: bytearray = bytearray(self.valid(r.random() < 0.3))
            if pkt[0] >> 4 == 4:
                struct.pack_into("!H", pkt, 2, r.randrange(0, 65536))
                struct.pack_into("!H", pkt, 10, 0)
                struct.pack_into("!H", pkt, 10, csum(bytes(pkt[:20])))
            else:
                struct.pack_into("!H", pkt, 4, r.randrange(0, 65536))
            if r.random() < 0.3:
                pkt += r.randbytes(r.randrange(1, 64))  # trailing bytes beyond the length
            return bytes(pkt)
        if pick < 0.40:
            self.count("bad-ip-header")
            return self.bad_ip_header()
        if pick < 0.50:
            self.count("bad-checksum")
            flipped = bytearray(self.valid(r.random() < 0.3))
            flipped[r.randrange(len(flipped) - 4, len(flipped))] ^= 1 << r.randrange(8)
            return bytes(flipped)
        if pick < 0.62:
            self.count("fragment")
            return self.fragment()
        if pick < 0.74:
            self.count("bad-tcp-header")
            return self.bad_tcp()
        if pick < 0.80:
            self.count("bad-udp")
            src, dst = self.src4(), self.dst4
            payload = r.randbytes(r.randrange(0, 64))
            body = udp(src, dst, r.randrange(1, 65536), r.randrange(0, 65536), payload,
                       length=r.randrange(0, 200), good_csum=r.random() < 0.5)
            return ipv4(src, dst, UDP, body)
        if pick < 0.86:
            self.count("ipv6-extension-headers")
            return self.bad_ipv6()
        if pick < 0.92:
            self.count("icmp")
            src = self.src4()
            body = bytes([r.randrange(256), r.randrange(256), 0, 0]) + r.randbytes(
                r.randrange(0, 80))
            body = body[:2] + struct.pack("!H", csum(body)) + body[4:]
            return ipv4(src, self.dst4, ICMP, body)
        self.count("valid-stray")
        return self.valid(r.random() < 0.3)

    def bad_ip_header(self) -> bytes:
        r = self.rng
        src = self.src4()
        body = tcp(src, self.dst4, r.randrange(1, 65536), self.port, r.getrandbits(32), 0, SYN)
        choice = r.randrange(4)
        if choice == 0:  # IHL below 5 or beyond the packet
            pkt = bytearray(ipv4(src, self.dst4, TCP, body))
            pkt[0] = 0x40 | r.choice((0, 1, 4, 15))
            struct.pack_into("!H", pkt, 10, 0)
            struct.pack_into("!H", pkt, 10, csum(bytes(pkt[: max(20, (pkt[0] & 15) * 4)])))
            return bytes(pkt)
        if choice == 1:  # garbage options (lengths 0, 1, past the header)
            opts = bytes([r.choice((0x44, 0x83, 0x89, 0x07, r.randrange(256))),
                          r.choice((0, 1, 2, 40, 255))]) + r.randbytes(r.choice((2, 6, 18, 38)))
            return ipv4(src, self.dst4, TCP, body, options=opts[: len(opts) // 4 * 4])
        if choice == 2:  # version 4 with a v6-sized header, flags reserved bit, TTL 0
            return ipv4(src, self.dst4, TCP, body, frag=0x8000, ttl=0)
        # broadcast / multicast / zero addresses
        dst = r.choice((b"\xff\xff\xff\xff", b"\xe0\x00\x00\x01", b"\0\0\0\0", b"\x7f\0\0\1"))
        return ipv4(r.choice((src, b"\0\0\0\0", b"\xe0\0\0\5")), dst, TCP,
                    tcp(src, dst, 1234, self.port, 1, 0, SYN))

    def fragment(self) -> bytes:
        """Overlapping, tiny, out-of-range and endless (never completed) fragments."""
        r = self.rng
        src = self.src4()
        self._frag_id = (self._frag_id + 1) & 0xFFFF
        ident = self._frag_id if r.random() < 0.7 else r.randrange(4)  # some ids collide
        offset_units = r.choice((0, 1, 2, r.randrange(0, 8192), 8191))
        more = r.random() < 0.8  # most never complete: "endless"
        payload = r.randbytes(r.choice((8, 16, 24, 1400, r.randrange(1, 64))))
        frag = (0x2000 if more else 0) | offset_units
        if r.random() < 0.1:
            frag |= 0x4000  # DF with MF/offset: contradictory
        return ipv4(src, self.dst4, r.choice((TCP, UDP)), payload, ident=ident, frag=frag)

    def bad_tcp(self) -> bytes:
        r = self.rng
        v6 = r.random() < 0.3
        src, dst = (self.src6(), self.dst6) if v6 else (self.src4(), self.dst4)
        choice = r.randrange(4)
        if choice == 0:  # data offset below 5 or beyond the segment
            body = tcp(src, dst, r.randrange(1, 65536), self.port, 1, 0, SYN,
                       offset=r.choice((0, 1, 4, 15)))
        elif choice == 1:  # malformed options: zero/one length, past the end, huge values
            opt = r.choice((b"\x02\x00", b"\x02\x01", b"\x03\x03\xff", b"\x08\x0a\0\0",
                            b"\x05\x02", b"\x05\x0a\0\0\0\1\0\0\0\2", b"\x02\x04\0\0",
                            b"\x04\x09", r.randbytes(r.randrange(1, 40))))
            body = tcp(src, dst, r.randrange(1, 65536), self.port, r.getrandbits(32), 0, SYN,
                       options=opt[:40])
        elif choice == 2:  # SYN with data, SYN+FIN, SYN+RST, port 0
            flags = r.choice((SYN | FIN, SYN | RST, SYN | URG | PSH | FIN, SYN))
            body = tcp(src, dst, r.choice((0, 1234)), r.choice((0, self.port)),
                       r.getrandbits(32), 0, flags, payload=r.randbytes(r.randrange(0, 100)))
        else:  # any flags, any numbers, to a flow that does not exist
            body = tcp(src, dst, r.randrange(1, 65536), self.port, r.getrandbits(32),
                       r.getrandbits(32), r.randrange(512), window=r.randrange(65536),
                       urg=r.randrange(65536))
        return ip_for(src, dst, TCP, body)

    def bad_ipv6(self) -> bytes:
        r = self.rng
        src = self.src6()
        kind = r.randrange(4)
        if kind == 0:  # an extension header chain of garbage (hop-by-hop, routing, dest)
            chain = b""
            for _ in range(r.randrange(1, 6)):
                chain += bytes([r.choice((0, 43, 60, 44, 6, 17, 59)), r.randrange(4)])
                chain += r.randbytes(6)
            return ipv6(src, self.dst6, r.choice((0, 43, 60)), chain + r.randbytes(20))
        if kind == 1:  # fragment header: overlapping / endless
            offset = r.choice((0, 1, 2, r.randrange(8192)))
            more = 1 if r.random() < 0.8 else 0
            fh = struct.pack("!BBHI", r.choice((TCP, UDP)), 0, offset << 3 | more,
                             r.randrange(16))
            return ipv6(src, self.dst6, FRAG6, fh + r.randbytes(r.choice((8, 16, 64))))
        if kind == 2:  # next header "no next header" or unknown
            return ipv6(src, self.dst6, r.choice((59, 253, 132)), r.randbytes(16))
        body = udp(src, self.dst6, r.randrange(1, 65536), self.port, r.randbytes(10),
                   good_csum=False)
        return ipv6(src, self.dst6, UDP, body)


class LiveFlow:
    """A TCP flow the injector opened itself from a spoofed source, to abuse once open."""

    __slots__ = ("dport", "dst", "established", "irs", "iss", "sent", "sport", "src")

    def __init__(self, src: bytes, sport: int, dst: bytes, dport: int, iss: int) -> None:
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.iss = iss
        self.irs: int | None = None
        self.sent = 0
        self.established = False


class Injector:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        dst4 = socket.inet_pton(socket.AF_INET, args.dst4)
        dst6 = socket.inet_pton(socket.AF_INET6, args.dst6)
        self.hostile = Hostile(self.rng, dst4, dst6, args.port)
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        self.sock.bind((args.tun, ETH_P_ALL))
        self.sock.setblocking(False)
        self.stats = Path(f"/sys/class/net/{args.tun}/statistics")
        self.live: dict[int, LiveFlow] = {}  # by our source port
        self.sent = 0
        self.send_errors = 0
        self.synacks = 0

    def tun_stat(self, name: str) -> int:
        return int((self.stats / name).read_text())

    def send(self, pkt: bytes) -> None:
        proto = ETH_P_IPV6 if pkt and pkt[0] >> 4 == 6 else ETH_P_IP
        try:
            self.sock.sendto(pkt or b"\0", (self.args.tun, proto))
            self.sent += 1
        except OSError:
            self.send_errors += 1

    def drain(self) -> None:
        """Read tunproxy's answers off the TUN: the SYN-ACKs of the flows we opened."""
        while True:
            try:
                data, addr = self.sock.recvfrom(70000)
            except BlockingIOError:
                return
            if addr[2] != PACKET_HOST or len(data) < 40 or data[0] >> 4 != 4:
                continue
            ihl = (data[0] & 15) * 4
            if data[9] != TCP or data[16:18] != bytes(SPOOF_NET):
                continue
            _, dport, seq, _, _, flags = struct.unpack_from("!HHIIBB", data, ihl)
            flow = self.live.get(dport)
            if flow is None:
                continue
            if flags & (SYN | ACK) == SYN | ACK and flow.irs is None:
                flow.irs = seq
                self.synacks += 1
            elif flags & RST:
                del self.live[dport]

    def open_flow(self) -> None:
        h = self.hostile
        src = h.src4()
        sport = self.rng.randrange(1024, 65536)
        if sport in self.live:
            return
        flow = LiveFlow(src, sport, h.dst4, self.args.port, self.rng.getrandbits(32))
        self.live[sport] = flow
        h.count("live-syn")
        self.send(ipv4(src, flow.dst, TCP, tcp(src, flow.dst, sport, flow.dport, flow.iss, 0,
                                               SYN, options=syn_options(self.rng))))

    def abuse(self, flow: LiveFlow) -> bytes:
        """A segment inside an open flow: the kind a broken or hostile peer sends."""
        r = self.rng
        h = self.hostile
        assert flow.irs is not None
        snd = flow.iss + 1 + flow.sent
        rcv = flow.irs + 1
        src, dst = flow.src, flow.dst

        def seg(flags: int, **kw: Any) -> bytes:
            return ipv4(src, dst, TCP, tcp(src, dst, flow.sport, flow.dport,
                                           kw.pop("seq", snd), kw.pop("ack", rcv), flags, **kw))

        if not flow.established:
            flow.established = True
            h.count("live-ack")
            return seg(ACK)
        pick = r.randrange(7)
        if pick == 0:
            h.count("live-flag-combination")
            flags = r.randrange(512)
            if flags & RST and r.random() < 0.8:
                flags &= ~RST  # keep most flows alive for more abuse
            return seg(flags, payload=r.randbytes(r.choice((0, 0, 10))))
        if pick == 1:
            h.count("live-zero-window")
            return seg(ACK, window=0)
        if pick == 2:
            h.count("live-sack-outside-window")
            blocks = b"".join(struct.pack("!II", (rcv + r.choice((-1, 1)) * r.randrange(
                1 << 20, 1 << 31)) & 0xFFFFFFFF, r.getrandbits(32)) for _ in range(r.randrange(
                    1, 5)))
            return seg(ACK, options=b"\x01\x01\x05" + bytes([2 + len(blocks)]) + blocks)
        if pick == 3:
            h.count("live-data")
            size = r.randrange(1, 600)
            # in order, overlapping the last bytes, or far out of the window
            where = r.choice((0, -min(flow.sent, size // 2), 1 << 24, -(1 << 24)))
            data = seg(ACK | PSH, seq=snd + where, payload=r.randbytes(size))
            if where == 0:
                flow.sent += size
            return data
        if pick == 4:
            h.count("live-bad-ack")
            return seg(ACK, ack=rcv + r.choice((1 << 20, -(1 << 20), r.getrandbits(32))))
        if pick == 5:
            h.count("live-bad-options")
            return seg(ACK, options=r.choice((b"\x08\x0a" + r.randbytes(8), b"\x03\x03\xff",
                                              b"\x02\x04\0\0", b"\x05\x02", b"\x04\x00")))
        h.count("live-urgent")
        return seg(ACK | URG, urg=r.randrange(65536), payload=r.randbytes(8))

    def next_packet(self) -> bytes:
        r = self.rng
        ready = [f for f in self.live.values() if f.irs is not None]
        if r.random() < 0.35:
            if ready:
                flow = r.choice(ready)
                pkt = self.abuse(flow)
                if flow.sent > 20000 or r.random() < 0.005:
                    self.hostile.count("live-rst")
                    del self.live[flow.sport]
                    src, dst = flow.src, flow.dst
                    return ipv4(src, dst, TCP, tcp(src, dst, flow.sport, flow.dport,
                                                   flow.iss + 1 + flow.sent, 0, RST))
                return pkt
            if len(self.live) < self.args.live_flows:
                self.open_flow()
        if len(self.live) < self.args.live_flows and r.random() < 0.01:
            self.open_flow()
        return self.hostile.next_stateless()

    def run(self) -> dict[str, Any]:
        args = self.args
        base_read = self.tun_stat("tx_packets")
        base_dropped = self.tun_stat("tx_dropped")
        start = time.monotonic()
        mine = 0  # what we wrote; the TUN counters also count the normal traffic beside us
        credited = 0  # TUN drops taken as done (see the pacing below)
        next_report = start + 5
        while mine < args.count:
            batch = min(256, args.count - mine)
            for _ in range(batch):
                self.send(self.next_packet())
            mine += batch
            self.drain()
            # Pace on what tunproxy has read: at most WINDOW of our packets ahead of it.
            # Drops count as done only once reads have stalled for 100 ms (a dropped packet
            # will never be read); counting them at once let the injector run ahead of
            # tunproxy by all it dropped.
            last_read = -1
            stalled_since = time.monotonic()
            while True:
                read = self.tun_stat("tx_packets") - base_read
                if self.sent - read - credited < args.window:
                    break
                now = time.monotonic()
                if read != last_read:
                    last_read, stalled_since = read, now
                elif now - stalled_since > 0.1:
                    credited = self.tun_stat("tx_dropped") - base_dropped
                    stalled_since = now
                self.drain()
                select.select([self.sock], [], [], 0.002)
            now = time.monotonic()
            if now >= next_report:
                next_report = now + 5
                emit({"progress": mine, "elapsed_s": round(now - start, 1),
                      "tun_read": self.tun_stat("tx_packets") - base_read,
                      "tun_dropped": self.tun_stat("tx_dropped") - base_dropped})
        elapsed = time.monotonic() - start
        return {
            "sent": self.sent, "send_errors": self.send_errors, "elapsed_s": elapsed,
            "per_s": self.sent / elapsed if elapsed else 0.0,
            "tun_dropped": self.tun_stat("tx_dropped") - base_dropped,
            "tun_read": self.tun_stat("tx_packets") - base_read,
            "synacks_seen": self.synacks, "kinds": self.hostile.kinds,
        }


def run_inject(args: argparse.Namespace) -> dict[str, Any]:
    return Injector(args).run()


def run_flood(args: argparse.Namespace) -> dict[str, Any]:
    """SYNs from random spoofed sources/ports, sent as fast as Python can build them."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sock.bind((args.tun, ETH_P_IP))
    dst = socket.inet_pton(socket.AF_INET, args.dst4)
    rng = random.Random(args.seed)
    stats = Path(f"/sys/class/net/{args.tun}/statistics")
    dropped0 = int((stats / "tx_dropped").read_text())
    # One SYN template; per packet only the source address and port, sequence and the two
    # checksums change.
    options = b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07"
    sent = errors = 0
    start = time.monotonic()
    while sent + errors < args.count:
        src = bytes([*SPOOF_NET, rng.randrange(256), rng.randrange(1, 255)])
        seg = tcp(src, dst, rng.randrange(1024, 65536), args.port, rng.getrandbits(32), 0, SYN,
                  window=64240, options=options)
        try:
            sock.sendto(ipv4(src, dst, TCP, seg), (args.tun, ETH_P_IP))
            sent += 1
        except OSError:
            errors += 1
    elapsed = time.monotonic() - start
    return {"sent": sent, "send_errors": errors, "elapsed_s": elapsed,
            "per_s": sent / elapsed if elapsed else 0.0,
            "tun_dropped": int((stats / "tx_dropped").read_text()) - dropped0}


# -- flows ---------------------------------------------------------------------------------


async def open_many(host: str, port: int, count: int, parallel: int, timeout: float,
                    first: bytes | None) -> tuple[list[tuple[asyncio.StreamReader,
                                                              asyncio.StreamWriter]], list[str]]:
    """Open ``count`` connections, ``parallel`` at a time; each verified with a 1-byte echo
    (``first``) or by reading its first bytes (``first`` None: a server that talks)."""
    flows: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(timeout):
                    reader, writer = await asyncio.open_connection(host, port, limit=1 << 16)
                    if first is not None:
                        writer.write(first)
                        if await reader.readexactly(len(first)) != first:
                            raise ValueError("wrong echo")
                    else:
                        await reader.readexactly(1024)
                flows.append((reader, writer))
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(one() for _ in range(count)))
    return flows, errors


async def stdin_line() -> str:
    """The next line of stdin ("" at its end). Read on a daemon thread, not the loop's
    executor: asyncio.run would wait for a read still blocked at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()

    def deliver(line: str) -> None:
        if not future.done():
            future.set_result(line)

    def read() -> None:
        line = sys.stdin.readline()
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, line)

    threading.Thread(target=read, daemon=True).start()
    return await future


async def flows_mode(args: argparse.Namespace) -> dict[str, Any]:
    start = time.monotonic()
    flows, errors = await open_many(args.host, args.port, args.count, args.parallel,
                                    args.timeout, b"x")
    emit({"ready": len(flows), "failed": len(errors), "elapsed_s": time.monotonic() - start,
          "first_error": errors[0] if errors else None})
    await stdin_line()
    payload = os.urandom(args.size)
    gate = asyncio.Semaphore(args.parallel)
    failures: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with gate:
            try:
                async with asyncio.timeout(args.timeout):
                    writer.write(payload)
                    if await reader.readexactly(len(payload)) != payload:
                        raise ValueError("wrong echo")
            except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")

    began = time.monotonic()
    await asyncio.gather(*(echo(r, w) for r, w in flows))
    emit({"echoed": len(flows) - len(failures), "failed": len(failures),
          "elapsed_s": time.monotonic() - began,
          "first_error": failures[0] if failures else None})
    await stdin_line()
    for _, writer in flows:
        writer.transport.abort()
    return {"closed": len(flows)}


async def active_mode(args: argparse.Namespace) -> dict[str, Any]:
    flows, errors = await open_many(args.host, args.port, args.count, args.parallel,
                                    args.timeout, b"x")
    ended: dict[int, tuple[float, str]] = {}
    stop = asyncio.Event()
    payload = os.urandom(args.size)

    async def keep_busy(index: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        try:
            while not stop.is_set():
                writer.write(payload)
                async with asyncio.timeout(args.timeout):
                    got = await reader.readexactly(len(payload))
                if got != payload:
                    ended[index] = (time.monotonic(), "wrong-echo")
                    return
                await asyncio.sleep(args.interval * (0.5 + random.random()))
        except asyncio.IncompleteReadError:
            ended[index] = (time.monotonic(), "eof")
        except ConnectionResetError:
            ended[index] = (time.monotonic(), "reset")
        except TimeoutError:
            ended[index] = (time.monotonic(), "timeout")
        except OSError as exc:
            ended[index] = (time.monotonic(), errno.errorcode.get(exc.errno or 0, "oserror"))
        finally:
            writer.transport.abort()

    tasks = [asyncio.ensure_future(keep_busy(i, r, w)) for i, (r, w) in enumerate(flows)]
    emit({"ready": len(flows), "failed": len(errors),
          "first_error": errors[0] if errors else None, "at": time.monotonic()})
    reader_task = asyncio.ensure_future(stdin_line())
    deadline = time.monotonic() + args.max_seconds
    while len(ended) < len(flows) and time.monotonic() < deadline and not reader_task.done():
        await asyncio.wait([reader_task], timeout=0.05)
    stop.set()
    alive = len(flows) - len(ended)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    kinds: dict[str, int] = {}
    for _, kind in ended.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"flows": len(flows), "alive": alive, "ended_at": sorted(t for t, _ in ended.values()),
            "ended_how": kinds}


async def slow_mode(args: argparse.Namespace) -> dict[str, Any]:
    flows, errors = await open_many(args.host, args.port, args.count, args.parallel,
                                    args.timeout, None)
    for reader, _ in flows:
        reader._transport.pause_reading()  # type: ignore[attr-defined]
    emit({"ready": len(flows), "failed": len(errors),
          "first_error": errors[0] if errors else None})
    await stdin_line()
    for _, writer in flows:
        writer.transport.abort()
    return {"held": len(flows)}


def dns_query(query_id: int, name: str) -> bytes:
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", 1, 1)


def run_dnsq(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{random.getrandbits(32):08x}"
    sent: dict[int, float] = {}
    answers: list[tuple[float, int]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((args.host, args.port))
        sock.setblocking(False)
        next_id = 0
        deadline = time.monotonic() + args.max_seconds
        while (len(answers) < args.count and time.monotonic() < deadline):
            while len(sent) < args.window and next_id < args.count:
                sock.send(dns_query(next_id, f"s{next_id}.{tag}.{args.zone}"))
                sent[next_id] = time.monotonic()
                next_id += 1
            readable, _, _ = select.select([sock], [], [], 0.05)
            if not readable:
                continue
            try:
                message = sock.recv(65535)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            query_id, flags = struct.unpack_from("!HH", message)
            when = sent.pop(query_id, None)
            if when is not None:
                answers.append((time.monotonic() - when, flags & 0xF))
    rcodes: dict[str, int] = {}
    for _, rcode in answers:
        rcodes[str(rcode)] = rcodes.get(str(rcode), 0) + 1
    times = sorted(t for t, _ in answers)
    return {"asked": next_id, "answered": len(answers), "unanswered": len(sent),
            "rcodes": rcodes, "max_s": times[-1] if times else None,
            "min_s": times[0] if times else None}


ASYNC_MODES = {"flows": flows_mode, "active": active_mode, "slow": slow_mode}
MODES = {"inject": run_inject, "flood": run_flood, "dnsq": run_dnsq}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted([*MODES, *ASYNC_MODES]))
    parser.add_argument("--host", default="10.232.0.1")
    parser.add_argument("--port", type=int, default=7007)
    parser.add_argument("--tun", default="tpstress0")
    parser.add_argument("--dst4", default="10.232.0.1")
    parser.add_argument("--dst6", default="fd00:232::1")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", type=int, default=512, help="inject: packets queued ahead")
    parser.add_argument("--live-flows", type=int, default=64, help="inject: flows to abuse")
    parser.add_argument("--parallel", type=int, default=200, help="connections opened at once")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--zone", default="stress.test")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    try:
        if args.mode in ASYNC_MODES:
            result = asyncio.run(ASYNC_MODES[args.mode](args))
        else:
            result = MODES[args.mode](args)
    except OSError as exc:
        emit({"error": f"{type(exc).__name__}: {exc}"})
        return 1
    emit(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
