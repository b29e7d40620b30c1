"""Keeps the benchmark harness (bench/) from rotting. Benchmarks are not tests: this only
checks that the smallest run produces figures, and that the report arithmetic is right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profiling import summarize
from bench.report import Column, Section, check_targets, render_table

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.netns
@pytest.mark.timeout(240)
def test_quick_baseline_run_produces_figures() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--paths", "baseline",
         "--only", "tcp,cps", "--json", "-"],
        capture_output=True, text=True, timeout=200, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    document = json.loads(proc.stdout)
    (section,) = document["sections"]
    assert section["mtu"] == 1500
    (baseline,) = section["columns"]
    assert baseline["path"] == "baseline"
    figures = baseline["figures"]
    assert figures["tcp_up"]["median"] > 0, figures["tcp_up"]
    assert figures["tcp_down"]["median"] > 0, figures["tcp_down"]
    assert figures["cps"]["median"] > 0, figures["cps"]
    # The table went to stderr, with the baseline figure in it.
    assert "connections/s" in proc.stderr


@pytest.mark.netns
@pytest.mark.timeout(300)
def test_quick_peer_run_reports_cpu_per_connection() -> None:
    """The peer columns (hev-socks5-tunnel, redsocks through dante), those built here."""
    from bench import peers

    ready = [name for name in peers.PEERS if peers.available(name) is None]
    if not ready:
        pytest.skip("no peer available: " + "; ".join(
            f"{name}: {peers.available(name)}" for name in peers.PEERS))
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--paths", ",".join(ready),
         "--only", "cps", "--json", "-"],
        capture_output=True, text=True, timeout=260, cwd=REPO, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (section,) = json.loads(proc.stdout)["sections"]
    assert [c["path"] for c in section["columns"]] == ready
    for column in section["columns"]:
        figures = column["figures"]
        assert figures["cps"]["median"] > 0, (column["label"], figures["cps"])
        # CPU time of the peer's process, per connection; it did carry them (else n/a).
        assert figures["cpu_conn"]["median"] > 0, (column["label"], figures["cpu_conn"])


def test_peer_targets_are_ratios_to_the_peer_of_the_same_round() -> None:
    section = _section(direct_up=[5.0], socks_cps=300.0, socks_error=None)
    hev = Column("hev", tests=("cps",))
    hev.cell("cps").add(250.0, 0)
    section.columns.append(hev)
    for column, p50 in ((section.columns[2], 900.0), (hev, 1000.0)):
        column.cell("conn_p50").add(p50, 0)
    verdicts = {v.target.name: v for v in check_targets([section])}
    cps = verdicts["connections/s via SOCKS5 >= 1.00x hev's"]
    assert cps.status == "PASS" and cps.detail.startswith("1.20x (limit 1.00x)")
    assert "hev > SOCKS5: 250 conn/s" in cps.detail
    # Lower is better: 900 / 1000 = 0.90x of hev's latency passes a <= 1.00x limit.
    assert verdicts["new connection latency p50 via SOCKS5 <= hev's"].status == "PASS"
    # redsocks was not measured: its targets are skipped, not failed.
    assert verdicts["TCP upload via SOCKS5 >= 0.90x redsocks'"].status == "SKIP"


def _section(
    direct_up: list[float], socks_cps: float | None, socks_error: str | None
) -> Section:
    baseline = Column("baseline", tests=("tcp", "cps"))
    for round_index, value in enumerate([10.0, 20.0, 11.0]):
        baseline.cell("tcp_up").add(value, round_index)
    baseline.cell("cps").add(1000.0, 0)
    direct = Column("direct", tests=("tcp",))
    for round_index, value in enumerate(direct_up):
        direct.cell("tcp_up").add(value, round_index)
    socks = Column("socks5", tests=("cps",))
    if socks_cps is not None:
        socks.cell("cps").add(socks_cps, 0)
    if socks_error is not None:
        socks.cell("cps").errors.append(socks_error)
    return Section(1500, [baseline, direct, socks])


def test_capture_columns_are_also_ratios_to_direct_of_the_same_round() -> None:
    section = _section(direct_up=[5.0, 10.0, 6.0], socks_cps=None, socks_error=None)
    other = Column("capture-other", tests=("tcp",))
    for round_index, value in enumerate([4.9, 9.0, 6.3]):
        other.cell("tcp_up").add(value, round_index)
    section.columns.append(other)
    table = render_table([section])
    # Baseline 10/20/11: ratios 0.49, 0.45, 0.57 -> 0.49; DIRECT 5/10/6: 0.98, 0.90, 1.05.
    row = next(line for line in table.splitlines() if line.startswith("TCP upload, 1"))
    assert row.endswith("6.30 (0.49x, 0.98x DIRECT)")
    verdict = next(v for v in check_targets([section])
                   if v.target.name == "TCP upload, another process captured >= 0.95x DIRECT")
    assert verdict.status == "PASS"
    assert verdict.detail == ("0.98x (limit 0.95x); DIRECT: 6.00 Gbit/s; "
                              "by round 0.98, 0.90, 1.05")
    # Download was planned (the tcp test) but has no figure: the target is not shown met.
    down = next(v for v in check_targets([section]) if v.target.key == "tcp_down"
                and v.target.path == "capture-other")
    assert (down.status, down.detail) == ("FAIL", "n/a: no figure")


def test_targets_use_the_median_of_per_round_ratios() -> None:
    section = _section(direct_up=[5.0, 10.0, 4.4], socks_cps=340.0, socks_error=None)
    verdicts = {v.target.name: v for v in check_targets([section])}
    # Per round 0.5, 0.5, 0.4 -> 0.50 (the ratio of the medians, 5 / 11, would be 0.45).
    # 340 / 1000 = 0.34 is just under 0.35.
    assert verdicts["TCP upload via DIRECT >= 0.40x baseline"].status == "PASS"
    assert "0.50x" in verdicts["TCP upload via DIRECT >= 0.40x baseline"].detail
    assert verdicts["connections/s via SOCKS5 >= 0.35x baseline"].status == "FAIL"
    # Planned but missing is a FAIL; not asked for (no "mem" in the column) is a SKIP.
    assert verdicts["TCP download via DIRECT >= 0.40x baseline"].status == "FAIL"
    assert verdicts["RSS at rest via DIRECT < 60 MiB"].status == "SKIP"


def test_a_socks5_target_names_what_the_server_alone_allows() -> None:
    section = _section(direct_up=[5.0], socks_cps=90.0, socks_error=None)
    only = Column("socks5-only", tests=("cps",))
    only.cell("cps").add(180.0, 0)
    section.columns.append(only)
    verdicts = {v.target.name: v for v in check_targets([section])}
    cps = verdicts["connections/s via SOCKS5 >= 0.35x baseline"]
    # 90 / 1000 against the limit; the server alone 180 / 1000; tunproxy keeps 90 / 180.
    assert cps.status == "FAIL"
    assert cps.detail == (
        "0.09x (limit 0.35x); the SOCKS5 server alone: 0.18x, tunproxy keeps 0.50 of it"
    )
    assert "server alone" not in verdicts["TCP upload via DIRECT >= 0.40x baseline"].detail


def test_unmeasurable_figure_fails_its_target_and_is_footnoted() -> None:
    section = _section(direct_up=[1.0], socks_cps=None, socks_error="tunproxy did not start: X")
    verdicts = {v.target.name: v for v in check_targets([section])}
    cps = verdicts["connections/s via SOCKS5 >= 0.35x baseline"]
    assert cps.status == "FAIL" and "did not start" in cps.detail
    table = render_table([section])
    assert "n/a [1]" in table
    assert "[1] tunproxy did not start: X" in table
    assert "1.00 (0.10x)" in table  # 1.0 / 10.0, the baseline of the same round


def test_profile_summary_counts_self_and_total_time() -> None:
    raw = (
        "main (tunproxy/cli.py:10);run (tunproxy/driver.py:5);parse (stack/wire/tcp.py:7) 30\n"
        "main (tunproxy/cli.py:10);run (tunproxy/driver.py:6) 10\n"
        "main (tunproxy/cli.py:10);run (tunproxy/driver.py:5);parse (stack/wire/tcp.py:9) 60\n"
    )
    profile = summarize(raw, "t", "raw.txt")
    assert profile.samples == 100
    top = profile.rows[0]
    # Two lines of the same function are one row.
    assert top.function == "parse (stack/wire/tcp.py)" and top.self_pct == 90.0
    run = next(r for r in profile.rows if r.function.startswith("run "))
    assert run.self_pct == 10.0 and run.total_pct == 100.0


@pytest.mark.parametrize("pipeline", [False, True])
def test_bench_config_is_one_tunproxy_accepts(pipeline: bool) -> None:
    from bench.run import tunproxy_config
    from tunproxy.app import build_outbounds
    from tunproxy.config import parse_config
    from tunproxy.outbounds import Socks5Outbound

    config = parse_config(tunproxy_config(1500, True, 1081, False, pipeline), Path("bench.yaml"))
    assert config.upstreams["socks"].pipeline is pipeline
    outbound = build_outbounds(config, None)["socks"]
    assert isinstance(outbound, Socks5Outbound) and outbound.pipeline is pipeline


@pytest.mark.timeout(120)
def test_flood_client_counts_echoed_datagrams() -> None:
    """``bench/client.py flood`` (the datagrams/s row) against a UDP echo on loopback: every
    echo is counted once, by sequence number; datagrams the server never answers are lost."""
    import socket
    import threading

    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.2)
    port = echo.getsockname()[1]
    answered = [0]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = echo.recvfrom(2048)
            except TimeoutError:
                continue
            answered[0] += 1
            if answered[0] % 10 == 0:
                continue  # every tenth one is never answered
            echo.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "client.py"), "flood", "--host", "127.0.0.1",
             "--port", str(port), "--window", "8", "--size", "64", "--max-seconds", "1.5",
             "--timeout", "0.3"],
            capture_output=True, text=True, timeout=100, cwd=REPO, check=False,
        )
    finally:
        stop.set()
        thread.join(timeout=10)
        echo.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] > 0 and result["lost"] > 0, result
    assert result["per_s"] == pytest.approx(result["count"] / result["elapsed_s"])
    # Echoed + lost + still in flight at the end (at most the window) = sent.
    assert result["sent"] - result["count"] - result["lost"] in range(0, 9), result
    assert result["count"] <= answered[0] * 0.9 + 1
