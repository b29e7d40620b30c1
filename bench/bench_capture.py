#!/usr/bin/env python3
"""Micro-benchmark of a packet capture's cost per TUN packet (issue 14), no TUN, no kernel.

    python3 bench/bench_capture.py            # ~10 s
    python3 bench/bench_capture.py --packets 20000

What the driver pays per packet for each case, in microseconds, as it reads batches of
``READ_BATCH`` packets (64 KB GSO super-packets with a virtio header and a partial
checksum, as the app's uploads arrive, and 1,500-byte packets, as without offloads):

* ``no capture``: the driver's check, once per batch (``driver.tap is None``);
* ``capture, other flow``: a capture selecting another process, the flow routed and seen
  by an earlier flush: the tap finds the packet's flow and drops it;
* ``... not routed yet``: the same for a flow whose rule is not set yet (its first
  moments): the tap holds the packet, the flush finds its flow and leaves it out;
* ``capture, this flow``: the same, and the packet is framed (checksum finished) and
  written as an Enhanced Packet Block with its flow's comment.

Each figure is the best of ``--repeat`` runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench.bench_stack import data_packet
from tests.ippeer import A4, B4
from tunproxy.capture.file import CaptureFile
from tunproxy.capture.select import parse_selection
from tunproxy.driver import READ_BATCH
from tunproxy.flows import FlowRecord


class NullOutput:
    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes, /) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def packets(count: int, size: int, vnet: bool) -> list[bytes]:
    out = []
    payload = bytes(size)
    seq = 1000
    for _ in range(count):
        out.append(data_packet(40000, 5201, seq, 1, payload, vnet))
        seq += size
    return out


def capture_of(process: str, vnet: bool, routed: bool = True) -> CaptureFile:
    capture = CaptureFile(Path("-"), limit=1 << 62, out=NullOutput(),
                          selection=parse_selection([f"process={process}"]))
    capture._vnet_hdr = vnet  # what attach() reads from the stack's config
    capture.flow_opened(FlowRecord(id=1, network="tcp", src=str(_ip(A4)), src_port=40000,
                                   dst=str(_ip(B4)), dst_port=5201, process="iperf3", pid=42,
                                   rule="MATCH" if routed else None, outbound="DIRECT"))
    return capture


def _ip(raw: bytes) -> str:
    return ".".join(str(b) for b in raw)


def per_packet_us(run: Callable[[], object], count: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best / count * 1e6


def no_capture(batches: list[list[bytes]],
               tap: Callable[[list[bytes], bool], None] | None = None) -> int:
    """The driver's one check per batch, with no capture running."""
    done = 0
    for batch in batches:
        if tap is not None:
            tap(batch, True)
        done += len(batch)
    return done


def with_capture(batches: list[list[bytes]], process: str, vnet: bool,
                 routed: bool = True) -> int:
    """The tap per batch, then the flush that selects, frames and writes. The flow has been
    seen by an earlier flush (the steady state of a long flow)."""
    capture = capture_of(process, vnet, routed)
    capture.tap(batches[0][:1], True)
    capture.flush()
    capture.packets = 0
    for batch in batches:
        capture.tap(batch, True)
    capture.flush()
    return capture.packets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'case':28} {'64 KB GSO, us/pkt':>18} {'1500 B, us/pkt':>16}")
    rows: dict[str, list[float]] = {}
    for size, vnet in ((65000, True), (1460, False)):
        pkts = packets(args.packets, size, vnet)
        batches = [pkts[i:i + READ_BATCH] for i in range(0, len(pkts), READ_BATCH)]
        assert with_capture(batches, "curl", vnet) == 0  # another process: nothing written
        assert with_capture(batches, "iperf3", vnet) == len(pkts)  # this flow: every packet
        cases: dict[str, Callable[[], object]] = {
            "no capture": lambda b=batches: no_capture(b),
            "capture, other flow": lambda b=batches, v=vnet: with_capture(b, "curl", v),
            "  ... not routed yet": lambda b=batches, v=vnet: with_capture(b, "curl", v, False),
            "capture, this flow": lambda b=batches, v=vnet: with_capture(b, "iperf3", v),
        }
        for name, run in cases.items():
            rows.setdefault(name, []).append(per_packet_us(run, len(pkts), args.repeat))
    for name, (big, small) in rows.items():
        print(f"{name:28} {big:18.3f} {small:16.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
