"""The pcapng codec, with bytes alone; then tshark reading a file written with it."""

from __future__ import annotations

import contextlib
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from stack.wire.checksum import checksum, pseudo_header_sum
from tunproxy.capture import pcapng
from tunproxy.capture.frames import flow_tuple, frame

LE = struct.Struct("<I")


def tcp_packet(src: str, sport: int, dst: str, dport: int, flags: int, payload: bytes = b"",
               seq: int = 1000) -> bytes:
    """A valid IPv4 TCP packet, checksums included."""
    s = bytes(int(x) for x in src.split("."))
    d = bytes(int(x) for x in dst.split("."))
    tcp = bytearray(struct.pack(">HHIIBBHHH", sport, dport, seq, 0, 5 << 4, flags, 65535, 0, 0))
    tcp += payload
    struct.pack_into(">H", tcp, 16, checksum(tcp, pseudo_header_sum(s, d, 6, len(tcp))))
    ip = bytearray(struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0x4000, 64, 6, 0,
                               s, d))
    struct.pack_into(">H", ip, 10, checksum(ip))
    return bytes(ip + tcp)


# -- construct: the exact bytes, field by field --------------------------------------------

def test_section_header_bytes() -> None:
    shb = pcapng.section_header()
    assert len(shb) == 28
    block_type, total, magic = struct.unpack_from("=III", shb)
    assert (block_type, total, magic) == (0x0A0D0D0A, 28, 0x1A2B3C4D)
    assert struct.unpack_from("=HHq", shb, 12) == (1, 0, -1)
    assert struct.unpack_from("=I", shb, 24)[0] == 28


def test_interface_description_bytes() -> None:
    idb = pcapng.interface_description(name="tun0", tsresol=9)
    # type, len, linktype 101, reserved, snaplen 0, if_name "tun0", if_tsresol 9, end, len
    expected = struct.pack("=IIHHI", 1, len(idb), 101, 0, 0)
    expected += struct.pack("=HH", 2, 4) + b"tun0"
    expected += struct.pack("=HH", 9, 1) + b"\x09\0\0\0"
    expected += struct.pack("=HH", 0, 0) + struct.pack("=I", len(idb))
    assert idb == expected


def test_enhanced_packet_bytes_with_padding_and_comment() -> None:
    epb = pcapng.enhanced_packet(0, (7 << 32) | 9, b"abcde", comment="hi",
                                 direction=pcapng.OUTBOUND)
    body = struct.pack("=IIIII", 0, 7, 9, 5, 5) + b"abcde\0\0\0"
    body += struct.pack("=HH", 1, 2) + b"hi\0\0"
    body += struct.pack("=HHI", 2, 4, 2)
    body += struct.pack("=HH", 0, 0)
    assert epb == struct.pack("=II", 6, 12 + len(body)) + body + struct.pack("=I", 12 + len(body))


def test_name_resolution_bytes() -> None:
    nrb = pcapng.name_resolution([("198.18.0.5", ["example.test"]), ("fc00::1", ["a.b"]),
                                  ("10.0.0.1", [])])
    v4 = bytes([198, 18, 0, 5]) + b"example.test\0"
    v6 = bytes.fromhex("fc000000000000000000000000000001") + b"a.b\0"
    body = struct.pack("=HH", 1, len(v4)) + v4 + b"\0" * (-len(v4) % 4)
    body += struct.pack("=HH", 2, len(v6)) + v6 + b"\0" * (-len(v6) % 4)
    body += struct.pack("=HH", 0, 0)
    assert nrb == struct.pack("=II", 4, 12 + len(body)) + body + struct.pack("=I", 12 + len(body))
    assert pcapng.name_resolution([("10.0.0.1", [])]) == b""


# -- deconstruct: parse(emit(x)) == x --------------------------------------------------------

def sample_stream() -> bytes:
    syn = tcp_packet("10.0.0.1", 40000, "198.18.0.5", 80, 0x02)
    return b"".join([
        pcapng.section_header(application="tunproxy test"),
        pcapng.interface_description(name="tun0"),
        pcapng.name_resolution([("198.18.0.5", ["example.test"])]),
        pcapng.enhanced_packet(0, 1_700_000_000_123_456_789, syn, comment="flow #1 curl(42)",
                               direction=pcapng.OUTBOUND),
        pcapng.enhanced_packet(0, 1_700_000_000_223_456_789, b"\x45" + b"\0" * 18),
    ])


def test_parse_round_trip() -> None:
    blocks = list(pcapng.parse_blocks(sample_stream()))
    assert [b.type for b in blocks] == [pcapng.BLOCK_SHB, pcapng.BLOCK_IDB, pcapng.BLOCK_NRB,
                                        pcapng.BLOCK_EPB, pcapng.BLOCK_EPB]
    assert blocks[0].option(pcapng.SHB_USERAPPL) == b"tunproxy test"
    assert blocks[1].fields[0] == pcapng.LINKTYPE_RAW
    assert blocks[1].option(pcapng.IF_TSRESOL) == b"\x09"
    assert blocks[2].records == [("198.18.0.5", ["example.test"])]
    epb = blocks[3]
    assert (epb.fields[1] << 32 | epb.fields[2]) == 1_700_000_000_123_456_789
    assert epb.data == tcp_packet("10.0.0.1", 40000, "198.18.0.5", 80, 0x02)
    assert epb.comment == "flow #1 curl(42)"
    assert epb.option(pcapng.EPB_FLAGS) == LE.pack(pcapng.OUTBOUND)
    assert len(blocks[4].data) == 19 and blocks[4].comment is None


def test_parse_big_endian_section() -> None:
    body = struct.pack(">IHHq", 0x1A2B3C4D, 1, 0, -1)
    shb = struct.pack(">II", 0x0A0D0D0A, 12 + len(body)) + body + struct.pack(">I", 12 + len(body))
    idb_body = struct.pack(">HHI", 101, 0, 0)
    idb = struct.pack(">II", 1, 12 + len(idb_body)) + idb_body + struct.pack(">I", 20)
    blocks = list(pcapng.parse_blocks(shb + idb))
    assert blocks[1].fields == (101, 0, 0)


@pytest.mark.parametrize("cut", range(1, 52, 3))
def test_truncated_input_raises_only_pcapng_error(cut: int) -> None:
    data = sample_stream()
    assert len(pcapng.enhanced_packet(0, 0, b"\x45" + b"\0" * 18)) == 52  # the last block
    with pytest.raises(pcapng.PcapngError):
        list(pcapng.parse_blocks(data[:-cut]))


def test_random_bytes_raise_only_pcapng_error() -> None:
    import random

    rng = random.Random(7)
    data = sample_stream()
    for _ in range(500):
        mutated = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        with contextlib.suppress(pcapng.PcapngError):
            list(pcapng.parse_blocks(bytes(mutated[:rng.randrange(len(mutated) + 1)])))


def test_not_pcapng() -> None:
    with pytest.raises(pcapng.PcapngError):
        list(pcapng.parse_blocks(b"\xd4\xc3\xb2\xa1" + b"\0" * 20))  # legacy pcap


# -- frames ------------------------------------------------------------------------------------

def test_frame_finishes_a_partial_checksum() -> None:
    packet = bytearray(tcp_packet("10.0.0.1", 40000, "10.0.0.2", 80, 0x18, b"hello"))
    good = bytes(packet)
    # What a TUN with offloads hands over: the pseudo-header sum (not complemented) in the
    # field, NEEDS_CSUM, csum_start 20, csum_offset 16.
    partial = pseudo_header_sum(bytes(packet[12:16]), bytes(packet[16:20]), 6, len(packet) - 20)
    struct.pack_into(">H", packet, 36, partial)
    vnet = struct.pack("<BBHHHH", 1, 0, 0, 0, 20, 16)
    assert frame(vnet + bytes(packet), True) == good
    assert frame(struct.pack("<BBHHHH", 0, 0, 0, 0, 0, 0) + good, True) == good
    assert frame(good, False) == good
    assert frame(b"\x01\x02", True) == b""


def test_flow_tuple_both_directions() -> None:
    out = tcp_packet("10.0.0.1", 40000, "10.0.0.2", 80, 0x02)
    back = tcp_packet("10.0.0.2", 80, "10.0.0.1", 40000, 0x12)
    assert flow_tuple(out, from_app=True) == ("tcp", "10.0.0.1", 40000, "10.0.0.2", 80)
    assert flow_tuple(back, from_app=False) == ("tcp", "10.0.0.1", 40000, "10.0.0.2", 80)
    assert flow_tuple(b"\x45\0", from_app=True) is None
    assert flow_tuple(b"", from_app=True) is None


# -- tshark reads what we write ------------------------------------------------------------

@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed (.ci/run)")
def test_tshark_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "sample.pcapng"
    path.write_bytes(sample_stream()[:-len(pcapng.enhanced_packet(0, 0, b"\x45" + b"\0" * 18))])
    result = subprocess.run(
        ["tshark", "-r", str(path), "-N", "n", "-o", "tcp.check_checksum:TRUE",
         "-T", "fields", "-E", "separator=|", "-e", "frame.comment", "-e", "ip.dst_host",
         "-e", "tcp.dstport", "-e", "tcp.flags.syn", "-e", "tcp.checksum.status",
         "-e", "frame.time_epoch"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    fields = result.stdout.strip().split("|")
    assert fields[0] == "flow #1 curl(42)"
    assert fields[1] == "example.test"  # the NRB names the address
    assert fields[2:5] == ["80", "1", "1"]  # checksum status 1: good
    assert fields[5].startswith("1700000000.123456789")
