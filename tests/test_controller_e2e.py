"""The controller API of a real tunproxy in namespaces, with curl downloading through it:
the download is seen live (process, rule, bytes), closed through the API (curl sees a
reset), logged to the JSON flow log (reopened on SIGHUP), and a WebSocket client that never
reads does not slow a transfer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.netns import SERVER4, Topology, topology

pytestmark = pytest.mark.netns

HTTP_PORT = 8080  # a slow download (the one the rule names)
FAST_PORT = 8081  # python's http.server: big.bin and small.txt at full speed
# ~1 MB/s of an endless body: the client reads everything as it comes, so its receive
# window never fills. (curl --limit-rate instead lets bytes wait unread in curl's socket: the
# kernel takes the RST at once, but hands out the queued bytes before the reset's error, so
# curl learns of the close only once it drains its buffer; tests/test_abort_e2e.py checks
# the socket's pending error instead.)
SLOW_SERVER = """\
import socket, sys, threading, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
def serve(c):
    try:
        c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 1000000000\\r\\n\\r\\n")
        while True:
            c.sendall(b"x" * 32768)
            time.sleep(0.03)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""
API_PORT = 9090
SECRET = "tops3cret"
BIG = 64 * 1024 * 1024
AUTH = {"Authorization": f"Bearer {SECRET}"}
API = f"http://127.0.0.1:{API_PORT}"


def config(flow_log: Path, ui: Path | None = None) -> str:
    ui_line = f"\n  ui: {ui}" if ui is not None else ""
    return f"""\
tun:
  name: tp0
  mtu: 1500
controller:
  listen: 127.0.0.1:{API_PORT}
  secret: {SECRET}{ui_line}
log:
  flows: {flow_log}
rules:
  - DST-PORT,{HTTP_PORT},DIRECT
  - MATCH,DIRECT
"""


class Lab:
    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        www = tmp / "www"
        www.mkdir()
        with open(www / "big.bin", "wb") as f:
            f.truncate(BIG)  # sparse: no disk, all zeros
        (www / "small.txt").write_text("hello\n")
        topo.server.spawn(sys.executable, "-m", "http.server", "--bind", SERVER4,
                          "--directory", str(www), str(FAST_PORT))
        topo.server.spawn(sys.executable, "-c", SLOW_SERVER, SERVER4, str(HTTP_PORT))
        topo.server.wait_tcp_listening(FAST_PORT)
        topo.server.wait_tcp_listening(HTTP_PORT)
        self.flow_log = tmp / "flows.jsonl"

    def start(self, ui: Path | None = None) -> Any:
        tp = self.topo.start_tunproxy(config(self.flow_log, ui))
        self.topo.client.wait_tcp_listening(API_PORT)
        return tp

    def curl(self, path: str, *args: str) -> subprocess.Popen[bytes]:
        return self.topo.client.spawn(
            "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
            *args, f"http://{SERVER4}:{HTTP_PORT if path == 'slow' else FAST_PORT}/{path}",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def api(self, body: Callable[[aiohttp.ClientSession], Any]) -> Any:
        """Run ``body`` with an aiohttp session whose sockets live in the client namespace."""

        async def main() -> Any:
            async with aiohttp.ClientSession(base_url=API) as session:
                return await asyncio.wait_for(body(session), 90)

        with self.topo.client.entered():
            return asyncio.run(main())


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo, tmp_path)


async def connections(session: aiohttp.ClientSession, closed: bool = False) -> Any:
    async with session.get("/connections" + ("?closed=1" if closed else ""),
                           headers=AUTH) as resp:
        assert resp.status == 200
        return await resp.json()


async def wait_for_curl(session: aiohttp.ClientSession, pid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for c in (await connections(session))["connections"]:
            m = c["metadata"]
            if m["destinationPort"] == str(HTTP_PORT) and c["tunproxy"]["pid"] == pid \
                    and c["download"] > 0:
                return c  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError("curl's flow never showed up in /connections")


def test_a_live_download_seen_and_closed_through_the_api(lab: Lab) -> None:
    tp = lab.start()
    curl = lab.curl("slow")

    async def body(session: aiohttp.ClientSession) -> tuple[str, dict[str, Any]]:
        c = await wait_for_curl(session, curl.pid)
        m = c["metadata"]
        assert (m["process"], m["processPath"]) == ("curl", "/usr/bin/curl")
        assert m["uid"] == 0 and m["network"] == "tcp" and m["destinationIP"] == SERVER4
        assert (c["rule"], c["rulePayload"], c["chains"]) == ("DstPort", str(HTTP_PORT),
                                                              ["DIRECT"])
        rule_line = config(lab.flow_log).splitlines().index(f"  - DST-PORT,{HTTP_PORT},DIRECT")
        assert c["tunproxy"]["rule"]["line"] == rule_line + 1 and c["tunproxy"]["state"] == "open"
        assert c["tunproxy"]["attribution"] == "process"
        # Live over the WebSocket: the byte count grows between pushes.
        async with session.ws_connect(f"/connections?interval=300&token={SECRET}") as ws:
            seen: list[int] = []
            while len(seen) < 2 or seen[0] == seen[-1]:
                assert len(seen) < 40, f"the download count did not move: {seen}"
                snap = json.loads((await ws.receive(timeout=30)).data)
                mine = [x for x in snap["connections"] if x["id"] == c["id"]]
                assert mine, "the flow vanished while curl was downloading"
                seen.append(mine[0]["download"])
        async with session.ws_connect(f"/traffic?token={SECRET}") as ws:
            tick = json.loads((await ws.receive(timeout=30)).data)
            assert tick["down"] > 100_000  # ~1 MB/s from the slow server
        async with session.delete(f"/connections/{c['id']}", headers=AUTH) as resp:
            assert resp.status == 204
        async with session.delete(f"/connections/{c['id']}", headers=AUTH) as resp:
            assert resp.status == 404
        snap = await connections(session, closed=True)
        assert c["id"] not in [x["id"] for x in snap["connections"]]
        [ended] = [x for x in snap["closed"] if x["id"] == c["id"]]
        return c["id"], ended

    flow_id, ended = lab.api(body)
    assert ended["tunproxy"]["endReason"] == "closed-by-api"
    out, err = curl.communicate(timeout=30)
    assert curl.returncode == 56, (curl.returncode, err)  # "Recv failure"
    assert b"reset" in err.lower()
    # The JSON flow log has the line, written when the flow ended.
    lines = [json.loads(x) for x in lab.flow_log.read_text().splitlines()]
    [entry] = [x for x in lines if x["id"] == int(flow_id)]
    assert entry["process"] == "curl" and entry["end_reason"] == "closed-by-api"
    assert entry["rule"]["type"] == "DST-PORT" and entry["bytes_down"] > 0
    # logrotate: move the file away, SIGHUP, and the next flow goes to a new file.
    lab.flow_log.rename(lab.tmp / "flows.jsonl.1")
    mark = tp.line_count()
    tp.send_signal(signal.SIGHUP)
    tp.wait_for_log("reloaded", start=mark)
    small = lab.curl("small.txt")
    out, err = small.communicate(timeout=30)
    assert out.decode().startswith("200"), err
    deadline = time.monotonic() + 30  # the flow ends in tunproxy just after curl exits
    while time.monotonic() < deadline and not (
        lab.flow_log.exists() and lab.flow_log.read_text().strip()
    ):
        time.sleep(0.05)
    fresh = [json.loads(x) for x in lab.flow_log.read_text().splitlines()]
    assert fresh and all(x["id"] != int(flow_id) for x in fresh)
    assert any(x["process"] == "curl" and x["dst_port"] == FAST_PORT for x in fresh)
    assert tp.stop() == 0


def test_a_websocket_client_that_never_reads_does_not_slow_the_data_path(lab: Lab) -> None:
    tp = lab.start()
    # A client that subscribes to fast pushes and never reads a byte.
    stuck = lab.topo.client.connect("127.0.0.1", API_PORT)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    stuck.sendall((f"GET /connections?interval=100&token={SECRET} HTTP/1.1\r\nHost: x\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    try:
        started = time.monotonic()
        curl = lab.curl("big.bin")
        out, err = curl.communicate(timeout=120)
        took = time.monotonic() - started
        assert out.decode() == f"200 {BIG}", err
        # And the API still answers everyone else.

        async def body(session: aiohttp.ClientSession) -> Any:
            async with session.get("/version", headers=AUTH) as resp:
                return await resp.json()

        assert lab.api(body)["meta"] is True
        print(f"64 MiB through tunproxy with a stuck WebSocket client: {took:.2f} s")
    finally:
        stuck.close()
    assert tp.stop() == 0
    assert os.path.exists(lab.flow_log)

