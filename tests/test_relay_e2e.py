"""Real traffic through tunproxy: a client namespace whose default route is the TUN,
real servers (Python peers, Debian's dante) in the server namespace.

Sizes: ``TUNPROXY_E2E_MB`` (default 100) megabytes each way for the bulk tests.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.e2e_peer import payload_chunks, payload_sha256
from tests.netns import (
    GATEWAY4,
    PROXY4,
    PROXY6,
    REPO,
    SERVER4,
    SERVER6,
    Topology,
    run,
    topology,
)

pytestmark = pytest.mark.netns

BULK = int(os.environ.get("TUNPROXY_E2E_MB", "100")) * 1024 * 1024
TCP_PORT = 7000
UDP_PORT = 7001
CLOSED_PORT = 7009
SOCKS_PORT = 1080

DANTE_CONF = """\
logoutput: stderr
internal: {internal} port = {port}
external: {external}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }}
"""
# Listening on IPv4 and IPv6, going out on either (danted.conf(5): 0/0 is any address of
# either family).
DANTE_CONF_DUAL = """\
logoutput: stderr
internal: {proxy4} port = {port}
internal: {proxy6} port = {port}
external: {server4}
external: {server6}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0/0 to: 0/0 }}
socks pass {{ from: 0/0 to: 0/0 command: connect }}
"""


def config(target: str = "DIRECT", extra_rules: str = "", mtu: int = 1500,
           offload: bool = True, faults: str = "", sniff: bool = False,
           relay_extra: str = "", proxy: str = f"{PROXY4}:{SOCKS_PORT}") -> str:
    return f"""\
tun:
  name: tp0
  mtu: {mtu}
  offload: {"true" if offload else "false"}
upstreams:
  socks: {{type: socks5, server: "{proxy}"}}
relay:
  # Long: an upstream connect on a loaded machine can take seconds. Tests that check a
  # prompt refusal bound it well below this, so a refusal sent only at the timeout fails.
  connect-timeout: 30
  sniff: {"true" if sniff else "false"}
{relay_extra}{faults}
rules:
{extra_rules}  - MATCH,{target}
"""


class Lab:
    """A topology with the test servers running in the server namespace."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        peer = str(REPO / "tests" / "e2e_peer.py")
        for host in (SERVER4, SERVER6):
            topo.server.spawn(sys.executable, peer, "tcp", host, str(TCP_PORT))
            topo.server.spawn(sys.executable, peer, "udp", host, str(UDP_PORT))
        topo.server.spawn(sys.executable, peer, "tcp", GATEWAY4, str(TCP_PORT))
        self.dante: object | None = None
        self.start_dante()
        topo.server.wait_tcp_listening(TCP_PORT)
        topo.server.wait_udp_bound(UDP_PORT)

    def start_dante(self, dual_stack: bool = False) -> None:
        conf = self.topo.workdir / "danted.conf"
        if dual_stack:
            conf.write_text(DANTE_CONF_DUAL.format(proxy4=PROXY4, proxy6=PROXY6, port=SOCKS_PORT,
                                                   server4=SERVER4, server6=SERVER6))  # fmt: skip
        else:
            conf.write_text(DANTE_CONF.format(internal=PROXY4, port=SOCKS_PORT, external=SERVER4))
        log = (self.topo.workdir / "danted.log").open("ab")
        self.dante = self.topo.server.spawn(
            "/usr/sbin/danted", "-f", str(conf), "-N", "1",
            "-p", str(self.topo.workdir / "danted.pid"), stderr=log,
        )
        self.topo.server.wait_tcp_listening(SOCKS_PORT)

    def stop_dante(self) -> None:
        proc = self.dante
        assert proc is not None
        proc.kill()  # type: ignore[attr-defined]
        proc.wait(timeout=10)  # type: ignore[attr-defined]
        # danted forks workers that retitle themselves: find them by name in this namespace.
        out = run("ip", "netns", "pids", self.topo.server.name, check=False)
        for pid in out.stdout.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "danted":
                    os.kill(int(pid), signal.SIGKILL)

    def connect(self, host: str = SERVER4, port: int = TCP_PORT, timeout: float = 20.0
                ) -> socket.socket:
        return self.topo.client.connect(host, port, timeout=timeout)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


def upload(lab: Lab, host: str, size: int, seed: int = 7) -> None:
    with lab.connect(host) as sock:
        sock.sendall(b"SINK\n")
        for chunk in payload_chunks(seed, size):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.makefile("rb").readline().strip().decode()
    assert answer == payload_sha256(seed, size)


def download(lab: Lab, host: str, size: int, seed: int = 11) -> None:
    with lab.connect(host) as sock:
        sock.sendall(f"SOURCE {size} {seed}\n".encode())
        digest = hashlib.sha256()
        received = 0
        while data := sock.recv(1 << 20):
            digest.update(data)
            received += len(data)
    assert received == size
    assert digest.hexdigest() == payload_sha256(seed, size)


def test_tcp_direct_both_ways(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT"))
    upload(lab, SERVER4, BULK)
    download(lab, SERVER4, BULK)
    tp.wait_for_log("via DIRECT: closed-by-client")  # before stopping: see wait_for_count
    tp.stop()
    # The download's super-packets went through the io_uring batch writer, where the
    # kernel has one (the same kernel this test runs on).
    assert f"writes {tun_write_method()}" in tp.log
    assert "writing to the TUN failed" not in tp.log


def tun_write_method() -> str:
    from tunproxy.uring import BatchWriter

    try:
        BatchWriter(0, 2).close()
    except OSError:
        return "write"
    return "io_uring"


def test_tcp_direct_ipv6(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT"))
    upload(lab, SERVER6, BULK // 4)
    download(lab, SERVER6, BULK // 4)


def test_tcp_through_socks5_both_ways(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("socks"))
    upload(lab, SERVER4, BULK)
    download(lab, SERVER4, BULK)
    tp.stop()
    assert "via socks" in tp.log


def test_socks5_proxy_over_ipv6_carries_ipv6_and_ipv4_destinations(lab: Lab) -> None:
    """The proxy's only address in the config is IPv6; IPv6 destinations go as ATYP 4."""
    lab.stop_dante()
    lab.start_dante(dual_stack=True)
    tp = lab.topo.start_tunproxy(config("socks", proxy=f"[{PROXY6}]:{SOCKS_PORT}"))
    upload(lab, SERVER6, BULK // 8)
    download(lab, SERVER6, BULK // 8)
    download(lab, SERVER4, BULK // 8)
    tp.wait_for_count("via socks: closed-by-", 3)
    tp.stop()


def test_tcp_without_offloads(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", offload=False))
    upload(lab, SERVER4, BULK // 4)
    download(lab, SERVER4, BULK // 4)


def read_to_eof(sock: socket.socket) -> bytes:
    received = bytearray()
    while chunk := sock.recv(1 << 20):
        received += chunk
    return bytes(received)


def echo_after_half_close(lab: Lab, data: bytes) -> None:
    """Send ``data`` to the echo server, FIN, and read the echo to its end.

    The reader runs from the start: megabytes are more than the buffers on the
    path are sure to hold (a server's send buffer stays small while loss keeps
    its window small), and a client that read only after sending would stall
    on its own full receive window.
    """
    with lab.connect() as sock, ThreadPoolExecutor(1) as pool:
        reading = pool.submit(read_to_eof, sock)
        sock.sendall(b"ECHO\n" + data)
        sock.shutdown(socket.SHUT_WR)  # our side is done; the server keeps sending
        received = reading.result()
    assert received == data


@pytest.mark.parametrize("target", ["DIRECT", "socks"])
def test_half_close_client_first(lab: Lab, target: str) -> None:
    lab.topo.start_tunproxy(config(target))
    echo_after_half_close(lab, b"".join(payload_chunks(3, 3 * 1024 * 1024)))


def test_half_close_server_first(lab: Lab) -> None:
    # The server sends everything and FINs while our side is still open and sending.
    lab.topo.start_tunproxy(config("DIRECT"))
    with lab.connect() as sock:
        sock.sendall(b"SOURCE 100000 5\n")
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
        sock.sendall(b"still here after your FIN\n")  # half-open: allowed
    assert len(received) == 100000


def test_many_concurrent_flows(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT"))

    def one(i: int) -> None:
        echo_after_half_close(lab, b"".join(payload_chunks(i, 64 * 1024)))

    with ThreadPoolExecutor(max_workers=50) as pool:
        list(pool.map(one, range(200)))
    tp.wait_for_count("closed-by-client", 200)
    tp.stop()


def udp_echo(sock: socket.socket, message: bytes, attempts: int = 3, wait: float = 10.0) -> None:
    """Send ``message`` to a UDP echo server on connected ``sock`` and see it come back.

    UDP may lose a datagram (a full socket buffer on a loaded machine), and an application
    sends again: so do we, ``attempts`` times, and skip late echoes of earlier ones. A size
    that never gets through still fails."""
    sock.settimeout(wait)
    for _ in range(attempts):
        sock.send(message)
        deadline = time.monotonic() + wait
        with contextlib.suppress(TimeoutError):
            while time.monotonic() < deadline:
                if sock.recv(65535) == message:
                    return
    raise AssertionError(f"no echo of a {len(message)}-byte datagram in {attempts} tries")


def _udp_round_trip(lab: Lab, host: str, count: int = 20) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = lab.topo.client.socket(family, socket.SOCK_DGRAM)
    with sock:
        sock.connect((host, UDP_PORT))
        for i in range(count):
            udp_echo(sock, f"datagram {i} ".encode() * (i + 1))


@pytest.mark.parametrize("target", ["DIRECT", "socks"])
def test_udp_request_response(lab: Lab, target: str) -> None:
    tp = lab.topo.start_tunproxy(config(target))
    _udp_round_trip(lab, SERVER4)
    tp.wait_for_log(rf"open #\d+ udp .* via {target}")


def test_udp_direct_ipv6(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT"))
    _udp_round_trip(lab, SERVER6)


def test_reject_is_connection_refused_within_a_second(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", extra_rules=f"  - DST-PORT,{TCP_PORT},REJECT\n"))
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        lab.connect()
    assert time.monotonic() - start < 10.0  # at once; a dropped SYN would wait 20 s


def test_drop_makes_the_client_time_out(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", extra_rules=f"  - DST-PORT,{TCP_PORT},DROP\n"))
    with pytest.raises(TimeoutError):
        lab.connect(timeout=1.5)


def test_refused_destination_looks_refused(lab: Lab) -> None:
    # Connect before accept: the app sees exactly what it would see without tunproxy.
    tp = lab.topo.start_tunproxy(config("DIRECT"))
    start = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        lab.connect(port=CLOSED_PORT)
    assert time.monotonic() - start < 10.0  # the upstream's refusal, not the 30 s timeout
    tp.wait_for_log(r"via DIRECT: refused")


def test_dead_socks5_fails_promptly(lab: Lab) -> None:
    lab.stop_dante()
    tp = lab.topo.start_tunproxy(config("socks"))
    start = time.monotonic()
    with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
        lab.connect()
    assert time.monotonic() - start < 10.0  # not the 30 s connect timeout
    tp.wait_for_log(r"via socks: proxy-error")


def test_socks5_dying_mid_transfer_resets_then_recovers(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("socks"))
    sock = lab.connect()
    sock.settimeout(30)
    sock.sendall(b"ECHO\n" + b"x" * 65536)
    assert sock.recv(65536)  # the echo is flowing through dante
    lab.stop_dante()
    # The dead proxy's kernel answers what we keep sending with RST; tunproxy must pass
    # the reset on to the app rather than leave it half-open.
    deadline = time.monotonic() + 30
    with pytest.raises((ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        while time.monotonic() < deadline:
            sock.sendall(b"y" * 65536)
            with contextlib.suppress(TimeoutError, BlockingIOError):
                sock.recv(1 << 20, socket.MSG_DONTWAIT)
    sock.close()
    tp.wait_for_log(r"via socks: upstream-(reset|closed)")
    lab.start_dante()
    download(lab, SERVER4, 1024 * 1024)


def test_flows_from_other_threads_do_not_interfere(lab: Lab) -> None:
    # Bulk both ways at once on two flows: each direction's backpressure is per flow.
    lab.topo.start_tunproxy(config("DIRECT"))
    errors: list[BaseException] = []

    def guard(fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=guard, args=(upload, lab, SERVER4, BULK // 4)),
        threading.Thread(target=guard, args=(download, lab, SERVER4, BULK // 4)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors


def test_the_gateway_is_not_tunnelled(lab: Lab) -> None:
    # Connected subnets keep working through the main table (suppress_prefixlength 0).
    tp = lab.topo.start_tunproxy(config("REJECT"))
    with lab.connect(GATEWAY4) as sock:
        sock.sendall(b"ECHO\nhello")
        assert sock.recv(5) == b"hello"
    with pytest.raises(ConnectionRefusedError):
        lab.connect(SERVER4)  # while everything else is tunnelled (and rejected)
    assert f"-> {GATEWAY4}" not in tp.log


def _client_hello(server_name: str) -> bytes:
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _outcome(lab: Lab, first_bytes: bytes) -> str:
    """'reset' if tunproxy refused the flow after sniffing, 'relayed' if the server answered."""
    with lab.connect() as sock:
        try:
            sock.sendall(first_bytes)
            sock.shutdown(socket.SHUT_WR)
            # The peer finds no command, reads to our FIN, and closes: a clean EOF.
            while sock.recv(65536):
                pass
        except OSError as exc:
            # The RST may land before our shutdown (ENOTCONN) or during the read.
            if exc.errno in (errno.ECONNRESET, errno.ENOTCONN, errno.EPIPE):
                return "reset"
            raise
    return "relayed"


SNIFF_RULES = "  - DOMAIN-SUFFIX,blocked.test,REJECT\n"


def test_tls_sni_sniffing_routes_by_domain(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT", extra_rules=SNIFF_RULES, sniff=True))
    assert _outcome(lab, _client_hello("www.blocked.test") + b"\n") == "reset"
    assert _outcome(lab, _client_hello("www.allowed.test") + b"\n") == "relayed"
    tp.wait_for_log(r"-> www\.blocked\.test:7000 via REJECT")
    tp.wait_for_log(r"-> www\.allowed\.test:7000 via DIRECT")


def test_http_host_sniffing_routes_by_domain(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", extra_rules=SNIFF_RULES, sniff=True))
    request = b"GET / HTTP/1.1\r\nHost: web.blocked.test\r\n\r\n"
    assert _outcome(lab, request) == "reset"
    assert _outcome(lab, request.replace(b"blocked", b"allowed")) == "relayed"


def test_without_sniffing_the_domain_is_unknown(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", extra_rules=SNIFF_RULES, sniff=False))
    assert _outcome(lab, _client_hello("www.blocked.test") + b"\n") == "relayed"


def test_sniffing_does_not_break_a_silent_client(lab: Lab) -> None:
    # The client says nothing at first (as with server-speaks-first protocols): after the
    # bounded wait the flow is routed without a domain and works.
    tp = lab.topo.start_tunproxy(config("DIRECT", sniff=True))
    with lab.connect() as sock:
        tp.wait_for_log(r"open #\d+ tcp .* via DIRECT")  # routed while we were silent
        sock.sendall(b"ECHO\nhello")
        assert sock.recv(5) == b"hello"


def test_idle_tcp_flows_time_out(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT", relay_extra="  tcp-idle-timeout: 1\n"))
    with lab.connect() as sock:
        sock.sendall(b"ECHO\nhi")
        assert sock.recv(2) == b"hi"
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)  # blocks until tunproxy gives up on the idle flow
        # Not before the idle timeout; after it, as soon as a loaded machine gets to it.
        assert 1.0 <= time.monotonic() - start < 15.0
    tp.wait_for_log(r"via DIRECT: idle-timeout")


def test_counters_are_reported_at_exit(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT"))
    _udp_round_trip(lab, SERVER4, count=3)
    tp.stop()
    counters = tp.wait_for_log(r"stack counters: ")
    packets_in = re.search(r"packets\.in (\d+)", counters)
    datagrams_out = re.search(r"udp\.datagrams_out (\d+)", counters)
    assert packets_in is not None and int(packets_in.group(1)) >= 3, counters
    assert datagrams_out is not None and int(datagrams_out.group(1)) == 3, counters
    assert re.search(r"flows ended: .*shutdown 1", tp.log)
