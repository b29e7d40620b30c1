"""The QUIC upstream (``QuicOutbound``) against ``tunproxy server`` on loopback: real
QUIC, real TLS, real sockets, no namespaces (no root needed)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.masque_peer import MasqueServer, free_udp_port, make_cert
from tunproxy.errors import ConnectRefused, ProxyError
from tunproxy.outbounds.base import DatagramReceiver, Target
from tunproxy.outbounds.quic import QuicOutbound

TOKEN = "s3cret-token"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[MasqueServer, int, Path]]:
    ca, cert, key = make_cert(tmp_path, "proxy.test", ["127.0.0.1"])
    port = free_udp_port()
    proc = MasqueServer(["--listen", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key),
                         "--token", TOKEN, "--allow", "127.0.0.0/8"])
    try:
        proc.wait_ready()
        yield proc, port, ca
    finally:
        if proc.proc.poll() is None:
            assert proc.stop() == 0, proc.log
        else:
            proc.kill()


class Collector(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


class Datagrams(DatagramReceiver):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.lost: Exception | None = None

    def datagram_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def session_lost(self, exc: Exception | None) -> None:
        self.lost = exc


async def _sink_server() -> tuple[asyncio.Server, dict[str, str]]:
    """TCP on 127.0.0.1: reads all, answers with the sha256 of what it read and
    then ``size`` bytes it sent first (a 'GET n' line asks for n bytes)."""
    seen: dict[str, str] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.readline()
        if first.startswith(b"GET "):
            size = int(first.split()[1])
            block = os.urandom(65536)
            digest = hashlib.sha256()
            sent = 0
            while sent < size:
                chunk = block[: min(len(block), size - sent)]
                digest.update(chunk)
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
            seen["down"] = digest.hexdigest()
            writer.write_eof()
            await reader.read()
        else:
            digest = hashlib.sha256(first)
            while chunk := await reader.read(65536):
                digest.update(chunk)
            writer.write(digest.hexdigest().encode())
            writer.write_eof()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


def _outbound(port: int, cert: Path, token: str = TOKEN) -> QuicOutbound:
    return QuicOutbound("q", "127.0.0.1", port, token=token, sni="proxy.test", ca=str(cert))


def test_tcp_both_ways_and_udp(server: tuple[MasqueServer, int, Path]) -> None:
    proc, port, cert = server

    async def main() -> None:
        tcp, seen = await _sink_server()
        tcp_port = tcp.sockets[0].getsockname()[1]
        outbound = _outbound(port, cert)
        # Up: 8 MB, half-close, the server answers with its sha256 after our FIN.
        payload = os.urandom(8 * 1024 * 1024)
        up = Collector()
        transport = await outbound.open_stream(Target(tcp_port, "127.0.0.1"), up, timeout=10)
        for i in range(0, len(payload), 65536):
            transport.write(payload[i : i + 65536])
            await asyncio.sleep(0)
        transport.write_eof()
        await asyncio.wait_for(up.eof, 60)
        assert up.data.decode() == hashlib.sha256(payload).hexdigest()
        # Down: 8 MB, by domain name (the proxy resolves 'localhost').
        down = Collector()
        transport = await outbound.open_stream(Target(tcp_port, domain="localhost"), down,
                                               timeout=10)
        transport.write(b"GET %d\n" % (8 * 1024 * 1024))
        await asyncio.wait_for(down.eof, 60)
        transport.write_eof()
        assert hashlib.sha256(down.data).hexdigest() == seen["down"]
        await asyncio.wait_for(down.lost, 10)
        # UDP: 1..1400-byte payloads echoed, the big ones as capsules, all in order of need.
        echo_transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            _Echo, local_addr=("127.0.0.1", 0))
        echo_port = echo_transport.get_extra_info("sockname")[1]
        receiver = Datagrams()
        session = await outbound.open_datagram(Target(echo_port, "127.0.0.1"), receiver,
                                               timeout=10)
        sizes = [1, 100, 1100, 1200, 1300, 1400, 10, 20, 1400, 5]
        for size in sizes:
            session.send(bytes([size % 251]) * size)
        got = [await asyncio.wait_for(receiver.queue.get(), 10) for _ in sizes]
        assert sorted(map(len, got)) == sorted(sizes)
        for data in got:
            assert data == bytes([len(data) % 251]) * len(data)
        session.close()
        echo_transport.close()
        await outbound.aclose()
        tcp.close()

    asyncio.run(main())
    assert "tcp 127.0.0.1" in proc.log and "-> localhost:" in proc.log


class _Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


def test_wrong_token_refused(server: tuple[MasqueServer, int, Path]) -> None:
    proc, port, cert = server

    async def main() -> None:
        outbound = _outbound(port, cert, token="wrong")
        for _ in range(3):
            with pytest.raises(ProxyError, match="407"):
                await outbound.open_stream(Target(9, "127.0.0.1"), Collector(), timeout=10)
        await outbound.aclose()

    asyncio.run(main())
    proc.wait_for_log(r"refused \(407\)")


def test_refused_destinations(server: tuple[MasqueServer, int, Path], tmp_path: Path) -> None:
    proc, port, cert = server

    async def main() -> None:
        outbound = _outbound(port, cert)
        # Nothing listens on port 9 of 127.0.0.1: the proxy's dial is refused.
        with pytest.raises(ConnectRefused):
            await outbound.open_stream(Target(9, "127.0.0.1"), Collector(), timeout=10)
        await outbound.aclose()

    asyncio.run(main())
    proc.wait_for_log(r"tcp .* -> 127\.0\.0\.1:9: refused \(502\)")


def test_untrusted_certificate_fails_handshake(server: tuple[MasqueServer, int, Path],
                                               tmp_path: Path) -> None:
    _, port, _ = server
    other, _, _ = make_cert(tmp_path, "other.test")

    async def main() -> None:
        outbound = _outbound(port, other)
        with pytest.raises(ProxyError, match="handshake"):
            await outbound.open_stream(Target(9, "127.0.0.1"), Collector(), timeout=10)
        await outbound.aclose()

    asyncio.run(main())


def test_sigterm_stops_cleanly(server: tuple[MasqueServer, int, Path]) -> None:
    proc, _, _ = server
    assert proc.stop(signal.SIGTERM) == 0
    assert "stopped after" in proc.log


class _Answers:
    """An H3Handler that records each stream's response status and end."""

    def __init__(self) -> None:
        self.status: dict[int, int] = {}
        self.ended: set[int] = set()
        self.closed: str | None = None

    def h3_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        self.status[stream_id] = int(dict(headers)[b":status"])
        if ended:
            self.ended.add(stream_id)

    def h3_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        if ended:
            self.ended.add(stream_id)

    def h3_datagram(self, stream_id: int, data: bytes) -> None:
        pass

    def h3_reset(self, stream_id: int) -> None:
        self.ended.add(stream_id)

    def h3_stop_sending(self, stream_id: int) -> None:
        pass

    def h3_writable(self, stream_id: int) -> None:
        pass

    def h3_closed(self, reason: str) -> None:
        self.closed = reason


def test_hostile_requests_get_error_responses(server: tuple[MasqueServer, int, Path]) -> None:
    """Requests no MASQUE client sends, and garbage capsules: each gets an error status or
    a reset, and the server goes on serving."""
    import socket as socket_module

    from tunproxy.h3link import ClientTLS, LinkSettings, dial
    from tunproxy.masque.capsule import emit_varint

    proc, port, ca = server
    auth = (b"proxy-authorization", b"Bearer " + TOKEN.encode())
    bad_requests = {
        "GET": ([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"x:1"),
                 (b":path", b"/"), auth], 405),
        "no port": ([(b":method", b"CONNECT"), (b":authority", b"example.com"), auth], 400),
        "bad host": ([(b":method", b"CONNECT"), (b":authority", b"bad host!:80"), auth], 400),
        "websocket": ([(b":method", b"CONNECT"), (b":protocol", b"websocket"),
                       (b":scheme", b"https"), (b":authority", b"x:1"), (b":path", b"/"),
                       auth], 501),
        "other path": ([(b":method", b"CONNECT"), (b":protocol", b"connect-udp"),
                        (b":scheme", b"https"), (b":authority", b"x:1"),
                        (b":path", b"/nope/1.2.3.4/53/"), auth], 404),
        "loopback denied": ([(b":method", b"CONNECT"), (b":authority", b"[::1]:22"), auth], 403),
        # (An oversized header, 431, is in test_masque_codec: qh3's encoder refuses to send one.)
    }

    async def main() -> None:
        answers = _Answers()

        def make_socket(address: str) -> socket_module.socket:
            sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
            sock.setblocking(False)
            return sock

        link = await dial(make_socket, "127.0.0.1", port, ClientTLS("proxy.test", str(ca)),
                          LinkSettings(), lambda _: answers, lambda _: None, 1 << 20)
        expected: dict[int, int] = {}
        for headers, status in bad_requests.values():
            stream_id = link.new_stream_id()
            link.send_headers(stream_id, headers)
            expected[stream_id] = status
        # A CONNECT-UDP that then sends a DATAGRAM capsule longer than any UDP payload.
        udp = link.new_stream_id()
        link.send_headers(udp, [
            (b":method", b"CONNECT"), (b":protocol", b"connect-udp"), (b":scheme", b"https"),
            (b":authority", b"x:1"), (b":path", b"/.well-known/masque/udp/127.0.0.1/9/"),
            (b"capsule-protocol", b"?1"), auth])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while not (set(expected) <= answers.ended and udp in answers.status):
            assert loop.time() < deadline, (answers.status, expected)
            await asyncio.sleep(0.02)
        assert {sid: answers.status.get(sid) for sid in expected} == expected
        assert answers.status[udp] == 200
        link.send_data(udp, emit_varint(0) + emit_varint(1 << 20) + b"\0" * 100)
        while udp not in answers.ended:
            assert loop.time() < deadline, "the bad capsule did not end the stream"
            await asyncio.sleep(0.02)
        assert answers.closed is None  # one stream's fault ended only that stream
        link.shutdown()
        link.close_transport()

    asyncio.run(main())
    proc.wait_for_log(r"bad capsule")
    # Still serving: a good flow after all that.
    assert proc.proc.poll() is None


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ("    token: '12'\n    udp-template: /udp/{target_host}/\n", 8,
         "upstreams.q.udp-template: must contain {target_port} once"),
        ("    ca: /nonexistent/ca.pem\n", 7, "upstreams.q.ca: no such file"),
        ("    username: u\n    password: p\n", 7, "is not a quic setting"),
        ("    keepalive: soon\n", 7, "upstreams.q.keepalive: expected a number"),
        ("    max-datagram-size: 900\n", 7, "out of range 1200..65527"),
        ("    cert: client.pem\n", 7, "upstreams.q.cert: cert and key go together"),
        ("    key: client.key\n", 7, "upstreams.q.key: cert and key go together"),
        ("    cert: client.pem\n    key: client.key\n", 7, "upstreams.q.cert: no such file"),
        ("    congestion: bbr\n", 7,
         "upstreams.q.congestion: 'bbr' is not available (the QUIC library, qh3, implements "
         "cubic only)"),
    ],
)
def test_quic_config_errors_name_file_and_line(tmp_path: Path, body: str, line: int,
                                               words: str) -> None:
    import subprocess
    import sys

    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - MATCH,q\nupstreams:\n  q:\n    type: quic\n"
                    "    server: a:1\n" + body)
    done = subprocess.run([sys.executable, "-m", "tunproxy", "check", str(path)],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 2, done.stdout
    assert done.stderr.startswith(f"tunproxy: {path}:{line}: "), done.stderr
    assert words in done.stderr


def test_reconnect_resumes_the_tls_session(server: tuple[MasqueServer, int, Path]) -> None:
    """The connection closes; the next flow dials again with the session ticket."""
    _, port, ca = server

    async def main() -> None:
        tcp, _ = await _sink_server()
        tcp_port = tcp.sockets[0].getsockname()[1]
        outbound = _outbound(port, ca)
        resumed = []
        for _ in range(2):
            flow = Collector()
            transport = await outbound.open_stream(Target(tcp_port, "127.0.0.1"), flow,
                                                   timeout=10)
            assert outbound._connection is not None
            resumed.append(outbound._connection.link.resumed)
            transport.write(b"x")
            transport.write_eof()
            await asyncio.wait_for(flow.eof, 10)
            await outbound.aclose()  # the QUIC connection closes
            assert outbound._connection is None
        assert resumed == [False, True]
        tcp.close()

    asyncio.run(main())


def test_quic_congestion_cubic_is_accepted(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tunproxy.config import load_config

    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - MATCH,q\nupstreams:\n  q:\n    type: quic\n"
                    "    server: a:1\n    congestion: CUBIC\n")
    done = subprocess.run([sys.executable, "-m", "tunproxy", "check", str(path)],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr
    assert load_config(path).upstreams["q"].options["congestion"] == "cubic"


def test_server_resets_a_stream_whose_target_takes_nothing(
        server: tuple[MasqueServer, int, Path]) -> None:
    """The server holds a stream (stops reading its socket) while a target takes nothing;
    after half the idle timeout (2 s: the client's 4 s is the smaller) it resets that
    stream rather than let the connection die, and the connection stays up."""
    proc, port, ca = server

    async def main() -> None:
        async def never_reads(reader: asyncio.StreamReader,
                              writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(3600)

        target_server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
        target = Target(target_server.sockets[0].getsockname()[1], "127.0.0.1")
        outbound = QuicOutbound("q", "127.0.0.1", port, token=TOKEN, sni="proxy.test",
                                ca=str(ca), idle_timeout=4, keepalive=1)
        try:
            got = Collector()
            stream = await outbound.open_stream(target, got, timeout=10)
            first = outbound._connection
            block = b"x" * 65536
            for _ in range(512):  # 32 MiB: more than the target's socket buffers take
                stream.write(block)
                await asyncio.sleep(0)
            lost = await asyncio.wait_for(got.lost, 60)
            assert isinstance(lost, ConnectionResetError), lost
            # The connection lives on: another flow goes through it.
            echo = Collector()
            other = await outbound.open_stream(target, echo, timeout=10)
            other.abort()
            assert outbound._connection is first and first is not None
            assert first.link.alive
        finally:
            await outbound.aclose()
            target_server.close()

    asyncio.run(main())
    proc.wait_for_log(r"WARNING .*stream \d+ reset: its reader took nothing for 2 s")


def test_malformed_http_datagram_is_a_connection_error(
        server: tuple[MasqueServer, int, Path]) -> None:
    """HTTP/3 datagrams skip qh3's H3 layer (h3link parses the quarter stream ID itself):
    one for a stream nobody opened is dropped, one without a complete quarter stream ID
    closes the connection with H3_DATAGRAM_ERROR (RFC 9297 section 2.1), and the server
    goes on serving."""
    import socket as socket_module

    from tunproxy.h3link import ClientTLS, LinkSettings, dial

    proc, port, ca = server

    def make_socket(address: str) -> socket_module.socket:
        sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
        sock.setblocking(False)
        return sock

    async def main() -> None:
        answers = _Answers()
        link = await dial(make_socket, "127.0.0.1", port, ClientTLS("proxy.test", str(ca)),
                          LinkSettings(), lambda _: answers, lambda _: None, 1 << 20)
        loop = asyncio.get_running_loop()
        link.send_datagram(4 * 40, b"\0for no stream")
        await link.ping()  # answered after the datagram was handled: the connection lives
        assert answers.closed is None
        link.send_datagram_frame(b"\x40")  # a 2-byte varint cut short
        deadline = loop.time() + 20
        while answers.closed is None:
            assert loop.time() < deadline, "the malformed datagram did not end the connection"
            await asyncio.sleep(0.02)
        assert "quarter stream ID" in answers.closed
        link.close_transport()

    asyncio.run(main())
    assert proc.proc.poll() is None
    # Still serving: a UDP echo through a new connection.

    async def echo() -> None:
        echo_transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            _Echo, local_addr=("127.0.0.1", 0))
        outbound = _outbound(port, ca)
        receiver = Datagrams()
        session = await outbound.open_datagram(
            Target(echo_transport.get_extra_info("sockname")[1], "127.0.0.1"), receiver,
            timeout=10)
        session.send(b"still here")
        assert await asyncio.wait_for(receiver.queue.get(), 10) == b"still here"
        session.close()
        echo_transport.close()
        await outbound.aclose()

    asyncio.run(echo())
