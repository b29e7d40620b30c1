"""The QUIC upstream end to end: apps in the client namespace, tunproxy with
``MATCH,quic``, ``tunproxy server`` on PROXY4 in the server namespace, the test servers
(tests/e2e_peer.py) behind it.

Sizes: ``TUNPROXY_QUIC_E2E_MB`` (default 32) megabytes each way in the default suite;
the 100 MB run is marked ``slow``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e_peer import payload_chunks
from tests.masque_peer import MasqueServer, make_cert
from tests.netns import (
    CLIENT6,
    PROXY4,
    PROXY6,
    REPO,
    SERVER4,
    SERVER6,
    Topology,
    Tunproxy,
    topology,
)
from tests.test_relay_e2e import download, echo_after_half_close, udp_echo, upload

pytestmark = pytest.mark.netns

BULK = int(os.environ.get("TUNPROXY_QUIC_E2E_MB", "32")) * 1024 * 1024
TCP_PORT = 7000
UDP_PORT = 7001
QUIC_PORT = 4443
TOKEN = "e2e-token"


def quic_config(token: str = TOKEN, ca: Path | None = None, extra: str = "",
                server: str = f"{PROXY4}:{QUIC_PORT}") -> str:
    return f"""\
tun:
  name: tp0
upstreams:
  quic:
    type: quic
    server: "{server}"
    token: "{token}"
    sni: proxy.test
    ca: "{ca}"
{extra}relay:
  # Long: on a loaded machine the handshake and a stream's CONNECT can take seconds (a flow
  # that waits longer is refused, and the test fails for the machine's sake, not ours).
  connect-timeout: 30
rules:
  - MATCH,quic
"""


class QuicLab:
    """A topology with the test servers and ``tunproxy server`` in the server namespace."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        peer = str(REPO / "tests" / "e2e_peer.py")
        for host in (SERVER4, SERVER6):
            topo.server.spawn(sys.executable, peer, "tcp", host, str(TCP_PORT))
            topo.server.spawn(sys.executable, peer, "udp", host, str(UDP_PORT))
        self.ca, self.cert, self.key = make_cert(topo.workdir, "proxy.test", [PROXY4])
        self.servers: list[MasqueServer] = []
        self.server = self.start_server()
        topo.server.wait_tcp_listening(TCP_PORT)
        topo.server.wait_udp_bound(UDP_PORT)

    def start_server(self, listen: str = f"{PROXY4}:{QUIC_PORT}") -> MasqueServer:
        # The targets are the server namespace's own addresses, refused by default.
        server = MasqueServer([
            "--listen", listen, "--cert", str(self.cert), "--key", str(self.key),
            "--token", TOKEN, "--allow", f"{SERVER4}/32", "--allow", f"{SERVER6}/128",
        ], ns=self.topo.server)
        self.servers.append(server)
        server.wait_ready()
        return server

    def start(self, **kwargs: object) -> Tunproxy:
        kwargs.setdefault("ca", self.ca)
        return self.topo.start_tunproxy(quic_config(**kwargs))  # type: ignore[arg-type]

    def connect(self, host: str = SERVER4, port: int = TCP_PORT, timeout: float = 20.0
                ) -> socket.socket:
        return self.topo.client.connect(host, port, timeout=timeout)

    def close(self) -> None:
        for server in self.servers:
            server.kill()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[QuicLab]:
    with topology(tmp_path) as topo:
        quic_lab = QuicLab(topo)
        try:
            yield quic_lab
        finally:
            quic_lab.close()
            print("---- tunproxy server log ----\n" + "\n".join(
                quic_lab.server.log.splitlines()[-100:]))


def test_tcp_both_ways(lab: QuicLab) -> None:
    tp = lab.start()
    upload(lab, SERVER4, BULK)  # type: ignore[arg-type]
    download(lab, SERVER4, BULK)  # type: ignore[arg-type]
    upload(lab, SERVER6, 1024 * 1024)  # type: ignore[arg-type]
    tp.wait_for_log(r"end #\d+ tcp .* via quic: closed")
    lab.server.wait_for_log(rf"tcp .* -> {re.escape(SERVER4)}:{TCP_PORT}: closed, up \d+ B")


@pytest.mark.slow
def test_tcp_100_mb_both_ways(lab: QuicLab) -> None:
    lab.start()
    upload(lab, SERVER4, 100 * 1024 * 1024)  # type: ignore[arg-type]
    download(lab, SERVER4, 100 * 1024 * 1024)  # type: ignore[arg-type]


def test_many_concurrent_flows_share_one_connection(lab: QuicLab) -> None:
    tp = lab.start()

    def one(i: int) -> None:
        echo_after_half_close(lab, b"".join(payload_chunks(i, 64 * 1024)))  # type: ignore[arg-type]

    with ThreadPoolExecutor(max_workers=40) as pool:
        list(pool.map(one, range(120)))
    tp.wait_for_count("closed-by-client", 120)  # before stopping: see wait_for_count
    assert tp.log.count("QUIC connection to") == 1, tp.log[-3000:]
    tp.stop()


def test_half_close_both_orders(lab: QuicLab) -> None:
    lab.start()
    echo_after_half_close(lab, b"".join(payload_chunks(3, 2 * 1024 * 1024)))  # type: ignore[arg-type]
    with lab.connect() as sock:
        sock.sendall(b"SOURCE 100000 5\n")
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        sock.sendall(b"still here after your FIN\n")  # half-open: allowed
    assert len(received) == 100000


@pytest.mark.parametrize("host", [SERVER4, SERVER6])
def test_udp_echo_every_size(lab: QuicLab, host: str) -> None:
    tp = lab.start()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sizes = [1, 2, 100, 500, 1000, 1100, 1150, 1200, 1250, 1300, 1350, 1400, 1, 7, 1400, 64]
    with lab.topo.client.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect((host, UDP_PORT))
        for size in sizes:
            udp_echo(sock, bytes([size % 256]) * size)
    tp.wait_for_log(r"open #\d+ udp .* via quic")
    authority = f"[{host}]:{UDP_PORT}" if ":" in host else f"{host}:{UDP_PORT}"
    lab.server.wait_for_log(rf"udp .* -> {re.escape(authority)}: open")


def test_wrong_token_refuses_flows_with_one_log_line(lab: QuicLab) -> None:
    tp = lab.start(token="not-the-token")
    for _ in range(5):
        start = time.monotonic()
        with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
            lab.connect(timeout=60).recv(1)
        assert time.monotonic() - start < 15  # refused, not left to the 30 s connect timeout
    tp.wait_for_log(r"refused the token \(407\)")
    lab.server.wait_for_log(r"refused \(407\)")
    assert len(re.findall(r"ERROR .*refused the token", tp.log)) == 1, tp.log[-3000:]


def test_untrusted_certificate_refuses_flows(lab: QuicLab) -> None:
    other, _, _ = make_cert(lab.topo.workdir, "other.test")
    tp = lab.start(ca=other)
    with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
        lab.connect(timeout=60).recv(1)
    tp.wait_for_log(r"handshake failed: .*certificate")


def test_server_killed_resets_flows_then_recovers(lab: QuicLab) -> None:
    tp = lab.start()
    sock = lab.connect()
    sock.settimeout(30)
    sock.sendall(b"ECHO\n" + b"x" * 65536)
    assert sock.recv(65536)
    lab.server.kill()
    killed = time.monotonic()
    with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        while time.monotonic() - killed < 30:
            sock.sendall(b"y" * 65536)
            try:
                if not sock.recv(1 << 20):
                    break
            except TimeoutError:
                pass
    # Promptly: well before the 30 s idle timeout would have noticed the dead server.
    assert time.monotonic() - killed < 15, "the flow was not reset promptly"
    sock.close()
    tp.wait_for_log(r"QUIC connection to .* closed")
    lab.server = lab.start_server()
    download(lab, SERVER4, 1024 * 1024)  # type: ignore[arg-type]
    assert tp.log.count("QUIC connection to") >= 3  # up, closed, up again


def test_fake_ip_flow_reaches_the_proxy_by_name(tmp_path: Path) -> None:
    """dig and curl by name: tunproxy answers with a fake address, the CONNECT names the
    domain, and only the MASQUE server's namespace (its hosts file) can resolve it."""
    import yaml

    from tests.test_dns_e2e import WEB_PORT, DnsLab, resolver

    with topology(tmp_path) as topo:
        dns_lab = DnsLab(topo, tmp_path)
        try:
            ca, cert, key = make_cert(tmp_path, "proxy.test", [PROXY4])
            server = MasqueServer([
                "--listen", f"{PROXY4}:{QUIC_PORT}", "--cert", str(cert), "--key", str(key),
                "--token", TOKEN, "--allow", f"{SERVER4}/32",
            ], ns=topo.server)
            try:
                server.wait_ready()
                config = {
                    "tun": {"name": "tp0"},
                    "upstreams": {"quic": {
                        "type": "quic", "server": f"{PROXY4}:{QUIC_PORT}", "token": TOKEN,
                        "sni": "proxy.test", "ca": str(ca)}},
                    "dns": resolver(),
                    "relay": {"connect-timeout": 30},
                    "rules": ["DOMAIN-SUFFIX,name.test,quic", "MATCH,DIRECT"],
                }
                tp = topo.start_tunproxy(yaml.safe_dump(config, sort_keys=False))
                answer = dns_lab.dig("web.name.test", "A")
                assert answer.status == "NOERROR" and answer.addresses, answer.output
                assert answer.addresses[0].startswith("198.1"), answer.output  # fake-ip
                assert dns_lab.curl(f"http://web.name.test:{WEB_PORT}/") == dns_lab.page
                tp.wait_for_log(rf"open #\d+ tcp .* -> web\.name\.test:{WEB_PORT} via quic")
                server.wait_for_log(
                    rf"tcp .* -> web\.name\.test:{WEB_PORT} \({re.escape(SERVER4)}\): open")
                assert "web.name.test" not in dns_lab.dnsmasq.log.lower()
            finally:
                server.kill()
        finally:
            dns_lab.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_stalled_reader_keeps_memory_bounded(lab: QuicLab) -> None:
    """A fast sender behind the proxy, an app that stops reading: QUIC grants credit on
    receipt, so without the relay's bound tunproxy would buffer the whole transfer."""
    import hashlib

    from tests.e2e_peer import payload_sha256

    tp = lab.start()
    size = 400 * 1024 * 1024
    with lab.connect() as sock:
        sock.sendall(f"SOURCE {size} 9\n".encode())
        first = sock.recv(65536)  # the transfer is flowing; now stop reading
        assert first
        start_rss = _rss_kib(tp.proc.pid)
        peak = start_rss
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            peak = max(peak, _rss_kib(tp.proc.pid))
            time.sleep(0.1)
        # Far less than the 400 MB on offer (what reached tunproxy is bounded by the
        # stack's send buffer, the 1 MiB hold limit and the socket buffers).
        assert peak - start_rss < 48 * 1024, f"RSS grew by {(peak - start_rss) // 1024} MiB"
        digest = hashlib.sha256(first)
        received = len(first)
        sock.settimeout(30)
        while chunk := sock.recv(1 << 20):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == payload_sha256(9, size)


def test_more_concurrent_flows_than_the_proxys_stream_limit(lab: QuicLab) -> None:
    """The server allows 100 concurrent streams (MAX_STREAMS): flow 101 waits for a slot
    instead of failing, and gets one as soon as an earlier flow ends."""
    tp = lab.start()
    socks = []
    try:
        for i in range(100):
            sock = lab.connect(timeout=20)
            socks.append(sock)
            sock.sendall(b"ECHO\n%d\n" % i)
            assert sock.recv(100) == b"%d\n" % i
        waiting = ThreadPoolExecutor(1).submit(lambda: lab.connect(timeout=20))
        time.sleep(0.5)  # flow 101 is parked on stream credit, not refused
        assert not waiting.done()
        socks.pop(0).close()  # a slot frees up
        extra = waiting.result(timeout=20)
        socks.append(extra)
        extra.sendall(b"ECHO\nlate\n")
        assert extra.recv(100) == b"late\n"
    finally:
        for sock in socks:
            sock.close()
    assert "internal-error" not in tp.log


def test_tcp_both_ways_under_2_percent_loss(lab: QuicLab) -> None:
    """2 % of the packets between client and server dropped each way (nftables): QUIC's
    loss recovery under every flow, the bytes still sha256-equal."""
    from tests.test_stack_e2e import _nft_drops, _nft_random_loss

    lab.start()
    _nft_random_loss(lab.topo.client, lab.topo.veth_client, one_in=50)
    size = BULK // 4
    upload(lab, SERVER4, size)  # type: ignore[arg-type]
    download(lab, SERVER4, size)  # type: ignore[arg-type]
    drops = _nft_drops(lab.topo.client)
    assert all(d > 0 for d in drops), f"the loss rules dropped nothing: {drops}"


def test_proxy_over_ipv6(lab: QuicLab) -> None:
    """The upstream is an IPv6 literal; it carries IPv4 and IPv6 destinations."""
    lab.server.kill()
    # A specific address: on a wildcard socket the kernel would answer from the address of
    # the route back (the veth's), which the client's connected socket does not accept.
    lab.server = lab.start_server(listen=f"[{PROXY6}]:{QUIC_PORT}")
    tp = lab.start(server=f"[{PROXY6}]:{QUIC_PORT}")
    download(lab, SERVER4, 1024 * 1024)  # type: ignore[arg-type]
    upload(lab, SERVER6, 1024 * 1024)  # type: ignore[arg-type]
    tp.wait_for_log(rf"QUIC connection to \[{re.escape(PROXY6)}\]:{QUIC_PORT} is up")
    lab.server.wait_for_log(rf"tcp \[{re.escape(CLIENT6)}\]:\d+ -> ")


def _download_within(lab: QuicLab, size: int, seed: int, deadline: float) -> int:
    """Download ``size`` bytes; how many arrived (sha256-checked when all) by ``deadline``."""
    import hashlib

    from tests.e2e_peer import payload_sha256

    received = 0
    digest = hashlib.sha256()
    with lab.connect() as sock:
        sock.sendall(f"SOURCE {size} {seed}\n".encode())
        while received < size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                break
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
    if received == size:
        assert digest.hexdigest() == payload_sha256(seed, size)
    return received


@pytest.mark.xfail(strict=False, reason=(
    "qh3 2.1 grants MAX_STREAM_DATA when its Rust core hands a stream's data to Python "
    "(QuicConnectionCore.next_event), and qh3 drains every event as each datagram is "
    "received: there is no per-stream read or credit API, so the only bound left is to "
    "stop reading the connection's UDP socket, which stalls every stream on it"))
def test_stalled_reader_does_not_stall_other_flows(lab: QuicLab) -> None:
    """Flow A's app stops reading while its sender goes on; flow B on the same QUIC
    connection still downloads 10 MB promptly."""
    tp = lab.start()
    stalled = lab.connect()
    try:
        stalled.sendall(f"SOURCE {400 * 1024 * 1024} 5\n".encode())
        stalled.settimeout(20)
        assert stalled.recv(65536)  # flowing; from now on nobody reads it (the sender
        # runs at link speed: tunproxy holds A past its 1 MiB limit within milliseconds)
        # 10 s: ample for 10 MB on an unblocked connection, and shorter than the 15 s
        # (half the 30 s idle timeout) after which tunproxy resets the stalled stream A
        # and B goes on (test_stalled_reader_is_reset_before_the_connection_dies).
        size = 10 * 1024 * 1024
        received = _download_within(lab, size, 13, time.monotonic() + 10)
        assert received == size, f"flow B got {received} of {size} bytes in 10 s"
        assert tp.log.count("QUIC connection to") == 1, tp.log[-3000:]  # the same connection
    finally:
        stalled.close()


def test_stalled_reader_is_reset_before_the_connection_dies(lab: QuicLab) -> None:
    """A held stream stops the connection's socket being read, so the connection would
    die of its idle timeout with every flow on it (measured: ~40 s with the default 30 s).
    A reader that takes nothing for half the idle timeout loses its stream instead; the
    connection and a flow waiting behind it go on."""
    tp = lab.topo.start_tunproxy(f"""\
tun:
  name: tp0
upstreams:
  quic:
    type: quic
    server: "{PROXY4}:{QUIC_PORT}"
    token: "{TOKEN}"
    sni: proxy.test
    ca: "{lab.ca}"
    idle-timeout: 4
    keepalive: 1
relay:
  connect-timeout: 30
rules:
  - MATCH,quic
""")
    size = 400 * 1024 * 1024
    with lab.connect() as stalled, ThreadPoolExecutor(1) as pool:
        stalled.sendall(f"SOURCE {size} 5\n".encode())
        stalled.settimeout(20)
        assert stalled.recv(65536)  # flowing; from now on nobody reads it
        other = pool.submit(_download_within, lab, 10 * 1024 * 1024, 13,
                            time.monotonic() + 60)
        tp.wait_for_log(r"WARNING .*stream \d+ reset: its reader took nothing for 2 s",
                        timeout=30)
        assert other.result(timeout=90) == 10 * 1024 * 1024
        received = 0
        deadline = time.monotonic() + 30
        with pytest.raises(ConnectionResetError):
            while time.monotonic() < deadline:
                chunk = stalled.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        assert received < size
    assert tp.log.count("QUIC connection to") == 1, tp.log[-3000:]  # never closed
