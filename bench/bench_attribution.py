#!/usr/bin/env python3
"""What attributing a flow costs (issue 13): the per-connection work ``log.attribution``
adds when a flow opens, measured on real loopback sockets of this process.

    python3 bench/bench_attribution.py [--count 2000]

Prints the median and p99, in microseconds, of: the sock_diag lookup alone
(``ProcessResolver.socket_of``), the whole process lookup (``lookup``: sock_diag, the
inode's owner, the exe link, validation), and the whole attribution (``Attributor``: the
lookup plus the cgroup read), of a failed one (no such socket; a remote source), and of the
common case in a proxy: a socket just made by another process that keeps connecting
(``new_socket``: the inode is not in the resolver's map yet, so that process's fds are
read again; its fd numbers are reused, as Linux hands out the lowest free one).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tunproxy.attribution import Attributor  # noqa: E402
from tunproxy.flows import FlowRecord  # noqa: E402
from tunproxy.procinfo import ProcessResolver  # noqa: E402


def timed(samples: list[float], fn: Callable[..., object], *args: object) -> None:
    began = time.perf_counter_ns()
    fn(*args)
    samples.append((time.perf_counter_ns() - began) / 1000)


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_us": round(statistics.median(ordered), 1),
            "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    port = listener.getsockname()[1]
    pairs = []
    for _ in range(args.count):
        c = socket.create_connection(("127.0.0.1", port))
        s, _ = listener.accept()
        pairs.append((c, s))
    resolver = ProcessResolver()
    attributor = Attributor(resolver)
    diag: list[float] = []
    lookup: list[float] = []
    whole: list[float] = []
    failed: list[float] = []
    remote: list[float] = []
    for c, _ in pairs:
        src, sport = c.getsockname()
        timed(diag, resolver.socket_of, "tcp", src, sport, "127.0.0.1", port)
        timed(lookup, resolver.lookup, "tcp", src, sport, "127.0.0.1", port)
        record = FlowRecord(id=1, network="tcp", src=src, src_port=sport, dst="127.0.0.1",
                            dst_port=port)
        timed(whole, attributor, record)
        assert record.attribution == "process", record.attribution
        gone = FlowRecord(id=2, network="tcp", src="127.0.0.1", src_port=1, dst="127.0.0.1",
                          dst_port=1)
        timed(failed, attributor, gone)
        far = FlowRecord(id=3, network="tcp", src="192.0.2.1", src_port=1, dst="127.0.0.1",
                         dst_port=1)
        timed(remote, attributor, far)
    # Another process connects anew each time, keeping its last 20 connections open.
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import socket, sys\nkeep = []\nfor _ in sys.stdin:\n"
            f"    c = socket.create_connection(('127.0.0.1', {port}))\n"
            "    keep.append(c)\n    print(c.getsockname()[1], flush=True)\n"
            "    if len(keep) > 20:\n        keep.pop(0).close()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    fresh: list[float] = []
    for i in range(min(args.count, 1000)):
        child.stdin.write("\n")
        child.stdin.flush()
        sport = int(child.stdout.readline())
        server, _ = listener.accept()
        record = FlowRecord(id=i, network="tcp", src="127.0.0.1", src_port=sport,
                            dst="127.0.0.1", dst_port=port)
        timed(fresh, attributor, record)
        assert record.attribution == "process", record.attribution
        server.close()
    child.stdin.close()
    child.wait()
    print(json.dumps({
        "count": args.count,
        "sock_diag": summary(diag),
        "process_lookup": summary(lookup),
        "attribution": summary(whole),
        "failed_no_socket": summary(failed),
        "remote_source": summary(remote),
        "new_socket": summary(fresh),
        "resolver_stats": resolver.stats,
    }, indent=2))
    for c, s in pairs:
        c.close()
        s.close()
    listener.close()
    attributor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
