"""pcapng, the capture format Wireshark and tshark read: emit blocks as bytes, and parse them.

Sans-I/O: every function returns bytes (or parses bytes); the caller writes them.
Blocks follow the pcapng draft (draft-ietf-opsawg-pcapng, "PCAP Now Generic"):

    Section Header Block (SHB)      starts the file: byte order, version, section length -1
    Interface Description (IDB)     one per interface: link type, snap length, if_tsresol
    Enhanced Packet Block (EPB)     one per packet: interface, timestamp, bytes, options
    Name Resolution Block (NRB)     address -> names, so Wireshark shows names for fake IPs

Every block is ``type, total length, body, total length`` (the length is repeated so a
reader can walk backwards); bodies and option values are padded to 32 bits. Written in the
machine's byte order, which the SHB's magic announces; parsed in either.

Options used: opt_comment (1) on any block, shb_userappl (4), if_name (2),
if_tsresol (9), epb_flags (2: direction in bits 0-1, 1 inbound, 2 outbound).
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BLOCK_EPB",
    "BLOCK_IDB",
    "BLOCK_NRB",
    "BLOCK_SHB",
    "INBOUND",
    "LINKTYPE_RAW",
    "OUTBOUND",
    "Block",
    "PcapngError",
    "enhanced_packet",
    "interface_description",
    "name_resolution",
    "parse_blocks",
    "section_header",
]

BLOCK_SHB = 0x0A0D0D0A
BLOCK_IDB = 0x00000001
BLOCK_NRB = 0x00000004
BLOCK_EPB = 0x00000006
BYTE_ORDER_MAGIC = 0x1A2B3C4D

LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble

OPT_ENDOFOPT = 0
OPT_COMMENT = 1
SHB_USERAPPL = 4
IF_NAME = 2
IF_TSRESOL = 9
EPB_FLAGS = 2
NRB_RECORD_END = 0
NRB_RECORD_IPV4 = 1
NRB_RECORD_IPV6 = 2

INBOUND = 1  # epb_flags direction: received on the interface
OUTBOUND = 2  # sent on the interface

_E = "<" if sys.byteorder == "little" else ">"
_HEAD = struct.Struct(_E + "II")  # block type, total length
_U32 = struct.Struct(_E + "I")
_OPT = struct.Struct(_E + "HH")
_SHB = struct.Struct(_E + "IHHq")  # magic, major, minor, section length
_IDB = struct.Struct(_E + "HHI")  # link type, reserved, snap length
_EPB = struct.Struct(_E + "IIIII")  # interface, ts high, ts low, captured, original length
_NRB_REC = struct.Struct(_E + "HH")


class PcapngError(ValueError):
    """The bytes are not a well-formed pcapng stream (the only error parse_blocks raises)."""


def _pad(n: int) -> int:
    return -n & 3


def _option(code: int, value: bytes) -> bytes:
    return _OPT.pack(code, len(value)) + value + b"\0" * _pad(len(value))


def _options(pairs: Iterable[tuple[int, bytes]]) -> bytes:
    body = b"".join(_option(code, value) for code, value in pairs)
    return body + _OPT.pack(OPT_ENDOFOPT, 0) if body else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return _HEAD.pack(block_type, total) + body + _U32.pack(total)


def _text(value: str) -> bytes:
    # UTF-8 without a terminating NUL, as the draft asks for string options.
    return value.encode("utf-8", "replace")


def section_header(*, application: str | None = None, comment: str | None = None) -> bytes:
    """The SHB that starts a file (section length unknown: -1, as a stream writer must)."""
    opts: list[tuple[int, bytes]] = []
    if comment:
        opts.append((OPT_COMMENT, _text(comment)))
    if application:
        opts.append((SHB_USERAPPL, _text(application)))
    return _block(BLOCK_SHB, _SHB.pack(BYTE_ORDER_MAGIC, 1, 0, -1) + _options(opts))


def interface_description(
    *, linktype: int = LINKTYPE_RAW, snaplen: int = 0, name: str | None = None,
    tsresol: int = 9,
) -> bytes:
    """An IDB; ``tsresol`` is the power of ten of the timestamp unit (9: nanoseconds)."""
    opts: list[tuple[int, bytes]] = []
    if name:
        opts.append((IF_NAME, _text(name)))
    if tsresol != 6:  # microseconds are the default; say anything else
        opts.append((IF_TSRESOL, bytes([tsresol])))
    return _block(BLOCK_IDB, _IDB.pack(linktype, 0, snaplen) + _options(opts))


def enhanced_packet(
    interface: int, timestamp: int, data: bytes | bytearray | memoryview, *,
    original_length: int | None = None, comment: str | None = None,
    direction: int | None = None,
) -> bytes:
    """An EPB; ``timestamp`` counts the interface's units (see ``tsresol``) since 1970."""
    opts: list[tuple[int, bytes]] = []
    if comment:
        opts.append((OPT_COMMENT, _text(comment)))
    if direction:
        opts.append((EPB_FLAGS, _U32.pack(direction & 3)))
    captured = len(data)
    head = _EPB.pack(interface, (timestamp >> 32) & 0xFFFFFFFF, timestamp & 0xFFFFFFFF,
                     captured, captured if original_length is None else original_length)
    return _block(BLOCK_EPB, b"".join((head, data, b"\0" * _pad(captured), _options(opts))))


def name_resolution(records: Iterable[tuple[str, Sequence[str]]]) -> bytes:
    """An NRB mapping each address (text, v4 or v6) to its names; b"" when there are none."""
    body = bytearray()
    for address, names in records:
        if not names:
            continue
        ip = ipaddress.ip_address(address)
        kind = NRB_RECORD_IPV4 if ip.version == 4 else NRB_RECORD_IPV6
        value = ip.packed + b"".join(_text(n) + b"\0" for n in names)
        body += _NRB_REC.pack(kind, len(value)) + value + b"\0" * _pad(len(value))
    if not body:
        return b""
    body += _NRB_REC.pack(NRB_RECORD_END, 0)
    return _block(BLOCK_NRB, bytes(body))


# -- parsing (tests, and anyone who wants to read a capture back) ---------------------------


@dataclass(slots=True)
class Block:
    """One parsed block: its type, its fixed fields, the packet bytes (EPB) and options."""

    type: int
    fields: tuple[int, ...] = ()
    data: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    records: list[tuple[str, list[str]]] = field(default_factory=list)  # NRB

    def option(self, code: int) -> bytes | None:
        return next((v for c, v in self.options if c == code), None)

    @property
    def comment(self) -> str | None:
        value = self.option(OPT_COMMENT)
        return None if value is None else value.decode("utf-8", "replace")


def _parse_options(body: bytes, offset: int, order: str) -> list[tuple[int, bytes]]:
    opt = struct.Struct(order + "HH")
    out: list[tuple[int, bytes]] = []
    while offset + 4 <= len(body):
        code, length = opt.unpack_from(body, offset)
        offset += 4
        if code == OPT_ENDOFOPT:
            break
        if offset + length > len(body):
            raise PcapngError(f"option {code} runs past its block")
        out.append((code, bytes(body[offset:offset + length])))
        offset += length + _pad(length)
    return out


def _parse_nrb(body: bytes, order: str) -> tuple[list[tuple[str, list[str]]], int]:
    rec = struct.Struct(order + "HH")
    records: list[tuple[str, list[str]]] = []
    offset = 0
    while True:
        if offset + 4 > len(body):
            raise PcapngError("name resolution block without an end record")
        kind, length = rec.unpack_from(body, offset)
        offset += 4
        if kind == NRB_RECORD_END:
            return records, offset
        value = body[offset:offset + length]
        if len(value) != length:
            raise PcapngError("name resolution record runs past its block")
        size = {NRB_RECORD_IPV4: 4, NRB_RECORD_IPV6: 16}.get(kind)
        if size is not None and length > size:
            address = str(ipaddress.ip_address(bytes(value[:size])))
            names = [n.decode("utf-8", "replace") for n in bytes(value[size:]).split(b"\0") if n]
            records.append((address, names))
        offset += length + _pad(length)


def parse_blocks(data: bytes | bytearray | memoryview) -> Iterator[Block]:
    """Every block of a pcapng stream, in order. Raises only PcapngError."""
    data = bytes(data)
    order = _E
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise PcapngError(f"truncated block at offset {offset}")
        block_type = struct.unpack_from(order + "I", data, offset)[0]
        if block_type == BLOCK_SHB:
            magic_le = struct.unpack_from("<I", data, offset + 8)[0]
            if magic_le == BYTE_ORDER_MAGIC:
                order = "<"
            elif struct.unpack_from(">I", data, offset + 8)[0] == BYTE_ORDER_MAGIC:
                order = ">"
            else:
                raise PcapngError("section header with an unknown byte-order magic")
        elif offset == 0:
            raise PcapngError("a pcapng stream starts with a section header block")
        total = struct.unpack_from(order + "I", data, offset + 4)[0]
        if total < 12 or total % 4 or offset + total > len(data):
            raise PcapngError(f"bad block length {total} at offset {offset}")
        if struct.unpack_from(order + "I", data, offset + total - 4)[0] != total:
            raise PcapngError(f"trailing length does not match at offset {offset}")
        body = data[offset + 8:offset + total - 4]
        offset += total
        yield _parse_body(block_type, body, order)


def _parse_body(block_type: int, body: bytes, order: str) -> Block:
    try:
        if block_type == BLOCK_SHB:
            fields = struct.unpack_from(order + "IHHq", body, 0)
            return Block(block_type, fields, options=_parse_options(body, 16, order))
        if block_type == BLOCK_IDB:
            fields = struct.unpack_from(order + "HHI", body, 0)
            return Block(block_type, fields, options=_parse_options(body, 8, order))
        if block_type == BLOCK_EPB:
            fields = struct.unpack_from(order + "IIIII", body, 0)
            captured = fields[3]
            end = 20 + captured
            if end > len(body):
                raise PcapngError("packet data runs past its block")
            return Block(block_type, fields, data=body[20:end],
                         options=_parse_options(body, end + _pad(captured), order))
        if block_type == BLOCK_NRB:
            records, offset = _parse_nrb(body, order)
            return Block(block_type, records=records,
                         options=_parse_options(body, offset, order))
    except struct.error as exc:
        raise PcapngError(f"block {block_type:#x} too short: {exc}") from None
    return Block(block_type, data=body)
