"""The largest UDP payload a tunproxy QUIC client announces (max_udp_payload_size, RFC 9000
section 18.2), and that a server then sends packets that big to it.

qh3 2.1 announces a fixed 1,472 from every client, so a server never sent a download bigger
packets than that, whatever the path carried; ``h3link`` announces the configured
``max_datagram_size`` when it is larger."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from qh3._hazmat import Buffer
from qh3.quic.packet import pull_quic_transport_parameters

from tests.masque_peer import make_cert
from tunproxy import h3link
from tunproxy.h3link import ClientTLS, H3Link, LinkSettings, set_transport_parameter
from tunproxy.varint import emit_varint


def _tlv(param_id: int, value: bytes) -> bytes:
    return emit_varint(param_id) + emit_varint(len(value)) + value


def test_set_transport_parameter_replaces_only_that_one() -> None:
    grease = _tlv(31 * 7 + 27, b"")  # a GREASE id (31 * N + 27) with an empty value
    data = _tlv(0x04, emit_varint(16 << 20)) + _tlv(0x03, emit_varint(1472)) + grease
    out = set_transport_parameter(data, 0x03, emit_varint(8952))
    assert out == _tlv(0x04, emit_varint(16 << 20)) + grease + _tlv(0x03, emit_varint(8952))
    parsed = pull_quic_transport_parameters(Buffer(data=out))
    assert parsed.max_udp_payload_size == 8952
    assert parsed.initial_max_data == 16 << 20


def test_set_transport_parameter_appends_when_absent_and_refuses_truncation() -> None:
    data = _tlv(0x01, emit_varint(30000))
    assert set_transport_parameter(data, 0x03, emit_varint(1500)) == (
        data + _tlv(0x03, emit_varint(1500)))
    with pytest.raises(ValueError):
        set_transport_parameter(data[:-1], 0x03, emit_varint(1500))
    with pytest.raises(ValueError):
        set_transport_parameter(b"\x40", 0x03, emit_varint(1500))  # a cut varint


class _Quiet:
    """An H3Handler that notes which request streams sent headers."""

    heard: set[int] = set()
    body: dict[int, int] = {}

    def __init__(self, link: H3Link) -> None:
        self.link = link

    def h3_headers(self, stream_id: int, headers: h3link.Headers, ended: bool) -> None:
        self.heard.add(stream_id)

    def h3_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        self.body[stream_id] = self.body.get(stream_id, 0) + len(data)

    def h3_datagram(self, stream_id: int, data: bytes) -> None:
        pass

    def h3_reset(self, stream_id: int) -> None:
        pass

    def h3_stop_sending(self, stream_id: int) -> None:
        pass

    def h3_writable(self, stream_id: int) -> None:
        pass

    def h3_closed(self, reason: str) -> None:
        pass


@pytest.mark.parametrize(("configured", "announced"), [(8952, 8952), (1200, 1472)])
def test_server_sends_what_the_client_announces(tmp_path: Path, configured: int,
                                                announced: int) -> None:
    """A client configured for 8,952-byte packets gets 8,952-byte packets from a server
    configured so too (it got 1,472 before); one configured below qh3's 1,472 still
    announces 1,472, as qh3 does."""
    ca, cert, key = make_cert(tmp_path, "proxy.test", ["127.0.0.1"])
    _Quiet.heard.clear()
    _Quiet.body.clear()
    settings = LinkSettings(max_datagram_size=configured)
    server_settings = LinkSettings(max_datagram_size=8952)

    async def main() -> None:
        server = await h3link.listen("127.0.0.1", 0, str(cert), str(key), server_settings,
                                     _Quiet, 1 << 20)
        host, port = server.address
        link = await h3link.dial(
            lambda _: socket.socket(socket.AF_INET, socket.SOCK_DGRAM), host, port,
            ClientTLS("proxy.test", cafile=str(ca)), settings, _Quiet, lambda _: None,
            1 << 20)
        try:
            (peer,) = server.links()
            parameters = peer._quic._applied_transport_parameters
            assert parameters is not None
            assert parameters.max_udp_payload_size == announced
            # A response body from the server; what reaches the client's socket.
            sizes: list[int] = []
            received = link.datagram_received
            batch_received = link.datagrams_received

            def one(data: bytes, addr: object) -> None:
                sizes.append(len(data))
                received(data, addr)

            def many(datagrams: list[bytes], addr: object) -> None:
                sizes.extend(len(data) for data in datagrams)
                batch_received(datagrams, addr)

            link.datagram_received = one  # type: ignore[method-assign]
            link.datagrams_received = many  # type: ignore[method-assign]
            stream_id = link.new_stream_id()
            link.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"https"),
                                          (b":authority", b"proxy.test"), (b":path", b"/")])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while stream_id not in _Quiet.heard:
                assert loop.time() < deadline, "the request never arrived"
                await asyncio.sleep(0.01)
            peer.h3.send_headers(stream_id, [(b":status", b"200")])
            peer.h3.send_data(stream_id, b"x" * 200_000, end_stream=True)
            peer.transmit()
            while _Quiet.body.get(stream_id, 0) < 200_000:
                assert loop.time() < deadline, f"body incomplete: {_Quiet.body}"
                await asyncio.sleep(0.01)
            assert max(sizes) <= announced
            assert max(sizes) > announced - 100, sizes
        finally:
            link.shutdown()
            link.close_transport()
            server.close()

    asyncio.run(main())
