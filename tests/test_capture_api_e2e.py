"""``tunproxy capture`` against a running tunproxy, through its controller: curl's flow is
captured (handshake, payload, comments naming curl), another process's flow is not, and
SIGINT leaves a file tshark reads. Also: a second capture is refused (409), a wrong secret
is one sentence and exit 1, and once the capture ends the driver's tap is gone (a new
capture is accepted)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.netns import SERVER4, Topology, topology

pytestmark = pytest.mark.netns

PORT = 8081
API_PORT = 9090
SECRET = "caps3cret"
BODY = "hello from the capture test\n" * 40
REPO = Path(__file__).resolve().parent.parent

CONFIG = f"""\
tun:
  name: tp0
  mtu: 1500
controller:
  listen: 127.0.0.1:{API_PORT}
  secret: {SECRET}
rules:
  - MATCH,DIRECT
"""

FETCH = ("import sys, urllib.request; "
         "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())")


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    with topology(tmp_path) as t:
        www = tmp_path / "www"
        www.mkdir()
        (www / "small.txt").write_text(BODY)
        t.server.spawn(sys.executable, "-m", "http.server", "--bind", SERVER4,
                       "--directory", str(www), str(PORT))
        t.server.wait_tcp_listening(PORT)
        t.start_tunproxy(CONFIG)
        t.client.wait_tcp_listening(API_PORT)
        yield t


def _capture(topo: Topology, *args: str) -> subprocess.Popen[bytes]:
    return topo.client.spawn(
        sys.executable, "-m", "tunproxy", "capture", "--controller", f"127.0.0.1:{API_PORT}",
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))


def _tshark(path: Path, *fields: str, display: str | None = None) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-N", "n", "-T", "fields", "-E", "separator=|"]
    for field in fields:
        argv += ["-e", field]
    if display:
        argv += ["-Y", display]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines() if line]


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_capture_of_curl_through_the_controller(topo: Topology, tmp_path: Path) -> None:
    out = tmp_path / "curl.pcapng"
    cap = _capture(topo, "--secret", SECRET, "--process", "curl", "-w", str(out))
    # The section header arrives at once: the tap is installed.
    _wait(lambda: (out.exists() and out.stat().st_size > 0) or cap.poll() is not None,
          "the capture to start")
    assert cap.poll() is None, cap.communicate()[1].decode()

    # A second capture at the same time is refused, in one sentence.
    second = _capture(topo, "--secret", SECRET, "-w", str(tmp_path / "second.pcapng"))
    _, err = second.communicate(timeout=30)
    assert second.returncode == 1
    assert "409" in err.decode() and "already running" in err.decode()

    url = f"http://{SERVER4}:{PORT}/small.txt"
    other = topo.client.run(sys.executable, "-c", FETCH, url)
    assert other.stdout == BODY
    curl = topo.client.run("curl", "-sS", url)
    assert curl.stdout == BODY
    other2 = topo.client.run(sys.executable, "-c", FETCH, url)
    assert other2.stdout == BODY

    # Wait until curl's response payload is in the file, then stop with SIGINT.
    def has_payload() -> bool:
        rows = _tshark(out, "tcp.len", display=f"tcp.srcport == {PORT} && tcp.len > 0")
        return sum(int(r[0]) for r in rows) >= len(BODY)

    _wait(has_payload, "curl's download in the capture")
    cap.send_signal(signal.SIGINT)
    _, err = cap.communicate(timeout=30)
    assert cap.returncode == 0, err.decode()

    rows = _tshark(out, "tcp.flags.str", "tcp.srcport", "tcp.dstport", "frame.comment")
    assert rows, "no packets captured"
    comments = {r[3] for r in rows}
    assert all(c.startswith("flow #") and " tcp curl(" in c for c in comments), comments
    assert not any("python" in c for c in comments)
    # One flow only (curl's): one client port, and its handshake in order.
    ports = {r[1] for r in rows if r[2] == str(PORT)}
    assert len(ports) == 1, ports
    flags = [r[0].replace("·", ".") for r in rows]
    syn = next(i for i, f in enumerate(flags) if f.endswith("S."))
    assert "A" in flags[syn + 1] and "S" in flags[syn + 1] and flags[syn + 1].count("A") == 1
    # The payload bytes curl received.
    payload = _tshark(out, "tcp.payload", display=f"tcp.srcport == {PORT} && tcp.len > 0")
    data = b"".join(bytes.fromhex(r[0].replace(":", "")) for r in payload)
    assert data.endswith(BODY.encode())

    # The tap was removed: a new capture is accepted (no 409), and ends cleanly.
    again = _capture(topo, "--secret", SECRET, "-c", "100000", "-w", "-")
    _wait(lambda: again.poll() is not None or _peek(again), "a second capture to start")
    again.send_signal(signal.SIGINT)
    data2, err2 = again.communicate(timeout=30)
    assert again.returncode == 0, err2.decode()
    assert data2[:4] == b"\x0a\x0d\x0d\x0a"  # a section header block, on stdout


def _peek(proc: subprocess.Popen[bytes]) -> bool:
    import select

    assert proc.stdout is not None
    return bool(select.select([proc.stdout], [], [], 0)[0])


def test_wrong_secret_and_no_controller_are_one_sentence(topo: Topology, tmp_path: Path) -> None:
    cap = _capture(topo, "--secret", "wrong", "-w", str(tmp_path / "x.pcapng"))
    _, err = cap.communicate(timeout=30)
    assert cap.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0], lines
    cap = topo.client.spawn(
        sys.executable, "-m", "tunproxy", "capture", "--controller", "127.0.0.1:9",
        "-w", os.devnull, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(REPO))
    _, err = cap.communicate(timeout=30)
    assert cap.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "cannot reach the controller" in lines[0], lines
