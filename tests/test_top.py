"""``tunproxy top``: the view model from snapshots (no terminal), then the real thing in
tmux against a running tunproxy with curl downloading through it."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.netns import REPO
from tunproxy.top import TopView


def conn(flow_id: int, process: str, pid: int, down_rate: float, host: str = "example.com",
         up: int = 0, down: int = 0) -> dict[str, Any]:
    return {
        "id": str(flow_id), "upload": up, "download": down, "chains": ["DIRECT"],
        "rule": "DomainSuffix", "rulePayload": "example.com",
        "metadata": {"network": "tcp", "host": host, "destinationIP": "192.0.2.1",
                     "destinationPort": "443", "process": process},
        "tunproxy": {"pid": pid, "state": "open", "uploadRate": 0.0, "downloadRate": down_rate,
                     "attribution": "process" if process else "failed: no-socket",
                     "rule": {"file": "/etc/tunproxy/rules.yaml", "line": 12}},
    }


SNAP = {"uploadTotal": 10, "downloadTotal": 3 * 1024 * 1024, "connections": [
    conn(1, "curl", 100, 1000.0, down=5000),
    conn(2, "firefox", 200, 50_000.0, host="a.org"),
    conn(3, "firefox", 200, 10.0, host="b.org"),
    conn(4, "", 0, 0.0, host="c.net"),
]}


def test_groups_by_process_sorted_by_download_rate() -> None:
    view = TopView()
    view.update(SNAP)
    rows = view.rows()
    assert [r.group for r in rows] == ["firefox (200)", "curl (100)", "? (failed: no-socket)"]
    assert "48.8 KB/s" in rows[0].text and " 2 " in rows[0].text
    assert "total up 10 B down 3.0 MB" in view.header()


def test_expand_select_and_close() -> None:
    view = TopView()
    view.update(SNAP)
    view.toggle()  # expand firefox (selected first)
    rows = view.rows()
    assert [(r.group, r.flow.id if r.flow else None) for r in rows[:3]] == [
        ("firefox (200)", None), ("firefox (200)", "2"), ("firefox (200)", "3")]
    assert "a.org:443" in rows[1].text and "DomainSuffix example.com rules.yaml:12 -> DIRECT" \
        in rows[1].text
    assert view.to_close() == ["2", "3"]  # a process row: all of its flows
    view.move(2)
    assert view.to_close() == ["3"]
    # The selection follows its flow when a refresh reorders the rows.
    flipped = dict(SNAP, connections=[conn(3, "firefox", 200, 99_999.0, host="b.org"),
                                      *SNAP["connections"][:2]])  # type: ignore[list-item]
    view.update(flipped)
    assert view.to_close() == ["3"] and view.current().flow.id == "3"  # type: ignore[union-attr]
    view.toggle(False)  # collapse from a flow: its process stays selected
    assert view.current().flow is None and view.current().group == "firefox (200)"  # type: ignore[union-attr]


def test_sort_and_filter() -> None:
    view = TopView()
    view.update(SNAP)
    view.cycle_sort()  # up: all equal, then by name
    assert view.sort == "up"
    view.sort = "flows"
    assert view.rows()[0].group == "firefox (200)"
    view.sort = "name"
    assert [r.group for r in view.rows()] == ["? (failed: no-socket)", "curl (100)",
                                              "firefox (200)"]
    view.filter = "b.org"
    assert [r.group for r in view.rows()] == ["firefox (200)"]
    view.toggle_all()
    assert [r.flow.id for r in view.rows() if r.flow] == ["3"]
    view.filter = "CURL"
    assert [r.group for r in view.rows()] == ["curl (100)"]


# --- in tmux, against a running tunproxy ---------------------------------------------------

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Tmux:
    def __init__(self) -> None:
        self.socket = f"tp-top-{secrets.token_hex(3)}"

    def __call__(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=30, check=check)
        return done.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top", check=False)

    def wait_for(self, predicate: Any, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            time.sleep(0.2)
        raise AssertionError(f"tmux never showed {what}:\n{self.screen()}")

    def alive(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "top"],
                              capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    t = Tmux()
    try:
        yield t
    finally:
        t("kill-server", check=False)


@needs_tmux
@pytest.mark.netns
def test_top_in_tmux_shows_curl_and_k_closes_it(tmp_path: Path, tmux: Tmux) -> None:
    from tests.netns import topology
    from tests.test_controller_e2e import API_PORT, SECRET, Lab

    with topology(tmp_path) as topo:
        lab = Lab(topo, tmp_path)
        lab.start()
        curl = lab.curl("slow")
        command = " ".join([
            "ip", "netns", "exec", topo.client.name, sys.executable, "-m", "tunproxy", "top",
            "--controller", f"127.0.0.1:{API_PORT}", "--secret", SECRET, "--interval", "0.5",
        ])
        # No client is attached: the window takes default-size, so set that first.
        tmux("-f", "/dev/null", "start-server", ";", "set-option", "-g", "default-size",
             "200x30", ";", "new-session", "-d", "-s", "top", "-c", str(REPO), command)
        group = f"curl ({curl.pid})"
        screen = tmux.wait_for(lambda s: group in s, f"the {group} line")
        assert "PROCESS" in screen and "tunproxy top" in screen
        tmux("send-keys", "-t", "top", "Enter")  # expand curl's process
        screen = tmux.wait_for(lambda s: "DstPort 8080" in s, "curl's flow with its rule")
        assert "open" in screen and "-> DIRECT" in screen
        tmux("send-keys", "-t", "top", "Down", "k")
        tmux.wait_for(lambda s: "closed 1 flow" in s, "the close confirmation")
        _out, err = curl.communicate(timeout=60)
        assert curl.returncode == 56, err  # reset by the close
        tmux.wait_for(lambda s: group not in s, "curl's line gone")
        tmux("send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 30
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tmux.alive()
