"""The server side of a benchmark topology: iperf3, echo, SOCKS5 (dante, microsocks), MASQUE
(``tunproxy server``, h2o), dnsmasq.

Everything runs in the server namespace of a ``tests.netns.Topology`` and is started with
``Netns.spawn``, so ``Topology.close()`` ends it by pid. Readiness is observed (``ss`` shows
the port), never assumed after a sleep.

Addresses: the services listen on ``SERVER4`` (10.232.0.1). The SOCKS5 servers listen on a
separate address, ``SOCKS4`` (10.233.0.1), also on the server's loopback: tunproxy routes its
upstream servers' own addresses around the TUN, so a SOCKS5 server sharing an address with
iperf3 would silently turn the SOCKS5 measurements into baseline ones. The MASQUE servers
listen on ``SOCKS4`` too, on UDP.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from tests.netns import SERVER4, Netns, Topology

SOCKS4 = "10.233.0.1"
IPERF_PORT = 5201
ECHO_PORT = 7007
MICROSOCKS_PORT = 1080
DANTE_PORT = 1081
DNS_PORT = 53
QUIC_PORT = 4443  # tunproxy server
H2O_PORT = 4444  # h2o
QUIC_TOKEN = "bench"
H2O_BIN = Path(os.environ.get("TUNPROXY_H2O_BIN", "/var/cache/tunproxy-peers/h2o/bin"))
# dnsmasq answers every name under this zone locally: the DNS baseline.
DNS_ZONE = "bench.test"
DNS_ZONE_ANSWER = "10.9.9.9"

BENCH = Path(__file__).resolve().parent


def prepare_namespaces(topo: Topology) -> None:
    """Sysctls and addresses the benchmarks need, all inside the topology's namespaces.

    A run opens tens of thousands of short connections from the client namespace (the
    connections-per-second client, and in DIRECT mode tunproxy's own outbound sockets too);
    without TIME_WAIT reuse and a wide port range, later columns would measure port
    exhaustion instead of the path.
    """
    for ns in (topo.client, topo.server):
        ns.run("sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        ns.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
    topo.server.run("ip", "addr", "add", f"{SOCKS4}/32", "dev", "lo")


class Services:
    """Starts the server-side daemons on demand; each at most once per topology."""

    def __init__(self, topo: Topology, workdir: Path) -> None:
        self.topo = topo
        self.workdir = workdir
        self.server: Netns = topo.server
        self._iperf: subprocess.Popen[bytes] | None = None
        self._h2o: subprocess.Popen[bytes] | None = None
        self._started: set[str] = set()
        self.pids: dict[str, int] = {}  # the MASQUE servers' processes, for their CPU time

    def _once(self, name: str) -> bool:
        if name in self._started:
            return False
        self._started.add(name)
        return True

    def iperf(self) -> None:
        if self._iperf is None or self._iperf.poll() is not None:
            self._iperf = self.server.spawn("iperf3", "-s", "-B", SERVER4, "-p", str(IPERF_PORT))
            self.server.wait_tcp_listening(IPERF_PORT)

    def iperf_started(self) -> bool:
        return self._iperf is not None

    def restart_iperf(self) -> None:
        """A client that died mid-test can leave iperf3's single-test server busy; start afresh."""
        if self._iperf is not None and self._iperf.poll() is None:
            self._iperf.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._iperf.wait(timeout=10)
        self._iperf = None
        # The old listener is gone once its process is; wait_tcp_listening sees the new one.
        self.iperf()

    def echo(self) -> None:
        if self._once("echo"):
            self.server.spawn(
                sys.executable, str(BENCH / "echo_server.py"), "--host", SERVER4,
                "--tcp-port", str(ECHO_PORT), "--udp-port", str(ECHO_PORT),
            )
            self.server.wait_tcp_listening(ECHO_PORT)
            self.server.wait_udp_bound(ECHO_PORT)

    def microsocks(self) -> None:
        if self._once("microsocks"):
            self.server.spawn("microsocks", "-i", SOCKS4, "-p", str(MICROSOCKS_PORT))
            self.server.wait_tcp_listening(MICROSOCKS_PORT)

    def dante(self) -> None:
        """danted for UDP ASSOCIATE (microsocks has no UDP)."""
        if not self._once("dante"):
            return
        conf = self.workdir / "danted.conf"
        conf.write_text(
            f"logoutput: {self.workdir / 'danted.log'}\n"
            f"internal: {SOCKS4} port = {DANTE_PORT}\n"
            f"external: {SERVER4}\n"
            "clientmethod: none\n"
            "socksmethod: none\n"
            "user.privileged: root\n"
            "user.unprivileged: root\n"
            "client pass { from: 0.0.0.0/0 to: 0.0.0.0/0 }\n"
            "socks pass {\n"
            "  from: 0.0.0.0/0 to: 0.0.0.0/0\n"
            "  command: connect udpassociate udpreply\n"
            "  protocol: tcp udp\n"
            "}\n"
        )
        self.server.spawn("danted", "-f", str(conf), "-p", str(self.workdir / "danted.pid"))
        self.server.wait_tcp_listening(DANTE_PORT)

    def proxychains_config(self, port: int) -> Path:
        """A proxychains4 config that sends a program's TCP connections through SOCKS4:port
        (strict: never around it), for iperf3 in the "SOCKS5 only" control column."""
        conf = self.workdir / f"proxychains-{port}.conf"
        conf.write_text(f"strict_chain\nquiet_mode\n[ProxyList]\nsocks5 {SOCKS4} {port}\n")
        return conf

    def masque_ca(self) -> Path:
        """The CA of the certificate both MASQUE servers present (made once per topology)."""
        from tests.masque_peer import make_cert

        ca = self.workdir / "proxy.test-ca.crt"
        if not ca.exists():
            make_cert(self.workdir, "proxy.test", [SOCKS4])
        return ca

    def masque_server(self, datagram_size: int = 1200) -> None:
        """``tunproxy server`` on SOCKS4:QUIC_PORT, allowed to reach SERVER4 (its own address),
        sending QUIC packets of up to ``datagram_size`` bytes."""
        if not self._once("masque"):
            return
        self.masque_ca()
        log = (self.workdir / "tunproxy-server.log").open("ab")
        self.pids["masque"] = self.server.spawn(
            sys.executable, "-m", "tunproxy", "--log-level", "warning", "server",
            "--listen", f"{SOCKS4}:{QUIC_PORT}", "--cert", str(self.workdir / "proxy.test.crt"),
            "--key", str(self.workdir / "proxy.test.key"), "--token", QUIC_TOKEN,
            "--allow", f"{SERVER4}/32", "--max-datagram-size", str(datagram_size),
            stderr=log, cwd=str(BENCH.parent),
        ).pid
        self.server.wait_udp_bound(QUIC_PORT)

    def h2o(self) -> bool:
        """h2o as a MASQUE server on SOCKS4:H2O_PORT; False when it is not built."""
        if not (H2O_BIN / "h2o").exists():
            return False
        if not self._once("h2o"):
            return True
        self.masque_ca()
        conf = self.workdir / "h2o.conf"
        conf.write_text(
            f"listen:\n  host: {SOCKS4}\n  port: {H2O_PORT}\n  type: quic\n  ssl:\n"
            f"    key-file: {self.workdir / 'proxy.test.key'}\n"
            f"    certificate-file: {self.workdir / 'proxy.test.crt'}\n"
            "hosts:\n  default:\n    paths:\n      \"/\":\n        proxy.connect:\n"
            "          - \"+*\"\n      \"/.well-known/masque/udp\":\n"
            "        proxy.connect-udp:\n          - \"+*\"\n"
        )
        self._spawn_h2o()
        return True

    def _spawn_h2o(self) -> None:
        log = (self.workdir / "h2o.log").open("ab")
        self._h2o = self.server.spawn(str(H2O_BIN / "h2o"), "-c", str(self.workdir / "h2o.conf"),
                                      stdout=log, stderr=subprocess.STDOUT)
        self.pids["h2o"] = self._h2o.pid
        self.server.wait_udp_bound(H2O_PORT)

    def h2o_gone(self) -> str | None:
        """Why h2o is no longer running (its last log line of note), or None while it runs.

        h2o 2.3.0-DEV aborts on an assertion in its HTTP/3 CONNECT code
        (``proceed_request_streaming: Assertion `stream->req_body != NULL'``, in
        lib/http3/server.c) when a tunnel's target closes while h2o's write to it is still
        pending and nothing is queued toward the client: the end of every iperf3 upload
        risks it (the iperf3 server closes its data socket with bytes still in flight).
        Reading the code: the connect handler's close path (close_readwrite, run again
        from a zero timer) calls the request's proceed callback after the HTTP/3 stream
        went to CLOSE_WAIT from inside the generator and released its body buffer; nothing
        the client sends is involved. See README, "The QUIC upstream".
        """
        if self._h2o is None or self._h2o.poll() is None:
            return None
        text = (self.workdir / "h2o.log").read_text(errors="replace")
        lines = [line for line in text.splitlines() if "Assertion" in line] or [
            line for line in text.splitlines() if "fatal signal" in line]
        return f"h2o exited (rc={self._h2o.returncode}): " + (
            lines[-1].strip() if lines else "see h2o.log")

    def restart_h2o(self) -> None:
        """Start h2o again after it died (a QUIC client then reconnects on its next flow)."""
        if self._h2o is not None and self._h2o.poll() is None:
            return
        self._spawn_h2o()

    def dnsmasq(self) -> None:
        if self._once("dnsmasq"):
            self.server.spawn(
                "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", f"--listen-address={SERVER4}", "--bind-interfaces",
                f"--port={DNS_PORT}", f"--address=/{DNS_ZONE}/{DNS_ZONE_ANSWER}",
                f"--pid-file={self.workdir / 'dnsmasq.pid'}", "--user=root", "--group=root",
            )
            self.server.wait_udp_bound(DNS_PORT)
