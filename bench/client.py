"""Measurement clients; each runs inside the client namespace and prints one JSON object.

Standalone (stdlib only) so the harness can run ``ip netns exec NS python3 bench/client.py
MODE ...``; the client then measures from inside the namespace, in its own process, and its
timings exclude interpreter start-up. Modes:

``cps``    COUNT sequential connections: connect, send 1 byte, read the echo, close. Gives
           connections per second and the per-connection latency (p50/p99).
``rr``     one persistent TCP connection, COUNT request/response round trips of SIZE bytes:
           p50/p99 latency and round trips per second.
``hold``   open COUNT connections (each verified with a 1-byte echo, so the flow exists end
           to end), print ``{"ready": COUNT}`` and keep them open until stdin closes.
``udp``    one UDP flow, request/response round trips (COUNT or MAX_SECONDS, whichever
           ends first): answers per second, p50/p99.
``flood``  one UDP flow, WINDOW datagrams of SIZE bytes in flight, each echo answered by the
           next datagram, for MAX_SECONDS: datagrams echoed per second (the rate a path
           sustains, not its round-trip time). A datagram unanswered for TIMEOUT is lost and
           replaced.
``dns``    A queries for distinct names under ``--zone``, WINDOW in flight at once, until
           COUNT answers or MAX_SECONDS: answers per second and one sample answer (to check
           it is a fake IP).

``poll``   a dashboard: GET ``/connections`` from the controller at HOST:PORT every
           ``--interval`` seconds until stdin closes; polls, p50/p99 of a poll, bytes and
           connections per answer.

``--socks HOST:PORT`` makes the TCP modes go through a SOCKS5 server themselves (RFC 1928
CONNECT, no authentication): the "SOCKS5 only" control, the SOCKS5 server without tunproxy.
On failure the object holds ``"error"`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import socket
import struct
import sys
import time
from typing import Any

# Give up on a path after this many failed operations in one run: a broken path should
# produce a clear error in seconds, not a multi-minute stream of timeouts.
MAX_FAILURES = 20


class PathError(Exception):
    """The path under test failed (refused, reset, timed out, wrong echo)."""


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def percentiles(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {}
    ordered = sorted(samples_ns)

    def pick(q: float) -> float:
        # Nearest-rank percentile: the value below which a fraction q of the samples lie.
        index = min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))
        return ordered[index] / 1000.0

    mean = sum(ordered) / len(ordered) / 1000.0
    return {"p50_us": pick(0.50), "p99_us": pick(0.99), "mean_us": mean}


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            raise PathError("connection closed before the echo arrived")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """Ask the SOCKS5 server ``sock`` is connected to for a CONNECT to ``host:port``."""
    # RFC 1928 section 3: version 5, one method offered, 0x00 = no authentication.
    sock.sendall(b"\x05\x01\x00")
    if recv_exact(sock, 2) != b"\x05\x00":
        raise PathError("the SOCKS5 server refused no-authentication")
    # Section 4: CONNECT (1) to an IPv4 (ATYP 1) or IPv6 (ATYP 4) address.
    if family_of(host) == socket.AF_INET6:
        atyp, address = 4, socket.inet_pton(socket.AF_INET6, host)
    else:
        atyp, address = 1, socket.inet_aton(host)
    sock.sendall(struct.pack("!BBBB", 5, 1, 0, atyp) + address + struct.pack("!H", port))
    _, reply, _, bound_type = recv_exact(sock, 4)
    if reply != 0:
        raise PathError(f"SOCKS5 CONNECT failed with reply {reply}")
    # Section 6: BND.ADDR (by its type) and BND.PORT follow; nothing in them is needed.
    length = recv_exact(sock, 1)[0] if bound_type == 3 else {1: 4, 4: 16}.get(bound_type, 0)
    recv_exact(sock, length + 2)


def tcp_connect(
    host: str, port: int, timeout: float, socks: tuple[str, int] | None = None
) -> socket.socket:
    """Connect to ``host:port``, through the SOCKS5 server ``socks`` if given."""
    first_hop = socks if socks is not None else (host, port)
    sock = socket.socket(family_of(first_hop[0]), socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect(first_hop)
        if socks is not None:
            socks5_connect(sock, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


def run_cps(args: argparse.Namespace) -> dict[str, Any]:
    samples: list[int] = []
    failures: list[str] = []
    start = time.perf_counter()
    for _ in range(args.count):
        began = time.perf_counter_ns()
        try:
            with tcp_connect(args.host, args.port, args.timeout, args.socks) as sock:
                sock.sendall(b"x")
                if recv_exact(sock, 1) != b"x":
                    raise PathError("wrong echo")
        except (OSError, PathError) as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
            if len(failures) >= MAX_FAILURES:
                raise PathError(
                    f"{len(failures)} connections failed, last: {failures[-1]}"
                ) from exc
            continue
        samples.append(time.perf_counter_ns() - began)
    elapsed = time.perf_counter() - start
    return {
        "count": len(samples), "failed": len(failures), "elapsed_s": elapsed,
        "per_s": len(samples) / elapsed, **percentiles(samples),
    }


def run_rr(args: argparse.Namespace) -> dict[str, Any]:
    payload = os.urandom(args.size)
    samples: list[int] = []
    with tcp_connect(args.host, args.port, args.timeout, args.socks) as sock:
        # Warm up the path (first-flow set-up in the proxy, slow start, caches).
        for _ in range(min(50, args.count)):
            sock.sendall(payload)
            recv_exact(sock, args.size)
        start = time.perf_counter()
        for _ in range(args.count):
            began = time.perf_counter_ns()
            sock.sendall(payload)
            if recv_exact(sock, args.size) != payload:
                raise PathError("wrong echo")
            samples.append(time.perf_counter_ns() - began)
        elapsed = time.perf_counter() - start
    return {"count": len(samples), "elapsed_s": elapsed, "per_s": len(samples) / elapsed,
            **percentiles(samples)}


def run_hold(args: argparse.Namespace) -> dict[str, Any]:
    socks: list[socket.socket] = []
    start = time.perf_counter()
    try:
        for _ in range(args.count):
            sock = tcp_connect(args.host, args.port, args.timeout, args.socks)
            socks.append(sock)
            sock.sendall(b"x")
            if recv_exact(sock, 1) != b"x":
                raise PathError("wrong echo")
        print(json.dumps({"ready": len(socks), "elapsed_s": time.perf_counter() - start}),
              flush=True)
        # Idle until the harness has read the proxy's memory and closes our stdin.
        sys.stdin.read()
    finally:
        for sock in socks:
            sock.close()
    return {"held": len(socks)}


def run_udp(args: argparse.Namespace) -> dict[str, Any]:
    payload = os.urandom(args.size)
    samples: list[int] = []
    lost = 0
    with socket.socket(family_of(args.host), socket.SOCK_DGRAM) as sock:
        sock.settimeout(args.timeout)
        sock.connect((args.host, args.port))
        start = time.perf_counter()
        deadline = start + args.max_seconds
        while len(samples) < args.count and time.perf_counter() < deadline:
            began = time.perf_counter_ns()
            sock.send(payload)
            try:
                # A late answer to an earlier, timed-out request is skipped, not counted.
                while sock.recv(65535) != payload:
                    pass
            except TimeoutError:
                lost += 1
                if lost >= MAX_FAILURES and not samples:
                    raise PathError(f"{lost} UDP requests without an answer") from None
                continue
            samples.append(time.perf_counter_ns() - began)
        elapsed = time.perf_counter() - start
    return {"count": len(samples), "lost": lost, "elapsed_s": elapsed,
            "per_s": len(samples) / elapsed, **percentiles(samples)}


def run_flood(args: argparse.Namespace) -> dict[str, Any]:
    """WINDOW datagrams in flight on one flow; each echo sends the next one."""
    seq_format = struct.Struct("!Q")
    filler = os.urandom(max(0, args.size - seq_format.size))
    outstanding: dict[int, float] = {}
    echoed = lost = sent = 0
    with socket.socket(family_of(args.host), socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.connect((args.host, args.port))
        sock.setblocking(False)
        recv, send, pack, unpack = sock.recv, sock.send, seq_format.pack, seq_format.unpack_from
        start = time.perf_counter()
        deadline = start + args.max_seconds
        now = expire_at = start
        while now < deadline:
            while len(outstanding) < args.window:
                outstanding[sent] = now
                send(pack(sent) + filler)
                sent += 1
            readable, _, _ = select.select([sock], [], [], min(0.05, max(0.0, deadline - now)))
            # At most a few windows' worth per wake-up: the clock and the deadline are
            # checked between batches, as echoes keep arriving while we answer them.
            for _ in range(4 * args.window if readable else 0):
                try:
                    message = recv(65535)
                except BlockingIOError:
                    break
                if len(message) < seq_format.size:
                    continue
                if outstanding.pop(unpack(message)[0], None) is None:
                    continue  # a late echo of a datagram already counted lost
                echoed += 1
                outstanding[sent] = now
                send(pack(sent) + filler)
                sent += 1
            now = time.perf_counter()
            if now >= expire_at:
                expire_at = now + 0.1
                for seq, when in list(outstanding.items()):
                    if now - when > args.timeout:
                        del outstanding[seq]
                        lost += 1
            if lost >= MAX_FAILURES * args.window and not echoed:
                raise PathError(f"{lost} UDP datagrams without an echo")
        elapsed = now - start
    return {"count": echoed, "lost": lost, "sent": sent, "elapsed_s": elapsed,
            "per_s": echoed / elapsed}


def dns_query(query_id: int, name: str) -> bytes:
    # RFC 1035 4.1.1: header with RD set, one question; 4.1.2: QNAME QTYPE=A QCLASS=IN.
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + qname + struct.pack("!HH", 1, 1)


def skip_name(message: bytes, offset: int) -> int:
    # RFC 1035 4.1.4: a name is labels ending in a zero byte, or ending in a 2-byte pointer.
    while True:
        length = message[offset]
        if length == 0:
            return offset + 1
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length


def first_a_record(message: bytes) -> str | None:
    try:
        _, _, qdcount, ancount, _, _ = struct.unpack_from("!HHHHHH", message)
        offset = 12
        for _ in range(qdcount):
            offset = skip_name(message, offset) + 4
        for _ in range(ancount):
            offset = skip_name(message, offset)
            rtype, _, _, rdlength = struct.unpack_from("!HHIH", message, offset)
            offset += 10
            if rtype == 1 and rdlength == 4:
                return socket.inet_ntoa(message[offset:offset + 4])
            offset += rdlength
    except (struct.error, IndexError):
        return None
    return None


def run_dns(args: argparse.Namespace) -> dict[str, Any]:
    """Keep WINDOW queries in flight until COUNT answers or MAX_SECONDS, whichever first."""
    tag = f"{random.getrandbits(32):08x}"
    outstanding: dict[int, float] = {}
    answered = lost = errors = sent = 0
    sample: str | None = None
    next_id = random.getrandbits(16)
    with socket.socket(family_of(args.host), socket.SOCK_DGRAM) as sock:
        sock.connect((args.host, args.port))
        sock.setblocking(False)
        start = time.perf_counter()
        deadline = start + args.max_seconds
        now = start
        while answered < args.count and now < deadline:
            while len(outstanding) < args.window:
                query_id = next_id
                next_id = (next_id + 1) & 0xFFFF
                sock.send(dns_query(query_id, f"q{sent}.{tag}.{args.zone}"))
                outstanding[query_id] = time.perf_counter()
                sent += 1
            readable, _, _ = select.select([sock], [], [], min(0.05, max(0.0, deadline - now)))
            while readable:
                try:
                    message = sock.recv(65535)
                except BlockingIOError:
                    break
                if len(message) < 12:
                    continue
                query_id, flags = struct.unpack_from("!HH", message)
                if outstanding.pop(query_id, None) is None:
                    continue  # an answer to a query already given up on
                if flags & 0x000F:  # RCODE != NOERROR
                    errors += 1
                    continue
                answered += 1
                if sample is None:
                    sample = first_a_record(message)
            now = time.perf_counter()
            for query_id, when in list(outstanding.items()):
                if now - when > args.timeout:
                    del outstanding[query_id]
                    lost += 1
            if lost + errors >= MAX_FAILURES and not answered:
                raise PathError(f"{lost} DNS queries unanswered, {errors} answered with an error")
        elapsed = now - start
    # Queries still in flight at the end are neither answered nor lost.
    return {"count": answered, "lost": lost, "errors": errors, "elapsed_s": elapsed,
            "per_s": answered / elapsed, "sample_answer": sample}


def run_poll(args: argparse.Namespace) -> dict[str, Any]:
    import threading
    import urllib.request

    stop = threading.Event()

    def wait_stdin() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    url = f"http://{args.host}:{args.port}/connections"
    samples: list[int] = []
    sizes: list[int] = []
    counts: list[int] = []
    failures = 0
    print(json.dumps({"ready": True}), flush=True)
    while not stop.is_set():
        began = time.perf_counter_ns()
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as resp:
                body = resp.read()
            samples.append(time.perf_counter_ns() - began)
            sizes.append(len(body))
            counts.append(len(json.loads(body)["connections"]))
        except OSError:
            failures += 1
        stop.wait(args.interval)
    return {"polls": len(samples), "failures": failures,
            "bytes_avg": sum(sizes) / max(1, len(sizes)),
            "connections_avg": sum(counts) / max(1, len(counts)), **percentiles(samples)}


def parse_socks(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


MODES = {"cps": run_cps, "rr": run_rr, "hold": run_hold, "udp": run_udp, "flood": run_flood,
         "dns": run_dns, "poll": run_poll}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=sorted(MODES))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--socks", type=parse_socks, metavar="HOST:PORT",
                        help="cps/rr/hold: connect through this SOCKS5 server (no auth)")
    parser.add_argument("--size", type=int, default=64, help="request size in bytes (rr, udp)")
    parser.add_argument("--window", type=int, default=32,
                        help="DNS queries or flood datagrams in flight")
    parser.add_argument("--zone", default="bench.test", help="DNS names are q<N>.<tag>.<zone>")
    parser.add_argument("--timeout", type=float, default=5.0, help="per operation, seconds")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="udp/dns run length limit")
    parser.add_argument("--interval", type=float, default=1.0, help="poll: seconds between GETs")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        result = MODES[args.mode](args)
    except (OSError, PathError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
