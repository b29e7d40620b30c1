"""Upstream groups: the sans-I/O choice (GroupState), and a fallback group over two real
SOCKS5 servers (microsocks) losing and regaining a member while tunproxy runs."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import PROXY4, SERVER4, Topology, topology
from tunproxy.outbounds.group import GroupState

# --- GroupState ---------------------------------------------------------------------------


def test_select_keeps_its_choice() -> None:
    s = GroupState("select", ["a", "b"])
    assert s.order("x") == ["a"]
    s.report("a", None)  # select does not fail over
    assert s.order("x") == ["a"]
    s.select("b")
    assert s.order("x") == ["b"]
    with pytest.raises(ValueError):
        s.select("c")


def test_fallback_takes_the_first_alive_and_comes_back() -> None:
    s = GroupState("fallback", ["a", "b", "c"])
    assert s.order("x") == ["a", "b", "c"]
    s.report("a", None)
    assert s.order("x") == ["b", "c", "a"]
    s.report("a", 0.05)
    assert s.order("x")[0] == "a"


def test_url_test_prefers_the_fastest_within_tolerance() -> None:
    s = GroupState("url-test", ["a", "b"], tolerance=50)
    s.report("a", 0.200)
    s.report("b", 0.100)
    assert s.order("x")[0] == "b"
    s.report("a", 0.080)  # faster, but by less than 50 ms: no switch
    assert s.order("x")[0] == "b"
    s.report("a", 0.010)
    assert s.order("x")[0] == "a"
    s.report("a", None)
    assert s.order("x") == ["b", "a"]


@pytest.mark.parametrize("kind", ["url-test", "fallback"])
def test_a_fixed_member_goes_first_while_alive_until_unfixed(kind: str) -> None:
    s = GroupState(kind, ["a", "b", "c"])
    s.report("a", 0.010)
    s.report("b", 0.300)
    s.report("c", 0.200)
    assert s.order("x")[0] == "a"
    s.fix("b")  # the slower one, or the later one: taken first all the same
    assert s.order("x") == ["b", "a", "c"]
    s.report("b", None)  # a fixed member that died: the group's own choice
    assert s.order("x")[0] == "a" and s.order("x")[-1] == "b"
    s.report("b", 0.300)
    assert s.order("x")[0] == "b"
    s.fix(None)
    assert s.order("x")[0] == "a"
    with pytest.raises(ValueError):
        s.fix("zzz")
    assert s.fixed is None


def test_load_balance_is_consistent() -> None:
    members = ["a", "b", "c", "d"]
    s = GroupState("load-balance", members)
    keys = [f"host{i}.example" for i in range(400)]
    before = {k: s.order(k)[0] for k in keys}
    assert before == {k: s.order(k)[0] for k in keys}  # stable
    assert set(before.values()) == set(members)  # spread over all
    s.report("c", None)
    after = {k: s.order(k)[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "c"}  # only c's destinations move
    assert "c" not in after.values()


# --- end to end: fallback over two microsocks ---------------------------------------------

A_OUT, B_OUT = "10.232.0.3", "10.232.0.4"  # where each proxy's connections come from
PEER_PORT, HTTP_PORT = 9300, 9380
INTERVAL = 2

# Answers each connection with the address it came from.
PEER = f"""
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVER4}", {PEER_PORT})); s.listen(64)
while True:
    c, (ip, _) = s.accept()
    c.sendall(ip.encode() + b"\\n"); c.close()
"""

CONFIG = f"""\
tun:
  device: tp0
proxies:
  - {{name: a, type: socks5, server: {PROXY4}, port: 1080}}
  - {{name: b, type: socks5, server: {PROXY4}, port: 1081}}
proxy-groups:
  - name: G
    type: fallback
    proxies: [a, b]
    url: http://{SERVER4}:{HTTP_PORT}/
    interval: {INTERVAL}
    timeout: 10000
rules:
  - MATCH,G
"""


class Lab:
    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        s = topo.server
        for addr in (A_OUT, B_OUT):
            s.run("ip", "addr", "add", f"{addr}/32", "dev", "lo")
        s.spawn(sys.executable, "-c", PEER)
        s.spawn(sys.executable, "-m", "http.server", "--bind", SERVER4, str(HTTP_PORT))
        self.a = self.start("a")
        self.b = self.start("b")
        s.wait_tcp_listening(PEER_PORT)
        s.wait_tcp_listening(HTTP_PORT)

    def start(self, which: str) -> object:
        port, out = (1080, A_OUT) if which == "a" else (1081, B_OUT)
        proc = self.topo.server.spawn("microsocks", "-i", PROXY4, "-p", str(port), "-b", out)
        self.topo.server.wait_tcp_listening(port)
        return proc

    def via(self) -> str | None:
        """Which proxy a new flow went through (its outgoing address), None if it failed."""
        try:
            with self.topo.client.connect(SERVER4, PEER_PORT, timeout=30) as sock:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    data += chunk
                return data.decode().strip() or None
        except OSError:
            return None

    def wait_via(self, expected: str, within: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < within:
            if self.via() == expected:
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"new flows did not go through {expected} within {within} s")


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


@pytest.mark.netns
def test_fallback_group_moves_to_the_live_member_and_back(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(CONFIG)
    assert lab.via() == A_OUT
    lab.a.kill()  # type: ignore[attr-defined]
    lab.a.wait(timeout=30)  # type: ignore[attr-defined]
    # A failed connect marks the member dead at once; the health check would within INTERVAL.
    lab.wait_via(B_OUT, within=INTERVAL + 60)
    assert lab.via() == B_OUT
    tp.wait_for_log(r"group G: member a is down")
    lab.a = lab.start("a")
    lab.wait_via(A_OUT, within=INTERVAL * 2 + 60)
    tp.wait_for_log(r"group G: member a is up")


# --- health checks in memory: DIRECT members to local HTTP/HTTPS servers --------------------


def _run_checks(url: str, serve_tls: bool, tmp_path: Path) -> dict[str, bool]:
    import asyncio
    import ssl

    from tests.test_dns_netns import DATA
    from tunproxy.outbounds.base import StreamProtocol, Target
    from tunproxy.outbounds.direct import DirectOutbound
    from tunproxy.outbounds.group import GroupConfig, GroupOutbound

    sys.path.insert(0, str(DATA))
    from dnstest_servers import make_certificate

    async def main() -> dict[str, bool]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

        ctx = None
        if serve_tls:
            cert, key = make_certificate(tmp_path, ["check.test"], ["127.0.0.1"])
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(cert, key)
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        # "dead": a port bound but not listening, so connections to it are refused.
        dead_sock = socket.socket()
        dead_sock.bind(("127.0.0.1", 0))
        dead_port = dead_sock.getsockname()[1]

        class Redirect(DirectOutbound):
            """DIRECT, but to a fixed port: one member reaches the server, one does not."""

            def __init__(self, name: str, to: int) -> None:
                super().__init__(name)
                self.to = to

            async def open_stream(
                self, target: Target, protocol: StreamProtocol, *, timeout: float
            ) -> asyncio.Transport:
                return await super().open_stream(Target(self.to, address="127.0.0.1"),
                                                 protocol, timeout=timeout)

        members = {"up": Redirect("up", port), "down": Redirect("down", dead_port)}
        group = GroupOutbound(GroupConfig("G", "url-test", ["down", "up"], url=url.format(port),
                                          timeout=5.0), members)
        await group.check_all()
        server.close()
        dead_sock.close()
        return dict(group.state.alive)

    return asyncio.run(main())


@pytest.mark.parametrize(("url", "tls"), [("http://127.0.0.1:{}/generate_204", False),
                                          ("https://check.test:{}/generate_204", True)])
def test_health_checks_over_http_and_https(url: str, tls: bool, tmp_path: Path) -> None:
    assert _run_checks(url, tls, tmp_path) == {"down": False, "up": True}


def test_groups_without_udp() -> None:
    from tunproxy.outbounds.group import GroupConfig, groups_without_udp

    groups = {
        "tcp-only": GroupConfig("tcp-only", "fallback", ["a", "b"]),
        "mixed": GroupConfig("mixed", "fallback", ["a", "u"]),
        "outer": GroupConfig("outer", "select", ["tcp-only", "REJECT"]),
        "direct": GroupConfig("direct", "select", ["DIRECT", "a"]),
    }
    assert groups_without_udp(groups, {"a", "b"}) == {"tcp-only", "outer"}
