#!/usr/bin/env python3
"""Micro-benchmark of the sans-I/O stack alone (no TUN, no kernel): how many bits per
second one CPython core pushes through ``Stack`` in each direction.

    python3 bench/bench_stack.py              # all cases, ~10 s
    python3 bench/bench_stack.py --mb 200     # more data per case
    python3 bench/bench_stack.py --profile    # cProfile of each case, top 15 functions

Cases: local app -> stack (``receive_packet``) as 64 KB GSO super-packets with a
virtio header (NEEDS_CSUM: no checksum verified) or as 1500-byte packets (full
checksum verified); stack -> local app (``send`` + ``packets_to_send``) as GSO
super-packets (pseudo-header sum only) or 1460-byte segments (full checksums).
The peer is ``tests.ippeer``'s packet builder; only the stack's time is measured.
"""

from __future__ import annotations

import argparse
import cProfile
import pathlib
import pstats
import sys
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from stack import FlowOpened, Stack, StackConfig
from stack.wire import tcp, virtio
from stack.wire.checksum import pseudo_header_sum
from tests.ippeer import A4, B4, TcpPeer, ip_packet, parse_out, tcp_l4, with_vnet


def established(vnet: bool, gso: bool) -> tuple[Stack, TcpPeer, int, int]:
    s = Stack(StackConfig(vnet_hdr=vnet, gso=gso, tcp_receive_window=16 << 20,
                          tcp_send_buffer=16 << 20, seed=1))  # fmt: skip
    peer = TcpPeer(s, mss=1460)
    peer.syn()
    ev = s.next_event()
    assert isinstance(ev, FlowOpened)
    s.accept(ev.flow, 0.0)
    (synack,) = [parse_out(p, vnet) for p in s.packets_to_send()]
    peer.take([synack])
    peer.deliver(tcp.ACK)
    s.packets_to_send()
    assert synack.tcp is not None
    return s, peer, ev.flow, synack.tcp.window_scale or 0


def data_packet(sport: int, dport: int, seq: int, ack: int, payload: bytes,
                vnet: bool) -> bytes:  # fmt: skip
    """A TCP data segment from A4 to B4 as a TUN reader gets it: with ``vnet``, behind a
    virtio header with its checksum left partial and GSO in 1,448-byte segments."""
    seg = tcp.TcpRepr(sport, dport, seq, ack, tcp.ACK, 65535)
    l4 = bytearray(tcp_l4(A4, B4, seg, payload))
    if not vnet:
        return ip_packet(A4, B4, 6, bytes(l4))
    l4[16:18] = pseudo_header_sum(A4, B4, 6, len(l4)).to_bytes(2, "big")
    return with_vnet(ip_packet(A4, B4, 6, bytes(l4)), flags=virtio.F_NEEDS_CSUM,
                     gso_type=virtio.GSO_TCPV4, gso_size=1448, hdr_len=40,
                     csum_start=20, csum_offset=16)  # fmt: skip


def bench_receive(total: int, vnet: bool) -> tuple[float, int]:
    s, peer, _, shift = established(vnet, False)
    size = 65000 if vnet else 1460
    payload = bytes(size)
    packets = []
    seq = peer.seq
    edge = (seq + 65535) & 0xFFFFFFFF  # the SYN-ACK's window is never scaled (RFC 7323 2.2)
    for _ in range(total // size):
        packets.append(data_packet(peer.sport, peer.dport, seq, peer.ack, payload, vnet))
        seq = (seq + size) & 0xFFFFFFFF
    batch = 8
    received = 0
    now = 1.0
    elapsed = 0.0
    i = 0
    pos = peer.seq
    while i < len(packets):
        t0 = time.perf_counter()
        n = 0
        # A well-behaved sender: only what fits the advertised window.
        while i < len(packets) and n < batch and (edge - pos - size) & 0xFFFFFFFF < 0x80000000:
            s.receive_packet(packets[i], now)
            i += 1
            n += 1
            pos = (pos + size) & 0xFFFFFFFF
        while (ev := s.next_event()) is not None:
            received += len(ev.data)  # type: ignore[union-attr]
        out = s.packets_to_send()
        elapsed += time.perf_counter() - t0
        for raw in out:
            seg, _ = tcp.parse(memoryview(raw)[(10 if vnet else 0) + 20 :])
            edge = (seg.ack + (seg.window << shift)) & 0xFFFFFFFF
        assert n or out, "stalled"
        now += 0.0001
    assert received == len(packets) * size, (received, len(packets) * size)
    return elapsed, received


def bench_send(total: int, vnet: bool) -> tuple[float, int]:
    s, peer, flow, _ = established(vnet, vnet)
    chunk = bytes(256 * 1024)
    sent = 0
    now = 1.0
    elapsed = 0.0
    acked = 0
    while acked < total:
        t0 = time.perf_counter()
        free = s.send_buffer_free(flow)
        if free and sent < total:
            piece = chunk[: min(free, total - sent)]
            s.send(flow, piece, now)
            sent += len(piece)
        out = s.packets_to_send()
        elapsed += time.perf_counter() - t0
        # The peer acknowledges everything at once (cheaply: no checksum verification).
        for raw in out:
            view = memoryview(raw)[10 if vnet else 0 :]
            seg, payload = tcp.parse(view[20:])
            end = (seg.seq + len(payload)) & 0xFFFFFFFF
            if (end - peer.ack) & 0xFFFFFFFF < 0x80000000:
                peer.ack = end
                acked += len(payload)
        now += 0.0005
        ack = peer.packet(tcp.ACK)
        t0 = time.perf_counter()
        s.receive_packet(ack, now)
        elapsed += time.perf_counter() - t0
    return elapsed, acked


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    total = args.mb * 1024 * 1024
    cases: list[tuple[str, Callable[[], tuple[float, int]]]] = [
        ("receive, 64 KB GSO super-packets (vnet)", lambda: bench_receive(total, True)),
        ("receive, 1500-byte packets (checksums)", lambda: bench_receive(total // 4, False)),
        ("send, 64 KB GSO super-packets (vnet)", lambda: bench_send(total, True)),
        ("send, 1460-byte segments (checksums)", lambda: bench_send(total // 4, False)),
    ]
    for name, fn in cases:
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            elapsed, n = fn()
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(15)
        else:
            elapsed, n = fn()
        print(f"{name:45s} {n * 8 / elapsed / 1e9:6.2f} Gbit/s  ({n >> 20} MB in {elapsed:.2f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
