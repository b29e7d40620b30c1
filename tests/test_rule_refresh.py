"""``type: http`` rule sets while running: fetched through an outbound (as the rules choose),
plain or over TLS, chunked or not, redirects followed; a good answer replaces the cached copy
and reloads, a bad one keeps it."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from pathlib import Path

import pytest

from tests.test_dns_netns import DATA
from tunproxy.outbounds.base import Outbound, Target
from tunproxy.outbounds.direct import DirectOutbound
from tunproxy.ruleremote import Refresher, RemoteRuleSet, fetch, parse_http_response

RULES = b"payload:\n  - '+.fresh.example'\n"


class Server:
    """A tiny HTTP server: path -> (status, headers, body); records the outbound's targets."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, str, bytes]] = {}
        self.requests: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ")[1].decode()
        self.requests.append(path)
        status, extra, body = self.routes.get(path, (404, "", b""))
        if "chunked" in extra:
            payload = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:5], body[5:])) + \
                b"0\r\n\r\n"
        else:
            payload = body
            extra += f"Content-Length: {len(body)}\r\n"
        writer.write(f"HTTP/1.1 {status} X\r\n{extra}Connection: close\r\n\r\n".encode() + payload)
        await writer.drain()
        writer.close()


def local(port: int) -> tuple[list[Target], object]:
    seen: list[Target] = []
    direct = DirectOutbound()

    class ToLocal(Outbound):
        name = "local"

        async def open_stream(self, target, protocol, *, timeout):  # type: ignore[no-untyped-def]
            seen.append(target)
            return await direct.open_stream(Target(port, address="127.0.0.1"), protocol,
                                            timeout=timeout)

        async def open_datagram(self, target, receiver, *, timeout):  # type: ignore[no-untyped-def]
            raise AssertionError

    out = ToLocal()
    return seen, (lambda network, target: out)


def test_fetch_plain_chunked_redirect_and_tls(tmp_path: Path) -> None:
    sys.path.insert(0, str(DATA))
    from dnstest_servers import make_certificate

    cert, key = make_certificate(tmp_path, ["rules.test"], ["127.0.0.1"])

    async def main() -> None:
        srv = Server()
        srv.routes = {
            "/a.yaml": (200, "", RULES),
            "/c.yaml": (200, "Transfer-Encoding: chunked\r\n", RULES),
            "/old": (302, "Location: /a.yaml\r\n", b""),
            "/broken": (500, "", b"no"),
        }
        plain = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        secure = await asyncio.start_server(srv.handle, "127.0.0.1", 0, ssl=server_ctx)
        seen, outbound_for = local(plain.sockets[0].getsockname()[1])
        assert await fetch("http://rules.test/a.yaml", outbound_for) == RULES
        assert seen[-1] == Target(80, domain="rules.test")
        assert await fetch("http://rules.test/c.yaml", outbound_for) == RULES
        assert await fetch("http://rules.test/old", outbound_for) == RULES
        with pytest.raises(ValueError, match="HTTP 500"):
            await fetch("http://rules.test/broken", outbound_for)
        seen, outbound_for = local(secure.sockets[0].getsockname()[1])
        trust = ssl.create_default_context(cafile=cert)
        assert await fetch("https://rules.test/a.yaml", outbound_for, tls=trust) == RULES
        assert seen[-1] == Target(443, domain="rules.test")
        with pytest.raises(ssl.SSLError):  # not trusted by the system's roots
            await fetch("https://rules.test/a.yaml", outbound_for)
        plain.close()
        secure.close()

    asyncio.run(main())


def test_refresher_replaces_the_cache_and_reloads_only_on_good_answers(tmp_path: Path) -> None:
    async def main() -> None:
        srv = Server()
        srv.routes = {"/r.yaml": (200, "", RULES)}
        plain = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
        _, outbound_for = local(plain.sockets[0].getsockname()[1])
        cached = tmp_path / "providers" / "r"
        cached.parent.mkdir()
        cached.write_bytes(b"payload:\n  - '+.stale.example'\n")
        os.utime(cached, (1, 1))  # stale: due at once
        reloads: list[int] = []
        updated = asyncio.Event()

        def reload() -> None:
            reloads.append(1)
            updated.set()

        rs = RemoteRuleSet("r", "http://rules.test/r.yaml", cached, 3600, "domain", None)
        refresher = Refresher([rs], outbound_for, reload)
        refresher.start()
        await asyncio.wait_for(updated.wait(), 10)
        assert cached.read_bytes() == RULES and reloads == [1]
        await refresher.aclose()
        # A broken answer (not a rule set) keeps the cached copy and does not reload.
        srv.routes = {"/r.yaml": (200, "", b"payload:\n  - 'not a domain'\n")}
        os.utime(cached, (1, 1))
        refresher = Refresher([rs], outbound_for, reload)
        refresher.start()
        deadline = asyncio.get_running_loop().time() + 30
        while len(srv.requests) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        await refresher.aclose()
        assert len(srv.requests) == 2
        assert cached.read_bytes() == RULES and reloads == [1]
        plain.close()

    asyncio.run(main())


def test_parse_http_response_errors() -> None:
    with pytest.raises(ValueError, match="status line"):
        parse_http_response(b"SSH-2.0\r\n\r\n")
    with pytest.raises(ValueError, match="cut short"):
        parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")


# --- end to end: the refresh goes where the rules send it ---------------------------------

HTTP_PORT = 9480
VIA = "10.232.0.3"  # the SOCKS5 server's outgoing address


@pytest.mark.netns
def test_refresh_is_downloaded_through_the_rules(tmp_path: Path) -> None:
    from tests.netns import PROXY4, SERVER4, topology

    site = tmp_path / "site"
    site.mkdir()
    (site / "r.yaml").write_bytes(RULES)
    log_path = tmp_path / "http.log"
    config = f"""\
tun: {{name: tp0}}
upstreams:
  s: {{type: socks5, server: "{PROXY4}:1080", udp: false}}
rule-sets:
  r: {{type: http, behavior: domain, url: "http://{SERVER4}:{HTTP_PORT}/r.yaml", interval: 2}}
rules:
  - RULE-SET,r,REJECT
  - IP-CIDR,{SERVER4}/32,s,no-resolve
  - MATCH,DIRECT
"""
    with topology(tmp_path) as topo, log_path.open("wb") as log:
        s = topo.server
        s.run("ip", "addr", "add", f"{VIA}/32", "dev", "lo")
        s.spawn(sys.executable, "-m", "http.server", "--bind", SERVER4, "--directory",
                str(site), str(HTTP_PORT), stderr=log)
        s.spawn("microsocks", "-i", PROXY4, "-p", "1080", "-b", VIA)
        s.wait_tcp_listening(HTTP_PORT)
        s.wait_tcp_listening(1080)
        tp = topo.start_tunproxy(config)
        tp.wait_for_log(r"rule set r: refreshed from", timeout=30)
        tp.wait_for_log(r"reloaded .*tunproxy.yaml", timeout=30)
        assert (tmp_path / "providers" / "r").read_bytes() == RULES
    requests = [ln for ln in log_path.read_text().splitlines() if "GET /r.yaml" in ln]
    # The first download at start goes directly (no routes yet); the refresh through s.
    assert requests[0].startswith("10.231.0.1 "), requests
    assert any(r.startswith(f"{VIA} ") for r in requests[1:]), requests
