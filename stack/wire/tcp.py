"""TCP header and options (RFC 9293 3.1; options RFC 9293 3.2, RFC 7323, RFC 2018).

::

    0  source port            2  destination port
    4  sequence number
    8  acknowledgment number
   12  data offset(4) | reserved(4)   13  flags (CWR ECE URG ACK PSH RST SYN FIN)
   14  window                16  checksum          18  urgent pointer
   20  options (data offset > 5), padded to a multiple of 4

``TcpPacket`` is the checked view: once its constructor accepted a buffer, the
fixed fields and the option area are known to be in bounds. ``TcpRepr`` is the
parsed form; ``parse``/``emit`` convert between the two. The checksum is never
computed here (the stack verifies or offloads it; see stack/wire/checksum.py).
The urgent pointer is ignored on input and written as zero (RFC 6093: nobody
relies on urgent data, and the relay has no way to express it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from stack.wire import WireError

__all__ = [
    "ACK",
    "CHECKSUM_OFFSET",
    "CWR",
    "ECE",
    "FIN",
    "HEADER_LEN",
    "MAX_HEADER_LEN",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "TcpPacket",
    "TcpRepr",
    "emit",
    "flags_str",
    "parse",
]

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

HEADER_LEN = 20
MAX_HEADER_LEN = 60

# Field offsets, named once.
SRC_PORT = 0
DST_PORT = 2
SEQ_NUM = 4
ACK_NUM = 8
DATA_OFFSET = 12
FLAGS = 13
WINDOW = 14
CHECKSUM_OFFSET = 16
URGENT = 18

# Option kinds (IANA "TCP Option Kind Numbers").
OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WS = 3
OPT_SACK_PERM = 4
OPT_SACK = 5
OPT_TS = 8

_HEADER = struct.Struct("!HHIIBBHHH")
_TS_ONLY_PREFIX = b"\x01\x01\x08\x0a"  # NOP NOP TS(10): what Linux puts on every data segment
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
_FLAG_NAMES = ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "."), (URG, "U"),
               (ECE, "E"), (CWR, "W"))


def flags_str(flags: int) -> str:
    """tcpdump-style flag letters, for test messages and logs: ``S.`` is SYN-ACK."""
    return "".join(name for bit, name in _FLAG_NAMES if flags & bit) or "none"


class TcpPacket:
    """Checked view of a TCP segment: header length validated against the buffer."""

    __slots__ = ("buffer", "header_len")

    def __init__(self, buffer: memoryview) -> None:
        if len(buffer) < HEADER_LEN:
            raise WireError("tcp-truncated", f"{len(buffer)} bytes")
        header_len = (buffer[DATA_OFFSET] >> 4) * 4
        if header_len < HEADER_LEN:
            raise WireError("tcp-data-offset", str(header_len))
        if header_len > len(buffer):
            raise WireError("tcp-truncated", f"header {header_len} > {len(buffer)} bytes")
        self.buffer = buffer
        self.header_len = header_len

    @property
    def options(self) -> memoryview:
        return self.buffer[HEADER_LEN : self.header_len]

    @property
    def payload(self) -> memoryview:
        return self.buffer[self.header_len :]


@dataclass(frozen=True, slots=True)
class TcpRepr:
    """A parsed TCP header. Sequence numbers are raw 32-bit values."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int  # the raw 16-bit field (unscaled)
    mss: int | None = None
    window_scale: int | None = None  # raw shift as sent (RFC 7323 2.3: >14 means 14)
    sack_permitted: bool = False
    sack_blocks: tuple[tuple[int, int], ...] = ()  # (left edge, right edge) pairs
    timestamp: tuple[int, int] | None = None  # (TSval, TSecr)

    def options_len(self) -> int:
        """Bytes of options ``emit`` writes (already padded to a multiple of 4)."""
        n = 0
        if self.mss is not None:
            n += 4
        if self.window_scale is not None:
            n += 4  # NOP + WS(3)
        if self.sack_permitted:
            n += 4  # NOP NOP + SACK-permitted(2)
        if self.timestamp is not None:
            n += 12  # NOP NOP + TS(10)
        if self.sack_blocks:
            n += 4 + 8 * len(self.sack_blocks)  # NOP NOP + SACK(2 + 8n)
        return n

    def header_len(self) -> int:
        return HEADER_LEN + self.options_len()

    def __str__(self) -> str:  # for assertion messages
        text = (
            f"TCP {self.src_port}->{self.dst_port} [{flags_str(self.flags)}] "
            f"seq={self.seq} ack={self.ack} win={self.window}"
        )
        if self.sack_blocks:
            text += f" sack={list(self.sack_blocks)}"
        return text


def _parse_options(opts: memoryview) -> tuple[
    int | None, int | None, bool, tuple[tuple[int, int], ...], tuple[int, int] | None
]:
    """RFC 9293 3.2: kinds 0 and 1 are one byte; every other option has a length byte >= 2."""
    mss: int | None = None
    ws: int | None = None
    sack_perm = False
    blocks: tuple[tuple[int, int], ...] = ()
    ts: tuple[int, int] | None = None
    i = 0
    end = len(opts)
    while i < end:
        kind = opts[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= end:
            raise WireError("tcp-option", f"kind {kind} without length")
        length = opts[i + 1]
        if length < 2 or i + length > end:
            raise WireError("tcp-option", f"kind {kind} length {length}")
        if kind == OPT_MSS:
            if length != 4:
                raise WireError("tcp-option", f"MSS length {length}")
            mss = _U16.unpack_from(opts, i + 2)[0]
        elif kind == OPT_WS:
            if length != 3:
                raise WireError("tcp-option", f"window scale length {length}")
            ws = opts[i + 2]
        elif kind == OPT_SACK_PERM:
            if length != 2:
                raise WireError("tcp-option", f"SACK-permitted length {length}")
            sack_perm = True
        elif kind == OPT_SACK:
            if (length - 2) % 8 or length == 2:
                raise WireError("tcp-option", f"SACK length {length}")
            pairs = (_U32X2.unpack_from(opts, j) for j in range(i + 2, i + length, 8))
            blocks = tuple((left, right) for left, right in pairs)
        elif kind == OPT_TS:
            if length != 10:
                raise WireError("tcp-option", f"timestamp length {length}")
            tsval, tsecr = _U32X2.unpack_from(opts, i + 2)
            ts = (tsval, tsecr)
        # Unknown options are skipped by their length (RFC 9293 3.2, MUST-6).
        i += length
    return mss, ws, sack_perm, blocks, ts


def parse(segment: memoryview) -> tuple[TcpRepr, memoryview]:
    """Header + payload view. Raises WireError on malformed input; never checks the checksum."""
    packet = TcpPacket(segment)
    sport, dport, seq, ack, _off, flags, window, _csum, _urg = _HEADER.unpack_from(segment)
    hl = packet.header_len
    if hl == HEADER_LEN:
        return TcpRepr(sport, dport, seq, ack, flags, window), segment[hl:]
    if hl == 32 and segment[20:24] == _TS_ONLY_PREFIX:
        # The common case (Linux: NOP NOP TS on every segment), without the option loop.
        tsval, tsecr = _U32X2.unpack_from(segment, 24)
        repr_ = TcpRepr(sport, dport, seq, ack, flags, window, timestamp=(tsval, tsecr))
        return repr_, segment[hl:]
    mss, ws, sack_perm, blocks, ts = _parse_options(segment[HEADER_LEN:hl])
    repr_ = TcpRepr(sport, dport, seq, ack, flags, window, mss, ws, sack_perm, blocks, ts)
    return repr_, segment[hl:]


def emit(
    repr: TcpRepr, payload: bytes | memoryview, buf: bytearray | memoryview, offset: int
) -> int:
    """Write header (checksum field 0) + payload at ``buf[offset:]``; return bytes written.

    Options are laid out as Linux does (MSS, then NOP-padded WS, SACK-permitted,
    timestamps, SACK blocks), each 4-byte aligned so no trailing padding is needed.
    Raises ValueError (our bug, not the peer's) when the options exceed 40 bytes.
    """
    opt_len = repr.options_len()
    if opt_len > MAX_HEADER_LEN - HEADER_LEN:
        raise ValueError(f"TCP options too long: {opt_len} bytes")
    hl = HEADER_LEN + opt_len
    _HEADER.pack_into(
        buf, offset, repr.src_port, repr.dst_port, repr.seq, repr.ack,
        (hl // 4) << 4, repr.flags, repr.window, 0, 0,
    )
    if opt_len:
        i = offset + HEADER_LEN
        if repr.mss is not None:
            struct.pack_into("!BBH", buf, i, OPT_MSS, 4, repr.mss)
            i += 4
        if repr.window_scale is not None:
            struct.pack_into("!BBBB", buf, i, OPT_NOP, OPT_WS, 3, repr.window_scale)
            i += 4
        if repr.sack_permitted:
            struct.pack_into("!BBBB", buf, i, OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2)
            i += 4
        if repr.timestamp is not None:
            struct.pack_into("!BBBBII", buf, i, OPT_NOP, OPT_NOP, OPT_TS, 10, *repr.timestamp)
            i += 12
        if repr.sack_blocks:
            n = len(repr.sack_blocks)
            struct.pack_into("!BBBB", buf, i, OPT_NOP, OPT_NOP, OPT_SACK, 2 + 8 * n)
            i += 4
            for left, right in repr.sack_blocks:
                _U32X2.pack_into(buf, i, left, right)
                i += 8
    n = len(payload)
    if n:
        buf[offset + hl : offset + hl + n] = payload
    return hl + n
