#!/usr/bin/env python3
"""tunproxy under hostile load (issue 16): each scenario prints one block of figures.

    sudo python3 bench/stress.py                      # everything, full size (~25 minutes)
    sudo python3 bench/stress.py --smoke              # everything, small (~2 minutes; CI)
    sudo python3 bench/stress.py --only hostile,flows --packets 200000
    sudo python3 bench/stress.py --only soak --soak-minutes 30

Scenarios (``--only``), all through tunproxy's real TUN in the namespaces of
``tests.netns.Topology``, with the servers of ``bench/services.py``:

* ``hostile``: PACKETS hostile packets written into the TUN from the client side
  (``bench/stress_client.py inject``) while an echo transfer runs; tunproxy must stay up,
  every transfer during and after must come back sha256-equal, RSS stays bounded; the
  stack's drop counters (read live with SIGUSR1) say what became of the packets.
* ``flows``: FLOWS concurrent TCP flows held open, then each echoes once (RSS per flow).
* ``synflood``: SYNS spoofed SYNs in a few seconds: the half-open limit holds, memory is
  bounded, legitimate connections made during the flood succeed.
* ``slow``: SLOW flows whose application stops reading while the server sends as fast as
  it can: RSS bounded by the configured buffers, and flat for SLOW_SECONDS.
* ``upstream``: the SOCKS5 server (microsocks) killed under UPSTREAM_FLOWS active flows:
  every flow ends within 2 s; restarted, new flows succeed without restarting tunproxy.
* ``dns``: the DNS upstream stops answering (SIGSTOP): SERVFAIL within ``dns.timeout``,
  no queries left pending; answers again once it is back.
* ``kill9``: ``kill -9`` of tunproxy under KILL_FLOWS active flows; the next start puts
  the client namespace's routing back and serves.
* ``soak``: SOAK_MINUTES of mixed traffic (short connections, bulk transfers, UDP, DNS),
  RSS sampled every SAMPLE_EVERY seconds; the samples and a fitted slope.

Exit status 1 when any check fails, 130 when interrupted. Everything created (namespaces,
processes) is removed at the end, also after Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import measure  # noqa: E402
from bench.measure import MeasureError  # noqa: E402
from bench.run import machine_info, raise_nofile_limit, sigterm_as_interrupt  # noqa: E402
from bench.services import (  # noqa: E402
    DNS_PORT,
    DNS_ZONE,
    ECHO_PORT,
    MICROSOCKS_PORT,
    SOCKS4,
    Services,
    prepare_namespaces,
)
from tests.netns import SERVER4, SERVER6, Topology, Tunproxy, topology  # noqa: E402
from tunproxy.config import RelayConfig  # noqa: E402
from tunproxy.relay import MIN_UPSTREAM_READ  # noqa: E402

TUN_NAME = "tpstress0"
SOURCE_PORT = 7010
STRESS_CLIENT = Path(__file__).resolve().parent / "stress_client.py"
STRESS_SERVER = Path(__file__).resolve().parent / "stress_server.py"
SCENARIOS = ("hostile", "flows", "synflood", "slow", "upstream", "dns", "kill9", "soak")
# The stack's defaults (stack.StackConfig), which the configuration does not change.
MAX_HALF_OPEN = 4096
# The stack's send buffer per flow: twice relay.buffer-size (tunproxy/app.py).
TCP_SEND_BUFFER = 2 * RelayConfig().buffer_size
DNS_TIMEOUT = 2.0
MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    packets: int
    flows: int
    syns: int
    slow_flows: int
    slow_seconds: float
    upstream_flows: int
    kill_flows: int
    soak_minutes: float
    sample_every: float


FULL = Sizes(packets=1_000_000, flows=10_000, syns=100_000, slow_flows=200, slow_seconds=60,
             upstream_flows=200, kill_flows=1000, soak_minutes=10, sample_every=10)
SMOKE = Sizes(packets=20_000, flows=500, syns=10_000, slow_flows=20, slow_seconds=10,
              upstream_flows=50, kill_flows=100, soak_minutes=1 / 3, sample_every=2)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- results --------------------------------------------------------------------------------


@dataclass
class Block:
    """One scenario's figures: what was thrown, what held, what was lost; and its checks."""

    title: str
    lines: list[tuple[str, str]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.lines.append((label, value))

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        return ok

    @property
    def passed(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def render(self) -> str:
        width = max((len(label) for label, _ in self.lines), default=0)
        out = [f"== {self.title} " + "=" * max(3, 76 - len(self.title))]
        out += [f"  {label:<{width}}  {value}" for label, value in self.lines]
        for name, ok, detail in self.checks:
            out.append(f"  [{'PASS' if ok else 'FAIL'}] {name}" + (f": {detail}" if detail
                                                                   else ""))
        return "\n".join(out)

    def as_dict(self) -> dict[str, Any]:
        return {"title": self.title, "figures": dict(self.lines), "passed": self.passed,
                "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks]}


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def fit_slope(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, y): y units per t unit."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var == 0:
        return 0.0
    return sum((t - mean_t) * (y - mean_y) for t, y in samples) / var


# -- the harness -----------------------------------------------------------------------------


def tunproxy_config(*, socks: bool = False, dns: str | None = None) -> str:
    lines = ["tun:", f"  name: {TUN_NAME}", "  mtu: 1500"]
    if socks:
        lines += ["upstreams:", "  socks:", "    type: socks5",
                  f'    server: "{SOCKS4}:{MICROSOCKS_PORT}"']
    lines += ["rules:", f"  - MATCH,{'socks' if socks else 'DIRECT'}"]
    if dns is not None:
        lines += ["dns:", "  enable: true", f"  mode: {dns}", "  servers:",
                  f'    - "udp://{SERVER4}:{DNS_PORT}"', f"  timeout: {DNS_TIMEOUT:g}",
                  "  cache-size: 1024", "  fake-ip-size: 4096", "  realip-size: 4096"]
    return "\n".join(lines) + "\n"


class ClientProc:
    """``bench/stress_client.py MODE`` running in the client namespace: JSON lines out,
    commands (any line) in; closing stdin ends its hold."""

    def __init__(self, ns_cmd: Callable[..., list[str]], mode: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            ns_cmd(sys.executable, str(STRESS_CLIENT), mode, *args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.mode = mode

    def read(self, timeout: float, skip_progress: bool = True) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            line = self.proc.stdout.readline() if ready else b""
            if not line:
                if ready:
                    err = self.proc.stderr.read().decode(errors="replace") \
                        if self.proc.stderr is not None else ""
                    raise MeasureError(f"stress client {self.mode} exited: {err.strip()[-500:]}")
                raise MeasureError(f"stress client {self.mode}: nothing within {timeout:g} s")
            result: dict[str, Any] = json.loads(line)
            if "error" in result:
                raise MeasureError(f"stress client {self.mode}: {result['error']}")
            if skip_progress and "progress" in result:
                progress(f"  {self.mode}: {json.dumps(result)}")
                continue
            return result

    def say(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Harness:
    def __init__(self, topo: Topology, workdir: Path, sizes: Sizes) -> None:
        self.topo = topo
        self.workdir = workdir
        self.sizes = sizes
        self.services = Services(topo, workdir)
        self.counter = 0
        self.source_started = False

    # .. tunproxy ..

    def start(self, config: str) -> Tunproxy:
        self.counter += 1
        tp = self.topo.start_tunproxy(config, "--log-level", "info", wait=False,
                                      name=f"stress-{self.counter}.yaml")
        tp.wait_ready(timeout=60)
        return tp

    def stop(self, tp: Tunproxy) -> None:
        with contextlib.suppress(Exception):
            if tp.proc.poll() is None:
                tp.stop(timeout=30)
            else:
                tp.kill()
        with contextlib.suppress(OSError):
            (self.workdir / f"{tp.config_path.stem}.log").write_text(tp.log)

    @contextlib.contextmanager
    def tunproxy(self, config: str) -> Iterator[Tunproxy]:
        tp = self.start(config)
        try:
            yield tp
        finally:
            self.stop(tp)

    def live(self, tp: Tunproxy, timeout: float = 30.0) -> dict[str, int]:
        """The stack's counters now (SIGUSR1 makes tunproxy log them), plus the relay's
        open flows and pending DNS lookups."""
        mark = tp.line_count()
        tp.send_signal(signal.SIGUSR1)
        line = tp.wait_for_log(r"stack counters: ", timeout, start=mark)
        tail = tp.wait_for_log(r"relay flows \d+", timeout, start=mark)
        counters: dict[str, int] = {}
        body = line.split("stack counters: ", 1)[1].split(";", 1)[0]
        for item in body.split(", "):
            name, _, value = item.rpartition(" ")
            if name and value.isdigit():
                counters[name] = int(value)
        match = re.search(r"relay flows (\d+)(?:, dns pending (\d+))?", tail)
        assert match is not None
        counters["relay.flows"] = int(match.group(1))
        if match.group(2) is not None:
            counters["dns.pending"] = int(match.group(2))
        return counters

    @staticmethod
    def rss(tp: Tunproxy) -> int:
        return measure.vm_rss_kib(tp.proc.pid)

    # .. clients ..

    def client(self, mode: str, *args: str) -> ClientProc:
        return ClientProc(self.topo.client.cmd, mode, *args)

    def transfer(self, size: int, timeout: float = 60.0) -> tuple[bool, str]:
        """Echo ``size`` random bytes through tunproxy; (sha256-equal, detail)."""
        data = os.urandom(size)
        want = hashlib.sha256(data).hexdigest()
        try:
            sock = self.topo.client.connect(SERVER4, ECHO_PORT, timeout=timeout)
        except OSError as exc:
            return False, f"connect: {exc}"
        got = hashlib.sha256()
        received = 0
        try:
            with sock:
                sender = threading.Thread(target=self._send_all, args=(sock, data), daemon=True)
                sender.start()
                while received < size:
                    chunk = sock.recv(1 << 20)
                    if not chunk:
                        return False, f"EOF after {received} of {size} bytes"
                    got.update(chunk)
                    received += len(chunk)
                sender.join(timeout)
        except OSError as exc:
            return False, f"{type(exc).__name__} after {received} of {size} bytes: {exc}"
        if got.hexdigest() != want:
            return False, "sha256 differs"
        return True, "sha256-equal"

    @staticmethod
    def _send_all(sock: Any, data: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    def source_server(self) -> None:
        if not self.source_started:
            self.source_started = True
            self.topo.server.spawn(sys.executable, str(STRESS_SERVER), "--host", SERVER4,
                                   "--port", str(SOURCE_PORT))
            self.topo.server.wait_tcp_listening(SOURCE_PORT)


class Transfers:
    """Echo transfers back to back in a thread until stopped: the "normal traffic" beside
    an attack; counts those that came back sha256-equal."""

    def __init__(self, harness: Harness, size: int) -> None:
        self.harness = harness
        self.size = size
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            ok, detail = self.harness.transfer(self.size)
            if ok:
                self.ok += 1
            else:
                self.failed.append(detail)

    def __enter__(self) -> Transfers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


class Sampler:
    """RSS of a process every ``every`` seconds in a thread."""

    def __init__(self, pid: int, every: float) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.monotonic()

    def _run(self) -> None:
        while True:
            with contextlib.suppress(MeasureError):
                self.samples.append((time.monotonic() - self.start, measure.vm_rss_kib(self.pid)))
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak(self) -> int:
        return max((kib for _, kib in self.samples), default=0)


def tenths(samples: list[tuple[float, int]]) -> list[int]:
    """The sample at each tenth of the run (and the last)."""
    if not samples:
        return []
    picks = sorted({min(len(samples) - 1, i * len(samples) // 10) for i in range(10)})
    return [samples[i][1] for i in picks] + [samples[-1][1]]


def late_growth(samples: list[tuple[float, int]]) -> int:
    """How much RSS grew over the last third of the samples (KiB; 0 if it fell)."""
    if len(samples) < 3:
        return 0
    last = samples[-(len(samples) // 3) - 1:]
    return max(0, max(kib for _, kib in last) - last[0][1])


def drops(before: dict[str, int], after: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(((k[5:], after[k] - before.get(k, 0)) for k in after
                   if k.startswith("drop.") and after[k] - before.get(k, 0) > 0),
                  key=lambda kv: -kv[1])


def delta(before: dict[str, int], after: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


# -- scenarios -------------------------------------------------------------------------------


def scenario_hostile(h: Harness, args: argparse.Namespace) -> Block:
    count = args.packets or h.sizes.packets
    block = Block(f"hostile packets: {count:,} into the TUN")
    h.services.echo()
    with h.tunproxy(tunproxy_config()) as tp:
        ok, detail = h.transfer(1 * MIB)
        rest = measure.wait_rss_settled(tp.proc.pid)
        before = h.live(tp)
        client = h.client("inject", "--tun", TUN_NAME, "--count", str(count), "--seed",
                          str(args.seed), "--dst4", SERVER4, "--dst6", SERVER6,
                          "--port", str(ECHO_PORT))
        with Sampler(tp.proc.pid, 0.5) as sampler, Transfers(h, 1 * MIB) as during:
            try:
                result = client.read(timeout=max(120.0, count / 500))
            finally:
                client.close()
        alive = tp.proc.poll() is None
        after_ok, after_detail = h.transfer(4 * MIB) if alive else (False, "tunproxy exited")
        after = h.live(tp) if alive else {}
    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(result["kinds"].items(),
                                                       key=lambda kv: -kv[1]))
    block.add("thrown", f"{result['sent']:,} packets in {result['elapsed_s']:.1f} s "
                        f"({result['per_s']:,.0f}/s), seed {args.seed}")
    block.add("kinds", kinds)
    block.add("reached tunproxy", f"{delta(before, after, 'packets.in'):,} packets read by "
                                  f"the stack (all traffic); {result['tun_dropped']:,} "
                                  "dropped by the TUN queue")
    block.add("flows opened and abused", f"{result['synacks_seen']:,} (answered SYN-ACKs)")
    block.add("stack drops by reason", ", ".join(f"{k} {v:,}" for k, v in drops(before, after))
              or "none")
    for key in ("tcp.rst_sent", "tcp.unknown_flow", "tcp.rst_ignored", "flows.opened.tcp",
                "icmp.unreachable_sent", "icmp.rate_limited"):
        if delta(before, after, key):
            block.add(key, f"{delta(before, after, key):,}")
    block.add("RSS", f"{mib(rest)} before, peak {mib(sampler.peak)} "
                     f"(+{mib(sampler.peak - rest)}); by tenths of the run: "
                     + " ".join(f"{kib / 1024:.0f}" for kib in tenths(sampler.samples))
                     + " MiB")
    block.add("flows held at the end", f"{after.get('flows.tcp', 0):,} TCP "
                                       f"({after.get('flows.half_open', 0):,} half-open), "
                                       f"{after.get('flows.udp', 0):,} UDP sessions in "
                                       f"the stack, {after.get('relay.flows', 0):,} in the "
                                       "relay; "
                                       f"{after.get('reassembly.bytes', 0):,} B of fragments")
    block.add("normal traffic", f"{during.ok} x 1 MiB echo transfers during, "
                                f"{len(during.failed)} failed; 4 MiB after: {after_detail}")
    block.check("tunproxy alive", alive, "" if alive else f"rc={tp.proc.poll()}")
    block.check("a transfer before", ok, detail)
    block.check("transfers during all sha256-equal", during.ok > 0 and not during.failed,
                f"{during.ok} ok" + (f", first failure: {during.failed[0]}" if during.failed
                                     else ""))
    block.check("transfer after sha256-equal", after_ok, after_detail)
    # What the attack fills is bounded by tables, not by a byte budget: half-open TCP flows
    # (4,096), UDP sessions (one per spoofed source and port, each with its upstream
    # socket, until idle for 60 s; 65,536 flows in all), held fragments (4 MiB). Bounded
    # means the growth is what those tables hold, at a bounded cost per flow.
    held = after.get("flows.tcp", 0) + after.get("flows.udp", 0)
    allowed = held * args.per_flow_kib + 4096 + args.rss_bound_mib * 1024
    block.add("RSS per flow held", f"{(sampler.peak - rest) / max(held, 1):.1f} KiB (growth "
                                   f"over {held:,} flows held); last third of the run "
                                   f"+{mib(late_growth(sampler.samples))}")
    block.check(f"RSS growth within what the tables hold ({args.per_flow_kib} KiB a flow + "
                f"4 MiB of fragments + {args.rss_bound_mib} MiB)",
                sampler.peak - rest <= allowed, f"+{mib(sampler.peak - rest)} of {mib(allowed)}")
    return block


def scenario_flows(h: Harness, args: argparse.Namespace) -> Block:
    count = args.flows or h.sizes.flows
    block = Block(f"concurrent flows: {count:,} TCP flows held, then each echoes")
    h.services.echo()
    with h.tunproxy(tunproxy_config()) as tp:
        h.transfer(64 * 1024)
        rest = measure.wait_rss_settled(tp.proc.pid)
        client = h.client("flows", "--host", SERVER4, "--port", str(ECHO_PORT), "--count",
                          str(count), "--parallel", "256", "--timeout", "60")
        try:
            ready = client.read(timeout=max(300.0, count / 20))
            loaded = measure.wait_rss_settled(tp.proc.pid, timeout=10)
            counters = h.live(tp)
            client.say()
            used = client.read(timeout=max(120.0, count / 50))
        finally:
            client.close()
        alive = tp.proc.poll() is None
    held = int(ready["ready"])
    per_flow = (loaded - rest) / held if held else 0.0
    block.add("opened", f"{held:,} of {count:,} in {ready['elapsed_s']:.1f} s "
                        f"({held / max(ready['elapsed_s'], 1e-9):,.0f}/s)"
              + (f", first failure: {ready['first_error']}" if ready["failed"] else ""))
    block.add("held in tunproxy", f"{counters.get('relay.flows', 0):,} relay flows, "
                                  f"{counters.get('flows.tcp', 0):,} stack TCP flows")
    block.add("then used", f"{used['echoed']:,} echoed 64 B in {used['elapsed_s']:.1f} s, "
                           f"{used['failed']:,} failed")
    block.add("RSS", f"{mib(rest)} at rest, {mib(loaded)} holding them: "
                     f"{per_flow:.1f} KiB per flow")
    block.check("tunproxy alive", alive)
    block.check("all flows opened", held == count, f"{held}/{count}")
    block.check("all flows echoed", used["echoed"] == held and not used["failed"],
                f"{used['echoed']}/{held}")
    block.check(f"RSS per flow under {args.per_flow_kib} KiB", per_flow < args.per_flow_kib,
                f"{per_flow:.1f} KiB")
    return block


def scenario_synflood(h: Harness, args: argparse.Namespace) -> Block:
    count = args.syns or h.sizes.syns
    block = Block(f"SYN flood: {count:,} spoofed SYNs")
    h.services.echo()
    # Legitimate connections: one started every 0.25 s while the flood runs, each in its
    # own thread (the kernel retries a lost SYN for up to ~2 minutes; we wait 40 s).
    probes: list[tuple[float, str]] = []  # (seconds taken, "ok" or the error)
    stop = threading.Event()
    lock = threading.Lock()

    def probe() -> None:
        began = time.monotonic()
        outcome = "ok"
        try:
            with h.topo.client.connect(SERVER4, ECHO_PORT, timeout=40) as sock:
                sock.sendall(b"legit")
                if sock.recv(16) != b"legit":
                    outcome = "wrong echo"
        except OSError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        with lock:
            probes.append((time.monotonic() - began, outcome))

    launched: list[threading.Thread] = []

    def legitimate() -> None:
        while not stop.wait(0.25):
            thread = threading.Thread(target=probe, daemon=True)
            thread.start()
            launched.append(thread)

    with h.tunproxy(tunproxy_config()) as tp:
        h.transfer(64 * 1024)
        rest = measure.wait_rss_settled(tp.proc.pid)
        before = h.live(tp)
        half_open_seen: list[int] = []
        thread = threading.Thread(target=legitimate, daemon=True)
        client = h.client("flood", "--tun", TUN_NAME, "--count", str(count), "--dst4", SERVER4,
                          "--port", str(ECHO_PORT), "--seed", str(args.seed))
        with Sampler(tp.proc.pid, 0.25) as sampler:
            thread.start()
            try:
                while client.proc.poll() is None:
                    half_open_seen.append(h.live(tp).get("flows.half_open", 0))
                    time.sleep(0.25)
                result = client.read(timeout=30)
            finally:
                client.close()
            stop.set()
            thread.join(timeout=10)
            # Keep watching while tunproxy works through the SYNs still queued.
            settle = time.monotonic() + args.flood_settle
            while time.monotonic() < settle:
                half_open_seen.append(h.live(tp).get("flows.half_open", 0))
                time.sleep(0.25)
            for probe_thread in launched:
                probe_thread.join(timeout=60)
        after = h.live(tp)
        alive = tp.proc.poll() is None
        after_ok, after_detail = h.transfer(1 * MIB) if alive else (False, "tunproxy exited")
    opened = delta(before, after, "flows.opened.tcp")
    refused = delta(before, after, "drop.limit.half_open")
    evicted = delta(before, after, "tcp.half_open_evicted")
    block.add("thrown", f"{result['sent']:,} SYNs in {result['elapsed_s']:.1f} s "
                        f"({result['per_s']:,.0f}/s); {result['tun_dropped']:,} dropped by the "
                        "TUN queue (tunproxy slower than the flood)")
    block.add("reached the stack", f"{opened:,} flows opened, {refused:,} dropped at the "
                                   f"half-open limit, {evicted:,} oldest half-open evicted")
    block.add("half-open", f"peak {max(half_open_seen, default=0):,} seen (limit "
                           f"{MAX_HALF_OPEN:,}), {len(half_open_seen)} readings")
    block.add("RSS", f"{mib(rest)} before, peak {mib(sampler.peak)} "
                     f"(+{mib(sampler.peak - rest)})")
    ok_times = sorted(t for t, outcome in probes if outcome == "ok")
    failures = [outcome for _, outcome in probes if outcome != "ok"]
    block.add("legitimate connections", f"{len(probes)} started during the flood (one per "
                                        f"0.25 s): {len(ok_times)} echoed"
              + (f" (median {ok_times[len(ok_times) // 2]:.2f} s, slowest {ok_times[-1]:.2f} s)"
                 if ok_times else "") + f", {len(failures)} failed"
              + (f" ({failures[0]})" if failures else ""))
    block.check("tunproxy alive", alive)
    block.check("half-open limit holds", max(half_open_seen, default=0) <= MAX_HALF_OPEN,
                f"peak {max(half_open_seen, default=0)}")
    block.check(f"at least {args.legit_percent}% of legitimate connections succeed",
                bool(probes) and len(ok_times) * 100 >= args.legit_percent * len(probes),
                f"{len(ok_times)} of {len(probes)}")
    block.check(f"RSS growth under {args.rss_bound_mib} MiB",
                sampler.peak - rest < args.rss_bound_mib * 1024, f"+{mib(sampler.peak - rest)}")
    block.check("transfer after sha256-equal", after_ok, after_detail)
    return block


def scenario_slow(h: Harness, args: argparse.Namespace) -> Block:
    count = args.slow_flows or h.sizes.slow_flows
    seconds = args.slow_seconds or h.sizes.slow_seconds
    block = Block(f"slow readers: {count} flows that stop reading, {seconds:g} s")
    h.source_server()
    h.services.echo()
    with h.tunproxy(tunproxy_config()) as tp:
        h.transfer(64 * 1024)
        rest = measure.wait_rss_settled(tp.proc.pid)
        tun0 = measure.tun_counters(h.topo.client, TUN_NAME) or {}
        client = h.client("slow", "--host", SERVER4, "--port", str(SOURCE_PORT), "--count",
                          str(count), "--timeout", "60")
        try:
            ready = client.read(timeout=300)
            began = time.monotonic()
            with Sampler(tp.proc.pid, max(1.0, seconds / 30)) as sampler:
                time.sleep(seconds)
            tun1 = measure.tun_counters(h.topo.client, TUN_NAME) or {}
            counters = h.live(tp)
            alive = tp.proc.poll() is None
            ok, detail = h.transfer(1 * MIB) if alive else (False, "tunproxy exited")
        finally:
            client.close()
        elapsed = time.monotonic() - began
    held = int(ready["ready"])
    samples = [(t, kib / 1024) for t, kib in sampler.samples]
    later = [kib for t, kib in sampler.samples if t >= seconds / 3]
    first = sampler.samples[0][1] if sampler.samples else rest
    growth_late = (max(later) - min(later)) if later else 0
    # Per flow (README "Reliability"): the unacknowledged bytes in the stack's send buffer,
    # the acknowledged head of the oldest read still in it (reads are no bigger than the
    # buffer's free space, so less than a send buffer), and one read of the floor size.
    per_flow = 2 * TCP_SEND_BUFFER + MIN_UPSTREAM_READ
    growth = sampler.peak - rest
    bound_kib = held * per_flow / 1024 + args.slow_slack_mib * 1024
    slope = fit_slope([(t / 60, mb) for t, mb in samples if t >= seconds / 3])
    block.add("thrown", f"{held} flows ({ready['failed']} failed to open) fed by a server "
                        f"that writes as fast as it can; the apps read 1 KiB each, then nothing")
    carried = tun1.get("rx_bytes", 0) - tun0.get("rx_bytes", 0)
    block.add("carried into the TUN", f"{carried / MIB:,.1f} MiB in {elapsed:.0f} s "
                                      "(until the windows closed)")
    block.add("flows held", f"{counters.get('relay.flows', 0)} relay flows")
    block.add("RSS", f"{mib(rest)} before; {mib(first)} .. {mib(sampler.peak)} over the run; "
                     f"+{mib(growth)}, {growth / max(held, 1):,.0f} KiB per flow; growth "
                     f"bound {mib(bound_kib)} = flows x (2 x send buffer of "
                     f"{TCP_SEND_BUFFER // 1024} KiB + {MIN_UPSTREAM_READ // 1024} KiB) + "
                     f"{args.slow_slack_mib} MiB")
    block.add("RSS samples [MiB]", " ".join(f"{mb:.1f}" for _, mb in samples))
    block.add("slope after the first third", f"{slope:+.2f} MiB/min")
    block.check("tunproxy alive", alive)
    block.check("all flows opened", held == count, f"{held}/{count}")
    block.check("RSS growth within the buffers' bound", growth <= bound_kib,
                f"+{mib(growth)}")
    block.check("no growth after the first third", growth_late <= 4 * 1024,
                f"{mib(growth_late)} between min and max")
    block.check("a transfer beside them sha256-equal", ok, detail)
    return block


def scenario_upstream(h: Harness, args: argparse.Namespace) -> Block:
    count = args.upstream_flows or h.sizes.upstream_flows
    block = Block(f"upstream death: microsocks killed under {count} active flows")
    h.services.echo()
    server = h.topo.server

    def start_socks() -> subprocess.Popen[bytes]:
        proc = server.spawn("microsocks", "-i", SOCKS4, "-p", str(MICROSOCKS_PORT))
        server.wait_tcp_listening(MICROSOCKS_PORT)
        return proc

    socks = start_socks()
    with h.tunproxy(tunproxy_config(socks=True)) as tp:
        client = h.client("active", "--host", SERVER4, "--port", str(ECHO_PORT), "--count",
                          str(count), "--interval", "0.2", "--timeout", "10",
                          "--max-seconds", "15")
        try:
            ready = client.read(timeout=120)
            time.sleep(1.0)  # the flows are busy
            killed_at = time.monotonic()
            socks.kill()
            socks.wait(timeout=10)
            result = client.read(timeout=60)
        finally:
            client.close()
        during = h.live(tp)
        socks = start_socks()
        after_ok = True
        try:
            fresh = measure.client(h.topo.client, "cps", "--host", SERVER4, "--port",
                                   str(ECHO_PORT), "--count", "50", "--timeout", "5")
            fresh_detail = f"{fresh['count']} of 50 new flows echoed"
            after_ok = fresh["count"] == 50
        except MeasureError as exc:
            after_ok, fresh_detail = False, str(exc)
        same_process = tp.proc.poll() is None
        settle = h.live(tp)
    ended = [t - killed_at for t in result["ended_at"]]
    late = [t for t in ended if t > 2.0]
    block.add("thrown", f"{ready['ready']} flows echoing 64 B every ~0.2 s; microsocks "
                        "killed with SIGKILL")
    # tunproxy mirrors the upstream's end: a killed proxy's kernel closes its sockets with
    # FIN (nothing unread) or RST, so the app sees EOF or a reset.
    block.add("ended", f"{len(ended)} of {result['flows']} "
                       f"({', '.join(f'{k} {v}' for k, v in result['ended_how'].items())}); "
                       f"after the kill: max {max(ended, default=0):.2f} s, "
                       f"median {sorted(ended)[len(ended) // 2] if ended else 0:.2f} s")
    block.add("relay flows left", f"{during.get('relay.flows', 0)} right after, "
                                  f"{settle.get('relay.flows', 0)} after the new flows")
    block.add("after restarting microsocks", fresh_detail)
    block.check("every flow ended", result["alive"] == 0 and len(ended) == result["flows"],
                f"{result['alive']} still alive")
    block.check("every flow ended within 2 s", not late and bool(ended),
                f"{len(late)} later than 2 s" if late else "")
    block.check("new flows succeed after the restart, same tunproxy",
                after_ok and same_process, fresh_detail)
    return block


def scenario_dns(h: Harness, args: argparse.Namespace) -> Block:
    block = Block("DNS upstream dead: dnsmasq stopped (SIGSTOP)")
    server = h.topo.server
    dnsmasq = server.spawn(
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        f"--listen-address={SERVER4}", "--bind-interfaces", f"--port={DNS_PORT}",
        f"--address=/{DNS_ZONE}/10.9.9.9", "--user=root", "--group=root",
        f"--pid-file={h.workdir / 'dnsmasq-stress.pid'}",
    )
    server.wait_udp_bound(DNS_PORT)
    queries = 500 if h.sizes is FULL else 200

    def ask(count: int, window: int) -> dict[str, Any]:
        client = h.client("dnsq", "--host", SERVER4, "--port", str(DNS_PORT), "--count",
                          str(count), "--window", str(window), "--zone", DNS_ZONE,
                          "--max-seconds", str(DNS_TIMEOUT * 4 + 10))
        try:
            return client.read(timeout=DNS_TIMEOUT * 4 + 40)
        finally:
            client.close()

    with h.tunproxy(tunproxy_config(dns="real-ip")) as tp:
        healthy = ask(50, 10)
        os.kill(dnsmasq.pid, signal.SIGSTOP)
        try:
            rest = measure.vm_rss_kib(tp.proc.pid)
            dead = ask(queries, queries)
            # Pending right after the answers, and once the timeout has surely passed.
            pending_now = h.live(tp).get("dns.pending", -1)
            time.sleep(DNS_TIMEOUT + 0.5)
            pending_later = h.live(tp).get("dns.pending", -1)
            loaded = measure.vm_rss_kib(tp.proc.pid)
        finally:
            os.kill(dnsmasq.pid, signal.SIGCONT)
        back = ask(50, 10)
    servfail = dead["rcodes"].get("2", 0)
    block.add("healthy", f"{healthy['answered']} of 50 answered, rcodes {healthy['rcodes']}")
    block.add("thrown", f"{dead['asked']} queries at once for distinct names with the upstream "
                        f"stopped (dns.timeout {DNS_TIMEOUT:g} s)")
    block.add("answers", f"{dead['answered']} answered (rcodes {dead['rcodes']}), "
                         f"{dead['unanswered']} unanswered; slowest {dead['max_s'] or 0:.2f} s, "
                         f"fastest {dead['min_s'] or 0:.2f} s")
    block.add("pending lookups", f"{pending_now} after the answers, {pending_later} "
                                 f"{DNS_TIMEOUT + 0.5:g} s later")
    block.add("RSS", f"{mib(rest)} before, {mib(loaded)} after")
    block.add("upstream back", f"{back['answered']} of 50 answered, rcodes {back['rcodes']}")
    block.check("healthy first", healthy["rcodes"].get("0", 0) == 50, str(healthy["rcodes"]))
    block.check("every query SERVFAIL", servfail == dead["asked"],
                f"{servfail} of {dead['asked']}")
    # The timeout runs from when tunproxy reads a query; reading 500 at once on two busy
    # cores takes a few hundred milliseconds, hence the slack.
    block.check(f"within the timeout ({DNS_TIMEOUT:g} s + {args.dns_slack:g} s)",
                (dead["max_s"] or 99) <= DNS_TIMEOUT + args.dns_slack,
                f"slowest {dead['max_s'] or 0:.2f} s")
    block.check("no pending pile-up", pending_later == 0, f"{pending_later} pending")
    block.check("answers again once it is back", back["rcodes"].get("0", 0) == 50,
                str(back["rcodes"]))
    return block


ROUTING_KEYS = ("rule4", "rule6", "route4", "route6")


def routing(h: Harness) -> dict[str, str]:
    """Rules and routes of the client namespace, without the TUN's IPv6 link-local route
    (the kernel draws a new link-local address for every new TUN)."""
    snap = h.topo.client.routing_snapshot()
    return {k: "\n".join(line for line in snap[k].splitlines()
                          if not re.match(r"local fe80::\S+ dev ", line))
            for k in ROUTING_KEYS}


def routing_counts(a: dict[str, str], b: dict[str, str]) -> str:
    """How many rules/routes ``b`` has that ``a`` has not, by kind."""
    parts = []
    for key in ROUTING_KEYS:
        extra = set(b[key].splitlines()) - set(a[key].splitlines())
        if extra:
            parts.append(f"{len(extra)} {key[:-1]}s (IPv{key[-1]})")
    return ", ".join(parts)


def routing_diff(a: dict[str, str], b: dict[str, str]) -> str:
    out = []
    for key in ROUTING_KEYS:
        la, lb = set(a[key].splitlines()), set(b[key].splitlines())
        out += [f"-{key}: {line}" for line in sorted(la - lb)]
        out += [f"+{key}: {line}" for line in sorted(lb - la)]
    return "; ".join(out)[:600]


def scenario_kill9(h: Harness, args: argparse.Namespace) -> Block:
    count = args.kill_flows or h.sizes.kill_flows
    block = Block(f"kill -9 under {count:,} active flows, then start again")
    h.services.echo()
    clean = routing(h)
    tp = h.start(tunproxy_config())
    try:
        running = routing(h)
        client = h.client("active", "--host", SERVER4, "--port", str(ECHO_PORT), "--count",
                          str(count), "--interval", "1.0", "--timeout", "5",
                          "--max-seconds", "10")
        try:
            ready = client.read(timeout=300)
            tp.proc.send_signal(signal.SIGKILL)
            tp.proc.wait(timeout=10)
            killed = time.monotonic()
            result = client.read(timeout=60)
        finally:
            client.close()
    finally:
        h.stop(tp)
    left = routing(h)
    tp2 = h.start(tunproxy_config())
    try:
        undo_line = next((line for line in tp2.log.splitlines() if "previous run" in line), "")
        again = routing(h)
        ok, detail = h.transfer(4 * MIB)
        fresh = measure.client(h.topo.client, "cps", "--host", SERVER4, "--port",
                               str(ECHO_PORT), "--count", "50", "--timeout", "5")
    finally:
        h.stop(tp2)
    after = routing(h)
    ended = [t - killed for t in result["ended_at"]]
    block.add("thrown", f"{ready['ready']:,} flows echoing 64 B every ~1 s; SIGKILL")
    block.add("the flows", f"{len(ended):,} ended within 10 s "
                           f"({', '.join(f'{k} {v}' for k, v in result['ended_how'].items())}),"
                           f" {result['alive']:,} still open: a dead process resets nothing, "
                           "the apps' own 5 s timeouts end them")
    block.add("left behind", (routing_counts(clean, left) or "nothing")
              + " (the TUN went with the process; its rules stay until the next start)")
    block.add("next start", re.sub(r"^\S+ \S+ ", "", undo_line)[:200] or "(no undo logged)")
    block.add("new instance", f"4 MiB echo {detail}; {fresh['count']} of 50 new connections")
    block.check("next start restores the routing of the first",
                again == running, routing_diff(running, again))
    block.check("the new instance serves", ok and fresh["count"] == 50, detail)
    block.check("its stop leaves the namespace as it was", after == clean,
                routing_diff(clean, after))
    return block


def scenario_soak(h: Harness, args: argparse.Namespace) -> Block:
    minutes = args.soak_minutes or h.sizes.soak_minutes
    every = args.sample_every or h.sizes.sample_every
    length = f"{minutes:g} min" if minutes >= 1 else f"{minutes * 60:.0f} s"
    block = Block(f"soak: {length} of mixed traffic, RSS every {every:g} s")
    h.services.echo()
    h.services.dnsmasq()
    errors: list[str] = []
    tallies = {"connections": 0, "bulk": 0, "udp": 0, "dns": 0}
    stop = threading.Event()
    deadline = time.monotonic() + minutes * 60

    def looped(name: str, body: Callable[[], int]) -> threading.Thread:
        def run() -> None:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    tallies[name] += body()
                except (MeasureError, OSError) as exc:
                    errors.append(f"{name}: {exc}")
                    stop.wait(1)
        return threading.Thread(target=run, daemon=True)

    ns = h.topo.client

    def connections() -> int:
        r = measure.client(ns, "cps", "--host", SERVER4, "--port", str(ECHO_PORT), "--count",
                           "200", "--timeout", "5")
        return int(r["count"])

    def bulk() -> int:
        ok, detail = h.transfer(8 * MIB)
        if not ok:
            raise MeasureError(f"bulk transfer: {detail}")
        return 1

    def udp() -> int:
        r = measure.client(ns, "udp", "--host", SERVER4, "--port", str(ECHO_PORT), "--count",
                           "2000", "--max-seconds", "5", "--size", "200", "--timeout", "1")
        return int(r["count"])

    def dns() -> int:
        r = measure.client(ns, "dns", "--host", SERVER4, "--port", str(DNS_PORT), "--count",
                           "2000", "--max-seconds", "5", "--window", "4", "--zone", DNS_ZONE,
                           "--timeout", "2")
        return int(r["count"])

    with h.tunproxy(tunproxy_config(dns="fake-ip")) as tp:
        h.transfer(64 * 1024)
        rest = measure.wait_rss_settled(tp.proc.pid)
        workers = [looped("connections", connections), looped("bulk", bulk),
                   looped("bulk", bulk), looped("udp", udp), looped("dns", dns)]
        with Sampler(tp.proc.pid, every) as sampler:
            for worker in workers:
                worker.start()
            while time.monotonic() < deadline and tp.proc.poll() is None:
                time.sleep(0.5)
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
        alive = tp.proc.poll() is None
        counters = h.live(tp) if alive else {}
    samples = [(t, kib / 1024) for t, kib in sampler.samples]
    third = max(1, len(samples) // 3)
    # The first third is warm-up (caches filling, the allocator's arenas): the slope that
    # says "still growing" is the one after it.
    slope = fit_slope([(t / 60, mb) for t, mb in samples[third:]])
    early = max(mb for _, mb in samples[:third])
    late = max(mb for _, mb in samples[-third:])
    block.add("thrown", f"{tallies['connections']:,} short connections, {tallies['bulk']} x "
                        f"8 MiB echo transfers, {tallies['udp']:,} UDP round trips, "
                        f"{tallies['dns']:,} DNS answers (fake-ip, distinct names)")
    block.add("caches", "dns cache-size 1024, fake-ip-size 4096 (LRU): distinct names fill "
                        "them early in the run")
    block.add("lost", f"{len(errors)} errors" + (f", first: {errors[0]}" if errors else ""))
    block.add("flows at the end", f"{counters.get('relay.flows', 0)} relay flows")
    block.add("RSS samples [MiB]", " ".join(f"{mb:.1f}" for _, mb in samples))
    block.add("RSS", f"{mib(rest)} at rest; max of the first third {early:.1f} MiB, "
                     f"of the last third {late:.1f} MiB; fitted slope after the first third "
                     f"{slope:+.3f} MiB/min")
    block.check("tunproxy alive", alive)
    block.check("no errors", not errors, errors[0] if errors else "")
    block.check(f"no growth beyond {args.soak_growth_mib} MiB from the first third to the "
                "last", late - early <= args.soak_growth_mib, f"{late - early:+.1f} MiB")
    return block


RUNNERS: dict[str, Callable[[Harness, argparse.Namespace], Block]] = {
    "hostile": scenario_hostile, "flows": scenario_flows, "synflood": scenario_synflood,
    "slow": scenario_slow, "upstream": scenario_upstream, "dns": scenario_dns,
    "kill9": scenario_kill9, "soak": scenario_soak,
}


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/stress.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"scenarios: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--smoke", action="store_true", help="small sizes (CI)")
    parser.add_argument("--only", metavar="SCENARIOS", help="comma-separated subset")
    parser.add_argument("--packets", type=int, help="hostile packets (1,000,000)")
    parser.add_argument("--flows", type=int, help="concurrent flows (10,000)")
    parser.add_argument("--syns", type=int, help="SYN flood size (100,000)")
    parser.add_argument("--slow-flows", type=int, help="slow readers (200)")
    parser.add_argument("--slow-seconds", type=float, help="slow readers' duration (60)")
    parser.add_argument("--upstream-flows", type=int, help="flows when the SOCKS5 dies (200)")
    parser.add_argument("--kill-flows", type=int, help="flows at kill -9 (1,000)")
    parser.add_argument("--soak-minutes", type=float, help="soak length (10)")
    parser.add_argument("--sample-every", type=float, help="soak RSS sampling period (10 s)")
    parser.add_argument("--seed", type=int, default=16, help="hostile packets' and SYNs' seed")
    parser.add_argument("--rss-bound-mib", type=int, default=64,
                        help="RSS growth allowed under attack (64)")
    parser.add_argument("--dns-slack", type=float, default=1.0,
                        help="seconds a SERVFAIL may come after dns.timeout (1.0)")
    parser.add_argument("--per-flow-kib", type=int, default=16,
                        help="RSS per held flow allowed (16)")
    parser.add_argument("--slow-slack-mib", type=int, default=8,
                        help="slow readers: RSS growth allowed beyond the buffers' bound")
    parser.add_argument("--soak-growth-mib", type=float, default=8.0,
                        help="RSS growth allowed across the soak (8)")
    parser.add_argument("--flood-settle", type=float, default=3.0,
                        help="seconds the SYN flood scenario keeps watching after the flood")
    parser.add_argument("--legit-percent", type=int, default=90,
                        help="legitimate connections that must succeed during the SYN flood")
    parser.add_argument("--keep", metavar="DIR", help="keep tunproxy's logs and configs here")
    parser.add_argument("--json", metavar="FILE", help="also write the blocks as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench/stress.py needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    chosen = [s.strip() for s in args.only.split(",")] if args.only else list(SCENARIOS)
    for name in chosen:
        if name not in SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}")
    sizes = SMOKE if args.smoke else FULL
    raise_nofile_limit()
    meta = machine_info()
    print(f"tunproxy stress  {meta['date']}  commit {meta['commit']}\nmachine: {meta['cpu']} "
          f"x{meta['cpus']}, kernel {meta['kernel']}, Python {meta['python']}, load at start "
          f"{meta['loadavg_at_start']}; {'smoke' if args.smoke else 'full'} sizes\n", flush=True)
    blocks: list[Block] = []
    interrupted = False
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunproxy-stress-") as tmp, sigterm_as_interrupt():
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            with topology(workdir, echo_logs=False) as topo:
                prepare_namespaces(topo)
                topo.client.run("sysctl", "-qw", "net.core.somaxconn=16384")
                topo.server.run("sysctl", "-qw", "net.core.somaxconn=16384")
                harness = Harness(topo, workdir, sizes)
                for name in chosen:
                    progress(f"{name}")
                    try:
                        block = RUNNERS[name](harness, args)
                    except (MeasureError, RuntimeError, TimeoutError, OSError,
                            subprocess.SubprocessError) as exc:
                        block = Block(name)
                        block.check("ran to the end", False, f"{type(exc).__name__}: {exc}"[:800])
                    blocks.append(block)
                    print(block.render() + "\n", flush=True)
        except KeyboardInterrupt:
            interrupted = True
    failed = [b.title for b in blocks if not b.passed]
    print(f"{len(blocks) - len(failed)} of {len(blocks)} scenarios passed in "
          f"{time.monotonic() - started:.0f} s" + (f"; failed: {'; '.join(failed)}" if failed
                                                  else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"meta": meta, "blocks": [b.as_dict() for b in blocks]}, indent=2) + "\n")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
