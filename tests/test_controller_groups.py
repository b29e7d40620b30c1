"""The controller's upstream groups, over a real aiohttp server on loopback (no root, no
TUN): groups in mihomo's shapes in ``GET /proxies``, ``PUT /proxies/{group}`` switching a
select group (and every refusal mihomo gives), ``/delay`` running one health check through
a member, and a SIGHUP-style rebuild of the policy keeping the choice."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tunproxy.config import parse_config
from tunproxy.controller.server import Controller
from tunproxy.errors import ConnectRefused
from tunproxy.flows import FlowTable
from tunproxy.outbounds.base import Outbound, StreamProtocol, Target
from tunproxy.outbounds.direct import DirectOutbound
from tunproxy.outbounds.group import GroupConfig, GroupOutbound, trail
from tunproxy.policy import Policy, build_policy

SECRET = "s3cret"
AUTH = {"Authorization": f"Bearer {SECRET}"}


class Redirect(DirectOutbound):
    """DIRECT, but every stream goes to one loopback port (None: a refused one)."""

    def __init__(self, name: str, to: int) -> None:
        super().__init__(name)
        self.to = to

    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        return await super().open_stream(Target(self.to, address="127.0.0.1"), protocol,
                                         timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http_204(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
    await writer.drain()
    writer.close()


Body = Callable[[dict[str, Outbound], aiohttp.ClientSession, int], Awaitable[None]]


def run(body: Body) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_http_204, "127.0.0.1", 0)
        web_port = server.sockets[0].getsockname()[1]
        dead = _free_port()  # nothing listens there: connections are refused
        members: dict[str, Outbound] = {"a": Redirect("a", web_port), "b": Redirect("b", dead)}
        outbounds: dict[str, Outbound] = {"DIRECT": DirectOutbound("DIRECT"), **members}
        outbounds["sel"] = GroupOutbound(GroupConfig("sel", "select", ["a", "b"]), members)
        outbounds["auto"] = GroupOutbound(
            GroupConfig("auto", "url-test", ["b", "a"], url="http://check.test/generate_204",
                        timeout=30), {"b": members["b"], "a": members["a"]})
        outbounds["lb"] = GroupOutbound(GroupConfig("lb", "load-balance", ["a", "b"]), members)
        config = parse_config("rules: [MATCH,DIRECT]\n", Path("/nonexistent/rules.yaml"))
        controller = Controller(FlowTable(), secret=SECRET, ruleset=lambda: config.ruleset,
                                outbounds=lambda: outbounds, config=lambda: config)
        port = _free_port()
        await controller.start("127.0.0.1", port)
        try:
            async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as session:
                await asyncio.wait_for(body(outbounds, session, web_port), 60)
        finally:
            await controller.aclose()
            server.close()

    asyncio.run(main())


async def get_json(session: aiohttp.ClientSession, path: str) -> Any:
    async with session.get(path, headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def put(session: aiohttp.ClientSession, path: str, data: Any) -> tuple[int, Any]:
    raw = data if isinstance(data, bytes) else None
    kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": data}
    async with session.put(path, headers=AUTH, **kwargs) as resp:
        return resp.status, (await resp.json() if resp.status != 204 else None)


def test_groups_are_listed_as_mihomo_does() -> None:
    async def body(outbounds: dict[str, Outbound], session: aiohttp.ClientSession,
                   port: int) -> None:
        auto = outbounds["auto"]
        assert isinstance(auto, GroupOutbound)
        await auto.check_all()  # b refused, a answers: a is the fastest alive
        proxies = (await get_json(session, "/proxies"))["proxies"]
        assert {k: v["type"] for k, v in proxies.items() if k in ("sel", "auto", "lb")} == {
            "sel": "Selector", "auto": "URLTest", "lb": "LoadBalance"}
        assert proxies["sel"]["now"] == "a" and proxies["sel"]["all"] == ["a", "b"]
        assert proxies["auto"]["now"] == "a" and proxies["auto"]["all"] == ["b", "a"]
        assert proxies["auto"]["testUrl"] == "http://check.test/generate_204"
        assert "now" not in proxies["lb"]  # picked per destination, as mihomo shows it
        [ha] = proxies["a"]["history"]
        [hb] = proxies["b"]["history"]
        assert ha["delay"] > 0 and proxies["a"]["alive"] is True
        assert hb["delay"] == 0 and proxies["b"]["alive"] is False
        assert ha["time"].endswith("Z")
        assert {"sel", "auto", "lb", "a", "b"} <= set(proxies["GLOBAL"]["all"])
        one = await get_json(session, "/proxies/sel")
        assert one["name"] == "sel" and one["now"] == "a"
        providers = (await get_json(session, "/providers/proxies"))["providers"]
        assert "sel" not in [p["name"] for p in providers["default"]["proxies"]]

    run(body)


def test_put_switches_a_select_group() -> None:
    async def body(outbounds: dict[str, Outbound], session: aiohttp.ClientSession,
                   port: int) -> None:
        sel = outbounds["sel"]
        assert isinstance(sel, GroupOutbound)
        assert await put(session, "/proxies/sel", {"name": "b"}) == (204, None)
        assert sel.state.order("any.example") == ["b"]  # the next flow's member
        assert (await get_json(session, "/proxies/sel"))["now"] == "b"
        # mihomo's refusals: unknown group 404; bad body, unknown member, not a selector 400
        status, err = await put(session, "/proxies/nope", {"name": "a"})
        assert status == 404 and err == {"message": "Resource not found"}
        for bad in (b"{not json", b"[1, 2]", b'{"name": 3}', b"{}", "a"):
            status, err = await put(session, "/proxies/sel", bad)
            assert (status, err) == (400, {"message": "Body invalid"}), bad
        status, err = await put(session, "/proxies/sel", {"name": "zzz"})
        assert status == 400 and "zzz" in err["message"]
        for not_select in ("lb", "a", "DIRECT", "GLOBAL"):
            status, err = await put(session, f"/proxies/{not_select}", {"name": "a"})
            assert (status, err) == (400, {"message": "Must be a Selector"}), not_select
        assert sel.state.selected == "b"  # none of the refusals changed it
        async with session.put("/proxies/sel", json={"name": "a"}) as resp:
            assert resp.status == 401  # the secret is needed, as for everything else
        assert sel.state.selected == "b"

    run(body)


async def delete(session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with session.delete(path, headers=AUTH) as resp:
        return resp.status, (await resp.json() if resp.status != 204 else None)


def test_put_fixes_a_url_test_group_and_delete_unfixes_it() -> None:
    async def body(outbounds: dict[str, Outbound], session: aiohttp.ClientSession,
                   port: int) -> None:
        auto = outbounds["auto"]
        assert isinstance(auto, GroupOutbound)
        auto.state.report("a", 0.500)  # as checks would: b answered faster, b is chosen
        auto.state.report("b", 0.001)
        assert (await get_json(session, "/proxies/auto"))["now"] == "b"
        assert await put(session, "/proxies/auto", {"name": "a"}) == (204, None)
        one = await get_json(session, "/proxies/auto")
        assert (one["now"], one["fixed"]) == ("a", "a")
        status, err = await put(session, "/proxies/auto", {"name": "zzz"})
        assert status == 400 and "zzz" in err["message"]
        assert await delete(session, "/proxies/auto") == (204, None)
        one = await get_json(session, "/proxies/auto")
        assert (one["now"], one["fixed"]) == ("b", "")
        assert await delete(session, "/proxies/auto") == (204, None)  # not fixed: still 204
        # mihomo's refusals: unknown 404; a selector, load-balance or a proxy 400
        assert await delete(session, "/proxies/nope") == (404, {"message": "Resource not found"})
        for other in ("sel", "lb", "a", "DIRECT", "GLOBAL"):
            assert await delete(session, f"/proxies/{other}") == (
                400, {"message": "Body invalid"}), other
        async with session.delete("/proxies/auto") as resp:
            assert resp.status == 401

    run(body)


def test_a_running_flow_keeps_its_member_after_a_switch() -> None:
    async def body(outbounds: dict[str, Outbound], session: aiohttp.ClientSession,
                   port: int) -> None:
        from tunproxy.outbounds.group import _StatusLine

        sel = outbounds["sel"]
        proto = _StatusLine()
        transport = await sel.open_stream(Target(80, domain="x.test"), proto, timeout=30)
        try:
            assert await put(session, "/proxies/sel", {"name": "b"}) == (204, None)
            # The flow opened through a still works; b (refused) is only for new flows.
            transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(proto.done, 10)).startswith(b"HTTP/1.1 204")
        finally:
            transport.close()
        with pytest.raises(ConnectRefused):  # a new flow goes to b
            await sel.open_stream(Target(80, domain="x.test"), _StatusLine(), timeout=30)

    run(body)


def test_a_flow_through_groups_notes_each_member_chosen_innermost_first() -> None:
    async def body(outbounds: dict[str, Outbound], session: aiohttp.ClientSession,
                   port: int) -> None:
        from tunproxy.controller.views import connection
        from tunproxy.flows import FlowRecord
        from tunproxy.outbounds.group import _StatusLine

        outer = GroupOutbound(GroupConfig("Proxy", "select", ["sel", "b"]),
                              {"sel": outbounds["sel"], "b": outbounds["b"]})
        via = trail()
        transport = await outer.open_stream(Target(80, domain="x.test"), _StatusLine(),
                                            timeout=5)
        transport.close()
        assert via == ["a", "sel"]  # Proxy took sel, which took a
        record = FlowRecord(1, "tcp", "10.0.0.2", 40000, "192.0.2.1", 80,
                            outbound="Proxy", via=tuple(via))
        assert connection(record)["chains"] == ["a", "sel", "Proxy"]  # as mihomo shows it
        # A member that failed is not noted: auto tries b (refused), then connects by a.
        via = trail()
        transport = await outbounds["auto"].open_stream(Target(80, domain="x.test"),
                                                        _StatusLine(), timeout=5)
        transport.close()
        assert via == ["a"]
        outer.select("b")  # refused: nothing opened, nothing noted
        via = trail()
        with pytest.raises(ConnectRefused):
            await outer.open_stream(Target(80, domain="x.test"), _StatusLine(), timeout=5)
        assert via == []

    run(body)


def test_delay_runs_one_check_through_the_member() -> None:
    async def body(outbounds: dict[str, Outbound], session: aiohttp.ClientSession,
                   port: int) -> None:
        url = "http://check.test/generate_204"
        got = await get_json(session, f"/proxies/a/delay?url={url}&timeout=5000")
        assert isinstance(got["delay"], int) and got["delay"] > 0
        [h] = (await get_json(session, "/proxies/a"))["history"]
        assert h["delay"] == got["delay"]
        async with session.get(f"/proxies/b/delay?url={url}&timeout=5000",
                               headers=AUTH) as resp:
            assert resp.status == 503 and (await resp.json())["message"]
        assert (await get_json(session, "/proxies/b"))["alive"] is False
        got = await get_json(session, f"/proxies/sel/delay?url={url}&timeout=5000")
        assert got["delay"] > 0  # through the group's chosen member, a
        for query in ("url=ftp://x/&timeout=100", f"url={url}", f"url={url}&timeout=soon", ""):
            async with session.get(f"/proxies/a/delay?{query}", headers=AUTH) as resp:
                assert resp.status == 400, query
        async with session.get(f"/proxies/nope/delay?url={url}&timeout=100",
                               headers=AUTH) as resp:
            assert resp.status == 404

    run(body)


GROUPS = """\
upstreams:
  a: {{type: socks5, server: "192.0.2.1:1080"}}
  b: {{type: socks5, server: "192.0.2.2:1080"}}
  c: {{type: socks5, server: "192.0.2.3:1080"}}
proxy-groups:
  - {{name: sel, type: {kind}, proxies: [{members}]}}
rules:
  - MATCH,sel
"""


def _policy(kind: str, members: str, previous: Policy | None) -> Policy:
    from tunproxy.app import build_outbounds

    text = GROUPS.format(kind=kind, members=members)
    config = parse_config(text, Path("/nonexistent/rules.yaml"))
    return build_policy(config, build_outbounds=build_outbounds, resolve=None,
                        make_dns=lambda c: None, make_processes=lambda: None,
                        previous=previous)


def _selected(policy: Policy) -> str:
    group = policy.outbounds["sel"]
    assert isinstance(group, GroupOutbound)
    return group.state.selected


def test_a_reload_keeps_the_selection_while_the_group_has_the_member() -> None:
    first = _policy("select", "a, b, c", None)
    group = first.outbounds["sel"]
    assert isinstance(group, GroupOutbound)
    group.select("c")
    kept = _policy("select", "c, a", first)  # reordered: the choice stays
    assert _selected(kept) == "c"
    gone = _policy("select", "a, b", kept)  # c left the group: back to the first member
    assert _selected(gone) == "a"
    again = _policy("select", "a, b, c", gone)
    assert _selected(again) == "a"
    fixed = _policy("fallback", "a, b, c", None)
    fixed.outbounds["sel"].state.fix("c")  # type: ignore[attr-defined]
    assert _policy("fallback", "c, a", fixed).outbounds["sel"].state.fixed == "c"  # type: ignore[attr-defined]
    other = _policy("fallback", "b, c", _policy("select", "c, b", None))
    assert other.outbounds["sel"].state.kind == "fallback"  # type: ignore[attr-defined]


# --- end to end: a select group over two microsocks, switched through the API -------------

E2E_API = 9391
E2E_CONFIG = """\
tun:
  device: tp0
controller:
  listen: 127.0.0.1:{api}
  secret: {secret}
proxies:
  - {{name: a, type: socks5, server: {proxy}, port: 1080}}
  - {{name: b, type: socks5, server: {proxy}, port: 1081}}
proxy-groups:
  - {{name: G, type: select, proxies: [a, b]}}
rules:
  - MATCH,G
# {note}
"""


@pytest.mark.netns
def test_put_switches_new_flows_to_the_other_socks_server(tmp_path: Path) -> None:
    from tests.netns import PROXY4, topology
    from tests.test_groups import A_OUT, B_OUT, PEER_PORT, Lab

    def api(lab: Lab, method: str, path: str, data: str | None = None) -> tuple[int, str]:
        args = ["curl", "-sS", "-X", method, "-H", f"Authorization: Bearer {SECRET}",
                "-w", "\n%{http_code}", f"http://127.0.0.1:{E2E_API}{path}"]
        if data is not None:
            args += ["-H", "Content-Type: application/json", "--data", data]
        out = lab.topo.client.run(*args).stdout
        text, _, status = out.rpartition("\n")
        return int(status), text

    def wait_chains(lab: Lab) -> list[str]:
        """The chains of the ended flows to the peer, once one has ended."""
        deadline = time.monotonic() + 30
        while True:
            body = json.loads(api(lab, "GET", "/connections?closed=1")[1])
            chains = [c["chains"] for c in body.get("closed", [])
                      if c["metadata"]["destinationPort"] == str(PEER_PORT)]
            if chains or time.monotonic() > deadline:
                assert len(chains) == 1, chains
                return list(chains[0])
            time.sleep(0.2)

    def config(note: str) -> str:
        return E2E_CONFIG.format(api=E2E_API, secret=SECRET, proxy=PROXY4, note=note)

    with topology(tmp_path) as topo:
        lab = Lab(topo)
        tp = topo.start_tunproxy(config("first"))
        topo.client.wait_tcp_listening(E2E_API)
        assert lab.via() == A_OUT  # the first member until switched
        assert json.loads(api(lab, "GET", "/proxies/G")[1])["now"] == "a"
        assert wait_chains(lab) == ["a", "G"]  # mihomo's chains: member first, then group
        assert api(lab, "PUT", "/proxies/G", '{"name": "b"}') == (204, "")
        assert lab.via() == B_OUT  # the very next flow takes b
        assert json.loads(api(lab, "GET", "/proxies/G")[1])["now"] == "b"
        status, text = api(lab, "PUT", "/proxies/G", '{"name": "c"}')
        assert status == 400 and "c" in json.loads(text)["message"]
        assert lab.via() == B_OUT
        # A reload that keeps the group and the member keeps the choice.
        tp.config_path.write_text(config("reloaded"))
        mark = len(tp.log.splitlines())
        tp.send_signal(signal.SIGHUP)
        tp.wait_for_log(r"reloaded ", start=mark)
        assert lab.via() == B_OUT
        assert json.loads(api(lab, "GET", "/proxies/G")[1])["now"] == "b"
