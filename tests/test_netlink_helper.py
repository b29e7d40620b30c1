"""tunproxy.netlink: pyroute2 runs in a short-lived helper process, never in tunproxy itself.

The helper is exercised for real inside a namespace this test creates (root needed); the
host e2e tests (tests/test_host_e2e.py) run the whole set-up and teardown through it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import Netns
from tunproxy.netlink import Netlink, NetlinkError

REPO = Path(__file__).resolve().parent.parent


def test_tunproxy_never_imports_pyroute2() -> None:
    code = ("import sys\n"
            "import tunproxy.app, tunproxy.cli, tunproxy.journal, tunproxy.routing\n"
            "print(any(m.split('.')[0] == 'pyroute2' for m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True, timeout=60).stdout.split()
    assert out == ["False"]


@pytest.fixture
def netns() -> object:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    ns = Netns(f"tpnl-{secrets.token_hex(3)}")
    subprocess.run(["ip", "netns", "add", ns.name], check=True)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns.name], check=False)


@pytest.mark.netns
def test_helper_answers_adds_dumps_and_errors_in_its_namespace(netns: Netns) -> None:
    async def main() -> tuple[list[int], int, list[dict[str, int | None]], int, int, int | None]:
        nl = await Netlink.start()
        try:
            lo = await nl.link_lookup(ifname="lo")
            await nl.link("set", index=lo[0], state="up")
            await nl.route("add", family=socket.AF_INET, dst="10.99.0.0", dst_len=24,
                           oif=lo[0], table=4321)
            routes = await nl.route_count(socket.AF_INET, 4321)
            await nl.rule("add", family=socket.AF_INET, priority=777, table=4321,
                          fwmark=0x99, fwmask=0xFFFFFFFF)
            rules = [r for r in await nl.rules(socket.AF_INET) if r["table"] == 4321]
            with pytest.raises(NetlinkError) as raised:
                await nl.rule("del", family=socket.AF_INET, priority=778, table=4321)
            await nl.rule("del", family=socket.AF_INET, priority=777, table=4321,
                          fwmark=0x99, fwmask=0xFFFFFFFF)
            left = len([r for r in await nl.rules(socket.AF_INET) if r["table"] == 4321])
            kind = await nl.link_kind(lo[0])
        finally:
            await nl.close()
        returncode = nl._proc.returncode
        assert returncode == 0, returncode
        return lo, routes, rules, raised.value.code, left, kind

    with netns.entered():
        lo, routes, rules, code, left, kind = asyncio.run(main())
    assert lo == [1]
    assert routes == 1
    assert rules == [{"fwmark": 0x99, "table": 4321}]
    assert code == errno.ENOENT
    assert left == 0
    assert kind is None  # loopback has no IFLA_INFO_KIND
    # The route went where the helper was started: into the test's namespace, not the host.
    assert "10.99.0.0/24" in netns.run("ip", "route", "show", "table", "4321").stdout
