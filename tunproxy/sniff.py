"""Learn a flow's domain from its first client bytes. Pure parsers, no I/O.

For a flow to a real address with no known domain, the relay may read the
client's first bytes before the rule decision:

- ``sniff_tls``: the server_name extension of a TLS ClientHello (RFC 8446 4.1.2,
  RFC 6066 section 3), reassembled across TLS records (RFC 8446 5.1);
- ``sniff_http``: the Host of an HTTP/1.x request (RFC 9112 3.2; absolute-form
  target wins, RFC 9112 3.2.2);
- ``QuicSniffer``: the SNI in the ClientHello carried by QUIC Initial packets
  (RFC 9000 17.2.2, 19.6), which are protected with keys anyone can derive from
  the Destination Connection ID (RFC 9001 5.2; v2: RFC 9369). The ClientHello
  may span several Initial packets and CRYPTO frames may come in any order.

Each returns the domain (lower case, no trailing dot), ``None`` when the bytes
cannot carry one (another protocol, no SNI, an IP literal, malformed), or
``NEED_MORE`` when a prefix looks right but ends too early. The caller bounds
the wait; a server-speaks-first protocol yields ``NEED_MORE`` only until the
caller's timer fires, or ``None`` at once for its first byte if it is not TLS
or an HTTP method.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tunproxy.varint import parse_varint

if TYPE_CHECKING:
    from aioquic.quic.crypto import CryptoPair

__all__ = [
    "NEED_MORE",
    "NeedMore",
    "QuicSniffer",
    "SniffResult",
    "load_quic_crypto",
    "parse_client_hello",
    "sniff_http",
    "sniff_quic",
    "sniff_stream",
    "sniff_tls",
]


class NeedMore:
    """The bytes so far are a valid prefix; more are needed to decide."""

    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __bool__(self) -> bool:
        return False


NEED_MORE = NeedMore()
SniffResult = str | None | NeedMore

MAX_HANDSHAKE = 64 * 1024  # a ClientHello bigger than this is not one we wait for
MAX_HTTP_HEADER = 16 * 1024
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                       r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")  # fmt: skip
_U16 = struct.Struct("!H")


def _domain(raw: bytes | str) -> str | None:
    """A plausible DNS name, normalized; None for IP literals and junk."""
    try:
        name = raw.decode("ascii") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        return None
    name = name.rstrip(".").lower()
    if not _HOSTNAME.match(name):
        return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None  # RFC 6066 3: literal addresses are not permitted in SNI, nor are they names


# --- TLS --------------------------------------------------------------------------------

TLS_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
NAME_TYPE_HOST = 0


def parse_client_hello(body: bytes) -> str | None:
    """SNI of a complete ClientHello body (after the 4-byte handshake header)."""
    try:
        offset = 2 + 32  # legacy_version, random
        offset += 1 + body[offset]  # legacy_session_id
        offset += 2 + _U16.unpack_from(body, offset)[0]  # cipher_suites
        offset += 1 + body[offset]  # legacy_compression_methods
        if offset == len(body):
            return None  # no extensions at all
        (ext_total,) = _U16.unpack_from(body, offset)
        offset += 2
        end = offset + ext_total
        if end > len(body):
            return None
        while offset + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, offset)
            offset += 4
            if ext_type == EXT_SERVER_NAME:
                ext = body[offset : offset + ext_len]
                (list_len,) = _U16.unpack_from(ext, 0)
                pos = 2
                while pos + 3 <= 2 + list_len:
                    name_type = ext[pos]
                    (name_len,) = _U16.unpack_from(ext, pos + 1)
                    name = ext[pos + 3 : pos + 3 + name_len]
                    if len(name) != name_len:
                        return None
                    if name_type == NAME_TYPE_HOST:
                        return _domain(name)
                    pos += 3 + name_len
                return None
            offset += ext_len
    except (IndexError, struct.error):
        return None
    return None


def _handshake_message(stream: bytes | bytearray) -> SniffResult:
    """SNI from a handshake byte stream starting with a ClientHello."""
    if not stream:
        return NEED_MORE
    if stream[0] != HANDSHAKE_CLIENT_HELLO:
        return None
    if len(stream) < 4:
        return NEED_MORE
    length = int.from_bytes(stream[1:4], "big")
    if length > MAX_HANDSHAKE:
        return None
    if len(stream) < 4 + length:
        return NEED_MORE
    return parse_client_hello(bytes(stream[4 : 4 + length]))


def sniff_tls(data: bytes) -> SniffResult:
    """SNI from the first client bytes of a TLS connection."""
    handshake = bytearray()
    offset = 0
    while True:
        if offset >= len(data):
            return NEED_MORE
        # RFC 8446 5.1: type(1) legacy_record_version(2) length(2); the ClientHello
        # may be fragmented over several handshake records.
        if data[offset] != TLS_HANDSHAKE:
            return None
        if offset + 1 < len(data) and data[offset + 1] != 3:
            return None
        if offset + 5 > len(data):
            return NEED_MORE
        (length,) = _U16.unpack_from(data, offset + 3)
        if length == 0 or length > 16384 + 2048:
            return None
        handshake += data[offset + 5 : offset + 5 + length]
        result = _handshake_message(handshake)
        if result is not NEED_MORE:
            return result
        if offset + 5 + length > len(data):
            return NEED_MORE
        offset += 5 + length
        if offset > MAX_HANDSHAKE:
            return None


# --- HTTP/1 -----------------------------------------------------------------------------

HTTP_METHODS = (b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                b"CONNECT", b"TRACE")  # fmt: skip


def _host_from_authority(authority: str) -> str | None:
    authority = authority.strip().rsplit("@", 1)[-1]
    if authority.startswith("["):
        return None  # an IPv6 literal says nothing about a domain
    host = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return _domain(host)


def sniff_http(data: bytes) -> SniffResult:
    """Host of an HTTP/1.x request from its first bytes."""
    head = data[:16]
    for method in HTTP_METHODS:
        token = method + b" "
        if head.startswith(token):
            break
        if token.startswith(head):
            return NEED_MORE  # "GE" could still become "GET "
    else:
        return None
    line_end = data.find(b"\n")
    if line_end < 0:
        return NEED_MORE if len(data) < MAX_HTTP_HEADER else None
    request_line = data[:line_end].rstrip(b"\r").decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    target = parts[1]
    if parts[0] == "CONNECT":  # authority-form (RFC 9112 3.2.3)
        return _host_from_authority(target)
    if "://" in target:  # absolute-form (a proxy request): its authority wins
        authority = target.split("://", 1)[1].split("/", 1)[0]
        return _host_from_authority(authority)
    offset = line_end + 1
    while True:
        end = data.find(b"\n", offset)
        if end < 0:
            return NEED_MORE if len(data) < MAX_HTTP_HEADER else None
        line = data[offset:end].rstrip(b"\r")
        if not line:
            return None  # end of the header block without Host
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            return _host_from_authority(value.decode("latin-1"))
        offset = end + 1


def sniff_stream(data: bytes) -> SniffResult:
    """TLS or HTTP: whichever the first bytes are; None if neither."""
    if not data:
        return NEED_MORE
    if data[0] == TLS_HANDSHAKE:
        return sniff_tls(data)
    return sniff_http(data)


# --- QUIC -------------------------------------------------------------------------------

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}  # RFC 9000 17.2.2, RFC 9369 3.2
FRAME_PADDING, FRAME_PING, FRAME_ACK, FRAME_ACK_ECN, FRAME_CRYPTO = 0x00, 0x01, 0x02, 0x03, 0x06
FRAME_CLOSE = 0x1C


class _Malformed(Exception):
    pass


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """RFC 9000 16: value and the offset after it."""
    parsed = parse_varint(data, offset)
    if parsed is None:
        raise _Malformed
    return parsed


def load_quic_crypto() -> None:
    """Import aioquic's packet protection (with the cryptography package: ~12 MiB of
    RSS, ~70 ms). ``QuicSniffer`` does it at its first Initial; a relay that sniffs
    calls this at start-up instead, so that the first QUIC flow does not stall it."""
    import aioquic.quic.crypto  # noqa: F401


class QuicSniffer:
    """Feed the client's datagrams of one UDP flow; each call says whether the SNI is known.

    Keys come from the first Initial's Destination Connection ID (RFC 9001 5.2).
    """

    MAX_DATAGRAMS = 8  # Initials to wait for; a ClientHello needs 1-3 in practice

    def __init__(self) -> None:
        self._dcid: bytes | None = None
        self._version = 0
        self._crypto: CryptoPair | None = None
        self._fragments: dict[int, bytes] = {}
        self._datagrams = 0
        self._result: SniffResult = NEED_MORE

    def receive(self, datagram: bytes) -> SniffResult:
        if self._result is not NEED_MORE:
            return self._result
        self._datagrams += 1
        try:
            self._receive(datagram)
        except (_Malformed, ValueError, IndexError, struct.error):  # CryptoError is a ValueError
            self._result = None
            return None
        stream = self._contiguous()
        result = _handshake_message(stream)
        if result is NEED_MORE and self._datagrams >= self.MAX_DATAGRAMS:
            result = None
        self._result = result
        return result

    def _contiguous(self) -> bytes:
        stream = bytearray()
        while True:
            # Any fragment that reaches past the end of what we have extends it.
            best = b""
            for start, data in self._fragments.items():
                if start <= len(stream) < start + len(data):
                    tail = data[len(stream) - start :]
                    if len(tail) > len(best):
                        best = tail
            if not best:
                return bytes(stream)
            stream += best

    def _receive(self, datagram: bytes) -> None:
        offset = 0
        while offset < len(datagram):
            start = offset
            first = datagram[offset]
            if not first & 0x80:
                if start == 0:
                    raise _Malformed  # short header: not the start of a connection
                return  # a short-header packet coalesced after long ones: ignore
            if not first & 0x40:
                raise _Malformed  # fixed bit (RFC 9000 17.2)
            if offset + 6 > len(datagram):
                raise _Malformed
            version = int.from_bytes(datagram[offset + 1 : offset + 5], "big")
            if version not in INITIAL_TYPE:
                raise _Malformed  # version negotiation or a version we cannot read
            offset += 5
            dcid_len = datagram[offset]
            if dcid_len > 20:
                raise _Malformed
            dcid = datagram[offset + 1 : offset + 1 + dcid_len]
            offset += 1 + dcid_len
            scid_len = datagram[offset]
            if scid_len > 20:
                raise _Malformed
            offset += 1 + scid_len
            is_initial = (first >> 4) & 0x03 == INITIAL_TYPE[version]
            if is_initial:
                token_len, offset = _varint(datagram, offset)
                offset += token_len
            length, offset = _varint(datagram, offset)
            end = offset + length
            if end > len(datagram) or length < 20:
                raise _Malformed
            if is_initial:
                self._initial(datagram[start:end], offset - start, dcid, version)
            elif start == 0:
                raise _Malformed  # the first packet of a connection is an Initial
            offset = end

    def _initial(self, packet: bytes, pn_offset: int, dcid: bytes, version: int) -> None:
        if self._crypto is None:
            # Imported here, not with this module: see load_quic_crypto.
            from aioquic.quic.crypto import CryptoPair

            self._dcid, self._version = dcid, version
            self._crypto = CryptoPair()
            self._crypto.setup_initial(cid=dcid, is_client=False, version=version)
        elif dcid != self._dcid or version != self._version:
            raise _Malformed  # not the same connection attempt
        _header, payload, _pn = self._crypto.decrypt_packet(packet, pn_offset, 0)
        self._frames(payload)

    def _frames(self, payload: bytes) -> None:
        offset = 0
        while offset < len(payload):
            frame_type, offset = _varint(payload, offset)
            if frame_type in (FRAME_PADDING, FRAME_PING):
                continue
            if frame_type in (FRAME_ACK, FRAME_ACK_ECN):  # RFC 9000 19.3
                _, offset = _varint(payload, offset)  # largest acknowledged
                _, offset = _varint(payload, offset)  # delay
                count, offset = _varint(payload, offset)
                _, offset = _varint(payload, offset)  # first range
                for _ in range(2 * count):
                    _, offset = _varint(payload, offset)
                if frame_type == FRAME_ACK_ECN:
                    for _ in range(3):
                        _, offset = _varint(payload, offset)
            elif frame_type == FRAME_CRYPTO:  # RFC 9000 19.6
                crypto_offset, offset = _varint(payload, offset)
                length, offset = _varint(payload, offset)
                data = payload[offset : offset + length]
                if len(data) != length or crypto_offset + length > MAX_HANDSHAKE:
                    raise _Malformed
                if len(data) > len(self._fragments.get(crypto_offset, b"")):
                    self._fragments[crypto_offset] = data
                offset += length
            else:
                # CONNECTION_CLOSE or a frame not allowed in Initial packets.
                raise _Malformed


def sniff_quic(datagrams: Iterable[bytes]) -> SniffResult:
    """SNI from a client's first datagrams (convenience over ``QuicSniffer``)."""
    sniffer = QuicSniffer()
    result: SniffResult = NEED_MORE
    for datagram in datagrams:
        result = sniffer.receive(datagram)
        if result is not NEED_MORE:
            break
    return result
