"""DNS against real servers in network namespaces.

The resolver side (a DnsService in ``dnstest_probe.py``) runs in the client
namespace; Debian's dnsmasq, and DoH / DoT / DoQ servers fronting it, run in
the server namespace (tests/netns.py's Topology: two namespaces joined by a
veth, removed afterwards). dnsmasq logs every query it receives, so each test
checks on the server side which queries reached it and from where.
"""

from __future__ import annotations

import json
import pathlib
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.netns import CLIENT4, PROXY4, SERVER4, Netns, Topology, Tunproxy, topology

pytestmark = pytest.mark.netns

DATA = pathlib.Path(__file__).parent / "data" / "dns"
PROBE = str(DATA / "dnstest_probe.py")
SERVERS = str(DATA / "dnstest_servers.py")
BIG_TXT = [f"chunk{i}-" + "y" * 240 for i in range(6)]  # ~1.5 kB: more than 1232 bytes


class Dnsmasq:
    """dnsmasq in the foreground with local records only, logging every query."""

    def __init__(self, ns: Netns, workdir: pathlib.Path, answer: str = "10.9.8.7") -> None:
        self.log_path = workdir / "dnsmasq.log"
        self.log_path.write_text("")
        txt = ",".join(f'"{t}"' for t in BIG_TXT)
        self.proc = ns.spawn(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--user=root", "--pid-file",
            f"--listen-address={SERVER4}", "--bind-interfaces", "--port=53",
            f"--address=/name.test/{answer}", "--local-ttl=60", f"--txt-record=big.test,{txt}",
            "--log-queries", f"--log-facility={self.log_path}",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "started, version" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        ns.wait_udp_bound(53)

    def queries(self, name: str, qtype: str = "A", source: str | None = None) -> int:
        pattern = rf"query\[{qtype}\] {re.escape(name)} from {re.escape(source or '')}"
        return len(re.findall(pattern, self.log_path.read_text()))


@pytest.fixture
def net(tmp_path: pathlib.Path) -> Iterator[Topology]:
    with topology(tmp_path) as topo:
        yield topo


@pytest.fixture
def dnsmasq(net: Topology, tmp_path: pathlib.Path) -> Dnsmasq:
    return Dnsmasq(net.server, tmp_path)


def probe(
    net: Topology, dns: dict[str, Any], *steps: dict[str, Any], socks5: str | None = None
) -> dict[str, Any]:
    spec = json.dumps({"dns": dns, "steps": list(steps), "socks5": socks5})
    done = net.client.run(sys.executable, PROBE, spec, timeout=60)
    return dict(json.loads(done.stdout))


def start_server(ns: Netns, kind: str, port: int, cert: tuple[str, str]) -> None:
    proc = ns.spawn(
        sys.executable, SERVERS, kind, "--host", SERVER4, "--port", str(port),
        "--cert", cert[0], "--key", cert[1], "--forward", f"{SERVER4}:53",
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready or proc.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"{kind} server did not start (rc={proc.poll()})")


def test_udp_upstream_coalesces_identical_queries(net: Topology, dnsmasq: Dnsmasq) -> None:
    out = probe(
        net,
        {"mode": "real-ip", "servers": [f"udp://{SERVER4}"]},
        {"op": "query", "name": "name.test", "count": 20},
        {"op": "query", "name": "name.test"},
    )
    burst, (later,) = out["results"]
    assert sorted(r["id"] for r in burst) == list(range(1, 21))
    assert all(r["rcode"] == "NOERROR" and r["answers"] == ["10.9.8.7"] for r in burst)
    assert later["answers"] == ["10.9.8.7"]
    # 20 concurrent queries made one upstream query; the 21st came from the cache.
    assert dnsmasq.queries("name.test", "A", CLIENT4) == 1
    assert out["counters"]["coalesced"] == 19 and out["counters"]["cache_hits"] == 1
    assert out["mapped"] == {"10.9.8.7": "name.test"}


def test_fake_ip_keeps_queries_local_until_direct_resolves(net: Topology, dnsmasq: Dnsmasq) -> None:
    out = probe(
        net,
        {"servers": [f"udp://{SERVER4}"], "fake-ip-filter": ["+.lan.name.test"]},
        {"op": "query", "name": "name.test"},
        {"op": "query", "name": "name.test", "type": "AAAA"},
        {"op": "query", "name": "pc.lan.name.test"},
        {"op": "resolve", "name": "name.test"},
    )
    (a,), (aaaa,), (filtered,), resolved = out["results"]
    (fake4,) = a["answers"]
    (fake6,) = aaaa["answers"]
    assert fake4.startswith("198.18.") and fake6.startswith("fc00:")
    assert out["mapped"][fake4] == "name.test" and out["mapped"][fake6] == "name.test"
    assert filtered["answers"] == ["10.9.8.7"]
    assert out["mapped"]["10.9.8.7"] == "pc.lan.name.test"
    assert resolved["addresses"] == ["10.9.8.7"]
    # The fake answers asked nobody; only the filter and the DIRECT-style resolve did.
    assert dnsmasq.queries("pc.lan.name.test", "A") == 1
    assert dnsmasq.queries("name.test", "A") == 1
    assert dnsmasq.queries("name.test", "AAAA") == 1


def test_truncated_udp_answer_is_retried_over_tcp(net: Topology, dnsmasq: Dnsmasq) -> None:
    out = probe(
        net,
        {"mode": "real-ip", "servers": [f"udp://{SERVER4}"]},
        {"op": "query", "name": "big.test", "type": "TXT", "network": "tcp"},
    )
    ((answer,),) = out["results"]
    assert answer["rcode"] == "NOERROR" and not answer["tc"]
    assert len(answer["answers"]) == 1
    assert all(chunk in answer["answers"][0] for chunk in BIG_TXT)
    # Once over UDP (answered TC=1), once over TCP.
    assert dnsmasq.queries("big.test", "TXT", CLIENT4) == 2


def test_dead_upstream_answers_servfail_within_the_timeout(net: Topology) -> None:
    dead = "10.232.0.99"  # routed to the server namespace, which drops it silently
    for server in (f"udp://{dead}", f"tcp://{dead}"):
        out = probe(
            net,
            {"mode": "real-ip", "servers": [server], "timeout": 1},
            {"op": "query", "name": "name.test"},
        )
        ((answer,),) = out["results"]
        assert answer["rcode"] == "SERVFAIL", server
        # The 1 s configured, not the 5 s default (upper bound loose: load makes timers late).
        assert 0.9 <= answer["elapsed"] < 4.0, server


@pytest.fixture
def cert(tmp_path: pathlib.Path) -> tuple[str, str]:
    sys.path.insert(0, str(DATA))
    from dnstest_servers import make_certificate

    return make_certificate(tmp_path, ["dns.test"], [SERVER4])


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("doh", "https://dns.test:8443/dns-query#ip={ip}&ca={ca}"),
        ("doq", "quic://{ip}:8853#sni=dns.test&ca={ca}"),
        ("doh3", "h3://{ip}:8443/dns-query#sni=dns.test&ca={ca}"),
        ("dot", "tls://{ip}:8853#sni=dns.test&ca={ca}"),
    ],
)
def test_encrypted_upstreams_reach_the_real_resolver(
    net: Topology, dnsmasq: Dnsmasq, cert: tuple[str, str], kind: str, url: str
) -> None:
    port = 8443 if kind.startswith("doh") else 8853
    start_server(net.server, kind, port, cert)
    name = f"{kind}.name.test"
    out = probe(
        net,
        {"mode": "real-ip", "servers": [url.format(ip=SERVER4, ca=cert[0])]},
        {"op": "query", "name": name, "count": 3},
        {"op": "query", "name": "other.name.test"},
    )
    burst, (other,) = out["results"]
    assert [r["answers"] for r in burst] == [["10.9.8.7"]] * 3
    assert other["rcode"] == "NOERROR" and other["answers"] == ["10.9.8.7"]
    # dnsmasq heard it from the encrypted server in its own namespace, never from the client.
    assert dnsmasq.queries(name, "A", SERVER4) == 1
    assert dnsmasq.queries(name, "A", CLIENT4) == 0
    assert out["counters"]["upstream_failures"] == 0


DANTE_CONF = f"""\
logoutput: stderr
internal: {SERVER4} port = 1080
external: {SERVER4}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }}
"""


@pytest.mark.parametrize("scheme", ["udp", "tcp", "quic"])
def test_upstream_flows_follow_the_rules_through_socks5(
    net: Topology, dnsmasq: Dnsmasq, tmp_path: pathlib.Path, cert: tuple[str, str], scheme: str
) -> None:
    conf = tmp_path / "danted.conf"
    conf.write_text(DANTE_CONF)
    net.server.spawn(
        "/usr/sbin/danted", "-f", str(conf), "-N", "1", "-p", str(tmp_path / "danted.pid")
    )
    net.server.wait_tcp_listening(1080)
    if scheme == "quic":
        start_server(net.server, "doq", 8853, cert)
        url = f"quic://{SERVER4}:8853#sni=dns.test&ca={cert[0]}"
    else:
        url = f"{scheme}://{SERVER4}"
    name = f"{scheme}.socks.name.test"
    out = probe(
        net,
        {"mode": "real-ip", "servers": [url]},
        {"op": "query", "name": name},
        socks5=f"{SERVER4}:1080",
    )
    ((answer,),) = out["results"]
    assert answer["rcode"] == "NOERROR" and answer["answers"] == ["10.9.8.7"]
    network = "tcp" if scheme == "tcp" else "udp"
    port = 8853 if scheme == "quic" else 53
    assert out["flows"] == [[network, f"{SERVER4}:{port}"]]
    # dnsmasq heard the query from the proxy's side, never from the client directly.
    assert dnsmasq.queries(name, "A", SERVER4) == 1
    assert dnsmasq.queries(name, "A", CLIENT4) == 0


# --- through tunproxy itself: dig and curl in the client namespace, the TUN as default route ----

HTTP_PORT = 8080
TLS_PORT = 8443


class TunLab:
    """dnsmasq (answering name.test -> the web server), a web server, and dante in the
    server namespace; dante resolves names with that dnsmasq (a resolv.conf that
    ``ip netns exec`` mounts for the server namespace only, removed afterwards)."""

    def __init__(self, net: Topology, workdir: pathlib.Path, cert: tuple[str, str]) -> None:
        self.net = net
        self.etc = pathlib.Path("/etc/netns") / net.server.name
        self.etc.mkdir(parents=True)
        try:
            self._start(workdir, cert)
        except BaseException:
            self.close()
            raise

    def _start(self, workdir: pathlib.Path, cert: tuple[str, str]) -> None:
        net = self.net
        (self.etc / "resolv.conf").write_text(f"nameserver {SERVER4}\n")
        self.dnsmasq = Dnsmasq(net.server, workdir, answer=SERVER4)
        net.server.spawn(
            sys.executable, "-m", "http.server", "--bind", SERVER4, str(HTTP_PORT),
            cwd=str(workdir),
        )  # fmt: skip
        start_server(net.server, "doh", TLS_PORT, cert)  # any HTTPS server will do
        conf = workdir / "danted.conf"
        conf.write_text(
            DANTE_CONF.replace(f"internal: {SERVER4}", f"internal: {PROXY4}").replace(
                "udpreply }", "udpreply\n  log: connect\n}"
            )
        )
        self.dante_log = workdir / "danted.log"
        net.server.spawn(
            "/usr/sbin/danted", "-f", str(conf), "-N", "1", "-p", str(workdir / "danted.pid"),
            stderr=self.dante_log.open("wb"),
        )  # fmt: skip
        net.server.wait_tcp_listening(1080)
        net.server.wait_tcp_listening(HTTP_PORT)

    def close(self) -> None:
        if self.etc.exists():
            for path in self.etc.iterdir():
                path.unlink()
            self.etc.rmdir()

    def start(self, dns: str, *, sniff: bool = False) -> Tunproxy:
        config = f"""\
tun:
  name: tp0
upstreams:
  socks: {{type: socks5, server: "{PROXY4}:1080"}}
relay:
  sniff: {"true" if sniff else "false"}
dns:
{dns}
rules:
  - DOMAIN-SUFFIX,name.test,socks
  - MATCH,DIRECT
"""
        return self.net.start_tunproxy(config)

    def dig(self, *args: str) -> list[str]:
        out = self.net.client.run("dig", "+short", "+time=3", "+tries=1", "@9.9.9.9", *args)
        return out.stdout.split()

    def curl(self, *args: str) -> str:
        out = self.net.client.run(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", *args,
            check=False,
        )  # fmt: skip
        return out.stdout


@pytest.fixture
def tunlab(net: Topology, tmp_path: pathlib.Path, cert: tuple[str, str]) -> Iterator[TunLab]:
    lab = TunLab(net, tmp_path, cert)
    try:
        yield lab
    finally:
        lab.close()


def test_tunproxy_fake_ip_socks5_receives_the_domain(tunlab: TunLab) -> None:
    tp = tunlab.start(
        f"  mode: fake-ip\n  servers: [udp://{SERVER4}]\n  fake-ip-filter: [+.lan.name.test]"
    )
    (fake,) = tunlab.dig("www.name.test")
    assert fake.startswith("198.18.")
    assert tunlab.dig("www.name.test", "+tcp") == [fake]  # TCP port 53 is hijacked too
    assert tunlab.dig("pc.lan.name.test") == [SERVER4]  # filtered: a real answer
    assert tunlab.curl(f"http://www.name.test:{HTTP_PORT}/") == "200"
    tp.wait_for_log(rf"open #\d+ tcp .* -> www\.name\.test:{HTTP_PORT} via socks")
    assert f"tcp/connect [: {CLIENT4}." in tunlab.dante_log.read_text()
    # tunproxy never asked about www.name.test: the proxy got the name and resolved it
    # (dante's lookup reaches dnsmasq from the server namespace itself).
    dnsmasq = tunlab.dnsmasq
    assert dnsmasq.queries("www.name.test", "A", CLIENT4) == 0
    assert dnsmasq.queries("www.name.test", "A", SERVER4) >= 1
    assert dnsmasq.queries("pc.lan.name.test", "A", CLIENT4) == 1


@pytest.mark.parametrize("upstream", ["udp", "quic"])
def test_tunproxy_real_ip_maps_answers_to_domains(
    tunlab: TunLab, cert: tuple[str, str], upstream: str
) -> None:
    if upstream == "quic":
        start_server(tunlab.net.server, "doq", 8853, cert)
        url = f"quic://{SERVER4}:8853#sni=dns.test&ca={cert[0]}"
    else:
        url = f"udp://{SERVER4}"
    tp = tunlab.start(f'  mode: real-ip\n  servers: ["{url}"]')
    assert tunlab.dig("www.name.test") == [SERVER4]
    assert tunlab.curl(f"http://www.name.test:{HTTP_PORT}/") == "200"
    tp.wait_for_log(rf"open #\d+ tcp .* -> www\.name\.test:{HTTP_PORT} via socks")
    # tunproxy asked once (dig and curl's lookup share the cache): directly over UDP, or
    # through the DoQ server, which asks dnsmasq from the server namespace.
    direct = tunlab.dnsmasq.queries("www.name.test", "A", CLIENT4)
    assert direct == (1 if upstream == "udp" else 0)
    if upstream == "quic":
        assert tunlab.dnsmasq.queries("www.name.test", "A", SERVER4) >= 1


def test_tunproxy_dead_upstream_servfail_within_the_timeout(tunlab: TunLab) -> None:
    tunlab.start("  mode: real-ip\n  servers: [udp://10.232.0.99]\n  timeout: 1")
    # dig gives up 4 s after its query (starting dig is not counted, however slow under
    # load): a SERVFAIL at all means tunproxy kept its 1 s, not the 5 s default.
    out = tunlab.net.client.run("dig", "+time=4", "+tries=1", "@9.9.9.9", "www.name.test")
    assert "status: SERVFAIL" in out.stdout, out.stdout


def test_tunproxy_sniffs_tls_sni_to_route_by_domain(tunlab: TunLab) -> None:
    tp = tunlab.start(f"  servers: [udp://{SERVER4}]", sniff=True)
    # Straight to the address, no DNS at all: only the ClientHello names the site.
    url = f"https://sni.name.test:{TLS_PORT}/"
    code = tunlab.curl("-k", "--resolve", f"sni.name.test:{TLS_PORT}:{SERVER4}", url)
    assert code == "404"  # the DoH server's answer to GET /: the request went through
    tp.wait_for_log(rf"open #\d+ tcp .* -> sni\.name\.test:{TLS_PORT} via socks")
    assert tunlab.dnsmasq.queries("sni.name.test", "A", CLIENT4) == 0
