"""Whose flow a captured packet is (IPv6 past its extension headers, RFC 8200 4), and what a
capture with a selection does with the packets it leaves out; bytes alone."""

from __future__ import annotations

import ipaddress
import struct
import time
from pathlib import Path

from tunproxy.capture import pcapng
from tunproxy.capture.file import CaptureFile
from tunproxy.capture.frames import flow_tuple
from tunproxy.capture.select import parse_selection
from tunproxy.flows import FlowRecord

APP, REMOTE = "fd00::1", "2001:db8::80"
HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS, AH, ESP, NO_NEXT = 0, 43, 44, 60, 51, 50, 59
TCP, UDP = 6, 17
FLOW = ("tcp", APP, 40000, REMOTE, 443)


def ports(sport: int, dport: int) -> bytes:
    # The first 8 bytes of a TCP or UDP header are all the lookup reads past the ports.
    return struct.pack(">HH", sport, dport) + bytes(16)


def ext(next_header: int, units: int) -> bytes:
    """A Hop-by-Hop/Routing/Destination Options header: (units + 1) * 8 bytes, PadN inside."""
    body = bytes((units + 1) * 8 - 2)
    return bytes((next_header, units)) + body


def fragment(next_header: int, offset: int, more: bool) -> bytes:
    return struct.pack(">BBHI", next_header, 0, (offset << 3) | more, 0x1234)


def auth(next_header: int) -> bytes:
    """An AH header with a 12-byte ICV: 24 bytes, Payload Len (24 / 4) - 2 = 4."""
    return bytes((next_header, 4)) + bytes(22)


def ipv6(first: int, rest: bytes, src: str = APP, dst: str = REMOTE) -> bytes:
    header = struct.pack(">IHBB", 6 << 28, len(rest), first, 64)
    return (header + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + rest)


def test_no_extension_headers() -> None:
    packet = ipv6(TCP, ports(40000, 443))
    assert flow_tuple(packet, from_app=True) == FLOW
    reply = ipv6(TCP, ports(443, 40000), src=REMOTE, dst=APP)
    assert flow_tuple(reply, from_app=False) == FLOW


def test_a_chain_of_extension_headers_is_followed() -> None:
    chain = (ext(ROUTING, 0) + ext(DEST_OPTS, 1) + fragment(AH, 0, True) + auth(UDP)
             + ports(40000, 443))
    packet = ipv6(HOP_BY_HOP, chain)
    assert flow_tuple(packet, from_app=True) == ("udp", APP, 40000, REMOTE, 443)
    # Seen through a memoryview past a virtio header, as the capture reads it.
    view = memoryview(bytes(10) + packet)[10:]
    assert flow_tuple(view, from_app=True) == ("udp", APP, 40000, REMOTE, 443)


def test_first_fragment_has_ports_later_ones_do_not() -> None:
    assert flow_tuple(ipv6(FRAGMENT, fragment(TCP, 0, True) + ports(40000, 443)),
                      from_app=True) == FLOW
    assert flow_tuple(ipv6(FRAGMENT, fragment(TCP, 185, False) + ports(40000, 443)),
                      from_app=True) is None


def test_unreachable_or_truncated_upper_layer_is_no_flow() -> None:
    assert flow_tuple(ipv6(ESP, bytes(32)), from_app=True) is None  # encrypted: no ports
    assert flow_tuple(ipv6(NO_NEXT, b""), from_app=True) is None
    # Hdr Ext Len points past the end of the packet.
    assert flow_tuple(ipv6(HOP_BY_HOP, bytes((TCP, 200)) + bytes(6)), from_app=True) is None
    assert flow_tuple(ipv6(HOP_BY_HOP, b"\x06"), from_app=True) is None
    assert flow_tuple(ipv6(FRAGMENT, b"\x06\x00\x00"), from_app=True) is None
    assert flow_tuple(ipv6(AH, b"\x06"), from_app=True) is None
    # A header that names itself as next, over and over: the walk ends, no flow.
    loop = b"".join(ext(DEST_OPTS, 0) for _ in range(40)) + ports(40000, 443)
    assert flow_tuple(ipv6(DEST_OPTS, loop), from_app=True) is None


def test_capture_selects_and_comments_a_packet_with_extension_headers(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    capture = CaptureFile(path, limit=1 << 20, selection=parse_selection(["process=curl"]))
    capture.flow_opened(FlowRecord(id=5, network="tcp", src=APP, src_port=40000, dst=REMOTE,
                                   dst_port=443, process="curl", pid=7))
    capture.flow_opened(FlowRecord(id=6, network="tcp", src=APP, src_port=40001, dst=REMOTE,
                                   dst_port=443, process="wget", pid=8))
    mine = ipv6(HOP_BY_HOP, ext(TCP, 0) + ports(40000, 443))
    theirs = ipv6(HOP_BY_HOP, ext(TCP, 0) + ports(40001, 443))
    capture.tap([mine, theirs], True)
    capture.close()
    epbs = [b for b in pcapng.parse_blocks(path.read_bytes()) if b.type == pcapng.BLOCK_EPB]
    assert [b.data for b in epbs] == [mine]
    assert epbs[0].comment == "flow #5 tcp curl(7)"


def test_a_settled_left_out_flow_is_dropped_by_the_tap(tmp_path: Path) -> None:
    """Its packets are not held until the flush; once it ends, its 5-tuple is judged afresh."""
    capture = CaptureFile(tmp_path / "c.pcapng", limit=1 << 20,
                          selection=parse_selection(["process=curl"]))
    old = time.time() - 10  # opened long enough ago: process and rule are known
    wget = FlowRecord(id=6, network="tcp", src=APP, src_port=40001, dst=REMOTE, dst_port=443,
                      process="wget", pid=8, started=old)
    # Routed (its rule is set): settled at once. Not routed yet and new: not settled.
    routed = FlowRecord(id=9, network="tcp", src=APP, src_port=40003, dst=REMOTE,
                        dst_port=443, process="wget", pid=8, rule="MATCH,DIRECT")
    young = FlowRecord(id=7, network="tcp", src=APP, src_port=40002, dst=REMOTE,
                       dst_port=443, process="wget", pid=8)
    for record in (wget, routed, young):
        capture.flow_opened(record)
    theirs = ipv6(HOP_BY_HOP, ext(TCP, 0) + ports(40001, 443))
    fresh = ipv6(TCP, ports(40002, 443))
    bulk = ipv6(TCP, ports(40003, 443))
    capture.tap([theirs, fresh, bulk], True)
    held = len(theirs) + len(fresh) + len(bulk)
    assert capture._pending_bytes == held  # not judged yet: held
    capture.flush()
    capture.tap([theirs, fresh, bulk], True)
    # wget's settled flows are dropped at once; the young one is still judged at each flush.
    assert capture._pending_bytes == len(fresh)
    capture.flush()
    wget.ended = time.time()
    capture.tap([theirs], True)
    assert capture._pending_bytes == len(theirs)
    # A new flow of curl on the same 5-tuple is written.
    capture.flow_opened(FlowRecord(id=8, network="tcp", src=APP, src_port=40001, dst=REMOTE,
                                   dst_port=443, process="curl", pid=9, started=old))
    capture.close()
    epbs = [b for b in pcapng.parse_blocks((tmp_path / "c.pcapng").read_bytes())
            if b.type == pcapng.BLOCK_EPB]
    assert [(b.data, b.comment) for b in epbs] == [(theirs, "flow #8 tcp curl(9)")]
