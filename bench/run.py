#!/usr/bin/env python3
"""tunproxy benchmarks (issue 7): one command builds the topology, measures, prints one table.

    sudo python3 bench/run.py                  # default run, about 10 minutes on 2 cores
    sudo python3 bench/run.py --quick          # a smoke run, well under a minute
    sudo python3 bench/run.py --only tcp --mtu 9000 --paths baseline,direct
    sudo python3 bench/run.py --targets        # also PASS/FAIL against issue 7's targets
    sudo python3 bench/run.py --json out.json  # machine-readable results too ("-": stdout)
    sudo python3 bench/run.py --profile prof/  # py-spy profiles of tunproxy under iperf3

For each MTU it builds a fresh ``tests.netns.Topology`` (client and server namespaces joined
by veth), starts the servers it needs in the server namespace (iperf3, a TCP/UDP echo
server, microsocks, dante, dnsmasq), and measures each column in turn:

* ``baseline``: plain kernel routing over the veth, no TUN, no tunproxy;
* ``DIRECT``: tunproxy with ``MATCH,DIRECT``;
* ``SOCKS5``: tunproxy with ``MATCH,socks`` to dante (``--socks-server microsocks``: TCP to
  microsocks, UDP still to dante, as microsocks has no UDP ASSOCIATE);
* the same two with the TUN offloads off (``tun.offload: false``);
* the peers (issue 17, ``bench/peers.py``): hev-socks5-tunnel and redsocks through the same
  dante; every column with a proxy process also gets that process's CPU per connection and
  per GB (user + system from /proc);
* ``QUIC``: tunproxy with ``MATCH,quic`` to ``tunproxy server`` (MASQUE over HTTP/3);
  ``QUIC h2o``: the same to h2o as the MASQUE server (when built, see tests/test_quic_h2o.py);
* ``SOCKS5 only``: a control without tunproxy: the client programs themselves use the SOCKS5
  server (iperf3 under proxychains4, the Python clients speak SOCKS5). It shows how much of
  the SOCKS5 column's loss is the SOCKS5 server's own.

Each figure is the median of its repetitions, shown with its ratio to the same run's
baseline. A tunproxy figure that cannot be measured (tunproxy fails to start, exits, carries
no traffic, or the traffic bypassed the TUN) is ``n/a`` with the reason as a footnote.
Everything the run creates (namespaces, processes) is removed at the end, also after
Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import measure, peers, profiling  # noqa: E402
from bench.measure import MeasureError  # noqa: E402
from bench.report import (  # noqa: E402
    CAPTURE_PATHS,
    METRICS,
    OPT_IN_PATHS,
    PATHS,
    PEER_LABELS,
    TESTS,
    Column,
    Section,
    check_targets,
    render_table,
    render_targets,
    sections_as_dict,
)
from bench.services import (  # noqa: E402
    DANTE_PORT,
    DNS_PORT,
    DNS_ZONE,
    ECHO_PORT,
    H2O_PORT,
    MICROSOCKS_PORT,
    QUIC_PORT,
    QUIC_TOKEN,
    SOCKS4,
    Services,
    prepare_namespaces,
)
from tests.netns import SERVER4, Topology, Tunproxy, topology  # noqa: E402

TUN_NAME = "tpbench0"
# Set in the child of --commit: the snapshot's commit (the snapshot has no .git).
SNAPSHOT_ENV = "TUNPROXY_BENCH_SNAPSHOT"
API_PORT = 9090  # the controller, in the client namespace (DIRECT +API)
FAKE_IP_PREFIX = "198.18.", "198.19."  # tunproxy's default fake-ip range 198.18.0.0/15
QUIC_IDLE_FLOWS = 90  # one QUIC connection carries at most 100 streams at once
CAPTURED_OTHER = "curl"  # the process the "capture other" column's capture selects


PROFILE_LEGEND = (
    "Reading the profiles: self% is time with the function at the top of the Python stack, "
    "including the system calls it makes\n(the kernel does the receiving side's TCP work "
    "inside a TUN write). Self time of Runner.run (asyncio/runners.py) is time inside\n"
    "uvloop's C event loop: epoll, socket reads and writes done in C, callback dispatch. "
    "busy% = samples / (rate x seconds): below 100%\nthe process was waiting, not computing."
)


@dataclass(frozen=True)
class Settings:
    iperf_seconds: float
    rounds: int  # every column is measured once per round; medians over rounds
    p4_rounds: int  # rounds that include iperf3 -P 4
    mem_rounds: int  # rounds that measure RSS (each round starts a fresh tunproxy)
    cps_count: int
    rr_count: int
    hold_count: int
    udp_seconds: float
    dns_seconds: float
    dns_window: int = 32
    dgram_window: int = 32  # UDP datagrams in flight in the datagrams/s run


QUICK = Settings(iperf_seconds=1, rounds=1, p4_rounds=1, mem_rounds=1, cps_count=200,
                 rr_count=200, hold_count=100, udp_seconds=0.5, dns_seconds=0.5)
DEFAULT = Settings(iperf_seconds=4, rounds=3, p4_rounds=1, mem_rounds=1, cps_count=2000,
                   rr_count=2000, hold_count=1000, udp_seconds=2, dns_seconds=2)
FULL = Settings(iperf_seconds=10, rounds=3, p4_rounds=3, mem_rounds=3, cps_count=2000,
                rr_count=5000, hold_count=1000, udp_seconds=3, dns_seconds=3)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- tunproxy configurations ------------------------------------------------------------


def tunproxy_config(mtu: int, offload: bool, upstream_port: int | None, dns: bool,
                    pipeline: bool = False, quic: tuple[int, Path, int] | None = None,
                    controller: bool = False, attribution: bool = True) -> str:
    lines = [
        "tun:",
        f"  name: {TUN_NAME}",
        f"  mtu: {mtu}",
        f"  offload: {'true' if offload else 'false'}",
    ]
    if quic is not None:
        port, ca, datagram_size = quic
        lines += ["upstreams:", "  quic:", "    type: quic", f'    server: "{SOCKS4}:{port}"',
                  f"    token: {QUIC_TOKEN}", "    sni: proxy.test", f'    ca: "{ca}"',
                  f"    max-datagram-size: {datagram_size}",
                  "rules:", "  - MATCH,quic", "dns:", "  enable: false"]
        return "\n".join(lines) + "\n"
    if upstream_port is not None:
        lines += ["upstreams:", "  socks:", "    type: socks5",
                  f'    server: "{SOCKS4}:{upstream_port}"']
        if pipeline:
            lines += ["    pipeline: true"]
    lines += ["rules:", f"  - MATCH,{'socks' if upstream_port is not None else 'DIRECT'}"]
    if dns:
        # Fake-ip answers A queries itself; the upstream is there for anything else.
        lines += ["dns:", "  enable: true", "  mode: fake-ip", "  servers:",
                  f'    - "udp://{SERVER4}:{DNS_PORT}"']
    else:
        lines += ["dns:", "  enable: false"]
    if controller:
        lines += ["controller:", f"  listen: 127.0.0.1:{API_PORT}"]
    if not attribution:
        lines += ["log:", "  attribution: false"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Group:
    """Tests that share one tunproxy process (one configuration)."""

    name: str
    tests: tuple[str, ...]
    upstream_port: int | None
    dns: bool
    probe_tcp: bool
    quic_port: int | None = None
    dashboard: bool = False  # a client polls the controller API while 1,000 flows are open
    capture: str | None = None  # a pcapng capture runs (GET /capture) of this process


def groups_for(column: Column, socks_port: int) -> list[Group]:
    def pick(*wanted: str) -> tuple[str, ...]:
        return tuple(t for t in TESTS if t in wanted and t in column.tests)

    if column.path == "direct-api":
        return [Group("main", pick("tcp", "cps", "latency", "udp", "dgram"), None, False, True,
                      dashboard=True)]
    if column.path in CAPTURE_PATHS:
        # Another process (none by that name sends anything: every packet of the measured
        # flow pays the capture's per-batch tap and its per-packet selection check) or
        # iperf3 itself (each of its packets is also written as pcapng).
        process = CAPTURED_OTHER if column.path == "capture-other" else "iperf3"
        return [Group("main", pick("tcp", "cps", "latency", "udp", "dgram"), None, False, True,
                      capture=process)]
    main = pick("mem", "tcp", "cps", "latency", "udp", "dgram")
    if column.path in ("quic", "quic-h2o"):
        port = QUIC_PORT if column.path == "quic" else H2O_PORT
        groups = [Group("main", main, None, False, True, port)]
    elif column.path == "direct":
        groups = [Group("main", main, None, False, True),
                  Group("dns", pick("dns"), None, True, False)]
    elif socks_port == DANTE_PORT:
        groups = [Group("main", main, DANTE_PORT, False, True)]
    else:
        # microsocks has no UDP ASSOCIATE: UDP via SOCKS5 goes to dante.
        groups = [Group("main", pick("mem", "tcp", "cps", "latency"), socks_port, False, True),
                  Group("udp", pick("udp", "dgram"), DANTE_PORT, False, False)]
    return [g for g in groups if g.tests]


# -- one run ----------------------------------------------------------------------------


def log_reason(log: str) -> str:
    """The most telling line of a tunproxy log: its last error, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip() and line != "<exited>"]
    for line in reversed(lines):
        if re.search(r"ERROR|CRITICAL|Error|error:|No module named", line):
            return line[:300]
    return lines[-1][:300] if lines else "(empty log)"


class Runner:
    def __init__(
        self, settings: Settings, workdir: Path, profile_dir: Path | None, log_level: str,
        socks_port: int, socks_pipeline: bool = False, attribution: bool = True,
        quic_datagram_size: int | None = None,
    ) -> None:
        self.settings = settings
        self.quic_datagram_size = quic_datagram_size
        self.socks_port = socks_port
        self.socks_pipeline = socks_pipeline
        self.attribution = attribution
        self.workdir = workdir
        self.profile_dir = profile_dir
        self.log_level = log_level
        self.profiles: list[profiling.Profile] = []
        self.tp: Tunproxy | None = None
        self.peer: peers.Peer | None = None  # a peer column's proxy (hev, redsocks)
        self.topo: Topology | None = None
        self.services: Services | None = None
        self.h2o_crashes: list[str] = []  # h2o's deaths under the QUIC h2o column
        self.round = 0
        self.section_dir = workdir
        # (column label, group) pairs whose tunproxy never started: not retried every round.
        self.broken: dict[tuple[str, str], str] = {}

    # .. plumbing ..

    def tunproxy_gone(self) -> str:
        assert self.tp is not None
        return f"tunproxy exited (rc={self.tp.proc.poll()}): {log_reason(self.tp.log)}"

    def h2o_restart(self, why: str) -> None:
        assert self.services is not None
        self.h2o_crashes.append(why)
        progress(f"    {why}; restarting h2o")
        tp = self.tp
        if tp is not None:
            # tunproxy must see its QUIC connection die (ICMP port unreachable, at the
            # latest on its next keepalive) before h2o listens again: a restarted h2o
            # drops the old connection's packets, which would then wait for the idle
            # timeout. Whichever it logged last, "is up" or "closed", is its view.
            lines = tp.log.splitlines()
            states = [(i, m.group(1)) for i, line in enumerate(lines)
                      if (m := re.search(r"QUIC connection to \S+ (is up|closed)", line))]
            if states and states[-1][1] == "is up":
                with contextlib.suppress(TimeoutError, RuntimeError):
                    tp.wait_for_log(r"QUIC connection to \S+ closed", timeout=20,
                                    start=states[-1][0] + 1)
        self.services.restart_h2o()
        if self.services.iperf_started():
            self.services.restart_iperf()  # its single-test server may still be busy

    def proxy_pid(self) -> int | None:
        """The process whose CPU and memory a figure costs: tunproxy or a peer."""
        if self.tp is not None:
            return self.tp.proc.pid
        return self.peer.pid if self.peer is not None else None

    def step(self, column: Column, what: str) -> None:
        progress(f"  round {self.round + 1}/{self.settings.rounds} {column.label}: {what}")

    def record(
        self, column: Column, keys: tuple[str, ...],
        measure_once: Callable[[], tuple[dict[str, float], float]],
    ) -> dict[str, float] | None:
        """Run one measurement; file its figures (or the reason there are none) under ``keys``.

        ``measure_once`` returns the figures and the payload bytes the path carried; for a
        tunproxy column, the TUN's byte counters must have moved at least half that much, or
        the traffic did not go through tunproxy at all and the figures would be a lie.
        """
        assert self.topo is not None
        tp = self.tp

        def fail(reason: str) -> None:
            for key in keys:
                column.cell(key).errors.append(reason)

        if tp is not None and tp.proc.poll() is not None:
            fail(self.tunproxy_gone())
            return None
        peer = self.peer
        if peer is not None and peer.gone():
            fail(peer.gone() or "")
            return None
        peer_before = peer.carried() if peer is not None else 0
        h2o = self.services if column.path == "quic-h2o" else None
        if h2o is not None and (gone := h2o.h2o_gone()) is not None:
            self.h2o_restart(gone)
        before = measure.tun_bytes(self.topo.client, TUN_NAME) if tp is not None else None
        log_mark = tp.line_count() if tp is not None else 0
        try:
            try:
                figures, carried = measure_once()
            except MeasureError:
                # h2o died under this measurement (its own bug, see Services.h2o_gone):
                # start it again and measure once more; tunproxy reconnects by itself.
                if h2o is None or (gone := h2o.h2o_gone()) is None:
                    raise
                self.h2o_restart(gone)
                before = measure.tun_bytes(self.topo.client, TUN_NAME)
                figures, carried = measure_once()
        except MeasureError as exc:
            reason = str(exc)
            if h2o is not None and (gone := h2o.h2o_gone()) is not None:
                reason = gone
            if peer is not None and peer.gone():
                reason = peer.gone() or reason
            if tp is not None:
                if tp.proc.poll() is not None:
                    reason = self.tunproxy_gone()
                else:
                    new_log = "\n".join(tp.log.splitlines()[log_mark:])
                    if re.search(r"ERROR|CRITICAL|Traceback", new_log):
                        reason += f" | tunproxy log: {log_reason(new_log)}"
            fail(reason)
            return None
        if tp is not None:
            after = measure.tun_bytes(self.topo.client, TUN_NAME)
            moved = (after or 0) - (before or 0)
            if before is None or moved < max(1.0, 0.5 * carried):
                fail(f"traffic bypassed the TUN ({moved} bytes through {TUN_NAME} for "
                     f"{carried:.0f} payload bytes)")
                return None
        if peer is not None and peer.carried() <= peer_before:
            fail(f"traffic bypassed {peer.label} (its "
                 f"{'TUN' if peer.name == 'hev' else 'REDIRECT rule'} counters did not move)")
            return None
        for key, value in figures.items():
            column.cell(key).add(value, self.round)
        return figures

    # .. the tests: each takes one sample per round ..

    def iperf_wrapper(self, column: Column) -> tuple[str, ...]:
        if column.path != "socks5-only":
            return ()
        assert self.services is not None
        conf = self.services.proxychains_config(self.socks_port)
        return ("proxychains4", "-q", "-f", str(conf))

    def client_via(self, column: Column) -> tuple[str, ...]:
        return ("--socks", f"{SOCKS4}:{self.socks_port}") if column.path == "socks5-only" else ()

    def test_tcp(self, column: Column) -> None:
        assert self.topo is not None
        ns = self.topo.client
        s = self.settings
        wrapper = self.iperf_wrapper(column)
        runs = [("tcp_up", False, 1), ("tcp_down", True, 1)]
        if self.round < s.p4_rounds:
            runs.append(("tcp_up_p4", False, 4))
        for key, reverse, parallel in runs:
            self.step(column, f"iperf3 {key}")

            def once(reverse: bool = reverse, parallel: int = parallel,
                     key: str = key) -> tuple[dict[str, float], float]:
                pid = self.proxy_pid()
                cpu = measure.cpu_seconds(pid) if pid is not None else 0.0
                result = measure.iperf(ns, s.iperf_seconds, reverse=reverse, parallel=parallel,
                                       wrapper=wrapper)
                figures = {key: result["gbps"]}
                if pid is not None and parallel == 1:
                    # CPU (ms) per GB of payload received.
                    cpu = measure.cpu_seconds(pid) - cpu
                    figures[f"cpu_gb_{'down' if reverse else 'up'}"] = \
                        cpu * 1e3 / (result["bytes"] / 1e9)
                return figures, result["bytes"]

            if self.record(column, (key,), once) is None and self.services is not None:
                self.services.restart_iperf()

    def test_cps(self, column: Column) -> None:
        assert self.topo is not None
        ns = self.topo.client
        count = self.settings.cps_count
        via = self.client_via(column)
        self.step(column, f"{count} connections")

        def once() -> tuple[dict[str, float], float]:
            pid = self.proxy_pid()
            user, system = measure.cpu_times(pid) if pid is not None else (0.0, 0.0)
            r = measure.client(ns, "cps", "--host", SERVER4, "--port", str(ECHO_PORT),
                               "--count", str(count), "--timeout", "5", *via)
            figures = {"cps": r["per_s"], "conn_p50": r["p50_us"], "conn_p99": r["p99_us"]}
            if pid is not None:
                user_after, system_after = measure.cpu_times(pid)
                per_conn = 1e6 / r["count"]
                figures["cpu_conn"] = (user_after - user + system_after - system) * per_conn
                figures["cpu_conn_sys"] = (system_after - system) * per_conn
            return figures, float(r["count"])

        self.record(column, ("cps", "conn_p50", "conn_p99"), once)

    def test_latency(self, column: Column) -> None:
        assert self.topo is not None
        ns = self.topo.client
        count = self.settings.rr_count
        via = self.client_via(column)
        self.step(column, f"{count} request/response round trips")

        def once() -> tuple[dict[str, float], float]:
            r = measure.client(ns, "rr", "--host", SERVER4, "--port", str(ECHO_PORT),
                               "--count", str(count), "--size", "64", "--timeout", "5", *via)
            return {"rr_p50": r["p50_us"], "rr_p99": r["p99_us"]}, 2.0 * 64 * r["count"]

        self.record(column, ("rr_p50", "rr_p99"), once)

    def test_udp(self, column: Column) -> None:
        assert self.topo is not None
        ns = self.topo.client
        seconds = self.settings.udp_seconds
        self.step(column, "UDP request/response")

        def once() -> tuple[dict[str, float], float]:
            pid = self.proxy_pid()
            cpu = measure.cpu_seconds(pid) if pid is not None else 0.0
            r = measure.client(ns, "udp", "--host", SERVER4, "--port", str(ECHO_PORT),
                               "--count", "100000000", "--max-seconds", f"{seconds:g}",
                               "--size", "64", "--timeout", "0.5")
            figures = {"udp_rr": r["per_s"]}
            if pid is not None and r["count"]:
                # One request and its reply: two datagrams through the proxy.
                figures["cpu_udp"] = (measure.cpu_seconds(pid) - cpu) * 1e6 / r["count"]
            return figures, 2.0 * 64 * r["count"]

        self.record(column, ("udp_rr",), once)

    def test_dgram(self, column: Column) -> None:
        """Datagrams/s echoed with a window in flight on one flow (issue 12's figure), and
        the CPU each echoed datagram (one up, one down) cost the proxy and, for the QUIC
        columns, the MASQUE server."""
        assert self.topo is not None
        ns = self.topo.client
        s = self.settings
        self.step(column, f"UDP datagrams/s, {s.dgram_window} in flight")
        server_pid = self.masque_pid(column)

        def once() -> tuple[dict[str, float], float]:
            pid = self.proxy_pid()
            cpu = measure.cpu_seconds(pid) if pid is not None else 0.0
            server_cpu = measure.cpu_seconds(server_pid) if server_pid is not None else 0.0
            r = measure.client(ns, "flood", "--host", SERVER4, "--port", str(ECHO_PORT),
                               "--max-seconds", f"{s.udp_seconds:g}", "--window",
                               str(s.dgram_window), "--size", "64", "--timeout", "1")
            if not r["count"]:
                raise MeasureError(f"no datagram echoed ({r['lost']} lost)")
            figures = {"dgram": r["per_s"]}
            if pid is not None:
                figures["cpu_dgram"] = (measure.cpu_seconds(pid) - cpu) * 1e6 / r["count"]
            if server_pid is not None:
                figures["cpu_dgram_server"] = \
                    (measure.cpu_seconds(server_pid) - server_cpu) * 1e6 / r["count"]
            return figures, 2.0 * 64 * r["count"]

        self.record(column, ("dgram", "cpu_dgram", "cpu_dgram_server"), once)

    def masque_pid(self, column: Column) -> int | None:
        """The MASQUE server behind a QUIC column (tunproxy server, h2o), if it runs."""
        if self.services is None or column.path not in ("quic", "quic-h2o"):
            return None
        return self.services.pids.get("masque" if column.path == "quic" else "h2o")

    def test_dns(self, column: Column) -> None:
        assert self.topo is not None
        ns = self.topo.client
        s = self.settings
        self.step(column, "DNS queries")
        sample: list[str] = []

        def once() -> tuple[dict[str, float], float]:
            r = measure.client(ns, "dns", "--host", SERVER4, "--port", str(DNS_PORT),
                               "--count", "100000000", "--max-seconds", f"{s.dns_seconds:g}",
                               "--window", str(s.dns_window), "--zone", DNS_ZONE,
                               "--timeout", "1")
            if r.get("sample_answer"):
                sample.append(r["sample_answer"])
            return {"dns_qps": r["per_s"]}, 30.0 * r["count"]

        self.record(column, ("dns_qps",), once)
        if column.path != "baseline" and sample and not sample[0].startswith(FAKE_IP_PREFIX):
            column.cell("dns_qps").note = (
                f"{column.label}: DNS answers were not fake IPs (e.g. {sample[0]}): the "
                "queries were relayed, not answered by tunproxy's fake-ip"
            )

    def test_mem(self, column: Column) -> None:
        """RSS at rest (fresh process, one probe flow done), then with N idle flows open."""
        pid = self.proxy_pid()
        assert self.topo is not None and pid is not None
        if self.round >= self.settings.mem_rounds:
            return
        count = self.settings.hold_count
        if column.path in ("quic", "quic-h2o"):
            # One QUIC connection carries them all, and qh3 and h2o both allow 100 concurrent
            # streams on it: more flows would wait for a slot, not be idle flows.
            count = min(count, QUIC_IDLE_FLOWS)
        self.step(column, f"RSS with {count} idle TCP flows")

        def once() -> tuple[dict[str, float], float]:
            assert self.topo is not None
            rest = measure.wait_rss_settled(pid)
            with measure.idle_flows(self.topo.client, SERVER4, ECHO_PORT, count) as info:
                held = int(info["ready"])
                loaded = measure.wait_rss_settled(pid)
            return {"rss_rest": rest / 1024.0, "rss_per_flow": (loaded - rest) / held}, held

        self.record(column, ("rss_rest", "rss_per_flow"), once)

    def profile_tcp(self, column: Column, mtu: int) -> None:
        """py-spy during an extra (unmeasured) iperf3 upload and download."""
        assert self.topo is not None
        ns = self.topo.client
        seconds = max(round(self.settings.iperf_seconds), 5)
        for direction, reverse in (("upload", False), ("download", True)):

            def load(reverse: bool = reverse, direction: str = direction) -> str:
                try:
                    gbps = measure.iperf(ns, seconds, reverse=reverse)["gbps"]
                except MeasureError as exc:
                    return f"iperf3 {direction} under py-spy failed: {exc}"
                return f"iperf3 {direction} under py-spy: {gbps:.2f} Gbit/s"

            self.profile(column, mtu, f"iperf3 {direction}", seconds, load)

    def profile_cps(self, column: Column, mtu: int) -> None:
        """py-spy during an extra (unmeasured) connections/s run."""
        assert self.topo is not None
        ns = self.topo.client
        seconds = 5

        def load() -> str:
            # About as many connections as tunproxy opens in the seconds recorded.
            try:
                r = measure.client(ns, "cps", "--host", SERVER4, "--port", str(ECHO_PORT),
                                   "--count", "5000", "--timeout", "5")
            except MeasureError as exc:
                return f"connections/s under py-spy failed: {exc}"
            return (f"connections/s under py-spy: {r['per_s']:,.0f} ({r['count']} connections "
                    f"in {r['elapsed_s']:.1f} s of the {seconds} s recorded)")

        self.profile(column, mtu, "connections/s", seconds, load)

    def profile_udp(self, column: Column, mtu: int) -> None:
        """py-spy during an extra (unmeasured) UDP request/response run."""
        assert self.topo is not None
        ns = self.topo.client
        seconds = 5

        def load() -> str:
            try:
                r = measure.client(ns, "udp", "--host", SERVER4, "--port", str(ECHO_PORT),
                                   "--count", "100000000", "--max-seconds", str(seconds),
                                   "--size", "64", "--timeout", "0.5")
            except MeasureError as exc:
                return f"UDP request/response under py-spy failed: {exc}"
            return f"UDP request/response under py-spy: {r['per_s']:,.0f}/s"

        self.profile(column, mtu, "UDP request/response", seconds, load)

    def profile(
        self, column: Column, mtu: int, what: str, seconds: int, load: Callable[[], str]
    ) -> None:
        """Record tunproxy with py-spy while ``load`` runs; also note the TUN's packet counts
        and sizes (with offloads working, tunproxy reads and writes super-packets far
        larger than the MTU)."""
        assert self.topo is not None and self.tp is not None and self.profile_dir is not None
        if not profiling.available():
            progress("  py-spy not found (pip install py-spy): no profile")
            return
        ns = self.topo.client
        name = re.sub(r"[^A-Za-z0-9]+", "-", f"mtu{mtu} {column.label} {what}")
        raw = self.profile_dir / f"{name}.txt"
        self.step(column, f"py-spy during {what} (not measured)")
        before = measure.tun_counters(ns, TUN_NAME)
        spy = profiling.start_recording(self.tp.proc.pid, seconds, raw)
        err = b""
        try:
            notes = [load()]
            _, err = spy.communicate(timeout=seconds + 60)
        finally:
            if spy.poll() is None:
                spy.kill()
                spy.wait(timeout=10)
        after = measure.tun_counters(ns, TUN_NAME)
        if not raw.exists():
            progress(f"  py-spy failed: {err.decode(errors='replace').strip()[-300:]}")
            return
        if before is not None and after is not None:
            delta = {key: after[key] - before[key] for key in after}
            for way, role in (("tx", "kernel -> tunproxy (reads)"),
                              ("rx", "tunproxy -> kernel (writes)")):
                packets = delta[f"{way}_packets"]
                if packets:
                    notes.append(f"TUN {role}: {packets:,} packets, "
                                 f"{delta[f'{way}_bytes'] / packets:,.0f} B per packet")
        self.profiles.append(profiling.summarize(
            raw.read_text(), f"MTU {mtu} {column.label} {what}", str(raw), seconds=seconds,
            notes=tuple(notes),
        ))

    # .. columns and sections ..

    TEST_ORDER = ("mem", "tcp", "cps", "latency", "udp", "dgram", "dns")

    def run_tests(self, column: Column, tests: tuple[str, ...], mtu: int) -> None:
        for test in self.TEST_ORDER:
            if test in tests:
                getattr(self, f"test_{test}")(column)
                if (test in ("tcp", "cps", "udp") and self.profile_dir is not None
                        and self.tp is not None and column.offload and self.round == 0):
                    getattr(self, f"profile_{test}")(column, mtu)

    def fail_tests(self, column: Column, tests: tuple[str, ...], reason: str) -> None:
        for metric in METRICS:
            if metric.test in tests:
                column.cell(metric.key).errors.append(reason)

    def datagram_size(self, mtu: int) -> int:
        """QUIC packet size for both ends (--quic-datagram-size; default: what the MTU carries)."""
        from tunproxy.quicio import datagram_size

        return self.quic_datagram_size or datagram_size(mtu, ipv6=False)

    def run_tunproxy_group(self, section: Section, column: Column, group: Group) -> None:
        assert self.topo is not None
        broken = self.broken.get((f"{section.mtu} {column.label}", group.name))
        if broken is not None:
            return  # the reason is already in every cell of the group
        quic = None
        if group.quic_port is not None:
            assert self.services is not None
            if column.path == "quic-h2o" and not self.services.h2o():
                self.fail_tests(column, group.tests,
                                "h2o is not built (see tests/test_quic_h2o.py)")
                return
            quic = (group.quic_port, self.services.masque_ca(),
                    self.datagram_size(section.mtu))
        config = tunproxy_config(section.mtu, column.offload, group.upstream_port, group.dns,
                                 self.socks_pipeline, quic,
                                 controller=group.dashboard or group.capture is not None,
                                 attribution=self.attribution)
        name = (f"tunproxy-mtu{section.mtu}-{column.label.replace(' ', '-')}-{group.name}"
                f"-round{self.round + 1}")
        self.step(column, f"starting tunproxy ({group.name}: {', '.join(group.tests)})")
        try:
            self.tp = self.topo.start_tunproxy(
                config, "--log-level", self.log_level, name=f"{name}.yaml", wait=False
            )
            self.tp.wait_ready(timeout=30)
        except (RuntimeError, TimeoutError, OSError) as exc:
            reason = "tunproxy did not start"
            reason += f": {log_reason(self.tp.log)}" if self.tp is not None else f": {exc}"
            progress(f"    {reason}")
            self.fail_tests(column, group.tests, reason)
            self.broken[(f"{section.mtu} {column.label}", group.name)] = reason
            self.stop_tunproxy(name)
            return
        try:
            if group.probe_tcp:
                try:
                    measure.client(self.topo.client, "cps", "--host", SERVER4, "--port",
                                   str(ECHO_PORT), "--count", "3", "--timeout", "5", timeout=60)
                except MeasureError as exc:
                    reason = f"no TCP through tunproxy: {exc}"
                    if self.tp.proc.poll() is not None:
                        reason = self.tunproxy_gone()
                    elif re.search(r"ERROR|CRITICAL|Traceback", self.tp.log):
                        reason += f" | tunproxy log: {log_reason(self.tp.log)}"
                    progress(f"    {reason}")
                    self.fail_tests(column, group.tests, reason)
                    return
            if group.dashboard:
                self.run_with_dashboard(column, group.tests, section.mtu)
            elif group.capture is not None:
                self.run_with_capture(column, group.tests, section.mtu, group.capture)
            else:
                self.run_tests(column, group.tests, section.mtu)
        finally:
            self.stop_tunproxy(name)

    def run_with_dashboard(self, column: Column, tests: tuple[str, ...], mtu: int) -> None:
        """The tests while 1,000 idle flows are open and a dashboard polls /connections
        every second (issue 13: the flow table and API must not slow the data path)."""
        assert self.topo is not None
        count = self.settings.hold_count
        self.step(column, f"opening {count} idle flows; a client polls /connections each second")
        try:
            with measure.idle_flows(self.topo.client, SERVER4, ECHO_PORT, count), \
                    measure.api_poller(self.topo.client, API_PORT) as summary:
                self.run_tests(column, tests, mtu)
        except MeasureError as exc:
            self.fail_tests(column, tests, f"dashboard load: {exc}")
            return
        if summary:
            p = summary[0]
            progress(f"    dashboard: {p.get('polls', 0)} polls ({p.get('failures', 0)} failed), "
                     f"{p.get('connections_avg', 0):.0f} connections and "
                     f"{p.get('bytes_avg', 0) / 1024:.0f} KiB per answer, p50 "
                     f"{p.get('p50_us', 0) / 1000:.1f} ms, p99 {p.get('p99_us', 0) / 1000:.1f} ms")

    def run_with_capture(self, column: Column, tests: tuple[str, ...], mtu: int,
                         process: str) -> None:
        """The tests while ``tunproxy capture --process PROCESS -w -`` runs (issue 14)."""
        assert self.topo is not None and self.tp is not None
        self.step(column, f"starting a capture of process {process} (GET /capture)")
        mark = self.tp.line_count()
        try:
            with measure.capture(self.topo.client, REPO, API_PORT, process) as received:
                self.run_tests(column, tests, mtu)
        except MeasureError as exc:
            self.fail_tests(column, tests, f"capture: {exc}")
            return
        # tunproxy's own account: packets written, bytes dropped for a slow reader.
        ended = ""
        with contextlib.suppress(TimeoutError, RuntimeError):
            ended = self.tp.wait_for_log(r"capture for .* ended: .*", timeout=10, start=mark)
        summary = ended.split("ended: ", 1)[-1].strip() if ended else "no summary logged"
        progress(f"    capture of {process}: {received[0]:,} bytes of pcapng read; "
                 f"tunproxy: {summary}")

    def stop_tunproxy(self, name: str) -> None:
        tp, self.tp = self.tp, None
        if tp is None:
            return
        with contextlib.suppress(Exception):
            if tp.proc.poll() is None:
                tp.stop(timeout=20)
            else:
                tp.kill()
        with contextlib.suppress(OSError):
            (self.section_dir / f"{name}.log").write_text(tp.log)

    def run_section(self, section: Section) -> None:
        tests = {t for c in section.columns for t in c.tests}
        paths = {c.path for c in section.columns}
        workdir = self.section_dir = self.workdir / f"mtu{section.mtu}"
        workdir.mkdir(parents=True, exist_ok=True)
        progress(f"MTU {section.mtu}: building the topology")
        # echo_logs=False: the logs are saved in the workdir, not printed over the table.
        with topology(workdir, mtu=section.mtu, echo_logs=False) as topo:
            self.topo = topo
            try:
                prepare_namespaces(topo)
                self.services = Services(topo, workdir)
                if "tcp" in tests:
                    self.services.iperf()
                if tests & {"cps", "latency", "mem", "udp", "dgram"}:
                    self.services.echo()
                if paths & {"socks5", "socks5-only", *PEER_LABELS}:
                    self.services.dante()
                    if self.socks_port == MICROSOCKS_PORT:
                        self.services.microsocks()
                if "quic" in paths:
                    self.services.masque_server(self.datagram_size(section.mtu))
                if "dns" in tests:
                    self.services.dnsmasq()
                for round_index in range(self.settings.rounds):
                    self.round = round_index
                    for column in section.columns:
                        if column.path == "baseline":
                            self.step(column, "plain kernel routing, no TUN")
                            self.run_tests(column, column.tests, section.mtu)
                        elif column.path in PEER_LABELS:
                            self.run_peer_column(section, column)
                        elif column.path == "socks5-only":
                            self.step(column, "no tunproxy, clients use the SOCKS5 server")
                            self.run_tests(column, column.tests, section.mtu)
                        else:
                            for group in groups_for(column, self.socks_port):
                                self.run_tunproxy_group(section, column, group)
            finally:
                self.stop_tunproxy("interrupted")
                self.stop_peer()
                self.topo = None

    def run_peer_column(self, section: Section, column: Column) -> None:
        """A peer (hev, redsocks) through the SOCKS5 server, fresh per round, like tunproxy."""
        assert self.topo is not None
        key = (f"{section.mtu} {column.label}", "peer")
        if key in self.broken:
            return
        tag = f"{column.path}-mtu{section.mtu}-round{self.round + 1}"
        self.step(column, "starting the peer")
        try:
            self.peer = peers.start(column.path, self.topo.client, self.section_dir,
                                    section.mtu, SOCKS4, DANTE_PORT, tag)
        except peers.PeerError as exc:
            reason = f"{PEER_LABELS[column.path]} did not start: {exc}"
            progress(f"    {reason}")
            self.fail_tests(column, column.tests, reason)
            self.broken[key] = reason
            return
        try:
            try:
                measure.client(self.topo.client, "cps", "--host", SERVER4, "--port",
                               str(ECHO_PORT), "--count", "3", "--timeout", "5", timeout=60)
            except MeasureError as exc:
                reason = self.peer.gone() or f"no TCP through {self.peer.label}: {exc}"
                progress(f"    {reason}")
                self.fail_tests(column, column.tests, reason)
                return
            self.run_tests(column, column.tests, section.mtu)
        finally:
            self.stop_peer()

    def stop_peer(self) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            with contextlib.suppress(Exception):
                peer.stop()


# -- planning -------------------------------------------------------------------------


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item not in allowed:
            raise SystemExit(f"unknown {what} {item!r}: choose from {', '.join(allowed)}")
    return items


def plan(args: argparse.Namespace) -> tuple[Settings, list[Section]]:
    settings = QUICK if args.quick else FULL if args.full else DEFAULT
    if args.rounds is not None:
        settings = replace(settings, rounds=args.rounds,
                           p4_rounds=min(args.rounds, settings.p4_rounds),
                           mem_rounds=min(args.rounds, settings.mem_rounds))
    if args.time is not None:
        settings = replace(settings, iperf_seconds=args.time)
    tests = parse_list(args.only, TESTS, "test") if args.only else list(TESTS)
    paths = parse_list(args.paths, PATHS, "path") if args.paths else [
        p for p in PATHS if p not in OPT_IN_PATHS]
    if args.mtu:
        mtus = [int(m) for m in args.mtu.split(",") if m.strip()]
    else:
        mtus = [1500] if args.quick else [1500, 9000]
    explicit_offloads = parse_list(args.offload, ("on", "off"), "offload setting") \
        if args.offload else None

    def offloads_at(mtu: int) -> list[bool]:
        if explicit_offloads is not None:
            return [o == "on" for o in explicit_offloads]
        if args.quick:
            return [True]
        if args.full:
            return [True, False]
        # Default: offloads off only at MTU 1500, where they matter most (1,500-byte packets
        # one by one through Python), to keep the default run near 10 minutes.
        return [True, False] if mtu == 1500 else [True]

    sections = []
    for mtu in mtus:
        columns = []
        if "baseline" in paths:
            # The baseline has no tunproxy process to weigh.
            columns.append(Column("baseline", True, tuple(t for t in tests if t != "mem")))
        for offload in offloads_at(mtu):
            for path in ("direct", "socks5", "quic", "quic-h2o", "direct-api", *CAPTURE_PATHS):
                if path not in paths or (path in ("direct-api", *CAPTURE_PATHS)
                                         and not offload):
                    continue
                # Fake-ip DNS is answered inside tunproxy whatever the outbound: once is enough.
                wanted = [t for t in tests if not (path != "direct" and t == "dns")
                          and not (path == "direct-api" and t == "mem")]
                if not offload and not args.full and explicit_offloads is None:
                    wanted = [t for t in wanted if t == "tcp"]
                if path in CAPTURE_PATHS and not args.full:
                    wanted = [t for t in wanted if t == "tcp"]  # throughput: the cost per byte
                if wanted:
                    columns.append(Column(path, offload, tuple(wanted)))
        for path in PEER_LABELS:
            if path in paths:
                wanted = [t for t in tests if t in peers.PEER_TESTS[path]]
                if wanted:
                    columns.append(Column(path, True, tuple(wanted)))
        if "socks5-only" in paths:
            # The clients that can speak SOCKS5 themselves: iperf3 (via proxychains4), cps, rr.
            control = tuple(t for t in tests if t in ("tcp", "cps", "latency"))
            if control:
                columns.append(Column("socks5-only", True, control))
        if columns:
            sections.append(Section(mtu, columns))
    return settings, sections


# -- machine and output -------------------------------------------------------------------


def build_info() -> str:
    """Which build of stack/ and rules/ tunproxy runs (mypyc-compiled or pure Python)."""
    try:
        import tunproxy_native
    except ImportError:  # a --commit snapshot from before the compiled build
        return "stack: pure Python"
    return tunproxy_native.describe()


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                          re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    commit = os.environ.get(SNAPSHOT_ENV) or subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    dirty = not os.environ.get(SNAPSHOT_ENV) and subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    if commit and dirty:
        commit += " + uncommitted changes"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "iperf3": subprocess.run(["iperf3", "--version"], capture_output=True, text=True,
                                 check=False).stdout.split("\n", 1)[0].strip(),
        "commit": commit or "unknown",
        "build": build_info(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def render_header(meta: dict[str, Any], settings: Settings, sections: list[Section]) -> str:
    mtus = ", ".join(str(s.mtu) for s in sections)
    return (
        f"tunproxy benchmark  {meta['date']}  commit {meta['commit']}  ({meta['build']})\n"
        f"machine: {meta['cpu']} x{meta['cpus']}, kernel {meta['kernel']}, "
        f"Python {meta['python']}, {meta['iperf3']}, load at start {meta['loadavg_at_start']}\n"
        f"MTU {mtus}; iperf3 -t {settings.iperf_seconds:g}; medians of {settings.rounds} rounds "
        f"(-P 4: {settings.p4_rounds}, RSS: {settings.mem_rounds}); {settings.cps_count} "
        f"connections per connections/s run; {settings.hold_count} idle flows for RSS; "
        f"SOCKS5 server {meta['socks_server']}"
        f"{'; attribution off' if meta.get('attribution') == 'off' else ''}\n"
        "cells: median (median ratio to the same round's baseline[, latency added in us]"
        "[, ratio to the same round's DIRECT for a capture column])"
    )


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every finally (teardown) runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def raise_nofile_limit() -> None:
    # tunproxy (started from here) holds two sockets per flow for the 1,000-flow test.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tests: {', '.join(TESTS)}; paths: {', '.join(PATHS)}",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="smallest run: MTU 1500, offloads on, 1 s iperf3, no repetitions")
    size.add_argument("--full", action="store_true",
                      help="everything: iperf3 -t 10, offloads on and off at every MTU, "
                           "every test in every column (about 30 minutes)")
    parser.add_argument("--only", metavar="TESTS", help="comma-separated subset of: "
                        + ", ".join(TESTS))
    parser.add_argument("--paths", metavar="PATHS", help="comma-separated subset of: "
                        + ", ".join(PATHS) + " (ratios need the baseline)")
    parser.add_argument("--mtu", metavar="MTUS", help="comma-separated, default 1500,9000")
    parser.add_argument("--offload", metavar="ON,OFF",
                        help="tunproxy offload settings to measure (default: on; off too at "
                             "MTU 1500, TCP throughput only)")
    parser.add_argument("--rounds", "--repeat", type=int,
                        help="rounds (each measures every column once; medians shown)")
    parser.add_argument("--time", type=float, help="iperf3 seconds per run")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON "
                        "('-': JSON on stdout, the table on stderr)")
    parser.add_argument("--targets", action="store_true",
                        help="PASS/FAIL against issue 7's targets (exit 0 unless --strict)")
    parser.add_argument("--strict", action="store_true", help="with --targets: exit 1 on FAIL")
    parser.add_argument("--profile", metavar="DIR", type=Path,
                        help="py-spy tunproxy during extra iperf3 and connections/s runs; raw "
                             "stacks go to DIR")
    parser.add_argument("--keep", metavar="DIR", type=Path,
                        help="keep configs and tunproxy logs in DIR (default: a temp dir, "
                             "removed)")
    parser.add_argument("--socks-server", choices=("dante", "microsocks"), default="dante",
                        help="SOCKS5 server for TCP (default dante; microsocks caps throughput "
                             "at a fraction of the baseline by itself; UDP always uses dante)")
    parser.add_argument("--socks-pipeline", action="store_true",
                        help="tunproxy's SOCKS5 upstream with pipeline: true (request sent with "
                             "the greeting); dante takes it, microsocks does not")
    parser.add_argument("--quic-datagram-size", type=int, metavar="BYTES",
                        help="max-datagram-size of the QUIC columns' client and tunproxy server "
                             "(default: the largest the MTU carries, e.g. 1472 at 1500)")
    parser.add_argument("--build-peers", action="store_true",
                        help="build hev-socks5-tunnel into its cache first if it is not there "
                             "(bench/peers.py; about a minute, once)")
    parser.add_argument("--no-attribution", action="store_true",
                        help="tunproxy with log.attribution: false (no process lookup for "
                             "flows the rules do not need it for): attribution's cost")
    parser.add_argument("--commit", metavar="REV",
                        help="measure the code of commit REV (git archive into a temp dir), "
                             "not the working tree, which others may be editing")
    parser.add_argument("--tunproxy-log-level", default="info",
                        help="tunproxy's --log-level during the run (default info)")
    return parser


def run_snapshot(rev: str, argv: list[str]) -> int:
    """Run this same command from a ``git archive`` of ``rev``: tunproxy, stack, rules and
    bench all come from the snapshot (tests.netns runs ``python -m tunproxy`` from there)."""
    resolved = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", f"{rev}^{{commit}}"],
                              capture_output=True, text=True, check=False)
    if resolved.returncode != 0:
        print(f"--commit: {rev!r} is not a commit: {resolved.stderr.strip()}", file=sys.stderr)
        return 2
    snapshot = Path(tempfile.mkdtemp(prefix="tunproxy-bench-src-"))
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(snapshot)], input=archive.stdout, check=True)
        script = snapshot / "bench" / "run.py"
        if not script.exists():
            print(f"--commit: {rev} has no bench/run.py", file=sys.stderr)
            return 2
        env = {**os.environ, SNAPSHOT_ENV: resolved.stdout.strip()}
        child = subprocess.Popen([sys.executable, str(script), *argv], env=env)
        try:
            return child.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too (same process group); SIGTERM is passed on. Either
            # way the child tears its topology down; wait for it.
            child.send_signal(signal.SIGTERM)
            return child.wait()
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(raw_argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root: it creates network namespaces and runs tunproxy.",
              file=sys.stderr)
        return 2
    if args.commit and not os.environ.get(SNAPSHOT_ENV):
        with sigterm_as_interrupt():
            return run_snapshot(args.commit, raw_argv)
    settings, sections = plan(args)
    if not sections:
        print("nothing to measure with these --only/--paths/--mtu choices", file=sys.stderr)
        return 2
    raise_nofile_limit()
    if args.build_peers and any(c.path == "hev" for s in sections for c in s.columns):
        progress("building hev-socks5-tunnel (once, into its cache)")
        peers.build_hev()
    meta = machine_info()
    if args.keep:
        workdir = args.keep.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="tunproxy-bench-"))
    profile_dir = args.profile.resolve() if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    socks_port = DANTE_PORT if args.socks_server == "dante" else MICROSOCKS_PORT
    if args.socks_pipeline and args.socks_server != "dante":
        print("--socks-pipeline needs --socks-server dante (microsocks stalls on it)",
              file=sys.stderr)
        return 2
    meta["socks_server"] = args.socks_server + (" (pipelined)" if args.socks_pipeline else "")
    if args.no_attribution:
        meta["attribution"] = "off"
    runner = Runner(settings, workdir, profile_dir, args.tunproxy_log_level, socks_port,
                    args.socks_pipeline, attribution=not args.no_attribution,
                    quic_datagram_size=args.quic_datagram_size)
    interrupted = False
    started = time.monotonic()
    try:
        with sigterm_as_interrupt():
            for section in sections:
                runner.run_section(section)
    except KeyboardInterrupt:
        interrupted = True
        progress("interrupted: everything torn down; partial results follow")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    meta["duration_s"] = round(time.monotonic() - started, 1)

    out = sys.stderr if args.json == "-" else sys.stdout
    text = render_header(meta, settings, sections) + "\n\n" + render_table(sections)
    verdicts = check_targets(sections)
    if args.targets:
        text += "\n\nTargets (issues 7, 14 and 17):\n" + render_targets(verdicts)
    if runner.profiles:
        text += "\n\n" + PROFILE_LEGEND
    for profile in runner.profiles:
        text += "\n\n" + profiling.render(profile)
    if runner.h2o_crashes:
        # Each one cost a measurement (retried once after the restart); see Services.h2o_gone.
        known = any("proceed_request_streaming" in why for why in runner.h2o_crashes)
        text += (f"\n\nh2o died {len(runner.h2o_crashes)} time(s) under the QUIC h2o column and "
                 "was restarted" + (" (its own assertion: a CONNECT target closed under a "
                                    "pending write; not tunproxy's doing)" if known else "")
                 + f"; last: {runner.h2o_crashes[-1]}")
    text += f"\n\n(run took {meta['duration_s']:.0f} s)"
    print(text, file=out, flush=True)
    if args.json:
        document = {
            "meta": meta, "settings": asdict(settings), "interrupted": interrupted,
            "sections": sections_as_dict(sections),
            "targets": [v.as_dict() for v in verdicts],
            "profiles": [p.as_dict() for p in runner.profiles],
        }
        encoded = json.dumps(document, indent=2)
        if args.json == "-":
            print(encoded, flush=True)
        else:
            Path(args.json).write_text(encoded + "\n")
    if interrupted:
        return 130
    if args.targets and args.strict and any(v.status == "FAIL" for v in verdicts):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
