"""No leaks around the tunnel (namespaces, as root).

- strict-route (the default): when the TUN has no IPv6 address, IPv6 is refused at
  once (ENETUNREACH) and nothing reaches the network; the on-link subnet still works
  as documented; ``strict-route: false`` lets IPv6 go around the tunnel.
- fake-ip DNS: 50 names asked of arbitrary servers over UDP and TCP, IPv4 and IPv6,
  are answered, and the only DNS that leaves the client namespace goes to the
  configured server (nft counters on the outside link).
"""

from __future__ import annotations

import errno
import re
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import GATEWAY6, SERVER4, SERVER6, Topology, topology
from tests.test_dns_e2e import Dnsmasq

pytestmark = pytest.mark.netns

TCP_PORT = 7100


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    with topology(tmp_path) as t:
        yield t


def counters(topo: Topology, ns_side: str, table: str) -> dict[str, int]:
    ns = topo.client if ns_side == "client" else topo.server
    out = ns.run("nft", "list", "table", "inet", table).stdout
    found = re.findall(r"counter packets (\d+) bytes \d+ comment \"(\w+)\"", out)
    return {name: int(n) for n, name in found}


def v4_only(strict: bool) -> str:
    return f"""\
tun: {{name: tp0, mtu: 1500, address: [172.19.0.1/30], strict-route: {str(strict).lower()}}}
rules: [MATCH,DIRECT]
"""


def connect6(topo: Topology) -> int:
    """0 when a TCP connection to [SERVER6]:TCP_PORT opens, else the errno."""
    try:
        topo.client.connect(SERVER6, TCP_PORT, timeout=30).close()
        return 0
    except OSError as exc:
        return exc.errno or -1


def test_ipv6_without_a_tun_address_is_refused_not_leaked(topo: Topology) -> None:
    topo.server.spawn(sys.executable, "-m", "http.server", "--bind", SERVER6, str(TCP_PORT))
    topo.server.wait_tcp_listening(TCP_PORT)
    topo.server.run("nft", "-f", "-", input=f"""
table inet tpleak {{
  chain input {{
    type filter hook input priority 0;
    ip6 daddr {SERVER6} counter comment "v6"
  }}
}}
""")
    tp = topo.start_tunproxy(v4_only(strict=True))
    tp.wait_for_log(r"policy routing for IPv6: .*unreachable")
    started = time.monotonic()
    assert connect6(topo) in (errno.ENETUNREACH, errno.EHOSTUNREACH)
    assert time.monotonic() - started < 10  # refused at once, not timed out (30 s)
    result = topo.client.run("ping", "-6", "-c", "1", "-W", "1", SERVER6, check=False)
    assert result.returncode != 0
    assert counters(topo, "server", "tpleak")["v6"] == 0  # nothing went around the tunnel
    # The on-link subnet is not the tunnel's business (as for IPv4): still reachable.
    result = topo.client.run("ping", "-6", "-c", "1", "-W", "10", GATEWAY6, check=False)
    assert result.returncode == 0, result.stdout
    tp.stop()
    # Opting out: IPv6 leaves by the main table, around the tunnel.
    topo.start_tunproxy(v4_only(strict=False), name="loose.yaml")
    assert connect6(topo) == 0
    assert counters(topo, "server", "tpleak")["v6"] > 0


def dns_query(name: str, qtype: int = 1, ident: int = 0) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    header = struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
    return header + labels + struct.pack("!HH", qtype, 1)


ASKER = r"""
import socket, struct, sys
sys.path.insert(0, sys.argv[1])
from tests.test_leaks_e2e import dns_query
answered = 0
servers = [("9.9.9.9", socket.AF_INET), ("192.0.2.53", socket.AF_INET),
           ("2001:db8::53", socket.AF_INET6)]
for i in range(50):
    server, family = servers[i % 3]
    q = dns_query(f"host{i}.leak.test", ident=i)
    if i % 5 == 4:  # over TCP
        s = socket.create_connection((server, 53), timeout=30)
        s.sendall(struct.pack("!H", len(q)) + q)
        data = s.recv(4096)[2:]
        s.close()
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(30)
        s.sendto(q, (server, 53))
        data = s.recv(4096)
        s.close()
    answered += data[:2] == q[:2] and struct.unpack_from("!H", data, 6)[0] == 1
# One query that fake-ip forwards (TXT): it must go to the configured server only.
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(30)
s.sendto(dns_query("note.leak.test", qtype=16, ident=999), ("9.9.9.9", 53))
txt = s.recv(4096)
print(answered, b"from the configured resolver" in txt)
"""


def test_fake_ip_dns_leaves_only_to_the_configured_server(topo: Topology) -> None:
    Dnsmasq(topo.server, topo.workdir, {}, txt={"note.leak.test": "from the configured resolver"})
    veth = topo.veth_client
    topo.client.run("nft", "-f", "-", input=f"""
table inet tpdns {{
  chain out {{
    type filter hook output priority 0;
    oifname "{veth}" udp dport 53 counter comment "all_udp"
    oifname "{veth}" tcp dport 53 counter comment "all_tcp"
    oifname "{veth}" ip daddr {SERVER4} udp dport 53 counter comment "configured"
  }}
}}
""")
    topo.start_tunproxy(f"""\
tun: {{name: tp0, mtu: 1500}}
dns: {{mode: fake-ip, servers: ["udp://{SERVER4}:53"], timeout: 10}}
rules: [MATCH,DIRECT]
""")
    result = topo.client.run(sys.executable, "-c", ASKER, str(Path(__file__).parent.parent))
    answered, txt_ok = result.stdout.split()
    assert answered == "50", result.stdout + result.stderr
    assert txt_ok == "True"
    seen = counters(topo, "client", "tpdns")
    assert seen["all_tcp"] == 0
    assert seen["all_udp"] == seen["configured"] >= 1  # only the TXT, only to the server
