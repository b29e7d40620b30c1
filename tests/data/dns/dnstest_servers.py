"""DNS servers for tests: plain UDP/TCP, DoT, DoH (HTTP/1.1) and DoQ (aioquic).

Importable by the tests (in-process servers on 127.0.0.1) and runnable as a
script inside a test's network namespace::

    python3 dnstest_servers.py doh --host 10.0.0.1 --port 443 --cert c.pem --key k.pem \\
        --forward 127.0.0.1:5353

prints ``ready`` once listening and serves until killed. Answers come from a
small ``Zone`` or, with ``--forward``, from a real resolver (dnsmasq) over UDP.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import pathlib
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aioquic.asyncio import QuicConnectionProtocol, serve
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived as H3DataReceived
from aioquic.h3.events import HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ProtocolNegotiated, QuicEvent, StreamDataReceived
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from dnslib import QTYPE, RCODE, RR, SOA, DNSRecord

Answerer = Callable[[bytes], Awaitable[bytes]]
_U16 = struct.Struct("!H")


def make_certificate(
    directory: pathlib.Path,
    names: list[str],
    ips: list[str] = (),  # type: ignore[assignment]
) -> tuple[str, str]:
    """A self-signed certificate (its own trust anchor) for ``names`` and ``ips``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


@dataclass
class Zone:
    """Authoritative answers for a handful of test names, counting what was asked."""

    records: list[str] = field(default_factory=list)  # zone-file lines
    delays: dict[str, float] = field(default_factory=dict)  # name -> seconds before answering
    asked: list[tuple[str, str]] = field(default_factory=list)
    soa_minimum: int = 30

    def __post_init__(self) -> None:
        self._rrs = [rr for line in self.records for rr in RR.fromZone(line)]

    async def __call__(self, query: bytes) -> bytes:
        request = DNSRecord.parse(query)
        name = str(request.q.qname).lower()
        self.asked.append((name.rstrip("."), QTYPE.get(request.q.qtype)))
        delay = self.delays.get(name.rstrip("."))
        if delay:
            await asyncio.sleep(delay)
        reply = request.reply()
        owned = [rr for rr in self._rrs if str(rr.rname).lower() == name]
        matching = [rr for rr in owned if rr.rtype == request.q.qtype]
        for rr in matching:
            reply.add_answer(rr)
        if not matching:
            if not owned:
                reply.header.rcode = RCODE.NXDOMAIN
            times = (1, 3600, 600, 86400, self.soa_minimum)
            soa = SOA("ns.test.", "hostmaster.test.", times)
            reply.add_auth(RR("test.", QTYPE.SOA, ttl=300, rdata=soa))
        return bytes(reply.pack())


def forward_udp(host: str, port: int, timeout: float = 10.0) -> Answerer:
    """Ask a real resolver over UDP (for servers fronting dnsmasq)."""

    async def answer(query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()

        class Protocol(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: object) -> None:
                if not future.done():
                    future.set_result(data)

        transport, _ = await loop.create_datagram_endpoint(Protocol, remote_addr=(host, port))
        try:
            transport.sendto(query)
            return await asyncio.wait_for(future, timeout)
        finally:
            transport.close()

    return answer


# --- UDP / TCP / DoT ---------------------------------------------------------------------


class UdpServer(asyncio.DatagramProtocol):
    def __init__(self, answer: Answerer, *, truncate: bool = False) -> None:
        self.answer = answer
        self.truncate = truncate  # answer every query with TC=1 and no records
        self.transport: asyncio.DatagramTransport | None = None
        self.received = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        task = asyncio.ensure_future(self._reply(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reply(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.truncate:
            reply = DNSRecord.parse(data).reply()
            reply.header.tc = 1
            out = bytes(reply.pack())
        else:
            out = await self.answer(data)
        assert self.transport is not None
        self.transport.sendto(out, addr)


async def start_udp(answer: Answerer, host: str, port: int, **kw: bool) -> UdpServer:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_datagram_endpoint(
        lambda: UdpServer(answer, **kw), local_addr=(host, port)
    )
    return protocol


@dataclass
class StreamStats:
    connections: int = 0
    requests: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def close_connections(self) -> None:
        """Close every client connection (as a server's idle timeout would)."""
        for writer in self.writers:
            writer.close()


async def start_tcp(
    answer: Answerer, host: str, port: int, *, tls: ssl.SSLContext | None = None
) -> tuple[asyncio.Server, StreamStats]:
    """RFC 7766 server: length-prefixed, each query answered as soon as it is ready
    (so answers can overtake each other on one connection)."""
    stats = StreamStats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        stats.writers.append(writer)
        lock = asyncio.Lock()
        tasks = set()

        async def one(query: bytes) -> None:
            out = await answer(query)
            async with lock:
                writer.write(_U16.pack(len(out)) + out)
                await writer.drain()

        try:
            while True:
                (length,) = _U16.unpack(await reader.readexactly(2))
                query = await reader.readexactly(length)
                stats.requests += 1
                task = asyncio.ensure_future(one(query))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()

    server = await asyncio.start_server(handle, host, port, ssl=tls)
    return server, stats


# --- DoH (RFC 8484, HTTP/1.1) --------------------------------------------------------------


async def start_doh(
    answer: Answerer,
    host: str,
    port: int,
    tls: ssl.SSLContext,
    path: str = "/dns-query",
    *,
    style: str = "length",
) -> tuple[asyncio.Server, StreamStats]:
    """``style``: "length" (Content-Length, keep-alive), "chunked" (chunked transfer
    coding, keep-alive) or "close" (no length, body ends with the connection)."""
    stats = StreamStats()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.connections += 1
        stats.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                stats.requests += 1
                if method != "POST" or target != path:
                    status, out, ctype = "404 Not Found", b"not here", "text/plain"
                elif headers.get("content-type") != "application/dns-message":
                    status, out, ctype = "415 Unsupported Media Type", b"", "text/plain"
                else:
                    status, out, ctype = "200 OK", await answer(body), "application/dns-message"
                head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                if style == "chunked":
                    half = len(out) // 2
                    body = b"".join(
                        b"%x\r\n%s\r\n" % (len(part), part) for part in (out[:half], out[half:])
                    )
                    writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + body)
                    writer.write(b"0\r\n\r\n")
                elif style == "close":
                    writer.write(f"{head}Connection: close\r\n\r\n".encode() + out)
                    await writer.drain()
                    break
                else:
                    writer.write(f"{head}Content-Length: {len(out)}\r\n\r\n".encode() + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port, ssl=tls)
    return server, stats


def server_tls(cert: str, key: str, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(alpn)
    return context


# --- DoQ (RFC 9250) --------------------------------------------------------------------------


async def start_doq(
    answer: Answerer, host: str, port: int, cert: str, key: str
) -> tuple[asyncio.AbstractServer, StreamStats]:
    stats = StreamStats()

    class DoqServerProtocol(QuicConnectionProtocol):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self._buffers: dict[int, bytearray] = {}
            self._tasks: set[asyncio.Task[None]] = set()
            stats.connections += 1

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived):
                buffer = self._buffers.setdefault(event.stream_id, bytearray())
                buffer += event.data
                if event.end_stream:
                    del self._buffers[event.stream_id]
                    stats.requests += 1
                    task = asyncio.ensure_future(self._reply(event.stream_id, bytes(buffer)))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

        async def _reply(self, stream_id: int, data: bytes) -> None:
            (length,) = _U16.unpack_from(data, 0)
            query = data[2 : 2 + length]
            assert query[:2] == b"\x00\x00", "RFC 9250 4.2.1: DoQ queries carry ID 0"
            out = await answer(query)
            self._quic.send_stream_data(stream_id, _U16.pack(len(out)) + out, end_stream=True)
            self.transmit()

    configuration = QuicConfiguration(is_client=False, alpn_protocols=["doq"])
    configuration.load_cert_chain(cert, key)
    server = await serve(host, port, configuration=configuration,
                         create_protocol=DoqServerProtocol)  # fmt: skip
    return server, stats


# --- DoH over HTTP/3 (RFC 8484 + RFC 9114) ------------------------------------------------------


async def start_doh3(
    answer: Answerer, host: str, port: int, cert: str, key: str, path: str = "/dns-query"
) -> tuple[asyncio.AbstractServer, StreamStats]:
    stats = StreamStats()

    class Doh3ServerProtocol(QuicConnectionProtocol):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self._http: H3Connection | None = None
            self._requests: dict[int, tuple[dict[bytes, bytes], bytearray]] = {}
            self._tasks: set[asyncio.Task[None]] = set()
            stats.connections += 1

        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, ProtocolNegotiated) and event.alpn_protocol == "h3":
                self._http = H3Connection(self._quic)
            if self._http is None:
                return
            for h3_event in self._http.handle_event(event):
                if isinstance(h3_event, HeadersReceived):
                    self._requests[h3_event.stream_id] = (dict(h3_event.headers), bytearray())
                    ended = h3_event.stream_ended
                elif isinstance(h3_event, H3DataReceived):
                    self._requests[h3_event.stream_id][1].extend(h3_event.data)
                    ended = h3_event.stream_ended
                else:
                    continue
                if ended:
                    headers, body = self._requests.pop(h3_event.stream_id)
                    stats.requests += 1
                    task = asyncio.ensure_future(
                        self._reply(h3_event.stream_id, headers, bytes(body))
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

        async def _reply(self, stream_id: int, headers: dict[bytes, bytes], body: bytes) -> None:
            assert self._http is not None
            if headers.get(b":method") != b"POST" or headers.get(b":path") != path.encode():
                status, out, ctype = b"404", b"not here", b"text/plain"
            else:
                status, out, ctype = b"200", await answer(body), b"application/dns-message"
            self._http.send_headers(
                stream_id,
                [(b":status", status), (b"content-type", ctype),
                 (b"content-length", str(len(out)).encode())],
            )  # fmt: skip
            self._http.send_data(stream_id, out, end_stream=True)
            self.transmit()

    configuration = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    configuration.load_cert_chain(cert, key)
    server = await serve(host, port, configuration=configuration,
                         create_protocol=Doh3ServerProtocol)  # fmt: skip
    return server, stats


# --- script entry ------------------------------------------------------------------------------


async def _main(args: argparse.Namespace) -> None:
    if args.forward:
        fhost, _, fport = args.forward.rpartition(":")
        answer = forward_udp(fhost, int(fport))
    else:
        answer = Zone(records=[f"{n}. 60 IN A 10.9.8.7" for n in ("name.test", "doh.test")])
    if args.kind == "doh":
        await start_doh(answer, args.host, args.port, server_tls(args.cert, args.key, ["http/1.1"]))
    elif args.kind == "doq":
        await start_doq(answer, args.host, args.port, args.cert, args.key)
    elif args.kind == "doh3":
        await start_doh3(answer, args.host, args.port, args.cert, args.key)
    elif args.kind == "dot":
        await start_tcp(answer, args.host, args.port, tls=server_tls(args.cert, args.key, ["dot"]))
    print("ready", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["doh", "doh3", "doq", "dot"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--forward")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
