"""DNS interception end to end, through tunproxy itself.

The client namespace's default route is tunproxy's TUN (tests/netns.py). Real
clients (``dig``, ``curl``) run there; its resolv.conf names ``DECOY``. The server
namespace holds:

- dnsmasq on ``SERVER4`` (the configured upstream) and another on ``DECOY`` (the
  resolver the client believes it asks), each logging every query it receives, so
  each test checks on the server side which names reached which resolver, and from
  where (``CLIENT4`` = tunproxy's DIRECT socket, ``SERVER4`` = dante or a DoH/DoQ
  server). With DNS hijacked, the decoy must never hear a thing;
- dante (SOCKS5 with UDP ASSOCIATE) on ``PROXY4``, whose only way to resolve
  ``web.name.test`` is the server namespace's own hosts file (``/etc/netns/<ns>/hosts``,
  mounted by ``ip netns exec``): a connection by that name through dante proves the
  proxy got the name, not an address;
- a web server on every address of the namespace (port ``WEB_PORT``).
"""

from __future__ import annotations

import errno
import ipaddress
import re
import shutil
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from dnslib import DNSRecord

from tests.netns import (
    CLIENT4,
    PROXY4,
    REPO,
    SERVER4,
    SERVER6,
    Netns,
    Topology,
    Tunproxy,
    topology,
)
from tests.test_dns_netns import start_server
from tests.test_relay_e2e import DANTE_CONF, SOCKS_PORT

pytestmark = pytest.mark.netns

DECOY = "192.0.2.53"  # the client's resolver (TEST-NET-1, on the server namespace's lo)
WEB4 = "10.232.0.3"  # real.name.test and pc.lan.name.test, answered by dnsmasq only
DECOY_WEB4 = "10.232.0.4"  # what the decoy answers for real.name.test
WEB_PORT = 8080
UDP_ECHO_PORT = 7001
FAKE4 = ipaddress.ip_network("198.18.0.0/15")
FAKE6 = ipaddress.ip_network("fc00::/18")
STALE_FAKE = "198.18.255.254"  # in the fake range, never handed out in a fresh run
DEAD_RESOLVER = "10.232.0.99"  # routed to the server namespace, which drops it silently

# What dnsmasq knows. web.name.test is deliberately absent: only dante's hosts file has it.
RESOLVER_RECORDS = {"real.name.test": WEB4, "pc.lan.name.test": WEB4}
RESOLVER_TXT = {
    "note.name.test": "from the configured resolver",
    # Six strings of 240 bytes: more than a 1232-byte UDP answer can hold.
    "big.name.test": ",".join(f"chunk{i}-" + "y" * 240 for i in range(6)),
}


class Dnsmasq:
    """dnsmasq with local records only, on ``address:port``, logging every query.

    (tests/test_dns_netns.py has one on SERVER4:53 answering all of name.test; these
    tests need other addresses and ports, and names that dnsmasq must not know.)
    """

    def __init__(
        self,
        ns: Netns,
        workdir: Path,
        records: Mapping[str, str],
        *,
        txt: Mapping[str, str] | None = None,
        address: str = SERVER4,
        port: int = 53,
    ) -> None:
        self.log_path = workdir / f"dnsmasq-{address}-{port}.log"
        self.log_path.write_text("")
        self.proc = ns.spawn(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--user=root", "--pid-file",
            f"--listen-address={address}", "--bind-interfaces", f"--port={port}",
            "--local-ttl=60", *(f"--host-record={name},{a}" for name, a in records.items()),
            *(f"--txt-record={name},{text}" for name, text in (txt or {}).items()),
            "--log-queries", f"--log-facility={self.log_path}",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while "started, version" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        ns.wait_udp_bound(port)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def heard(self) -> int:
        return len(re.findall(r"query\[", self.log))

    def queries(self, name: str, qtype: str = "A", source: str | None = None) -> int:
        pattern = rf"query\[{qtype}\] {re.escape(name)} from {re.escape(source or '')}"
        return len(re.findall(pattern, self.log))


@dataclass(frozen=True)
class Record:
    name: str
    ttl: int
    type: str
    data: str


@dataclass(frozen=True)
class DigAnswer:
    status: str | None  # None: no answer at all
    records: tuple[Record, ...]
    output: str

    @property
    def addresses(self) -> list[str]:
        return [r.data for r in self.records if r.type in ("A", "AAAA")]


def dig(ns: Netns, *args: str, server: str = DECOY, wait: int = 15) -> DigAnswer:
    done = ns.run(
        "dig", f"+time={wait}", "+tries=1", "+noall", "+comments", "+answer", f"@{server}",
        *args, check=False, timeout=wait + 10,
    )  # fmt: skip
    status = re.search(r"status: (\w+)", done.stdout)
    records = []
    for line in done.stdout.splitlines():
        fields = line.split(None, 4)
        if line.startswith(";") or len(fields) < 5:
            continue
        name, ttl, _class, rtype, data = fields
        records.append(Record(name.rstrip("."), int(ttl), rtype, data.strip()))
    return DigAnswer(status.group(1) if status else None, tuple(records), done.stdout)


class DnsLab:
    """The servers above, plus per-namespace /etc files (removed by ``close``)."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self._etc: list[Path] = []
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _etc_files(self, ns: Netns, files: Mapping[str, str]) -> None:
        etc = Path("/etc/netns") / ns.name
        etc.mkdir(parents=True)
        self._etc.append(etc)
        for name, text in files.items():
            (etc / name).write_text(text)

    def _start(self) -> None:
        topo, server = self.topo, self.topo.server
        # Before anything starts there: `ip netns exec` mounts these at each start.
        self._etc_files(topo.client, {
            "resolv.conf": f"nameserver {DECOY}\noptions timeout:10 attempts:1\n",
            "hosts": "127.0.0.1 localhost\n",
        })  # fmt: skip
        self._etc_files(server, {
            # No resolver at all (nothing listens on 127.0.0.1:53): names come from here.
            "resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
            "hosts": f"127.0.0.1 localhost\n{SERVER4} web.name.test\n",
        })  # fmt: skip
        for address in (WEB4, DECOY):
            server.run("ip", "addr", "add", f"{address}/32", "dev", "lo")
        self.dnsmasq = Dnsmasq(server, self.workdir, RESOLVER_RECORDS, txt=RESOLVER_TXT)
        self.decoy = Dnsmasq(server, self.workdir, {"real.name.test": DECOY_WEB4}, address=DECOY)
        www = self.workdir / "www"
        www.mkdir()
        self.page = f"page {self.workdir.name}\n"
        (www / "index.html").write_text(self.page)
        server.spawn(
            sys.executable, "-m", "http.server", "--bind", "0.0.0.0", "--directory", str(www),
            str(WEB_PORT),
        )  # fmt: skip
        conf = DANTE_CONF.format(internal=PROXY4, port=SOCKS_PORT, external=SERVER4)
        logged = conf.replace("udpreply }", "udpreply\n  log: connect\n}")
        assert logged != conf, "DANTE_CONF changed shape: add 'log: connect' another way"
        (self.workdir / "danted.conf").write_text(logged)
        self.dante_log = self.workdir / "danted.log"
        server.spawn(
            "/usr/sbin/danted", "-f", str(self.workdir / "danted.conf"), "-N", "1",
            "-p", str(self.workdir / "danted.pid"), stderr=self.dante_log.open("wb"),
        )  # fmt: skip
        server.wait_tcp_listening(SOCKS_PORT)
        server.wait_tcp_listening(WEB_PORT)

    def close(self) -> None:
        for etc in self._etc:
            shutil.rmtree(etc, ignore_errors=True)
        self._etc.clear()

    def start(
        self, dns: Mapping[str, Any] | None, rules: Sequence[str], name: str = "tunproxy.yaml"
    ) -> Tunproxy:
        config: dict[str, Any] = {
            "tun": {"name": "tp0"},
            "upstreams": {"socks": {"type": "socks5", "server": f"{PROXY4}:{SOCKS_PORT}"}},
            "relay": {"connect-timeout": 30},
            "rules": [*rules, "MATCH,DIRECT"],
        }
        if dns is not None:
            config["dns"] = dict(dns)
        return self.topo.start_tunproxy(yaml.safe_dump(config, sort_keys=False), name=name)

    def dig(self, *args: str, server: str = DECOY, wait: int = 15) -> DigAnswer:
        return dig(self.topo.client, *args, server=server, wait=wait)

    def curl(self, *args: str) -> str:
        done = self.topo.client.run("curl", "-sS", "--max-time", "60", *args, check=False)
        return done.stdout + done.stderr

    def connect(self, host: str, port: int = WEB_PORT, timeout: float = 30.0) -> socket.socket:
        sock: socket.socket = self.topo.client.connect(host, port, timeout=timeout)
        return sock


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[DnsLab]:
    with topology(tmp_path) as topo:
        dns_lab = DnsLab(topo, tmp_path)
        try:
            yield dns_lab
        finally:
            dns_lab.close()


def resolver(port: int = 53) -> dict[str, Any]:
    return {"servers": [f"udp://{SERVER4}:{port}"]}


def only_address(answer: DigAnswer) -> str:
    assert answer.status == "NOERROR", answer.output
    (address,) = answer.addresses
    return address


# --- fake-ip ---------------------------------------------------------------------------------


def test_fake_ip_answers_locally_short_lived_and_stable(lab: DnsLab) -> None:
    tp = lab.start({**resolver(), "ttl": 3}, [])
    first = lab.dig("web.name.test", "A")
    fake = only_address(first)
    assert ipaddress.ip_address(fake) in FAKE4
    assert [r.ttl for r in first.records] == [3]  # dns.ttl, not the 60 s dnsmasq would give
    # Stable on repeat, over TCP, and whichever server the client asked (even the real one).
    assert only_address(lab.dig("web.name.test", "A")) == fake
    assert only_address(lab.dig("web.name.test", "A", "+tcp")) == fake
    assert only_address(lab.dig("WEB.Name.Test", "A", server=SERVER4)) == fake
    assert only_address(lab.dig("web.name.test", "A", server=SERVER6)) == fake
    assert only_address(lab.dig("web.name.test", "A", "+tcp", server=SERVER6)) == fake
    other = only_address(lab.dig("other.name.test", "A"))
    assert other != fake and ipaddress.ip_address(other) in FAKE4
    aaaa = lab.dig("web.name.test", "AAAA")
    assert ipaddress.ip_address(only_address(aaaa)) in FAKE6
    assert [r.ttl for r in aaaa.records] == [3]
    # HTTPS records could carry real address hints: NODATA, so the client uses A/AAAA.
    https = lab.dig("web.name.test", "TYPE65")
    assert https.status == "NOERROR" and not https.records, https.output
    tp.wait_for_log(rf"open #\d+ udp .* -> {re.escape(DECOY)}:53 via dns \(dns\.hijack\)")
    tp.wait_for_log(rf"open #\d+ tcp .* -> {re.escape(DECOY)}:53 via dns \(dns\.hijack\)")
    # Nothing was asked upstream, nor of any server the client named: answers are local.
    assert "name.test" not in lab.dnsmasq.log.lower()
    assert lab.decoy.heard() == 0


def test_fake_ip_flow_reaches_socks5_by_name(lab: DnsLab) -> None:
    tp = lab.start(resolver(), ["DOMAIN-SUFFIX,name.test,socks"])
    # curl resolves through the client's resolv.conf (hijacked), then connects to the fake
    # address; only dante, which got the name, can find the real web server.
    for family in ("-4", "-6"):
        assert lab.curl(family, f"http://web.name.test:{WEB_PORT}/") == lab.page, family
    for src in (r"172\.19\.0\.1", r"fdfe:[0-9a-f:]+"):  # the TUN's own addresses, v4 and v6
        tp.wait_for_log(
            rf"open #\d+ tcp (?:\S+\(\d+\) )?{src}:\d+ -> web\.name\.test:{WEB_PORT} via socks")
    assert re.search(
        rf"tcp/connect .* -> .* {re.escape(SERVER4)}\.{WEB_PORT}\b", lab.dante_log.read_text()
    ), lab.dante_log.read_text()
    # No resolver heard of the name: tunproxy never resolved it, dante used its hosts file.
    assert "name.test" not in lab.dnsmasq.log.lower()
    assert lab.decoy.heard() == 0


def test_fake_ip_filter_gets_real_answers_and_hosts_answer_statically(lab: DnsLab) -> None:
    dns = {
        **resolver(),
        "fake-ip-filter": ["+.lan.name.test"],
        "hosts": {"static.name.test": ["10.232.0.77", "fd00:232::77"]},
    }
    lab.start(dns, [])
    assert only_address(lab.dig("pc.lan.name.test", "A")) == WEB4
    assert lab.dnsmasq.queries("pc.lan.name.test", "A", CLIENT4) == 1
    assert only_address(lab.dig("static.name.test", "A")) == "10.232.0.77"
    assert only_address(lab.dig("static.name.test", "AAAA")) == "fd00:232::77"
    # Other query types are forwarded (to the configured resolver, not the decoy).
    (note,) = lab.dig("note.name.test", "TXT").records
    assert note.type == "TXT" and note.data == f'"{RESOLVER_TXT["note.name.test"]}"'
    assert lab.dnsmasq.queries("note.name.test", "TXT", CLIENT4) == 1
    assert lab.decoy.heard() == 0
    assert lab.dnsmasq.queries("static.name.test", "A") == 0
    # A sibling outside the filter is still fake.
    assert ipaddress.ip_address(only_address(lab.dig("pc.name.test", "A"))) in FAKE4


def test_unknown_fake_address_is_refused_not_leaked(lab: DnsLab) -> None:
    # Make the stale fake address real in the server namespace, with a web server and a UDP
    # echo behind it: a leaked flow would get through and be answered.
    server = lab.topo.server
    server.run("ip", "addr", "add", f"{STALE_FAKE}/32", "dev", "lo")
    peer = str(REPO / "tests" / "e2e_peer.py")
    server.spawn(sys.executable, peer, "udp", STALE_FAKE, str(UDP_ECHO_PORT))
    server.wait_udp_bound(UDP_ECHO_PORT)
    tp = lab.start(resolver(), [])
    # Refused (a dropped SYN would end in TimeoutError instead).
    with pytest.raises(ConnectionRefusedError):
        lab.connect(STALE_FAKE)
    with lab.topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(30)
        sock.connect((STALE_FAKE, UDP_ECHO_PORT))
        sock.send(b"hello?")
        # ICMP unreachable comes back; an echo would mean the datagram leaked.
        with pytest.raises(OSError) as raised:
            sock.recv(100)
        assert raised.value.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH)
    tp.wait_for_log(rf"end #\d+ tcp .* -> {re.escape(STALE_FAKE)}:{WEB_PORT} .*unknown-fake-ip")
    tp.wait_for_log(rf"end #\d+ udp .* -> {re.escape(STALE_FAKE)}:{UDP_ECHO_PORT} .*unknown-fake")


def test_fake_ip_table_persists_across_a_restart(lab: DnsLab) -> None:
    dns = {**resolver(), "fake-ip-persist": str(lab.workdir / "fake-ip.json")}
    rules = ["DOMAIN-SUFFIX,name.test,socks"]
    first = lab.start(dns, rules)
    fake = only_address(lab.dig("web.name.test"))
    assert first.stop() == 0
    # A client that cached the answer comes back after the restart, without asking again.
    second = lab.start(dns, rules, name="restarted.yaml")
    with lab.connect(fake) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nHost: web.name.test\r\n\r\n")
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(lab.page.encode())
    second.wait_for_log(rf"open #\d+ tcp .* -> web\.name\.test:{WEB_PORT} via socks")
    assert only_address(lab.dig("web.name.test")) == fake


# --- DNS over TCP ------------------------------------------------------------------------------


def test_several_queries_on_one_tcp_connection(lab: DnsLab) -> None:
    tp = lab.start(resolver(), [])
    names = [f"n{i}.name.test" for i in range(5)]
    # dig reuses one connection for one query after another...
    out = lab.topo.client.run(
        "dig", "+tcp", "+keepopen", "+time=3", "+tries=1", "+noall", "+answer", f"@{DECOY}",
        *names,
    ).stdout  # fmt: skip
    answers = {line.split()[0].rstrip("."): line.split()[4] for line in out.splitlines()}
    assert sorted(answers) == names
    assert len(set(answers.values())) == len(names)
    assert all(ipaddress.ip_address(a) in FAKE4 for a in answers.values())
    assert len(re.findall(rf"open #\d+ tcp .* -> {re.escape(DECOY)}:53 via dns", tp.log)) == 1
    # ...and a client may pipeline them all in one write (RFC 7766 6.2.1.1).
    queries = [DNSRecord.question(name) for name in names]
    for ident, query in enumerate(queries, start=100):
        query.header.id = ident
    with lab.connect(DECOY, 53) as sock:
        sock.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (q.pack() for q in queries)))
        stream = sock.makefile("rb")
        replies = [DNSRecord.parse(stream.read(struct.unpack("!H", stream.read(2))[0]))
                   for _ in names]  # fmt: skip
    by_id = {r.header.id: r for r in replies}
    assert sorted(by_id) == list(range(100, 100 + len(names)))
    for ident, name in enumerate(names, start=100):
        assert str(by_id[ident].q.qname).rstrip(".") == name
        assert [str(rr.rdata) for rr in by_id[ident].rr] == [answers[name]]


def test_big_answer_truncated_over_udp_then_whole_over_tcp(lab: DnsLab) -> None:
    tp = lab.start({**resolver(), "mode": "real-ip"}, [])
    (record,) = lab.dig("big.name.test", "TXT").records  # dig retries over TCP after TC=1
    assert all(f"chunk{i}-{'y' * 240}" in record.data for i in range(6))
    tp.wait_for_log(rf"open #\d+ udp .* -> {re.escape(DECOY)}:53 via dns")
    tp.wait_for_log(rf"open #\d+ tcp .* -> {re.escape(DECOY)}:53 via dns")
    # Upstream, tunproxy too got TC=1 over UDP and asked again over TCP: once each.
    assert lab.dnsmasq.queries("big.name.test", "TXT", CLIENT4) == 2
    quiet = lab.dig("big.name.test", "TXT", "+ignore")  # the truncated UDP answer itself
    assert quiet.status == "NOERROR" and " tc" in quiet.output.split("flags:")[1].split(";")[0]


# --- real-ip ---------------------------------------------------------------------------------


def test_real_ip_answer_gives_later_flows_their_domain(lab: DnsLab) -> None:
    tp = lab.start({**resolver(), "mode": "real-ip"}, ["DOMAIN,real.name.test,REJECT"])
    # Before the lookup tunproxy cannot know the name: the rule does not match.
    lab.connect(WEB4).close()
    answer = lab.dig("real.name.test", "A")
    assert only_address(answer) == WEB4 and answer.records[0].ttl <= 60
    assert lab.dnsmasq.queries("real.name.test", "A", CLIENT4) == 1
    # Now it does: the same address carries the domain, and DOMAIN rejects it.
    with pytest.raises(ConnectionRefusedError):
        lab.connect(WEB4)
    tp.wait_for_log(rf"open #\d+ tcp .* -> real\.name\.test:{WEB_PORT} via REJECT")


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
def test_upstream_queries_take_the_path_the_rules_choose(lab: DnsLab, scheme: str) -> None:
    lab.start(
        {"mode": "real-ip", "servers": [f"{scheme}://{SERVER4}"]},
        [f"IP-CIDR,{SERVER4}/32,socks"],
    )
    assert only_address(lab.dig("real.name.test", "A")) == WEB4
    # dnsmasq heard it from dante's external address, never from tunproxy's own socket.
    assert lab.dnsmasq.queries("real.name.test", "A", SERVER4) == 1
    assert lab.dnsmasq.queries("real.name.test", "A", CLIENT4) == 0
    # dante's log names the destination of a CONNECT; of an ASSOCIATE only the client side.
    expected = {"udp": r"udp/udpassociate ", "tcp": rf"tcp/connect .*{re.escape(SERVER4)}\.53\b"}
    dante = lab.dante_log.read_text()
    assert re.search(rf"pass\(\d+\): {expected[scheme]}", dante), dante


@pytest.mark.parametrize("scheme", ["udp", "tcp"])
def test_dead_upstream_answers_servfail_within_the_timeout(lab: DnsLab, scheme: str) -> None:
    timeout = 1.0
    lab.start(
        {"mode": "real-ip", "servers": [f"{scheme}://{DEAD_RESOLVER}"], "timeout": timeout}, []
    )
    start = time.monotonic()
    answer = lab.dig("real.name.test", "A", wait=30)
    elapsed = time.monotonic() - start
    # tunproxy's SERVFAIL (dig would report no status at all had it waited out its own
    # 30 s), and not before the timeout: load only adds time, so only the lower bound is
    # tight.
    assert answer.status == "SERVFAIL", answer.output
    assert timeout * 0.9 <= elapsed < 30


@pytest.mark.parametrize("kind", ["doh", "doq"])
def test_encrypted_upstreams_answer_through_tunproxy(lab: DnsLab, kind: str) -> None:
    sys.path.insert(0, str(REPO / "tests" / "data" / "dns"))
    from dnstest_servers import make_certificate  # type: ignore[import-not-found]

    cert = make_certificate(lab.workdir, ["dns.test"], [SERVER4])
    port = 8443 if kind == "doh" else 8853
    start_server(lab.topo.server, kind, port, cert)  # forwards to dnsmasq on SERVER4:53
    url = {
        "doh": f"https://dns.test:{port}/dns-query#ip={SERVER4}&ca={cert[0]}",
        "doq": f"quic://{SERVER4}:{port}#sni=dns.test&ca={cert[0]}",
    }[kind]
    lab.start({"mode": "real-ip", "servers": [url]}, [])
    assert only_address(lab.dig("real.name.test", "A")) == WEB4
    assert only_address(lab.dig("pc.lan.name.test", "A", "+tcp")) == WEB4
    # Asked by the DoH/DoQ server in the server namespace, never by tunproxy in plain DNS.
    assert lab.dnsmasq.queries("real.name.test", "A", SERVER4) == 1
    assert lab.dnsmasq.queries("pc.lan.name.test", "A", SERVER4) == 1
    assert lab.dnsmasq.queries("real.name.test", "A", CLIENT4) == 0


# --- what is not hijacked -----------------------------------------------------------------------


def test_other_ports_are_not_hijacked(lab: DnsLab) -> None:
    other = Dnsmasq(lab.topo.server, lab.workdir, RESOLVER_RECORDS, port=5353)
    tp = lab.start(resolver(), [])
    # To port 5353 the query is an ordinary UDP flow and gets the real answer...
    assert only_address(lab.dig("-p", "5353", "real.name.test", server=SERVER4)) == WEB4
    assert other.queries("real.name.test", "A", CLIENT4) == 1
    tp.wait_for_log(rf"open #\d+ udp .* -> {re.escape(SERVER4)}:5353 via DIRECT")
    # ...while to port 53 of the same server it is answered by tunproxy (fake-ip).
    fake = only_address(lab.dig("real.name.test", server=SERVER4))
    assert ipaddress.ip_address(fake) in FAKE4
    assert lab.dnsmasq.queries("real.name.test") == 0


def test_without_a_dns_section_queries_are_ordinary_flows(lab: DnsLab) -> None:
    tp = lab.start(None, [])
    # The server the client asked answers, through the TUN, relayed like any UDP flow.
    assert only_address(lab.dig("real.name.test")) == DECOY_WEB4
    assert lab.decoy.queries("real.name.test", "A", CLIENT4) == 1
    tp.wait_for_log(rf"open #\d+ udp .* -> {re.escape(DECOY)}:53 via DIRECT")
    assert only_address(lab.dig("real.name.test", "+tcp", server=SERVER4)) == WEB4
    tp.wait_for_log(rf"open #\d+ tcp .* -> {re.escape(SERVER4)}:53 via DIRECT")
    assert lab.dnsmasq.queries("real.name.test", "A", CLIENT4) == 1
    assert " via dns " not in tp.log
    assert lab.topo.client.run("ip", "rule").stdout.count("dport 53") == 0
