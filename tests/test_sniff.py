"""Sniffers fed real client first flights: whole, byte by byte, truncated, with junk."""

from __future__ import annotations

import pathlib
import struct
import sys

import pytest
from aioquic.quic.packet import QuicProtocolVersion
from hypothesis import given, settings
from hypothesis import strategies as st

from tunproxy.sniff import (
    NEED_MORE,
    QuicSniffer,
    parse_client_hello,
    sniff_http,
    sniff_quic,
    sniff_stream,
    sniff_tls,
)

DATA = pathlib.Path(__file__).parent / "data" / "dns"
sys.path.insert(0, str(DATA))
from dnstest_fixtures import (  # noqa: E402
    quic_initial_datagrams,
    tls_client_hello,
    unpack_datagrams,
)

TLS_FIXTURE = (DATA / "tls_client_hello.bin").read_bytes()
QUIC_FIXTURE = unpack_datagrams((DATA / "quic_initial.bin").read_bytes())
QUIC_BIG_FIXTURE = unpack_datagrams((DATA / "quic_initial_big.bin").read_bytes())


# --- TLS -------------------------------------------------------------------------------


def test_tls_fixture_whole() -> None:
    assert sniff_tls(TLS_FIXTURE) == "www.example.test"
    assert sniff_stream(TLS_FIXTURE) == "www.example.test"


def test_tls_fresh_client_hello_with_trailing_data() -> None:
    hello = tls_client_hello("Fresh.Example.TEST")
    assert sniff_tls(hello + b"\x17\x03\x03\x00\x05hello") == "fresh.example.test"


def test_tls_byte_by_byte_needs_more_until_complete() -> None:
    for cut in range(len(TLS_FIXTURE)):
        assert sniff_tls(TLS_FIXTURE[:cut]) is NEED_MORE, cut
    assert sniff_tls(TLS_FIXTURE) == "www.example.test"


def fragment_records(hello: bytes, size: int) -> bytes:
    """The same handshake message spread over records of ``size`` bytes (RFC 8446 5.1)."""
    body = hello[5:]
    out = b""
    for i in range(0, len(body), size):
        chunk = body[i : i + size]
        out += b"\x16\x03\x01" + struct.pack("!H", len(chunk)) + chunk
    return out


@pytest.mark.parametrize("size", [1, 7, 100])
def test_tls_client_hello_fragmented_over_records(size: int) -> None:
    data = fragment_records(TLS_FIXTURE, size)
    assert sniff_tls(data) == "www.example.test"
    assert sniff_tls(data[: len(data) // 2]) is NEED_MORE


def test_tls_without_sni_and_with_ip_literal() -> None:
    context_hello = tls_client_hello("192.0.2.7")  # ssl sends no SNI for an IP literal
    assert sniff_tls(context_hello) is None


def client_hello(*extensions: tuple[int, bytes]) -> bytes:
    """A minimal ClientHello record built field by field (RFC 8446 4.1.2)."""
    exts = b"".join(struct.pack("!HH", t, len(v)) + v for t, v in extensions)
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += struct.pack("!H", len(exts)) + exts
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def server_name(*names: tuple[int, bytes]) -> tuple[int, bytes]:
    entries = b"".join(bytes([t]) + struct.pack("!H", len(n)) + n for t, n in names)
    return 0, struct.pack("!H", len(entries)) + entries


def test_tls_constructed_client_hello() -> None:
    alpn = (16, b"\x00\x03\x02h2")
    assert sniff_tls(client_hello(alpn, server_name((0, b"built.test.")))) == "built.test"
    assert sniff_tls(client_hello(alpn)) is None  # no server_name extension
    assert sniff_tls(client_hello(server_name((0, b"10.1.2.3")))) is None  # IP literal
    assert sniff_tls(client_hello(server_name((0, b"bad name")))) is None
    assert sniff_tls(client_hello(server_name((7, b"x"), (0, b"second.test")))) == "second.test"


@pytest.mark.parametrize(
    "data",
    [b"\x17\x03\x03\x00\x10", b"\x16\x02\x00", b"\x16\x03\x01\x00\x00", b"SSH-2.0-OpenSSH\r\n"],
)
def test_tls_not_a_client_hello(data: bytes) -> None:
    assert sniff_tls(data) is None


def test_tls_server_hello_type_is_not_sniffed() -> None:
    assert sniff_tls(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00") is None


@given(st.binary(max_size=300))
def test_parse_client_hello_never_raises(body: bytes) -> None:
    result = parse_client_hello(body)
    assert result is None or isinstance(result, str)


@settings(max_examples=200)
@given(st.binary(max_size=600))
def test_stream_sniffer_never_raises(data: bytes) -> None:
    result = sniff_stream(data)
    assert result is None or result is NEED_MORE or isinstance(result, str)


# --- HTTP ------------------------------------------------------------------------------

HTTP_REQUEST = (
    b"GET /index.html HTTP/1.1\r\nUser-Agent: curl/8.5.0\r\nHost: Name.Test:8080\r\n"
    b"Accept: */*\r\n\r\n"
)


def test_http_whole_and_with_body() -> None:
    assert sniff_http(HTTP_REQUEST) == "name.test"
    post = b"POST /x HTTP/1.1\r\nhost: api.test\r\nContent-Length: 3\r\n\r\nabc"
    assert sniff_stream(post) == "api.test"


def test_http_byte_by_byte() -> None:
    host_line_end = HTTP_REQUEST.index(b"Host:") + len(b"Host: Name.Test:8080\r\n")
    for cut in range(host_line_end - 1):
        assert sniff_http(HTTP_REQUEST[:cut]) is NEED_MORE, cut
    assert sniff_http(HTTP_REQUEST[:host_line_end]) == "name.test"


def test_http_connect_authority_form() -> None:
    assert sniff_http(b"CONNECT tunnel.test:443 HTTP/1.1\r\nHost: x.test\r\n\r\n") == "tunnel.test"


def test_http_absolute_form_wins() -> None:
    request = b"GET http://proxy.target.test/ HTTP/1.1\r\nHost: other.test\r\n\r\n"
    assert sniff_http(request) == "proxy.target.test"


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",  # IP literal
        b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
        b"GET / SPDY/3\r\nHost: a.test\r\n\r\n",
        b"HELO mail.test\r\n",  # server-speaks-first protocols' clients, SMTP-ish
        b"\x00\x01\x02",
    ],
)
def test_http_no_domain(data: bytes) -> None:
    assert sniff_http(data) is None


def test_http_gives_up_on_endless_headers() -> None:
    data = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 20000
    assert sniff_http(data) is None


# --- QUIC ------------------------------------------------------------------------------


def test_quic_fixture_one_initial() -> None:
    assert len(QUIC_FIXTURE) == 1
    assert sniff_quic(QUIC_FIXTURE) == "quic.example.test"


def test_quic_client_hello_over_several_initials() -> None:
    sniffer = QuicSniffer()
    results = [sniffer.receive(d) for d in QUIC_BIG_FIXTURE]
    assert results[:-1] == [NEED_MORE] * (len(QUIC_BIG_FIXTURE) - 1)
    assert results[-1] == "big.example.test"
    assert sniffer.receive(b"anything later") == "big.example.test"  # decided once


def test_quic_initials_in_reverse_order() -> None:
    assert sniff_quic(list(reversed(QUIC_BIG_FIXTURE))) == "big.example.test"


def test_quic_fresh_connection() -> None:
    datagrams = quic_initial_datagrams("Live.Example.Test", ["h3"])
    assert sniff_quic(datagrams) == "live.example.test"


def test_quic_version_2_initial() -> None:
    # RFC 9369: other salt, other key labels, other Initial type bits.
    datagrams = quic_initial_datagrams("v2.example.test", ["h3"], QuicProtocolVersion.VERSION_2)
    assert datagrams[0][1:5] == bytes.fromhex("6b3343cf")
    assert sniff_quic(datagrams) == "v2.example.test"


@pytest.mark.parametrize("cut", [1, 5, 30, 300, 500])
def test_quic_truncated_datagram_is_no(cut: int) -> None:
    # A datagram arrives whole or not at all: a cut one is not QUIC we can read.
    # (aioquic's Initial is ~526 bytes, then zero padding up to 1200.)
    assert sniff_quic([QUIC_FIXTURE[0][:cut]]) is None


def test_quic_flipped_ciphertext_fails_authentication() -> None:
    damaged = bytearray(QUIC_FIXTURE[0])
    damaged[100] ^= 0x01
    assert sniff_quic([bytes(damaged)]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"\x40" + b"\x00" * 40,  # short header
        b"\xc0\xff\x00\x00\x1d" + b"\x00" * 40,  # draft version we do not read
        b"\xc0\x00\x00\x00\x00" + b"\x00" * 40,  # version negotiation
        b"\x12\x34\x01\x00\x00\x01",  # a DNS query, not QUIC
    ],
)
def test_quic_not_an_initial(data: bytes) -> None:
    assert sniff_quic([data]) is None


def test_quic_gives_up_after_too_many_datagrams() -> None:
    sniffer = QuicSniffer()
    first = QUIC_BIG_FIXTURE[0]
    results = [sniffer.receive(first) for _ in range(QuicSniffer.MAX_DATAGRAMS)]
    assert results[-1] is None and results[0] is NEED_MORE


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=1300))
def test_quic_random_bytes_never_raise(data: bytes) -> None:
    assert sniff_quic([data]) in (None, NEED_MORE) or isinstance(sniff_quic([data]), str)
