"""The sans-I/O MASQUE layer (RFC 9297 capsules, RFC 9298 CONNECT-UDP, RFC 9114 CONNECT),
tested with bytes alone: fixtures, round trips, input fed byte by byte, hostile input."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunproxy.masque import (
    CapsuleParser,
    ConnectRequest,
    MasqueError,
    RequestRefused,
    connect_request,
    connect_udp_request,
    datagram_prefix,
    emit_capsule,
    emit_http_datagram,
    expand_udp_template,
    parse_http_datagram,
    parse_quarter_stream_id,
    parse_request,
    parse_udp_path,
    response_headers,
    response_status,
)
from tunproxy.masque.capsule import emit_varint, parse_varint
from tunproxy.masque.request import DEFAULT_UDP_TEMPLATE, check_template

# RFC 9000 appendix A.1's sample varints.
VARINTS = [
    (bytes.fromhex("c2197c5eff14e88c"), 151_288_809_941_952_652),
    (bytes.fromhex("9d7f3e7d"), 494_878_333),
    (bytes.fromhex("7bbd"), 15_293),
    (bytes.fromhex("25"), 37),
]


@pytest.mark.parametrize(("wire", "value"), VARINTS)
def test_varint_fixtures(wire: bytes, value: int) -> None:
    assert parse_varint(wire) == (value, len(wire))
    assert emit_varint(value) == wire
    assert parse_varint(wire[:-1]) is None


@given(st.integers(0, (1 << 62) - 1))
def test_varint_round_trip(value: int) -> None:
    wire = emit_varint(value)
    assert parse_varint(wire + b"junk") == (value, len(wire))


def test_varint_too_big() -> None:
    with pytest.raises(ValueError):
        emit_varint(1 << 62)


# A DATAGRAM capsule with context 0 and payload "hi": type 0, length 3, 00 'h' 'i'.
DATAGRAM_CAPSULE = bytes.fromhex("00 03 00 68 69")
# An unknown capsule (type 0x2a, 4 bytes) that must be skipped.
UNKNOWN_CAPSULE = bytes.fromhex("2a 04 de ad be ef")


def test_capsule_fixture() -> None:
    assert emit_capsule(0, emit_http_datagram(b"hi")) == DATAGRAM_CAPSULE
    parser = CapsuleParser()
    values = parser.feed(UNKNOWN_CAPSULE + DATAGRAM_CAPSULE + UNKNOWN_CAPSULE)
    assert values == [bytes.fromhex("00 68 69")]
    assert parse_http_datagram(values[0]) == (0, b"hi")
    assert parser.skipped == 2
    assert parser.buffered == 0


@pytest.mark.parametrize("chunk", [1, 2, 3, 7])
def test_capsules_fed_in_pieces(chunk: int) -> None:
    big_unknown = emit_capsule(0x1234, b"x" * 300)
    stream = UNKNOWN_CAPSULE + DATAGRAM_CAPSULE + big_unknown + DATAGRAM_CAPSULE
    parser = CapsuleParser()
    values = []
    for i in range(0, len(stream), chunk):
        values += parser.feed(stream[i : i + chunk])
    assert values == [bytes.fromhex("00 68 69")] * 2
    assert parser.skipped == 2
    assert parser.buffered == 0


@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 0x3F, 0x40, 0x2ABC, 1 << 40]),
                       st.binary(max_size=2000))),
    st.lists(st.integers(1, 500), min_size=1),
)
def test_capsule_stream_round_trip(capsules: list[tuple[int, bytes]], cuts: list[int]) -> None:
    stream = b"".join(emit_capsule(t, v) for t, v in capsules)
    parser = CapsuleParser()
    values: list[bytes] = []
    offset, i = 0, 0
    while offset < len(stream):
        step = cuts[i % len(cuts)]
        values += parser.feed(stream[offset : offset + step])
        offset += step
        i += 1
    assert values == [v for t, v in capsules if t == 0]
    assert parser.buffered == 0


@given(st.binary(max_size=3000))
def test_hostile_capsule_bytes_raise_only_masque_error(data: bytes) -> None:
    parser = CapsuleParser()
    try:
        for value in parser.feed(data):
            with contextlib.suppress(MasqueError):
                parse_http_datagram(value)
    except MasqueError:
        pass


def test_oversized_datagram_capsule_refused_before_buffering() -> None:
    parser = CapsuleParser()
    with pytest.raises(MasqueError):
        parser.feed(emit_varint(0) + emit_varint(1 << 30))


def test_huge_unknown_capsule_is_streamed_past() -> None:
    parser = CapsuleParser()
    assert parser.feed(emit_varint(0x77) + emit_varint(10_000_000)) == []
    for _ in range(100):
        assert parser.feed(b"z" * 100_000) == []
        assert parser.buffered == 0
    assert parser.feed(DATAGRAM_CAPSULE) == [bytes.fromhex("00 68 69")]


def test_http_datagram_truncated() -> None:
    with pytest.raises(MasqueError):
        parse_http_datagram(b"")
    with pytest.raises(MasqueError):
        parse_http_datagram(b"\x40")  # a 2-byte varint cut short
    assert parse_http_datagram(emit_http_datagram(b"x", context_id=70)) == (70, b"x")


@pytest.mark.parametrize(
    ("stream_id", "context_id", "wire"),
    [(0, 0, "00 00"), (4, 0, "01 00"), (252, 0, "3f 00"), (256, 0, "40 40 00"),
     (400, 70, "40 64 40 46"), (4 * 16384, 0, "80 00 40 00 00")],
)
def test_datagram_prefix_fixtures(stream_id: int, context_id: int, wire: str) -> None:
    """RFC 9297 section 2.1: quarter stream ID, then (RFC 9298 section 4) the context ID."""
    prefix = datagram_prefix(stream_id, context_id)
    assert prefix == bytes.fromhex(wire)
    frame = prefix + b"payload"
    quarter, offset = parse_quarter_stream_id(frame) or (-1, -1)
    assert quarter * 4 == stream_id
    assert parse_http_datagram(frame[offset:]) == (context_id, b"payload")


@given(st.integers(0, (1 << 60) - 1), st.binary(max_size=50))
def test_quarter_stream_id_round_trip(quarter: int, payload: bytes) -> None:
    frame = emit_varint(quarter) + payload
    assert parse_quarter_stream_id(frame) == (quarter, len(frame) - len(payload))


@pytest.mark.parametrize("frame", [b"", b"\x40", b"\x80\x00\x01", bytes.fromhex("d0" + "00" * 7),
                                   bytes.fromhex("ff" * 8)])
def test_malformed_quarter_stream_id(frame: bytes) -> None:
    """Cut short, or 2^60 and above (RFC 9297 section 2.1): H3_DATAGRAM_ERROR for the
    caller."""
    assert parse_quarter_stream_id(frame) is None


# --- URI template --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("host", "port", "path"),
    [
        ("192.0.2.6", 443, "/.well-known/masque/udp/192.0.2.6/443/"),
        ("2001:db8::42", 53, "/.well-known/masque/udp/2001%3Adb8%3A%3A42/53/"),
        ("example.com", 8443, "/.well-known/masque/udp/example.com/8443/"),
    ],
)
def test_udp_template_both_ways(host: str, port: int, path: str) -> None:
    assert expand_udp_template(DEFAULT_UDP_TEMPLATE, host, port) == path
    assert parse_udp_path(DEFAULT_UDP_TEMPLATE, path) == (host, port)


def test_udp_template_full_uri_and_query() -> None:
    template = "https://proxy.example.org:4443/masque?h={target_host}&p={target_port}"
    assert check_template(template) is None
    path = expand_udp_template(template, "2001:db8::1", 9)
    assert path == "/masque?h=2001%3Adb8%3A%3A1&p=9"
    assert parse_udp_path(template, path) == ("2001:db8::1", 9)


@pytest.mark.parametrize(
    "template",
    ["/udp/{target_host}/", "udp/{target_host}/{target_port}", "/{target_port}/{target_port}"],
)
def test_bad_templates(template: str) -> None:
    assert check_template(template) is not None


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/.well-known/masque/udp/192.0.2.6/0/", 400),
        ("/.well-known/masque/udp/192.0.2.6/70000/", 400),
        ("/.well-known/masque/udp/bad%20host/53/", 400),
        ("/.well-known/masque/udp/192.0.2.6/53", 404),
        ("/other/192.0.2.6/53/", 404),
        ("/.well-known/masque/udp/%ff%fe/53/", 400),
    ],
)
def test_udp_path_refused(path: str, status: int) -> None:
    with pytest.raises(RequestRefused) as info:
        parse_udp_path(DEFAULT_UDP_TEMPLATE, path)
    assert info.value.status == status


@given(st.text(max_size=300))
def test_hostile_paths_raise_only_masque_error(path: str) -> None:
    try:
        host, port = parse_udp_path(DEFAULT_UDP_TEMPLATE, path)
    except MasqueError:
        return
    assert 0 < port < 65536 and host


# --- requests ------------------------------------------------------------------------------

def test_connect_request_round_trip() -> None:
    headers = connect_request("example.com", 443, "s3cret")
    assert headers == [
        (b":method", b"CONNECT"),
        (b":authority", b"example.com:443"),
        (b"proxy-authorization", b"Bearer s3cret"),
    ]
    assert parse_request(headers, DEFAULT_UDP_TEMPLATE, "s3cret") == ConnectRequest(
        "tcp", "example.com", 443
    )
    v6 = connect_request("2001:db8::1", 80, None)
    assert (b":authority", b"[2001:db8::1]:80") in v6
    assert parse_request(v6, DEFAULT_UDP_TEMPLATE, None) == ConnectRequest("tcp", "2001:db8::1", 80)


def test_connect_request_idna() -> None:
    headers = connect_request("bücher.example", 443, None)
    assert (b":authority", b"xn--bcher-kva.example:443") in headers


def test_connect_udp_request_round_trip() -> None:
    headers = connect_udp_request("proxy:443", DEFAULT_UDP_TEMPLATE, "2001:db8::5", 53, "t")
    assert (b":protocol", b"connect-udp") in headers
    assert (b"capsule-protocol", b"?1") in headers
    request = parse_request(headers, DEFAULT_UDP_TEMPLATE, "t")
    assert request == ConnectRequest("udp", "2001:db8::5", 53)


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (connect_request("example.com", 443, None), 407),
        (connect_request("example.com", 443, "wrong"), 407),
        ([(b":method", b"GET"), (b":authority", b"a:1"), (b"proxy-authorization", b"Bearer t")],
         405),
        ([(b":method", b"CONNECT"), (b"proxy-authorization", b"Bearer t")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"a"), (b"proxy-authorization", b"Bearer t")],
         400),
        ([(b":method", b"CONNECT"), (b":authority", b"a:1"), (b":path", b"/"),
          (b"proxy-authorization", b"Bearer t")], 400),
        ([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
          (b":path", b"/"), (b":authority", b"a:1"), (b"proxy-authorization", b"Bearer t")], 501),
        ([(b":method", b"CONNECT"), (b":authority", b"\xff:1"),
          (b"proxy-authorization", b"Bearer t")], 400),
        ([(b":method", b"CONNECT"), (b":authority", b"a:1"), (b"proxy-authorization", b"Bearer t"),
          (b"x", b"y" * 10000)], 431),
    ],
)
def test_requests_refused(headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(RequestRefused) as info:
        parse_request(headers, DEFAULT_UDP_TEMPLATE, "t")
    assert info.value.status == status


@given(st.lists(st.tuples(st.sampled_from([b":method", b":authority", b":protocol", b":path",
                                           b":scheme", b"proxy-authorization", b"x"]),
                          st.binary(max_size=80)), max_size=8))
def test_hostile_requests_raise_only_masque_error(headers: list[tuple[bytes, bytes]]) -> None:
    with contextlib.suppress(MasqueError):
        parse_request(headers, DEFAULT_UDP_TEMPLATE, None)


def test_responses() -> None:
    assert response_status(response_headers(200, udp=True)) == 200
    assert (b"capsule-protocol", b"?1") in response_headers(200, udp=True)
    assert (b"proxy-authenticate", b"Bearer") in response_headers(407)
    for bad in ([], [(b":status", b"2000")], [(b":status", b"ok!")]):
        with pytest.raises(MasqueError):
            response_status(bad)
