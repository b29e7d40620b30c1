"""The undo record is per instance: per TUN name *and* per network namespace.

Two instances with the same TUN name in two namespaces, sharing a state directory, run side
by side and each undoes only its own leftovers; a record left by a namespace that is gone is
never undone in a new namespace that got its inode (simulated: the kernel picks inodes, so
the test rewrites the record's inode, which is all an old tunproxy looked at).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Topology, topology
from tunproxy.journal import NetnsIdentity

pytestmark = pytest.mark.netns

CONFIG = """\
tun:
  name: tpj0
  mtu: 1500
rules:
  - MATCH,DIRECT
"""


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Topology, Topology]]:
    # The same workdir: both topologies' tunproxies share one state directory.
    with topology(tmp_path) as a, topology(tmp_path) as b:
        yield a, b


def _records(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("tpj0@netns-*.json"))


def _cleanup(topo: Topology, state_dir: Path) -> str:
    done = topo.client.run(sys.executable, "-m", "tunproxy", "cleanup", "--state-dir",
                           str(state_dir), check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_instances_same_tun_name_in_two_namespaces(two: tuple[Topology, Topology]) -> None:
    a, b = two
    before_a, before_b = a.client.routing_snapshot(), b.client.routing_snapshot()
    tp_a = a.start_tunproxy(CONFIG, name="a.yaml")
    tp_b = b.start_tunproxy(CONFIG, name="b.yaml")  # was: "another tunproxy ... is running"
    state_dir = tp_a.state_dir
    assert tp_b.state_dir == state_dir
    assert len(_records(state_dir)) == 2
    # A crashes; B's start and B's cleanup must not touch A's record or namespace.
    tp_a.stop(signal.SIGKILL)
    left_in_a = a.client.routing_snapshot()
    assert left_in_a["rule4"] != before_a["rule4"]  # A's rules are left behind
    report = _cleanup(b, state_dir)
    assert "another network namespace" in report and "still running" in report
    assert a.client.routing_snapshot() == left_in_a
    assert len(_records(state_dir)) == 2
    # B stops cleanly: its own record goes, A's stays.
    assert tp_b.stop() == 0
    assert b.client.routing_snapshot() == before_b
    assert len(_records(state_dir)) == 1
    # The next start in A undoes A's leftovers, and only there.
    tp_a2 = a.start_tunproxy(CONFIG, name="a.yaml")
    assert "left behind" in tp_a2.log
    assert tp_a2.stop() == 0
    assert a.client.routing_snapshot() == before_a
    assert not _records(state_dir)


def test_record_of_a_gone_namespace_is_not_undone_where_its_inode_went(
    two: tuple[Topology, Topology],
) -> None:
    a, b = two
    tp_a = a.start_tunproxy(CONFIG, name="a.yaml")
    tp_a.stop(signal.SIGKILL)
    (stale,) = _records(tp_a.state_dir)
    # B runs with the very same rules (same priorities, table, mark).
    tp_b = b.start_tunproxy(CONFIG, name="b.yaml")
    during_b = b.client.routing_snapshot()
    # A's namespace goes away and B's namespace "gets its inode": rewrite the record so the
    # inode says B (all an inode-keyed record would have to go by).
    a.close()
    record = json.loads(stale.read_text())
    record["netns"] = int(Path(f"/run/netns/{b.client.name}").stat().st_ino)
    stale.write_text(json.dumps(record))
    report = _cleanup(b, tp_b.state_dir)
    assert f"{stale.name}: made in another network namespace; left alone" in report
    assert b.client.routing_snapshot() == during_b  # B's rules are B's, untouched
    assert tp_b.stop() == 0
    assert stale.exists()


def test_identity_owns_only_its_own_records() -> None:
    here = NetnsIdentity.here()
    assert here.cookie is not None  # Linux 5.14+
    mine = here.to_json()
    assert here.owns(mine)
    assert not here.owns({**mine, "netns_cookie": here.cookie + 1})  # same inode, other ns
    assert not here.owns({**mine, "boot_id": "another-boot"})
    assert here.before_boot({**mine, "boot_id": "another-boot"})
    assert not here.before_boot(mine)
    assert here.owns({"netns": here.inode})  # an older tunproxy's record: the inode only
