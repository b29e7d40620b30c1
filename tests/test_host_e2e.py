"""tunproxy for real in a namespace: the host is exactly as before after every kind of exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import REPO, Topology

pytestmark = pytest.mark.netns

CONFIG = """\
tun:
  name: tp0
  mtu: 1500
  route-exclude: [192.0.2.0/24, 2001:db8::/32]
  exclude-uid: [4242]
upstreams:
  corp: {type: socks5, server: "10.232.0.1:1080"}
rules:
  - MATCH,DIRECT
"""


def _state_files(tp: object) -> list[Path]:
    """The undo records of TUN tp0 (one per network namespace: tp0@netns-<cookie>.json)."""
    return sorted(tp.state_dir.glob("tp0@netns-*.json"))  # type: ignore[attr-defined]


def _tunproxy_cli(topo: Topology, *args: str) -> subprocess.CompletedProcess[str]:
    return topo.client.run(sys.executable, "-m", "tunproxy", *args, check=False)


def _rules_while_running(topo: Topology) -> tuple[str, str]:
    return (topo.client.run("ip", "-4", "rule").stdout, topo.client.run("ip", "-6", "rule").stdout)


def test_routing_is_installed_while_running(topo: Topology) -> None:
    tp = topo.start_tunproxy(CONFIG)
    rules4, rules6 = _rules_while_running(topo)
    assert "fwmark 0x2022 lookup main" in rules4
    assert "lookup main suppress_prefixlength 0" in rules4
    assert "to 192.0.2.0/24 lookup main" in rules4
    assert "to 10.232.0.1 lookup main" in rules4  # the upstream server itself
    assert "uidrange 4242-4242 lookup main" in rules4
    assert "lookup 2022" in rules4
    assert "to 2001:db8::/32 lookup main" in rules6
    routes = topo.client.run("ip", "route", "show", "table", "2022").stdout
    assert "default dev tp0" in routes
    link = topo.client.run("ip", "-d", "link", "show", "tp0").stdout
    assert "mtu 1500" in link and "tun" in link
    # The journal is on disk while running.
    (state_file,) = _state_files(tp)
    state = json.loads(state_file.read_text())
    assert any(c["kind"] == "rule" for c in state["changes"])
    assert tp.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exit_restores_routing_exactly(topo: Topology, sig: int) -> None:
    before = topo.client.routing_snapshot()
    tp = topo.start_tunproxy(CONFIG)
    assert topo.client.routing_snapshot() != before
    assert tp.stop(sig) == 0
    assert topo.client.routing_snapshot() == before
    assert "host configuration restored" in tp.log
    assert not _state_files(tp)


def test_kill_9_then_cleanup_restores_routing(topo: Topology) -> None:
    before = topo.client.routing_snapshot()
    tp = topo.start_tunproxy(CONFIG)
    tp.stop(signal.SIGKILL)
    # The kernel removed the TUN with its routes, but the ip rules are left behind.
    assert topo.client.routing_snapshot()["rule4"] != before["rule4"]
    result = _tunproxy_cli(topo, "cleanup", "--state-dir", str(tp.state_dir))
    assert result.returncode == 0, result.stderr
    assert "undid" in result.stdout
    assert topo.client.routing_snapshot() == before
    # A second cleanup finds nothing to do.
    again = _tunproxy_cli(topo, "cleanup", "--state-dir", str(tp.state_dir))
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


def test_next_start_undoes_a_crashed_run(topo: Topology) -> None:
    before = topo.client.routing_snapshot()
    topo.start_tunproxy(CONFIG).stop(signal.SIGKILL)
    tp = topo.start_tunproxy(CONFIG)
    assert "left behind" in tp.log
    assert tp.stop() == 0
    assert topo.client.routing_snapshot() == before


def test_cleanup_in_another_namespace_touches_nothing(topo: Topology) -> None:
    tp = topo.start_tunproxy(CONFIG)
    tp.stop(signal.SIGKILL)
    server_before = topo.server.routing_snapshot()
    result = topo.server.run(sys.executable, "-m", "tunproxy", "cleanup", "--state-dir",
                             str(tp.state_dir), check=False)
    assert "another network namespace" in result.stdout
    assert topo.server.routing_snapshot() == server_before
    assert _state_files(tp)
    assert _tunproxy_cli(topo, "cleanup", "--state-dir", str(tp.state_dir)).returncode == 0


def test_offloads_are_on_while_running(topo: Topology) -> None:
    tp = topo.start_tunproxy(CONFIG)
    ready = tp.wait_for_log("tunproxy ready")
    assert "offloads csum" in ready and "tso4" in ready
    features = topo.client.run("ethtool", "-k", "tp0").stdout
    assert "tcp-segmentation-offload: on" in features
    assert "tx-checksumming: on" in features
    tp.stop()


def test_offload_off_is_honoured(topo: Topology) -> None:
    tp = topo.start_tunproxy(CONFIG.replace("mtu: 1500", "mtu: 1500\n  offload: false"))
    assert "offloads off" in tp.wait_for_log("tunproxy ready")
    features = topo.client.run("ethtool", "-k", "tp0").stdout
    assert "tcp-segmentation-offload: off" in features
    tp.stop()


def _start_fails(topo: Topology, config: str) -> str:
    tp = topo.start_tunproxy(config, wait=False)
    rc = tp.proc.wait(timeout=30)
    tp.stop()
    assert rc == 1, tp.log
    lines = [line for line in tp.log.splitlines() if line != "<exited>"]
    assert "Traceback" not in tp.log
    return lines[-1]


def test_interface_name_taken(topo: Topology) -> None:
    topo.client.run("ip", "link", "add", "tp0", "type", "veth", "peer", "name", "tp0peer")
    before = topo.client.routing_snapshot()
    message = _start_fails(topo, CONFIG)
    assert message == ("tunproxy: an interface named tp0 already exists; set tun.name to "
                       "another name")
    assert topo.client.routing_snapshot() == before


def test_table_clash(topo: Topology) -> None:
    topo.client.run("ip", "route", "add", "blackhole", "198.51.100.0/24", "table", "2022")
    before = topo.client.routing_snapshot()
    message = _start_fails(topo, CONFIG)
    assert "routing table 2022 is already in use" in message
    assert topo.client.routing_snapshot() == before


def test_fwmark_clash(topo: Topology) -> None:
    topo.client.run("ip", "rule", "add", "fwmark", "0x2022", "lookup", "100", "priority", "100")
    before = topo.client.routing_snapshot()
    message = _start_fails(topo, CONFIG)
    assert "fwmark 0x2022 is already used" in message
    assert topo.client.routing_snapshot() == before


def test_repo_is_importable_from_namespace(topo: Topology) -> None:
    # Guards the harness itself: tunproxy runs from this checkout inside the namespace.
    out = topo.client.run(sys.executable, "-c", "import tunproxy, sys; print(tunproxy.__file__)")
    assert str(REPO) in out.stdout
