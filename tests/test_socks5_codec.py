"""The sans-I/O SOCKS5 client, tested with bytes alone (RFC 1928, RFC 1929).

Each server transcript is fed three ways (h11's test_io): whole, byte by
byte, and followed by payload bytes that must come back as ``leftover``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunproxy.protocols.socks5 import (
    Connected,
    Event,
    Failed,
    Reply,
    Socks5Client,
    Socks5LocalError,
    Socks5RemoteError,
    State,
    UdpDatagram,
    emit_address,
)

# --- fixtures: (what the client must send, what the server answers) -------------------------

GREETING_NOAUTH = bytes.fromhex("05 01 00")
GREETING_AUTH = bytes.fromhex("05 02 00 02")
METHOD_NOAUTH = bytes.fromhex("05 00")
METHOD_USERPASS = bytes.fromhex("05 02")
AUTH_USER_PASS = bytes.fromhex("01 04") + b"user" + bytes.fromhex("06") + b"secret"
AUTH_OK = bytes.fromhex("01 00")
AUTH_BAD = bytes.fromhex("01 01")

CONNECT_V4 = bytes.fromhex("05 01 00 01 c0 00 02 07 01 bb")  # 192.0.2.7:443
CONNECT_V6 = bytes.fromhex("05 01 00 04 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01 00 35")
CONNECT_DOMAIN = bytes.fromhex("05 01 00 03 0b") + b"example.com" + bytes.fromhex("00 50")
UDP_ASSOCIATE_ZERO = bytes.fromhex("05 03 00 01 00 00 00 00 00 00")

REPLY_OK_V4 = bytes.fromhex("05 00 00 01 0a 00 00 02 c3 50")  # bound 10.0.0.2:50000
REPLY_OK_V6 = bytes.fromhex("05 00 00 04 fe 80 00 00 00 00 00 00 00 00 00 00 00 00 00 02 04 38")
REPLY_OK_DOMAIN = bytes.fromhex("05 00 00 03 05") + b"relay" + bytes.fromhex("13 88")
REPLY_OK_ZERO = bytes.fromhex("05 00 00 01 00 00 00 00 9c 40")  # 0.0.0.0:40000
REPLY_REFUSED = bytes.fromhex("05 05 00 01 00 00 00 00 00 00")

PAYLOAD = b"HTTP/1.1 200 OK\r\n\r\n"


def feed(client: Socks5Client, server: bytes, chunk: int | None) -> tuple[bytes, list[Event]]:
    """Feed the server's bytes in chunks of ``chunk`` (None: whole), collecting what
    the client sends and the events; stop once the handshake is over, as a caller does."""
    sent = client.data_to_send()
    events: list[Event] = []
    step = chunk or len(server)
    pieces = [server[i : i + step] for i in range(0, len(server), step)]
    for piece in pieces:
        if client.state in (State.ESTABLISHED, State.FAILED):
            break
        events += client.receive_data(piece)
        sent += client.data_to_send()
    return sent, events


FEEDS: list[tuple[str, int | None]] = [("whole", None), ("bytewise", 1), ("threes", 3)]


@pytest.mark.parametrize(("how", "chunk"), FEEDS)
@pytest.mark.parametrize(
    ("host", "port", "request_bytes"),
    [
        ("192.0.2.7", 443, CONNECT_V4),
        ("2001:db8::1", 53, CONNECT_V6),
        ("example.com", 80, CONNECT_DOMAIN),
    ],
)
def test_connect_no_auth(
    how: str, chunk: int | None, host: str, port: int, request_bytes: bytes
) -> None:
    client = Socks5Client()
    client.connect(host, port)
    sent, events = feed(client, METHOD_NOAUTH + REPLY_OK_V4, chunk)
    assert sent == GREETING_NOAUTH + request_bytes
    assert events == [Connected("10.0.0.2", 50000, b"")]
    assert client.state is State.ESTABLISHED


def test_domain_is_sent_for_remote_resolution() -> None:
    # The request carries the name itself (ATYP 3), never a locally resolved address.
    client = Socks5Client()
    client.connect("example.com", 80)
    client.data_to_send()
    client.receive_data(METHOD_NOAUTH)
    request = client.data_to_send()
    assert request[3] == 0x03
    assert b"example.com" in request


@pytest.mark.parametrize(("how", "chunk"), [*FEEDS, ("reply-then-payload", 12)])
def test_leftover_payload_after_reply(how: str, chunk: int | None) -> None:
    client = Socks5Client()
    client.connect("192.0.2.7", 443)
    server = METHOD_NOAUTH + REPLY_OK_V4 + PAYLOAD
    step = chunk or len(server)
    events: list[Event] = []
    fed = 0
    while client.state is not State.ESTABLISHED:
        events += client.receive_data(server[fed : fed + step])
        fed += step
    assert len(events) == 1 and isinstance(events[0], Connected)
    # What followed the reply in the chunk that completed it comes back as
    # leftover; the rest is for the caller to read from the stream itself.
    assert events[0].leftover + server[fed:] == PAYLOAD
    if chunk is None:
        assert events[0].leftover == PAYLOAD


@pytest.mark.parametrize(("how", "chunk"), FEEDS)
def test_connect_with_username_password(how: str, chunk: int | None) -> None:
    client = Socks5Client(auth=("user", "secret"))
    client.connect("192.0.2.7", 443)
    sent, events = feed(client, METHOD_USERPASS + AUTH_OK + REPLY_OK_V6, chunk)
    assert sent == GREETING_AUTH + AUTH_USER_PASS + CONNECT_V4
    assert events == [Connected("fe80::2", 1080, b"")]


def test_credentials_offered_but_no_auth_chosen() -> None:
    client = Socks5Client(auth=("user", "secret"))
    client.connect("192.0.2.7", 443)
    sent, events = feed(client, METHOD_NOAUTH + REPLY_OK_V4, None)
    assert sent == GREETING_AUTH + CONNECT_V4  # no credentials sent when not asked for
    assert events == [Connected("10.0.0.2", 50000, b"")]


def test_auth_reply_with_socks_version_is_accepted() -> None:
    client = Socks5Client(auth=("user", "secret"))
    client.connect("192.0.2.7", 443)
    _, events = feed(client, METHOD_USERPASS + bytes.fromhex("05 00") + REPLY_OK_V4, None)
    assert isinstance(events[0], Connected)


@pytest.mark.parametrize(("how", "chunk"), FEEDS)
def test_auth_rejected(how: str, chunk: int | None) -> None:
    client = Socks5Client(auth=("user", "secret"))
    client.connect("192.0.2.7", 443)
    sent, events = feed(client, METHOD_USERPASS + AUTH_BAD, chunk)
    assert sent == GREETING_AUTH + AUTH_USER_PASS  # the request is never sent
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert events[0].reply_code is None and "username or password" in events[0].message
    assert client.state is State.FAILED
    assert client.receive_data(b"junk after failure") == []
    assert client.receive_eof() == []


def test_no_acceptable_method() -> None:
    client = Socks5Client()
    client.connect("192.0.2.7", 443)
    sent, events = feed(client, bytes.fromhex("05 ff"), None)
    assert sent == GREETING_NOAUTH
    assert events == [Failed(None, "the proxy accepts none of our authentication methods")]


# --- pipelining: everything in the first write --------------------------------------------


@pytest.mark.parametrize(("how", "chunk"), FEEDS)
def test_pipelined_connect_sends_everything_before_any_reply(how: str, chunk: int | None) -> None:
    client = Socks5Client(pipeline=True)
    client.connect("192.0.2.7", 443)
    assert client.data_to_send() == GREETING_NOAUTH + CONNECT_V4
    _, events = feed(client, METHOD_NOAUTH + REPLY_OK_V4 + PAYLOAD, chunk)
    assert client.data_to_send() == b""  # nothing is sent twice
    assert client.state is State.ESTABLISHED
    assert len(events) == 1 and isinstance(events[0], Connected)
    assert (events[0].bound_addr, events[0].bound_port) == ("10.0.0.2", 50000)


@pytest.mark.parametrize(("how", "chunk"), FEEDS)
def test_pipelined_with_credentials_offers_only_username_password(
    how: str, chunk: int | None
) -> None:
    client = Socks5Client(auth=("user", "secret"), pipeline=True)
    client.connect("192.0.2.7", 443)
    # Offering NO_AUTH too would leave it open whether the credentials that follow
    # are read as credentials or as the request.
    assert client.data_to_send() == bytes.fromhex("05 01 02") + AUTH_USER_PASS + CONNECT_V4
    sent, events = feed(client, METHOD_USERPASS + AUTH_OK + REPLY_OK_V4, chunk)
    assert sent == b""
    assert events == [Connected("10.0.0.2", 50000, b"")]


@pytest.mark.parametrize(
    ("auth", "server", "message"),
    [
        (None, bytes.fromhex("05 ff"), "none of our authentication methods"),
        (("user", "secret"), METHOD_USERPASS + AUTH_BAD, "username or password"),
        (None, METHOD_NOAUTH + REPLY_REFUSED, "connection refused"),
    ],
)
def test_pipelined_refusals_are_failed_events(
    auth: tuple[str, str] | None, server: bytes, message: str
) -> None:
    client = Socks5Client(auth=auth, pipeline=True)
    client.connect("192.0.2.7", 443)
    client.data_to_send()
    _, events = feed(client, server, 1)
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert message in events[0].message
    assert client.state is State.FAILED


def test_pipelined_method_never_offered_is_remote_error() -> None:
    client = Socks5Client(auth=("user", "secret"), pipeline=True)
    client.connect("192.0.2.7", 443)
    client.data_to_send()
    with pytest.raises(Socks5RemoteError):
        client.receive_data(METHOD_NOAUTH)  # only USERNAME_PASSWORD was offered


@pytest.mark.parametrize("code", [int(r) for r in Reply if r != Reply.SUCCEEDED] + [0x42])
def test_reply_codes_fail(code: int) -> None:
    client = Socks5Client()
    client.connect("example.com", 80)
    reply = bytes((5, code)) + REPLY_REFUSED[2:]
    _, events = feed(client, METHOD_NOAUTH + reply, 1)
    assert len(events) == 1 and isinstance(events[0], Failed)
    assert events[0].reply_code == code
    assert events[0].message  # a sentence for the log, also for unassigned codes


@pytest.mark.parametrize(
    ("reply", "bound"),
    [
        (REPLY_OK_ZERO, ("0.0.0.0", 40000)),
        (REPLY_OK_DOMAIN, ("relay", 5000)),
        (REPLY_OK_V6, ("fe80::2", 1080)),
    ],
)
def test_udp_associate(reply: bytes, bound: tuple[str, int]) -> None:
    client = Socks5Client()
    client.udp_associate()
    sent, events = feed(client, METHOD_NOAUTH + reply, 1)
    assert sent == GREETING_NOAUTH + UDP_ASSOCIATE_ZERO
    assert events == [Connected(*bound, b"")]


def test_udp_associate_with_known_source() -> None:
    client = Socks5Client()
    client.udp_associate("127.0.0.1", 4242)
    client.data_to_send()
    client.receive_data(METHOD_NOAUTH)
    assert client.data_to_send() == bytes.fromhex("05 03 00 01 7f 00 00 01 10 92")


@pytest.mark.parametrize(
    "server",
    [
        METHOD_NOAUTH,
        METHOD_NOAUTH + REPLY_OK_V4[:4],
        METHOD_NOAUTH + REPLY_OK_DOMAIN[:4],  # length octet not yet here
        METHOD_NOAUTH + REPLY_OK_DOMAIN[:-1],
        METHOD_USERPASS + AUTH_OK[:1],
    ],
)
def test_truncated_waits_and_eof_is_a_remote_error(server: bytes) -> None:
    client = Socks5Client(auth=("user", "secret"))
    client.connect("192.0.2.7", 443)
    _, events = feed(client, server, None)
    assert events == []
    assert client.state in (State.AWAIT_METHOD, State.AWAIT_AUTH, State.AWAIT_REPLY)
    with pytest.raises(Socks5RemoteError):
        client.receive_eof()


@pytest.mark.parametrize(
    "server",
    [
        bytes.fromhex("04 00"),  # SOCKS4 answer
        bytes.fromhex("05 02"),  # a method never offered (no credentials)
        bytes.fromhex("05 01"),  # GSSAPI, never offered
        METHOD_NOAUTH + bytes.fromhex("04 00 00 01 00 00 00 00 00 00"),
        METHOD_NOAUTH + bytes.fromhex("05 00 00 07 00 00"),  # unknown ATYP
        METHOD_NOAUTH + bytes.fromhex("05 00 00 03 02 c3 a9 00 50"),  # non-ASCII domain
    ],
)
def test_protocol_violations_raise_remote_error(server: bytes) -> None:
    client = Socks5Client()
    client.connect("192.0.2.7", 443)
    client.data_to_send()
    with pytest.raises(Socks5RemoteError):
        client.receive_data(server)


def test_bad_auth_version_is_remote_error() -> None:
    client = Socks5Client(auth=("user", "secret"))
    client.connect("192.0.2.7", 443)
    with pytest.raises(Socks5RemoteError):
        client.receive_data(METHOD_USERPASS + bytes.fromhex("02 00"))


def test_server_speaking_first_is_remote_error() -> None:
    client = Socks5Client()
    assert client.receive_data(b"") == []
    with pytest.raises(Socks5RemoteError):
        client.receive_data(METHOD_NOAUTH)


@pytest.mark.parametrize(
    "misuse",
    [
        lambda c: c.connect("192.0.2.7", 70000),
        lambda c: c.connect("a" * 256, 80),
        lambda c: c.connect("", 80),
        lambda c: (c.connect("192.0.2.7", 1), c.connect("192.0.2.7", 1)),
        lambda c: (c.connect("192.0.2.7", 1), c.receive_data(METHOD_NOAUTH + REPLY_OK_V4),
                   c.receive_data(b"payload")),
    ],
)
def test_local_misuse_raises_local_error(misuse: Callable[[Socks5Client], object]) -> None:
    with pytest.raises(Socks5LocalError):
        misuse(Socks5Client())


def test_credentials_length_limits() -> None:
    with pytest.raises(Socks5LocalError):
        Socks5Client(auth=("", "x"))
    with pytest.raises(Socks5LocalError):
        Socks5Client(auth=("u", "p" * 256))
    Socks5Client(auth=("u" * 255, "p" * 255))


def test_unicode_domain_goes_as_idna() -> None:
    assert emit_address("bücher.example", 80) == (
        bytes((3, 21)) + b"xn--bcher-kva.example" + bytes.fromhex("00 50")
    )


# --- UDP datagram header: RFC 1928 section 7 ----------------------------------------------------

UDP_V4 = bytes.fromhex("00 00 00 01 7f 00 00 01 00 35") + b"dns?"
UDP_DOMAIN = bytes.fromhex("00 00 00 03 08") + b"dns.test" + bytes.fromhex("00 35") + b"q"
UDP_FRAGMENT = bytes.fromhex("00 00 01 01 7f 00 00 01 00 35") + b"part"


def test_udp_datagram_deconstruct() -> None:
    assert UdpDatagram.parse(UDP_V4) == UdpDatagram("127.0.0.1", 53, b"dns?")
    assert UdpDatagram.parse(UDP_DOMAIN) == UdpDatagram("dns.test", 53, b"q")
    assert UdpDatagram.parse(UDP_FRAGMENT).frag == 1


def test_udp_datagram_construct() -> None:
    assert UdpDatagram("127.0.0.1", 53, b"dns?").emit() == UDP_V4
    assert UdpDatagram("dns.test", 53, b"q").emit() == UDP_DOMAIN
    assert UdpDatagram.header("127.0.0.1", 53) + b"dns?" == UDP_V4


def test_udp_fragments_are_dropped() -> None:
    assert UdpDatagram.unwrap(UDP_FRAGMENT) is None
    assert UdpDatagram.unwrap(UDP_V4) == UdpDatagram("127.0.0.1", 53, b"dns?")


def test_udp_payload_of_skips_the_address() -> None:
    assert UdpDatagram.payload_of(UDP_V4) == b"dns?"
    assert UdpDatagram.payload_of(UDP_DOMAIN) == b"q"
    assert UdpDatagram.payload_of(UDP_FRAGMENT) is None
    v6 = UdpDatagram.header("2001:db8::1", 443) + b"quic"
    assert UdpDatagram.payload_of(v6) == b"quic"
    assert UdpDatagram.payload_of(UdpDatagram.header("127.0.0.1", 53)) == b""
    with pytest.raises(Socks5RemoteError, match="unknown address type"):
        UdpDatagram.payload_of(bytes.fromhex("00 00 00 07 7f 00 00 01 00 35"))


@pytest.mark.parametrize("cut", range(len(UDP_DOMAIN) - len(b"q")))
def test_udp_truncated_header_is_remote_error(cut: int) -> None:
    with pytest.raises(Socks5RemoteError):
        UdpDatagram.parse(UDP_DOMAIN[:cut])
    with pytest.raises(Socks5RemoteError):
        UdpDatagram.payload_of(UDP_DOMAIN[:cut])


# --- properties -----------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: ipaddress.IPv6Address(a).compressed)
label = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
domain = st.lists(label, min_size=1, max_size=5).map(".".join).filter(
    lambda d: not _is_ip(d) and len(d) <= 255
)
hosts = st.one_of(ipv4, ipv6, domain)
ports = st.integers(0, 0xFFFF)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@given(host=hosts, port=ports, payload=st.binary(max_size=64), frag=st.integers(0, 255))
def test_udp_datagram_round_trip(host: str, port: int, payload: bytes, frag: int) -> None:
    datagram = UdpDatagram(host, port, payload, frag)
    assert UdpDatagram.parse(datagram.emit()) == datagram


@given(data=st.binary(max_size=64))
def test_udp_random_bytes_parse_or_remote_error(data: bytes) -> None:
    try:
        datagram = UdpDatagram.parse(data)
    except Socks5RemoteError:
        return
    assert datagram.emit()[3:] == data[3:]  # whatever parsed re-emits the same address + data


_datagrams = st.builds(lambda host, port, payload, frag: UdpDatagram(host, port, payload, frag)
                       .emit(), hosts, ports, st.binary(max_size=16), st.integers(0, 1))


@given(data=st.one_of(st.binary(max_size=64), _datagrams,
                      _datagrams.map(lambda d: d[: len(d) // 2])))  # fmt: skip
def test_udp_payload_of_agrees_with_unwrap(data: bytes) -> None:
    """The fast path gives unwrap's payload, or raises where unwrap raises; it only
    skips the address, so a non-ASCII domain, which parse rejects, passes."""
    try:
        datagram = UdpDatagram.unwrap(data)
    except Socks5RemoteError as exc:
        if "not ASCII" in str(exc):
            assert isinstance(UdpDatagram.payload_of(data), bytes | None)
            return
        with pytest.raises(Socks5RemoteError):
            UdpDatagram.payload_of(data)
        return
    assert UdpDatagram.payload_of(data) == (None if datagram is None else datagram.payload)


@given(host=hosts, port=ports, payload=st.binary(max_size=32), data=st.data())
def test_reply_round_trip_in_random_segments(
    host: str, port: int, payload: bytes, data: st.DataObject
) -> None:
    """A valid transcript cut anywhere gives one Connected with the bound address."""
    server = METHOD_NOAUTH + bytes((5, 0, 0)) + emit_address(host, port) + payload
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(server) - 1)), max_size=8)))
    pieces = [server[a:b] for a, b in zip([0, *cuts], [*cuts, len(server)], strict=True)]
    client = Socks5Client()
    client.connect("192.0.2.7", 443)
    events: list[Event] = []
    fed = 0
    for piece in pieces:
        events += client.receive_data(piece)
        fed += len(piece)
        if client.state is State.ESTABLISHED:
            break
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, Connected)
    assert (event.bound_addr, event.bound_port) == (host, port)
    assert event.leftover + server[fed:] == payload


@given(
    # A valid prefix lets the random part reach the later parsers (auth, reply).
    prefix=st.sampled_from(
        [b"", METHOD_NOAUTH, METHOD_USERPASS, METHOD_USERPASS + AUTH_OK, METHOD_NOAUTH + b"\x05"]
    ),
    junk=st.binary(max_size=80),
    chunks=st.lists(st.integers(1, 16), max_size=20),
    auth=st.booleans(),
    udp=st.booleans(),
)
def test_random_server_bytes_give_events_or_remote_error(
    prefix: bytes, junk: bytes, chunks: list[int], auth: bool, udp: bool
) -> None:
    server = prefix + junk
    client = Socks5Client(auth=("user", "secret") if auth else None)
    if udp:
        client.udp_associate()
    else:
        client.connect("example.com", 443)
    offset = 0
    try:
        for size in [*chunks, len(server)]:
            if client.state in (State.ESTABLISHED, State.FAILED):
                break
            for event in client.receive_data(server[offset : offset + size]):
                assert isinstance(event, Connected | Failed)
            client.data_to_send()
            offset += size
        client.receive_eof()
    except Socks5RemoteError:
        pass
