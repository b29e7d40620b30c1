"""``GET /capture`` without a TUN: a real Controller and FlowTable, the driver's tap slot
fed by hand; the stream read back block by block. Also the bounded queue and the CLI's
block splitter."""

from __future__ import annotations

import asyncio
import struct
import time
from types import SimpleNamespace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from tests.test_capture_pcapng import tcp_packet
from tunproxy.capture import pcapng
from tunproxy.capture.stream import Chunks
from tunproxy.capturecli import BlockSplitter
from tunproxy.controller.server import Controller
from tunproxy.flows import FlowRecord, FlowTable

APP, SERVER = "172.19.0.1", "10.0.0.9"
SECRET = "s"
AUTH = {"Authorization": f"Bearer {SECRET}"}


def _controller(table: FlowTable, driver: Any, relay: Any) -> Controller:
    return Controller(table, secret=SECRET, ruleset=lambda: None, outbounds=lambda: {},
                      config=lambda: None, data_path=lambda: (relay, driver))


def _flow(table: FlowTable, fid: int, port: int, process: str) -> FlowRecord:
    r = FlowRecord(id=fid, network="tcp", src=APP, src_port=port, dst=SERVER, dst_port=80,
                   process=process, pid=100 + fid, rule="r.yaml:1: MATCH,DIRECT",
                   outbound="DIRECT")
    table.track(r)
    return r


async def _read_blocks(content: Any, want: int, timeout: float = 30) -> list[Any]:
    buf = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        blocks = list(pcapng.parse_blocks(BlockSplitter().feed(buf)))
        if sum(b.type == pcapng.BLOCK_EPB for b in blocks) >= want:
            return blocks
        buf += await asyncio.wait_for(content.readany(), timeout)
    raise AssertionError("the stream did not bring the packets")


def test_capture_streams_the_selected_flow_and_removes_its_tap() -> None:
    table = FlowTable()
    _flow(table, 1, 40001, "curl")
    _flow(table, 2, 40002, "wget")
    driver: Any = SimpleNamespace(tap=None)
    relay = SimpleNamespace(stack=SimpleNamespace(config=SimpleNamespace(vnet_hdr=False)))
    curl_syn = tcp_packet(APP, 40001, SERVER, 80, 0x02)
    wget_syn = tcp_packet(APP, 40002, SERVER, 80, 0x02)
    curl_synack = tcp_packet(SERVER, 80, APP, 40001, 0x12)

    def send(packets: list[bytes], from_app: bool) -> None:
        driver.tap(packets, from_app)

    async def main() -> None:
        async with TestClient(TestServer(_controller(table, driver, relay).app)) as client:
            async with client.get("/capture?process=curl", headers={}) as resp:
                assert resp.status == 401
            async with client.get("/capture?process=curl&limit=x", headers=AUTH) as resp:
                assert resp.status == 400
            async with client.get("/capture?proces=curl", headers=AUTH) as resp:
                assert resp.status == 400
            async with client.get("/capture?process=curl", headers=AUTH) as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"] == "application/x-pcapng"
                assert driver.tap is not None  # tapped while the stream is open
                async with client.get("/capture", headers=AUTH) as second:
                    assert second.status == 409
                send([curl_syn, wget_syn], True)
                send([curl_synack], False)
                blocks = await _read_blocks(resp.content, 2)
            assert blocks[0].type == pcapng.BLOCK_SHB and blocks[1].type == pcapng.BLOCK_IDB
            epbs = [b for b in blocks if b.type == pcapng.BLOCK_EPB]
            assert [b.data for b in epbs] == [curl_syn, curl_synack]
            assert all(b.comment is not None and "curl(101)" in b.comment for b in epbs)
            # The client went: the tap is removed (polled, the server notices within POLL).
            deadline = time.monotonic() + 30
            while driver.tap is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert driver.tap is None
            # A limit ends the stream by itself once reached.
            async with client.get("/capture?limit=200", headers=AUTH) as resp:
                assert resp.status == 200
                for _ in range(5):
                    send([curl_syn] * 4, True)
                    await asyncio.sleep(0)
                body = await asyncio.wait_for(resp.read(), 10)
            assert len(body) <= 200
            assert [b.type for b in pcapng.parse_blocks(body)][:2] == [pcapng.BLOCK_SHB,
                                                                      pcapng.BLOCK_IDB]
            assert driver.tap is None

    asyncio.run(main())


def test_the_queue_is_bounded_and_drops_whole_chunks() -> None:
    async def main() -> None:
        chunks = Chunks(max_bytes=100)
        chunks.write(b"h" * 60)
        chunks.flush()  # the first chunk always goes (the header)
        chunks.write(b"a" * 30)
        chunks.flush()
        chunks.write(b"b" * 30)
        chunks.flush()  # 120 > 100: dropped whole
        assert chunks.take() == b"h" * 60 + b"a" * 30 and chunks.dropped == 30
        chunks.write(b"c" * 30)
        chunks.flush()
        assert chunks.take() == b"c" * 30

    asyncio.run(main())


def test_the_splitter_gives_whole_blocks_only() -> None:
    stream = (pcapng.section_header(application="t")
              + pcapng.interface_description(name="tun", tsresol=9)
              + pcapng.enhanced_packet(0, 1, b"\x45" + b"\0" * 39, comment="x"))
    splitter = BlockSplitter()
    out = b""
    cuts = []
    for i in range(len(stream)):
        got = splitter.feed(stream[i:i + 1])
        if got:
            cuts.append(len(out) + len(got))
        out += got
    assert out == stream
    lengths = [struct.unpack_from("=I", stream, off + 4)[0] for off in (0,)]
    assert cuts[0] == lengths[0] and len(cuts) == 3
