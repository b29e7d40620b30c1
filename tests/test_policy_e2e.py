"""SIGHUP in the running proxy: an upstream and a rule naming it arrive in one reload,
and leave in another while a flow still runs on it (namespaces, dante, as root)."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import PROXY4, topology
from tests.test_relay_e2e import SOCKS_PORT, TCP_PORT, Lab

pytestmark = pytest.mark.netns


def config(with_upstream: bool) -> str:
    upstream = f'upstreams:\n  added: {{type: socks5, server: "{PROXY4}:{SOCKS_PORT}"}}\n'
    rule = f"  - DST-PORT,{TCP_PORT},added\n"
    return f"""\
tun: {{name: tp0, mtu: 1500}}
relay: {{connect-timeout: 30}}
{upstream if with_upstream else ""}rules:
{rule if with_upstream else ""}  - MATCH,DIRECT
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


def echo(sock: object, data: bytes) -> bytes:
    sock.sendall(data)  # type: ignore[attr-defined]
    return sock.recv(len(data))  # type: ignore[attr-defined, no-any-return]


def test_sighup_adds_an_upstream_with_a_rule_then_removes_it_under_a_running_flow(
    lab: Lab,
) -> None:
    tp = lab.topo.start_tunproxy(config(with_upstream=False))
    before = lab.connect()
    assert echo(before, b"ECHO\ndirect") == b"direct"

    tp.config_path.write_text(config(with_upstream=True))
    mark = tp.line_count()
    tp.send_signal(signal.SIGHUP)
    tp.wait_for_log(r"reloaded .*: 2 rules, outbounds .*added", start=mark)
    through = lab.connect()
    assert echo(through, b"ECHO\nproxied") == b"proxied"
    assert echo(before, b"still") == b"still"  # the older flow keeps DIRECT
    before.close()
    tp.wait_for_log(rf"end #\d+ tcp .*:{TCP_PORT} via DIRECT", start=mark)

    # The upstream goes away again while `through` runs on it: the flow carries on,
    # and the outbound is closed only when it ends.
    tp.config_path.write_text(config(with_upstream=False))
    mark = tp.line_count()
    tp.send_signal(signal.SIGHUP)
    tp.wait_for_log(r"outbound added removed by the reload: closed when its 1 flows end",
                    start=mark)  # fmt: skip
    tp.wait_for_log(r"reloaded .*: 1 rules", start=mark)
    assert echo(through, b"after") == b"after"
    fresh = lab.connect()
    assert echo(fresh, b"ECHO\nnew") == b"new"
    fresh.close()
    through.close()
    tp.wait_for_log(rf"end #\d+ tcp .*:{TCP_PORT} via added", start=mark)
    tp.wait_for_log(r"closing outbound added", start=mark)
    assert tp.proc.poll() is None
