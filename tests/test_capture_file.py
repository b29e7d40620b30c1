"""The capture file without a TUN: batches in through the tap, pcapng out, read back."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path
from types import SimpleNamespace

from tests.test_capture_pcapng import tcp_packet
from tunproxy.capture import pcapng
from tunproxy.capture.file import CaptureFile
from tunproxy.flows import FlowRecord

APP, FAKE = "172.19.0.1", "198.18.0.7"


def vnet(packet: bytes) -> bytes:
    return struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + packet


def records() -> dict[int, FlowRecord]:
    r = FlowRecord(id=3, network="tcp", src=APP, src_port=40000, dst=FAKE, dst_port=80,
                   domain="example.test", process="curl", pid=42,
                   rule="rules.yaml:2: MATCH,DIRECT", outbound="DIRECT")
    return {3: r}


def test_batches_are_written_with_comments_names_and_directions(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    capture = CaptureFile(path, limit=1 << 20, interface="tun0")
    syn = tcp_packet(APP, 40000, FAKE, 80, 0x02)
    synack = tcp_packet(FAKE, 80, APP, 40000, 0x12)
    other = tcp_packet(APP, 40001, "10.0.0.9", 443, 0x02)

    async def drive() -> None:
        driver = SimpleNamespace(tap=None)
        relay = SimpleNamespace(stack=SimpleNamespace(config=SimpleNamespace(vnet_hdr=True)))
        capture.attach(relay, driver)
        assert driver.tap == capture.tap
        # The SYN comes before its flow is known...
        capture.tap([vnet(syn), vnet(other)], True)
        # ...and the record when the flow opens; writing happens later, with both known.
        for record in records().values():
            capture.flow_opened(record)
        capture.tap([vnet(synack)], False)

    asyncio.run(drive())
    capture.close()
    blocks = list(pcapng.parse_blocks(path.read_bytes()))
    assert [b.type for b in blocks] == [pcapng.BLOCK_SHB, pcapng.BLOCK_IDB, pcapng.BLOCK_NRB,
                                        pcapng.BLOCK_EPB, pcapng.BLOCK_EPB, pcapng.BLOCK_EPB]
    assert blocks[2].records == [(FAKE, ["example.test"])]
    epbs = blocks[3:]
    assert [b.data for b in epbs] == [syn, other, synack]  # virtio headers gone
    comment = "flow #3 tcp curl(42) example.test rule MATCH,DIRECT via DIRECT"
    assert [b.comment for b in epbs] == [comment, None, comment]
    assert [b.option(pcapng.EPB_FLAGS) for b in epbs] == [
        struct.pack("=I", pcapng.OUTBOUND)] * 2 + [struct.pack("=I", pcapng.INBOUND)]
    assert capture.packets == 3 and capture.skipped == 0


def test_the_limit_holds(tmp_path: Path) -> None:
    path = tmp_path / "small.pcapng"
    limit = 2000
    capture = CaptureFile(path, limit=limit)
    packet = tcp_packet(APP, 40000, FAKE, 80, 0x10, b"x" * 200)
    capture.tap([packet] * 50, True)
    capture.close()
    assert path.stat().st_size <= limit
    blocks = list(pcapng.parse_blocks(path.read_bytes()))  # whole blocks only: still valid
    written = sum(1 for b in blocks if b.type == pcapng.BLOCK_EPB)
    assert written == capture.packets and 0 < written < 50
    assert capture.skipped == 50 - written
