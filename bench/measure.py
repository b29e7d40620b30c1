"""One measurement at a time: iperf3, the client modes, TUN byte counters, tunproxy's RSS.

Every function here either returns numbers or raises ``MeasureError`` with a one-line
reason; the harness turns that reason into an ``n/a`` cell and goes on with the next figure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.services import IPERF_PORT
from tests.netns import SERVER4, Netns

CLIENT = Path(__file__).resolve().parent / "client.py"


class MeasureError(Exception):
    """A figure could not be measured; ``str(exc)`` is the reason shown in the report."""


def iperf(
    ns: Netns, seconds: float, *, reverse: bool = False, parallel: int = 1,
    wrapper: tuple[str, ...] = (),
) -> dict[str, float]:
    """``iperf3 -c SERVER4 -t SECONDS [-R] [-P N] --json``: goodput seen by the receiver.

    ``wrapper`` prefixes the command (``proxychains4 -q -f CONF`` for the SOCKS5-only control).
    """
    argv = [*wrapper, "iperf3", "-c", SERVER4, "-p", str(IPERF_PORT), "-t", f"{seconds:g}",
            "--json", "--connect-timeout", "5000"]
    if reverse:
        argv.append("-R")
    if parallel > 1:
        argv += ["-P", str(parallel)]
    try:
        proc = ns.run(*argv, check=False, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"iperf3 did not finish within {seconds + 30:g} s") from None
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise MeasureError(f"iperf3 rc={proc.returncode}: {tail[0]}") from None
    if "error" in report:
        raise MeasureError(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    sent = report["end"].get("sum_sent", {})
    if received["bytes"] <= 0:
        raise MeasureError("iperf3 moved no data")
    return {
        "gbps": received["bits_per_second"] / 1e9,
        "bytes": float(received["bytes"]),
        "retransmits": float(sent.get("retransmits", 0)),
    }


def client(ns: Netns, mode: str, *args: str, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``bench/client.py MODE ...`` in ``ns``; its JSON result, or MeasureError."""
    try:
        proc = ns.run(sys.executable, str(CLIENT), mode, *args, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"client {mode} did not finish within {timeout:g} s") from None
    lines = proc.stdout.strip().splitlines()
    if not lines:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise MeasureError(f"client {mode} rc={proc.returncode}: {tail[0]}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise MeasureError(f"client {mode}: {result['error']}")
    return result


@contextlib.contextmanager
def idle_flows(
    ns: Netns, host: str, port: int, count: int, timeout: float = 300.0
) -> Iterator[dict[str, Any]]:
    """Hold ``count`` verified TCP connections open in ``ns`` for the body of the block."""
    proc = subprocess.Popen(
        ns.cmd(sys.executable, str(CLIENT), "hold", "--host", host, "--port", str(port),
               "--count", str(count)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else b""
        if not line:
            raise MeasureError(f"idle flows: the client opened no {count} flows in {timeout:g} s")
        result: dict[str, Any] = json.loads(line)
        if "error" in result:
            raise MeasureError(f"idle flows: {result['error']}")
        yield result
    finally:
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def api_poller(ns: Netns, port: int, interval: float = 1.0) -> Iterator[list[dict[str, Any]]]:
    """A dashboard polling tunproxy's ``/connections`` every ``interval`` s in ``ns`` for the
    body of the block; the list it yields gets the poller's summary at the end."""
    proc = subprocess.Popen(
        ns.cmd(sys.executable, str(CLIENT), "poll", "--host", "127.0.0.1", "--port",
               str(port), "--interval", str(interval)),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None and proc.stdin is not None
    summary: list[dict[str, Any]] = []
    try:
        proc.stdout.readline()  # {"ready": true}
        yield summary
    finally:
        try:
            out, _ = proc.communicate(input=b"", timeout=30)  # stdin closes: the poller ends
            lines = out.decode().strip().splitlines()
            if lines:
                summary.append(json.loads(lines[-1]))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def capture(ns: Netns, repo: Path, port: int, process: str,
            timeout: float = 30.0) -> Iterator[list[int]]:
    """``tunproxy capture --process PROCESS -w -`` against the controller on ``port`` in
    ``ns`` for the body of the block; the pcapng is read and counted, not stored (a capture
    of iperf3 is gigabytes). The list yielded holds the byte count, final at the end.

    The body starts once the first bytes (the section header) arrived: the controller has
    installed its tap on the data path by then.
    """
    proc = subprocess.Popen(
        ns.cmd(sys.executable, "-m", "tunproxy", "capture", "--controller",
               f"127.0.0.1:{port}", "--process", process, "-w", "-"),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=repo,
    )
    assert proc.stdout is not None and proc.stderr is not None
    received = [0]
    started = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        while data := os.read(proc.stdout.fileno(), 1 << 16):
            received[0] += len(data)
            started.set()
        started.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        if not started.wait(timeout) or not received[0]:
            # `ip netns exec` execs the command: this pid is the capture client itself.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            raise MeasureError(f"the capture did not start: {err[-1] if err else 'no output'}")
        yield received
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # ends the capture as Ctrl-C does
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        reader.join(timeout=30)
        proc.stdout.close()
        proc.stderr.close()


def tun_counters(ns: Netns, device: str) -> dict[str, int] | None:
    """``device``'s byte and packet counters, or None when it does not exist.

    For a TUN device, ``tx`` is what the kernel handed to tunproxy (tunproxy's reads) and
    ``rx`` what tunproxy handed to the kernel (its writes).
    """
    proc = ns.run("ip", "-j", "-s", "link", "show", "dev", device, check=False)
    if proc.returncode != 0:
        return None
    (link,) = json.loads(proc.stdout)
    stats = link.get("stats64") or link["stats"]
    return {f"{way}_{what}": int(stats[way][what])
            for way in ("rx", "tx") for what in ("bytes", "packets")}


def tun_bytes(ns: Netns, device: str) -> int | None:
    """Bytes through ``device`` both ways, or None when it does not exist."""
    counters = tun_counters(ns, device)
    return None if counters is None else counters["rx_bytes"] + counters["tx_bytes"]


def vm_rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` in /proc/PID/status, kB = KiB)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise MeasureError(f"cannot read the RSS of pid {pid}: {exc}") from None
    match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
    if match is None:
        raise MeasureError(f"pid {pid} has no VmRSS (a zombie?)")
    return int(match.group(1))


def wait_rss_settled(pid: int, timeout: float = 3.0) -> int:
    """RSS once it stops growing: two reads 50 ms apart that agree (the proxy may still be
    finishing the last flows' set-up when the client reports them open)."""
    deadline = time.monotonic() + timeout
    last = vm_rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = vm_rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of process ``pid``, all its threads (``/proc/PID/stat`` fields
    14 and 15, what ``time`` reports): what a figure cost the proxy, far less sensitive to
    the load of a shared machine than its rate. System time includes the kernel's work done
    in the proxy's system calls: a TUN write runs the receiving socket's TCP input."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as exc:
        raise MeasureError(f"cannot read the CPU time of pid {pid}: {exc}") from None
    # The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (see ``cpu_times``)."""
    return sum(cpu_times(pid))
