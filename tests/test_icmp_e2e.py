"""Honest ping through the running proxy (namespaces, as root).

The server namespace answers for its own addresses and for nothing else, and its
firewall counts the echo requests that reach SERVER4 and drops those to FILTERED4
(an address it has). tunproxy must show exactly that: replies from SERVER4 for
requests that really arrived there, none from FILTERED4 nor from an address nobody
has, ICMP unreachable for REJECT, "administratively prohibited" for an upstream.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import PROXY4, SERVER4, SERVER6, Topology, topology

pytestmark = pytest.mark.netns

MISSING4 = "10.232.0.99"  # routed to the server namespace, which has no such address
REJECTED4 = "10.232.0.3"
PROXIED4 = "10.232.0.4"
DROPPED4 = "10.232.0.5"
FILTERED4 = "10.232.0.7"
NFT = f"""
table inet tptest {{
  chain input {{
    type filter hook input priority 0;
    ip daddr {SERVER4} icmp type echo-request counter
    ip daddr {FILTERED4} icmp type echo-request drop
  }}
}}
"""


def config(ping: str = "forward") -> str:
    return f"""\
tun: {{name: tp0, mtu: 1500}}
relay: {{ping: {ping}}}
upstreams:
  socks: {{type: socks5, server: "{PROXY4}:1080"}}
rules:
  - IP-CIDR,{REJECTED4}/32,REJECT
  - IP-CIDR,{PROXIED4}/32,socks
  - IP-CIDR,{DROPPED4}/32,DROP
  - MATCH,DIRECT
"""


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    with topology(tmp_path) as t:
        t.server.run("ip", "addr", "add", f"{FILTERED4}/32", "dev", "lo")
        t.server.run("nft", "-f", "-", input=NFT)
        yield t


def echo_requests_at_server(topo: Topology) -> int:
    out = topo.server.run("nft", "list", "table", "inet", "tptest").stdout
    match = re.search(r"counter packets (\d+)", out)
    assert match is not None, out
    return int(match.group(1))


def ping(topo: Topology, address: str, count: int = 3) -> tuple[int, str]:
    flag = "-6" if ":" in address else "-4"
    # -W: how long a reply (or an ICMP error) may take; long for a loaded machine (a late
    # reply counted as lost), which costs time only where no reply is the expected result.
    result = topo.client.run("ping", flag, "-n", "-c", str(count), "-i", "0.2", "-W", "10",
                             address, check=False)  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def rtts(output: str) -> list[float]:
    return [float(m) for m in re.findall(r"time=([\d.]+) ms", output)]


@pytest.mark.parametrize("sockets", ["raw", "datagram"])
def test_ping_shows_real_reachability_and_round_trip(topo: Topology, sockets: str) -> None:
    if sockets == "datagram":
        # Lets root's group use unprivileged ICMP sockets, in the client namespace only.
        topo.client.run("sysctl", "-qw", "net.ipv4.ping_group_range=0 0")
    tp = topo.start_tunproxy(config())
    code, out = ping(topo, SERVER4)
    assert code == 0 and len(rtts(out)) == 3, out
    assert echo_requests_at_server(topo) == 3  # each reply answers a request that arrived
    tp.wait_for_log(f"pings to AF_INET leave through an ICMP {sockets} socket")
    code, out = ping(topo, SERVER6)
    assert code == 0 and len(rtts(out)) == 3, out
    # An address that exists but whose firewall drops pings, and one nobody has:
    # no reply at all (tunproxy used to answer every address itself).
    for address in (FILTERED4, MISSING4):
        code, out = ping(topo, address, count=2)
        assert code == 1 and rtts(out) == [], out


def test_ping_by_verdict(topo: Topology) -> None:
    topo.start_tunproxy(config())
    code, out = ping(topo, REJECTED4, count=1)
    assert code == 1 and "Destination Host Unreachable" in out, out
    code, out = ping(topo, PROXIED4, count=1)
    assert code == 1 and "Packet filtered" in out, out
    code, out = ping(topo, DROPPED4, count=1)
    assert code == 1 and rtts(out) == [] and "Unreachable" not in out, out


def test_ping_local_answers_every_address_when_asked(topo: Topology) -> None:
    topo.start_tunproxy(config(ping="local"))
    code, out = ping(topo, MISSING4, count=2)
    assert code == 0 and len(rtts(out)) == 2, out
    assert echo_requests_at_server(topo) == 0
