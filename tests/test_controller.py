"""The controller API's handlers, over a real aiohttp server on loopback and a flow table
filled by hand (no root, no TUN): mihomo's shapes and types, auth, closing flows, the
WebSocket pushes, bad requests, and a client that never reads."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

import rules
from tunproxy.config import parse_config
from tunproxy.controller import server as server_module
from tunproxy.controller.server import Controller
from tunproxy.flows import FlowRecord, FlowTable

RULES = """\
upstreams:
  proxy: {type: socks5, server: "192.0.2.9:1080"}
rule-sets:
  ads: {path: ads.txt, behavior: domain, format: text}
rules:
  - DOMAIN-SUFFIX,example.com,proxy
  - RULE-SET,ads,REJECT
  - IP-CIDR,10.0.0.0/8,DIRECT,no-resolve
  - MATCH,DIRECT
"""
SECRET = "s3cret"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Setup:
    def __init__(self, tmp: Path) -> None:
        (tmp / "ads.txt").write_text("ads.example\n+.tracker.example\n")
        (tmp / "rules.yaml").write_text(RULES)
        ui = tmp / "ui"
        ui.mkdir()
        (ui / "index.html").write_text("<html>dashboard</html>")
        (ui / "app.js").write_text("console.log(1)")
        self.config = parse_config(RULES, tmp / "rules.yaml")
        self.table = FlowTable()
        self.closed: list[int] = []
        self.table.closer = self._close
        self.controller = Controller(
            self.table, secret=SECRET, ui=str(ui), ruleset=lambda: self.config.ruleset,
            outbounds=lambda: {"DIRECT": 1, "REJECT": 2, "proxy": 3},
            config=lambda: self.config,
        )
        self.base = ""

    def _close(self, flow_id: int, reason: str) -> bool:
        self.closed.append(flow_id)
        self.table.ended(self.table.live[flow_id], reason)
        return True

    def add(self, flow_id: int, domain: str = "www.example.com") -> FlowRecord:
        meta = rules.FlowMeta("tcp", "10.0.0.1", 40000 + flow_id, None, 443, domain=domain)
        r = FlowRecord(id=flow_id, network="tcp", src="10.0.0.1", src_port=40000 + flow_id,
                       dst="198.18.0.5", dst_port=443, domain=domain, process="curl",
                       pid=1234, uid=1000, exe="/usr/bin/curl", unit="session-2.scope")
        self.table.track(r)
        r.attribution = "process"
        r.set_verdict(self.config.ruleset.match(meta))
        r.outbound = r.verdict.target
        return r


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


AUTH = {"Authorization": f"Bearer {SECRET}"}


def run(tmp_path: Path, body: Callable[[Setup, aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        setup = Setup(tmp_path)
        port = _port()
        await setup.controller.start("127.0.0.1", port)
        setup.base = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession(base_url=setup.base) as session:
                await asyncio.wait_for(body(setup, session), 60)
        finally:
            await setup.controller.aclose()

    asyncio.run(main())


async def get_json(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(path, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


def test_version_configs_rules_proxies_providers(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        assert (await get_json(session, "/version"))["version"].startswith("tunproxy ")
        configs = await get_json(session, "/configs")
        assert configs["mode"] == "rule" and configs["tun"]["device"] == "tunproxy0"
        assert isinstance(configs["port"], int) and configs["allow-lan"] is False
        got = (await get_json(session, "/rules"))["rules"]
        assert [(r["type"], r["payload"], r["proxy"]) for r in got] == [
            ("DomainSuffix", "example.com", "proxy"), ("RuleSet", "ads", "REJECT"),
            ("IPCIDR", "10.0.0.0/8", "DIRECT"), ("Match", "", "DIRECT")]
        assert [r["size"] for r in got] == [-1, 2, -1, -1]
        assert got[0]["line"] == 6 and got[0]["file"].endswith("rules.yaml")
        proxies = (await get_json(session, "/proxies"))["proxies"]
        assert {k: v["type"] for k, v in proxies.items()} == {
            "DIRECT": "Direct", "REJECT": "Reject", "proxy": "Socks5", "GLOBAL": "Selector"}
        assert proxies["GLOBAL"]["all"] == ["DIRECT", "REJECT", "proxy"]
        assert (await get_json(session, "/proxies/proxy"))["name"] == "proxy"
        async with session.get("/proxies/nope", headers=AUTH) as resp:
            assert resp.status == 404 and (await resp.json())["message"]
        providers = (await get_json(session, "/providers/proxies"))["providers"]
        assert [p["name"] for p in providers["default"]["proxies"]] == [
            "DIRECT", "REJECT", "proxy"]
        sets = (await get_json(session, "/providers/rules"))["providers"]
        assert sets["ads"]["ruleCount"] == 2 and sets["ads"]["behavior"] == "Domain"
        assert RFC3339.match(sets["ads"]["updatedAt"])

    run(tmp_path, body)


def test_connections_have_mihomos_fields_and_types(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        r = setup.add(7)
        r.bytes_up, r.bytes_down = 100, 5000
        ended = setup.add(8, domain="other.org")
        setup.table.ended(ended, "closed-by-server")
        snap = await get_json(session, "/connections")
        assert snap["uploadTotal"] == 100 and snap["downloadTotal"] == 5000
        assert isinstance(snap["memory"], int) and snap["memory"] > 0
        [c] = snap["connections"]
        assert c["id"] == "7" and c["upload"] == 100 and c["download"] == 5000
        assert RFC3339.match(c["start"]) and c["chains"] == ["proxy"]
        assert (c["rule"], c["rulePayload"]) == ("DomainSuffix", "example.com")
        m = c["metadata"]
        assert (m["network"], m["type"], m["sourceIP"], m["destinationIP"]) == (
            "tcp", "Tun", "10.0.0.1", "198.18.0.5")
        assert (m["sourcePort"], m["destinationPort"]) == ("40007", "443")  # strings, as mihomo
        assert (m["host"], m["process"], m["processPath"], m["uid"]) == (
            "www.example.com", "curl", "/usr/bin/curl", 1000)
        extra = c["tunproxy"]
        assert extra["state"] == "connecting" and extra["pid"] == 1234
        assert extra["rule"]["line"] == 6 and extra["unit"] == "session-2.scope"
        with_closed = await get_json(session, "/connections?closed=1")
        [old] = with_closed["closed"]
        assert old["id"] == "8" and old["tunproxy"]["endReason"] == "closed-by-server"

    run(tmp_path, body)


def test_auth_bearer_and_websocket_token(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET}):
            async with session.get("/connections", headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json()) == {"message": "Unauthorized"}
        async with session.get("/connections?token=" + SECRET) as resp:
            assert resp.status == 401  # ?token= is for WebSocket upgrades only, as mihomo
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect("/connections?token=wrong")
        assert err.value.status == 401
        async with session.ws_connect("/connections?token=" + SECRET) as ws:
            assert "connections" in json.loads((await ws.receive()).data)
        async with session.get("/ui/") as resp:  # the dashboard itself is public
            assert resp.status == 200 and "dashboard" in await resp.text()
        async with session.get("/ui/app.js") as resp:
            assert resp.status == 200
        escape = yarl.URL(setup.base + "/ui/%2e%2e/rules.yaml", encoded=True)
        async with session.get(escape) as resp:
            assert resp.status in (403, 404)
        async with session.options("/connections") as resp:  # CORS preflight
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"

    run(tmp_path, body)


def test_delete_connections(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        for i in (1, 2, 3):
            setup.add(i)
        async with session.delete("/connections/2", headers=AUTH) as resp:
            assert resp.status == 204
        assert setup.closed == [2] and setup.table.get(2).end_reason == "closed-by-api"  # type: ignore[union-attr]
        async with session.delete("/connections/2", headers=AUTH) as resp:
            assert resp.status == 404  # ended already
        async with session.delete("/connections/abc", headers=AUTH) as resp:
            assert resp.status == 400 and "abc" in (await resp.json())["message"]
        async with session.delete("/connections", headers=AUTH) as resp:
            assert resp.status == 204
        assert sorted(setup.closed) == [1, 2, 3] and not setup.table.live

    run(tmp_path, body)


def test_websocket_pushes_connections_traffic_and_memory(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        r = setup.add(1)
        async with session.ws_connect(f"/connections?interval=100&token={SECRET}") as ws:
            first = json.loads((await ws.receive(timeout=30)).data)
            assert first["connections"][0]["download"] == 0
            r.bytes_down = 4096
            for _ in range(50):  # pushed again every 100 ms with the new counters
                snap = json.loads((await ws.receive(timeout=30)).data)
                if snap["connections"][0]["download"] == 4096:
                    break
            else:
                raise AssertionError("the new byte count was never pushed")
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await session.ws_connect(f"/connections?interval=soon&token={SECRET}")
        assert err.value.status == 400
        async with session.ws_connect(f"/traffic?token={SECRET}") as ws:
            r.bytes_up += 3000
            tick = json.loads((await ws.receive(timeout=30)).data)
            assert set(tick) == {"up", "down"} and tick["up"] > 0
        async with session.ws_connect(f"/memory?token={SECRET}") as ws:
            assert json.loads((await ws.receive(timeout=30)).data) == {"inuse": 0, "oslimit": 0}
            second = json.loads((await ws.receive(timeout=30)).data)
            assert second["inuse"] > 0
        async with session.get("/traffic", headers=AUTH) as resp:  # plain streamed form
            line = await asyncio.wait_for(resp.content.readline(), 30)
            assert set(json.loads(line)) == {"up", "down"}

    run(tmp_path, body)


def test_logs_by_level(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        async with session.get("/logs?level=loud", headers=AUTH) as resp:
            assert resp.status == 400
        logger = logging.getLogger("tunproxy.test")
        logger.setLevel(logging.DEBUG)
        async with session.ws_connect(f"/logs?level=warning&token={SECRET}") as ws:
            await asyncio.sleep(0)  # let the handler subscribe
            for _ in range(100):
                if setup.controller._hub is not None and setup.controller._hub._subscribers:
                    break
                await asyncio.sleep(0.01)
            logger.info("not for a warning-level client")
            logger.warning("disk on fire")
            msg = json.loads((await ws.receive(timeout=30)).data)
            assert msg == {"type": "warning", "payload": "tunproxy.test: disk on fire"}

    run(tmp_path, body)


def _ws_handshake(port: int, path: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    return s


def test_a_websocket_client_that_never_reads_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "SEND_TIMEOUT", 1.0)

    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        for i in range(300):  # ~150 KB per snapshot: the socket buffers fill in moments
            setup.add(i, domain=f"host-{i}-" + "x" * 200 + ".example.com")
        port = int(setup.base.rsplit(":", 1)[1])
        path = f"/connections?interval=100&token={SECRET}"
        stuck = await asyncio.to_thread(_ws_handshake, port, path)
        try:
            for _ in range(300):
                if setup.controller.dropped_clients:
                    break
                # Meanwhile everyone else is served.
                assert len((await get_json(session, "/connections"))["connections"]) == 300
                await asyncio.sleep(0.05)
            assert setup.controller.dropped_clients == 1
        finally:
            stuck.close()

    run(tmp_path, body)


def test_malformed_http_gets_400_and_the_server_goes_on(tmp_path: Path) -> None:
    async def body(setup: Setup, session: aiohttp.ClientSession) -> None:
        port = int(setup.base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GARBAGE \x00\x01 nonsense\r\n\r\n")
        status = await asyncio.wait_for(reader.readline(), 30)
        assert re.match(rb"HTTP/1\.[01] 400 ", status), status
        writer.close()
        async with session.post("/connections", headers=AUTH, data=b"x" * 200_000) as resp:
            assert resp.status in (405, 413)
        assert (await get_json(session, "/version"))["meta"] is True

    run(tmp_path, body)


def test_a_reachable_controller_without_secret_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "open.yaml"
    path.write_text("controller: {listen: 0.0.0.0:9090}\nrules: [MATCH,DIRECT]\n")
    done = subprocess.run([sys.executable, "-m", "tunproxy", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "open.yaml:1: controller.listen: 0.0.0.0 is not a loopback address" in done.stderr
    assert "needs a secret" in done.stderr


@pytest.fixture(autouse=True)
def _no_leaked_handlers() -> AsyncIterator[None]:  # type: ignore[misc]
    before = list(logging.getLogger().handlers)
    yield
    assert logging.getLogger().handlers == before


def test_the_fast_encoder_says_what_snapshot_says(tmp_path: Path) -> None:
    """The cached encoder (what the server sends) decodes to the plain snapshot, also after
    the fields it caches change."""
    from tunproxy.controller.views import SnapshotEncoder, snapshot

    setup = Setup(tmp_path)
    table = setup.table
    encoder = SnapshotEncoder()
    records = [setup.add(i, domain=f'q"uote{i}.example.com') for i in range(5)]
    ended = records.pop()
    ended.bytes_down = 99
    table.ended(ended, 'reset "by" client')

    def same() -> None:
        got = json.loads(encoder.encode(table, closed=True))
        want = snapshot(table, closed=True)
        got["memory"] = want["memory"] = 0
        assert got == want

    same()
    records[0].bytes_up, records[0].state = 1234, "half-closed"
    records[1].domain = "changed.example.org"
    records[2].outbound, records[2].rule, records[2].verdict = "dns", "dns.hijack", None
    records[3].rate_down = 1.5e6
    same()
    assert json.loads(encoder.encode(table))["connections"][1]["metadata"]["host"] == (
        "changed.example.org")
