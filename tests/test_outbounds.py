"""DIRECT and SOCKS5 outbounds against real servers, all inside one private namespace.

One namespace per module (only ``lo`` up) holds everything: Debian's ``danted``
(no auth, CONNECT + UDP ASSOCIATE), ``microsocks`` (RFC 1929 username/password),
Python echo servers, a scripted fake SOCKS5 server for the cases real servers
do not produce (0.0.0.0 relay address, fragments, junk, payload glued to the
reply, a closing control connection, silence), and the asyncio loop running
the outbounds: it runs in a thread that entered the namespace, so every socket
it makes, and every byte, stays on that namespace's loopback.

The namespace's /etc/netns/<ns>/hosts names ``echo.test``; only processes
started with ``ip netns exec`` (the proxies) see it, so a CONNECT to that
name can only work if the proxy resolved it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import select
import shutil
import socket
import struct
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from tests.netns import Netns, run
from tunproxy.errors import ConnectRefused, ConnectTimeout, ProxyError, Unreachable
from tunproxy.outbounds import DirectOutbound, Socks5Outbound, Target
from tunproxy.outbounds.base import DatagramReceiver, DatagramSession
from tunproxy.outbounds.direct import dial_tcp

pytestmark = pytest.mark.netns

T = TypeVar("T")

DANTE_PORT = 1080
MICROSOCKS_PORT = 1081
DEAD_PORT = 1099  # nothing listens here
USER, PASSWORD = "tp-user", "tp-secret"
DOMAIN = "echo.test"
MARK = 0x7A11
BIG = 10 * 1024 * 1024

DANTE_CONF = f"""\
logoutput: stderr
internal: 127.0.0.1 port = {DANTE_PORT}
external: lo
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }}
"""


# --- the namespace and its long-lived servers --------------------------------------------------


@dataclass
class Lab:
    ns: Netns
    workdir: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    name = f"tpob-{secrets.token_hex(3)}"
    workdir = tmp_path_factory.mktemp("outbounds")
    etc = Path("/etc/netns") / name
    ns = Netns(name)
    run("ip", "netns", "add", name)
    try:
        ns.run("ip", "link", "set", "lo", "up")
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.0.1 {DOMAIN}\n")
        conf = workdir / "danted.conf"
        conf.write_text(DANTE_CONF)
        dante_log = (workdir / "danted.log").open("wb")
        ns.spawn(
            "/usr/sbin/danted", "-f", str(conf), "-N", "1", "-p", str(workdir / "danted.pid"),
            stderr=dante_log,
        )
        ns.spawn(
            "microsocks", "-i", "127.0.0.1", "-p", str(MICROSOCKS_PORT), "-u", USER, "-P", PASSWORD
        )
        ns.wait_tcp_listening(DANTE_PORT)
        ns.wait_tcp_listening(MICROSOCKS_PORT)
        yield Lab(ns, workdir)
    finally:
        ns.kill_spawned()
        run("ip", "netns", "del", name, check=False)
        shutil.rmtree(etc, ignore_errors=True)


class NsLoop:
    """An event loop running in a thread that lives in the namespace."""

    def __init__(self, ns: Netns, kind: str) -> None:
        self.ns = ns
        if kind == "uvloop":
            uvloop = pytest.importorskip("uvloop")
            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"loop-{ns.name}", daemon=True)
        self._thread.start()
        self._started.wait(60)

    def _run(self) -> None:
        with self.ns.entered():
            here = os.stat("/proc/thread-self/ns/net").st_ino
            assert here == os.stat(f"/run/netns/{self.ns.name}").st_ino
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(self._started.set)
            self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Servers:
    tcp_echo: int
    tcp6_echo: int
    udp_echo: int
    fake_socks: int
    silent: int
    fake: FakeSocks5
    closers: list[Any] = field(default_factory=list)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def env(request: pytest.FixtureRequest, lab: Lab) -> Iterator[tuple[NsLoop, Servers]]:
    nsloop = NsLoop(lab.ns, request.param)
    try:
        servers = nsloop.run(start_servers())
        try:
            yield nsloop, servers
        finally:
            nsloop.run(stop_servers(servers))
    finally:
        nsloop.close()


def listening_socket(kind: socket.SocketKind, host: str = "127.0.0.1") -> socket.socket:
    """Made in the loop's thread, hence in the namespace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(64)
    sock.setblocking(False)
    return sock


async def start_servers() -> Servers:
    loop = asyncio.get_running_loop()
    closers: list[Any] = []
    tcp = listening_socket(socket.SOCK_STREAM)
    tcp6 = listening_socket(socket.SOCK_STREAM, "::1")
    # Same port on ::1 as on 127.0.0.1 is not guaranteed; the v6 echo gets its own.
    for sock in (tcp, tcp6):
        closers.append(await loop.create_server(TcpEcho, sock=sock))
    udp = listening_socket(socket.SOCK_DGRAM)
    transport, _ = await loop.create_datagram_endpoint(UdpEcho, sock=udp)
    closers.append(transport)
    silent = listening_socket(socket.SOCK_STREAM)
    closers.append(await loop.create_server(Silent, sock=silent))
    fake = FakeSocks5()
    fake_sock = listening_socket(socket.SOCK_STREAM)
    closers.append(await loop.create_server(lambda: FakeSocks5Conn(fake), sock=fake_sock))
    return Servers(
        tcp.getsockname()[1], tcp6.getsockname()[1], udp.getsockname()[1],
        fake_sock.getsockname()[1], silent.getsockname()[1], fake, closers,
    )


async def stop_servers(servers: Servers) -> None:
    for closer in servers.closers:
        closer.close()
    servers.fake.close_all()


class TcpEcho(asyncio.Protocol):
    """Echoes everything; answers the client's EOF with its own (half-close both ways)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        self.transport.write_eof()
        return True


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.transport.sendto(b"echo:" + data, addr)


class Silent(asyncio.Protocol):
    """Accepts and never answers: a proxy that hangs."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


# --- a scripted SOCKS5 server for what real ones never do --------------------------------------


STALL_PORT = 9  # CONNECT to this port: the fake never replies
REPLY_CODE_PORT = 60000  # CONNECT to 60000 + n: the fake replies REP = n


class FakeSocks5:
    """No-auth SOCKS5. CONNECT: replies success with ``early`` glued to the reply,
    then echoes (but see STALL_PORT, REPLY_CODE_PORT). UDP ASSOCIATE: replies
    BND.ADDR 0.0.0.0 and, for each datagram, sends back a fragment, junk, a
    datagram from another socket, then the real answer. Records each request."""

    early = b"early bytes"

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.controls: list[asyncio.Transport] = []
        self.relays: list[asyncio.DatagramTransport] = []

    def close_all(self) -> None:
        for transport in [*self.controls, *self.relays]:
            transport.close()


class FakeSocks5Conn(asyncio.Protocol):
    def __init__(self, server: FakeSocks5) -> None:
        self.server = server
        self.buf = bytearray()
        self.stage = "greeting"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.controls.append(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.stage == "echo":
            self.transport.write(data)
            return
        self.buf += data
        if self.stage == "greeting" and len(self.buf) >= 2 and len(self.buf) >= 2 + self.buf[1]:
            del self.buf[: 2 + self.buf[1]]
            self.transport.write(b"\x05\x00")
            self.stage = "request"
        if self.stage == "request" and len(self.buf) >= 5:
            addr_len = {1: 4, 4: 16, 3: 1 + self.buf[4]}[self.buf[3]]
            if len(self.buf) < 4 + addr_len + 2:
                return
            request = bytes(self.buf[: 4 + addr_len + 2])
            self.server.requests.append(request)
            del self.buf[: len(request)]
            port = struct.unpack("!H", request[-2:])[0]
            if request[1] == 1 and port == STALL_PORT:
                self.stage = "stalled"  # as if the destination never answered the proxy
            elif request[1] == 1 and port >= REPLY_CODE_PORT:
                self.transport.write(
                    bytes((5, port - REPLY_CODE_PORT)) + b"\x00\x01\x00\x00\x00\x00\x00\x00"
                )
            elif request[1] == 1:
                self.transport.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00" + FakeSocks5.early)
                self.stage = "echo"
            else:
                asyncio.get_running_loop().create_task(self.associate())

    async def associate(self) -> None:
        loop = asyncio.get_running_loop()
        relay_sock = listening_socket(socket.SOCK_DGRAM)
        relay, _ = await loop.create_datagram_endpoint(
            lambda: FakeRelay(self.server), sock=relay_sock
        )
        self.server.relays.append(relay)
        port = relay_sock.getsockname()[1]
        self.transport.write(b"\x05\x00\x00\x01\x00\x00\x00\x00" + struct.pack("!H", port))
        self.stage = "associated"


class FakeRelay(asyncio.DatagramProtocol):
    def __init__(self, server: FakeSocks5) -> None:
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.requests.append(data)
        header, payload = data[:10], data[10:]  # the tests send to an IPv4 target
        fragment = header[:2] + b"\x01" + header[3:] + b"fragment"
        self.transport.sendto(fragment, addr)
        self.transport.sendto(b"\x00\x00", addr)  # truncated header
        stranger = listening_socket(socket.SOCK_DGRAM)
        stranger.sendto(header + b"stranger", addr)  # right format, wrong source
        stranger.close()
        self.transport.sendto(header + b"reply:" + payload, addr)


# --- client side helpers --------------------------------------------------------------------


class Sink(asyncio.Protocol):
    """The relay's stand-in: hashes what arrives, notes the order of callbacks."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.digest = hashlib.sha256()
        self.received = 0
        self.head = b""
        self.calls: list[str] = []
        self.eof: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._want: tuple[int, asyncio.Future[None]] | None = None

    async def received_at_least(self, count: int, timeout: float = 30.0) -> None:
        if self.received < count:
            self._want = (count, asyncio.get_running_loop().create_future())
            await asyncio.wait_for(self._want[1], timeout)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("connection_made")
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.calls or self.calls[-1] != "data_received":
            self.calls.append("data_received")
        if len(self.head) < 64:
            self.head += data[: 64 - len(self.head)]
        self.digest.update(data)
        self.received += len(data)
        if self._want is not None and self.received >= self._want[0]:
            self._want[1].set_result(None)
            self._want = None

    def eof_received(self) -> bool:
        self.calls.append("eof_received")
        if not self.eof.done():
            self.eof.set_result(None)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("connection_lost")
        if not self.lost.done():
            self.lost.set_result(exc)


class Inbox(DatagramReceiver):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes) -> None:
        self.queue.put_nowait(data)

    def session_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def echo_through(
    transport: asyncio.Transport, sink: Sink, size: int, *, half_close: bool = True
) -> tuple[str, str]:
    """Send ``size`` random bytes, then EOF; wait for the echo's EOF. Return both sha256.

    Without ``half_close``: wait for every byte instead, then close (microsocks
    tears down both directions at the first EOF, so it cannot be half-closed)."""
    sent = hashlib.sha256()
    chunk = os.urandom(256 * 1024)
    remaining = size
    while remaining:
        piece = chunk[: min(len(chunk), remaining)]
        transport.write(piece)
        sent.update(piece)
        remaining -= len(piece)
    if half_close:
        assert transport.can_write_eof()
        transport.write_eof()  # the echo server answers our EOF only after echoing everything
        await asyncio.wait_for(sink.eof, 60)
    else:
        await sink.received_at_least(size, timeout=60)
    transport.close()
    return sent.hexdigest(), sink.digest.hexdigest()


def mark_of(transport: asyncio.BaseTransport) -> int:
    sock = transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK))


# --- DIRECT ---------------------------------------------------------------------------------


def _loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        loop: asyncio.AbstractEventLoop = pytest.importorskip("uvloop").new_event_loop()
        return loop
    return asyncio.new_event_loop()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_dial_tcp_sends_its_syn_in_its_first_step(kind: str) -> None:
    """The dialer's connect(2) is issued before its first suspension: no thread-pool name
    lookup of the IP literal first (uvloop's sock_connect made one per connection, a
    thread round trip and a loop turn before the SYN). The dial's first step is run by
    hand inside a task that then blocks the loop, so nothing else can have run."""
    loop = _loop(kind)
    listener = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen()

        async def first_step_only() -> bool:
            dial = dial_tcp("127.0.0.1", listener.getsockname()[1], fwmark=None)
            with contextlib.suppress(StopIteration):  # done at once: connected, fine too
                dial.send(None)  # runs up to its first await
            try:
                readable, _, _ = select.select([listener], [], [], 30.0)  # the loop waits
                return bool(readable)
            finally:
                dial.close()  # lets go of the half-made socket

        assert loop.run_until_complete(first_step_only()), "no SYN after the first step"
        listener.accept()[0].close()
    finally:
        listener.close()
        loop.close()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_dial_tcp_refused_is_an_oserror_with_its_errno(kind: str) -> None:
    loop = _loop(kind)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # bound then closed: nothing listens there
    try:
        with pytest.raises(OSError) as caught:
            loop.run_until_complete(dial_tcp("127.0.0.1", port, fwmark=None))
        assert caught.value.errno == errno.ECONNREFUSED
        assert "refused" in str(caught.value).lower()
    finally:
        loop.close()


def test_direct_10mb_echo_with_half_close_and_mark(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> tuple[str, str, int, int, list[str]]:
        direct = DirectOutbound(fwmark=MARK)
        sink = Sink()
        transport = await direct.open_stream(
            Target(servers.tcp_echo, "127.0.0.1"), sink, timeout=30
        )
        assert sink.transport is transport
        mark = mark_of(transport)
        sock = transport.get_extra_info("socket")
        nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        sent, got = await echo_through(transport, sink, BIG)
        assert sink.received == BIG
        return sent, got, mark, nodelay, sink.calls

    sent, got, mark, nodelay, calls = nsloop.run(go())
    assert sent == got
    assert mark == MARK
    assert nodelay != 0
    assert calls[:3] == ["connection_made", "data_received", "eof_received"]


def test_direct_ipv6_and_bind_to_device(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> tuple[bytes, bytes]:
        direct = DirectOutbound(fwmark=MARK, interface="lo")
        sink = Sink()
        transport = await direct.open_stream(Target(servers.tcp6_echo, "::1"), sink, timeout=30)
        device = transport.get_extra_info("socket").getsockopt(
            socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16
        )
        transport.write(b"over ipv6")
        transport.write_eof()
        await asyncio.wait_for(sink.eof, 5)
        transport.close()
        return device.rstrip(b"\0"), sink.head

    device, head = nsloop.run(go())
    assert device == b"lo"
    assert head == b"over ipv6"


def test_direct_domain_goes_through_the_resolver(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env
    asked: list[str] = []

    async def resolve(name: str) -> list[str]:
        asked.append(name)
        return ["127.0.0.1"]

    async def go() -> bytes:
        direct = DirectOutbound(fwmark=MARK, resolve=resolve)
        sink = Sink()
        transport = await direct.open_stream(
            Target(servers.tcp_echo, domain="fake-ip.example"), sink, timeout=30
        )
        transport.write(b"by name")
        transport.write_eof()
        await asyncio.wait_for(sink.eof, 5)
        transport.close()
        return sink.head

    assert nsloop.run(go()) == b"by name"
    assert asked == ["fake-ip.example"]


def test_direct_domain_without_resolver_is_unreachable(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> None:
        await DirectOutbound(fwmark=MARK).open_stream(
            Target(servers.tcp_echo, domain="fake-ip.example"), Sink(), timeout=30
        )

    with pytest.raises(Unreachable):
        nsloop.run(go())


def test_direct_refused_port_is_prompt(env: tuple[NsLoop, Servers]) -> None:
    nsloop, _ = env

    async def go() -> float:
        start = time.monotonic()
        with pytest.raises(ConnectRefused):
            await DirectOutbound(fwmark=MARK).open_stream(
                Target(DEAD_PORT, "127.0.0.1"), Sink(), timeout=30
            )
        return time.monotonic() - start

    assert nsloop.run(go()) < 10.0  # refused at once, not the 30 s timeout


def test_direct_no_route_is_unreachable(env: tuple[NsLoop, Servers]) -> None:
    nsloop, _ = env

    async def go() -> None:
        # The namespace has only lo: no route, so the kernel fails the connect
        # itself and no packet is sent anywhere.
        await DirectOutbound(fwmark=MARK).open_stream(
            Target(80, "192.0.2.1"), Sink(), timeout=30
        )

    with pytest.raises(Unreachable):
        nsloop.run(go())


def test_direct_udp_round_trip_with_mark(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> tuple[bytes, int]:
        inbox = Inbox()
        session = await DirectOutbound(fwmark=MARK).open_datagram(
            Target(servers.udp_echo, "127.0.0.1"), inbox, timeout=30
        )
        session.send(b"ping")
        reply = await asyncio.wait_for(inbox.queue.get(), 5)
        mark = mark_of(cast(Any, session).transport)
        session.close()
        assert not inbox.lost.done()  # closing it ourselves is no loss
        return reply, mark

    assert nsloop.run(go()) == (b"echo:ping", MARK)


def test_direct_udp_refused_ends_session(env: tuple[NsLoop, Servers]) -> None:
    nsloop, _ = env

    async def go() -> Exception | None:
        inbox = Inbox()
        session = await DirectOutbound(fwmark=MARK).open_datagram(
            Target(DEAD_PORT, "127.0.0.1"), inbox, timeout=30
        )
        session.send(b"anyone?")  # ICMP port unreachable comes back on lo
        return await asyncio.wait_for(inbox.lost, 5)

    assert isinstance(nsloop.run(go()), ConnectRefused)


# --- SOCKS5 via dante -----------------------------------------------------------------------


def dante(pipeline: bool = False) -> Socks5Outbound:
    return Socks5Outbound("dante", "127.0.0.1", DANTE_PORT, fwmark=MARK, pipeline=pipeline)


def microsocks(password: str = PASSWORD, pipeline: bool = False) -> Socks5Outbound:
    return Socks5Outbound(
        "microsocks", "127.0.0.1", MICROSOCKS_PORT, username=USER, password=password,
        fwmark=MARK, pipeline=pipeline,
    )


@pytest.mark.parametrize("via", ["dante", "microsocks"])
def test_socks5_10mb_echo_with_half_close_and_mark(
    env: tuple[NsLoop, Servers], via: str
) -> None:
    nsloop, servers = env

    async def go() -> tuple[str, str, int]:
        outbound = dante() if via == "dante" else microsocks()
        sink = Sink()
        transport = await outbound.open_stream(
            Target(servers.tcp_echo, "127.0.0.1"), sink, timeout=30
        )
        assert sink.calls == ["connection_made"]
        mark = mark_of(transport)
        sent, got = await echo_through(transport, sink, BIG, half_close=via == "dante")
        assert sink.received == BIG
        return sent, got, mark

    sent, got, mark = nsloop.run(go())
    assert sent == got
    assert mark == MARK


@pytest.mark.parametrize("via", ["dante", "microsocks"])
def test_socks5_connect_by_domain_is_resolved_by_the_proxy(
    env: tuple[NsLoop, Servers], via: str
) -> None:
    nsloop, servers = env

    async def go() -> bytes:
        outbound = dante() if via == "dante" else microsocks()
        sink = Sink()
        # No address: only the proxy (which sees the namespace's hosts file) can resolve it.
        transport = await outbound.open_stream(
            Target(servers.tcp_echo, domain=DOMAIN), sink, timeout=30
        )
        transport.write(b"remote dns")
        await sink.received_at_least(len(b"remote dns"))
        transport.close()
        return sink.head

    assert nsloop.run(go()) == b"remote dns"


def test_socks5_pipelined_connect_and_udp_associate_through_dante(
    env: tuple[NsLoop, Servers],
) -> None:
    nsloop, servers = env

    async def go() -> tuple[str, str, bytes]:
        outbound = dante(pipeline=True)
        sink = Sink()
        transport = await outbound.open_stream(
            Target(servers.tcp_echo, "127.0.0.1"), sink, timeout=30
        )
        sent, got = await echo_through(transport, sink, BIG, half_close=True)
        inbox = Inbox()
        session = await outbound.open_datagram(
            Target(servers.udp_echo, "127.0.0.1"), inbox, timeout=30
        )
        session.send(b"ping")
        reply = await asyncio.wait_for(inbox.queue.get(), 5)
        session.close()
        return sent, got, reply

    sent, got, reply = nsloop.run(go())
    assert sent == got
    assert reply == b"echo:ping"


def test_socks5_pipelined_to_a_proxy_that_reads_one_message_per_recv(
    env: tuple[NsLoop, Servers],
) -> None:
    """microsocks answers the greeting and drops the rest of that read: the stall
    the pipeline setting risks, and the error names it."""
    nsloop, servers = env

    async def go() -> None:
        await microsocks(pipeline=True).open_stream(
            Target(servers.tcp_echo, "127.0.0.1"), Sink(), timeout=1
        )

    with pytest.raises(ProxyError, match=r"stuck in await-auth; or it does not take pipelined"):
        nsloop.run(go())


def test_socks5_request_carries_the_domain(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> bytes:
        outbound = Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, fwmark=MARK)
        transport = await outbound.open_stream(
            Target(443, address="203.0.113.9", domain="www.example.org"), Sink(), timeout=30
        )
        transport.close()
        return servers.fake.requests[-1]

    request = nsloop.run(go())
    assert request == b"\x05\x01\x00\x03\x0fwww.example.org\x01\xbb"


def test_socks5_bytes_glued_to_the_reply_reach_the_protocol(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> tuple[list[str], bytes]:
        outbound = Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, fwmark=MARK)
        sink = Sink()
        transport = await outbound.open_stream(Target(80, "203.0.113.9"), sink, timeout=30)
        # connection_made, then the early bytes, delivered before open_stream returned.
        calls = list(sink.calls)
        transport.write(b"+echo")
        await sink.received_at_least(len(FakeSocks5.early) + 5)
        transport.close()
        return calls, sink.head

    calls, head = nsloop.run(go())
    assert calls == ["connection_made", "data_received"]
    assert head == FakeSocks5.early + b"+echo"


def test_proxy_dying_mid_stream_reaches_the_protocol(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> list[str]:
        outbound = Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, fwmark=MARK)
        sink = Sink()
        transport = await outbound.open_stream(Target(80, "203.0.113.9"), sink, timeout=30)
        transport.write(b"x" * 1000)
        await sink.received_at_least(len(FakeSocks5.early) + 1000)
        # The proxy goes away hard: linger 0 turns the close into an RST.
        proxy_side = servers.fake.controls[-1]
        proxy_side.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        proxy_side.abort()
        exc = await asyncio.wait_for(sink.lost, 5)
        return [*sink.calls, type(exc).__name__]

    calls = nsloop.run(go())
    assert calls == ["connection_made", "data_received", "connection_lost", "ConnectionResetError"]


def test_socks5_wrong_password_is_proxy_error(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> None:
        await microsocks("wrong").open_stream(
            Target(servers.tcp_echo, "127.0.0.1"), Sink(), timeout=30
        )

    with pytest.raises(ProxyError, match="username or password"):
        nsloop.run(go())


@pytest.mark.parametrize("via", ["dante", "microsocks"])
def test_socks5_refused_port_is_connect_refused_promptly(
    env: tuple[NsLoop, Servers], via: str
) -> None:
    nsloop, _ = env

    async def go() -> float:
        start = time.monotonic()
        with pytest.raises(ConnectRefused):
            await (dante() if via == "dante" else microsocks()).open_stream(
                Target(DEAD_PORT, "127.0.0.1"), Sink(), timeout=30
            )
        return time.monotonic() - start

    assert nsloop.run(go()) < 10.0  # refused at once, not the 30 s timeout


def test_socks5_unroutable_target_is_unreachable(env: tuple[NsLoop, Servers]) -> None:
    nsloop, _ = env

    async def go() -> None:
        # dante's connect fails in the kernel (no route in the namespace): REP 3 or 4.
        await dante().open_stream(Target(80, "192.0.2.1"), Sink(), timeout=30)

    with pytest.raises(Unreachable):
        nsloop.run(go())


def test_dead_proxy_is_proxy_error_promptly(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> tuple[float, str]:
        start = time.monotonic()
        dead = Socks5Outbound("dead", "127.0.0.1", DEAD_PORT, fwmark=MARK)
        with pytest.raises(ProxyError) as info:
            await dead.open_stream(Target(servers.tcp_echo, "127.0.0.1"), Sink(), timeout=30)
        with pytest.raises(ProxyError):
            await dead.open_datagram(Target(servers.udp_echo, "127.0.0.1"), Inbox(), timeout=30)
        return time.monotonic() - start, str(info.value)

    elapsed, message = nsloop.run(go())
    assert elapsed < 10.0  # not the 30 s timeouts: refused at once
    assert "is down" in message


def test_silent_proxy_times_out_as_proxy_error(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> float:
        start = time.monotonic()
        silent = Socks5Outbound("silent", "127.0.0.1", servers.silent, fwmark=MARK)
        with pytest.raises(ProxyError, match="did not answer"):
            await silent.open_stream(Target(servers.tcp_echo, "127.0.0.1"), Sink(), timeout=0.3)
        elapsed = time.monotonic() - start
        with pytest.raises(ProxyError, match="no UDP ASSOCIATE"):
            await silent.open_datagram(
                Target(servers.udp_echo, "127.0.0.1"), Inbox(), timeout=0.3
            )
        return elapsed

    elapsed = nsloop.run(go())
    # uvloop's clock has millisecond granularity; the upper bound is loose for a loaded
    # machine (a silent proxy not timed out would hang the test instead).
    assert 0.25 <= elapsed < 4.0


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (1, ProxyError),
        (2, ProxyError),
        (3, Unreachable),
        (4, Unreachable),
        (5, ConnectRefused),
        (6, ConnectTimeout),
        (7, ProxyError),
        (8, ProxyError),
        (0x42, ProxyError),
    ],
)
def test_socks5_reply_codes_map_to_what_the_app_would_see(
    env: tuple[NsLoop, Servers], code: int, error: type[Exception]
) -> None:
    nsloop, servers = env

    async def go() -> None:
        outbound = Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, fwmark=MARK)
        await outbound.open_stream(Target(REPLY_CODE_PORT + code, "127.0.0.1"), Sink(), timeout=30)

    with pytest.raises(error) as info:
        nsloop.run(go())
    assert type(info.value) is error


def test_destination_timeout_behind_the_proxy_is_connect_timeout(
    env: tuple[NsLoop, Servers],
) -> None:
    nsloop, servers = env

    async def go() -> None:
        outbound = Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, fwmark=MARK)
        await outbound.open_stream(Target(STALL_PORT, "127.0.0.1"), Sink(), timeout=0.3)

    with pytest.raises(ConnectTimeout):
        nsloop.run(go())


def test_target_socks5_cannot_carry_is_unreachable(env: tuple[NsLoop, Servers]) -> None:
    nsloop, _ = env

    async def go() -> None:
        await dante().open_stream(Target(80, domain="a" * 300), Sink(), timeout=30)

    with pytest.raises(Unreachable):
        nsloop.run(go())


@pytest.mark.parametrize("by", ["ip", "domain"])
def test_socks5_udp_associate_through_dante(env: tuple[NsLoop, Servers], by: str) -> None:
    nsloop, servers = env

    async def go() -> tuple[list[bytes], int]:
        inbox = Inbox()
        target = (
            Target(servers.udp_echo, "127.0.0.1") if by == "ip"
            else Target(servers.udp_echo, domain=DOMAIN)
        )
        session = await dante().open_datagram(target, inbox, timeout=30)
        replies = []
        for i in range(3):
            session.send(b"ping %d" % i)
            replies.append(await asyncio.wait_for(inbox.queue.get(), 5))
        mark = mark_of(cast(Any, session).transport)
        session.close()
        return replies, mark

    replies, mark = nsloop.run(go())
    assert replies == [b"echo:ping 0", b"echo:ping 1", b"echo:ping 2"]
    assert mark == MARK


def test_socks5_udp_drops_fragments_junk_strangers_and_ends_with_control(
    env: tuple[NsLoop, Servers],
) -> None:
    nsloop, servers = env

    async def go() -> tuple[bytes, bool, int, Exception | None, bytes]:
        inbox = Inbox()
        outbound = Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, fwmark=MARK)
        session = await outbound.open_datagram(Target(53, "127.0.0.1"), inbox, timeout=30)
        association = cast(Any, session)
        # BND.ADDR was 0.0.0.0: the relay is the proxy's own address.
        assert association.relay[0] == "127.0.0.1"
        session.send(b"query")
        reply = await asyncio.wait_for(inbox.queue.get(), 5)
        # The fake sent a fragment and junk before the reply; the stranger's copy is
        # filtered by the kernel (the socket is connected to the relay).
        extra = inbox.queue.empty()
        dropped = association.dropped
        request = servers.fake.requests[-1]
        servers.fake.controls[-1].close()  # the proxy ends the association
        lost = await asyncio.wait_for(inbox.lost, 5)
        session.send(b"after the end")  # harmless no-op
        return reply, extra, dropped, lost, request

    reply, nothing_else, dropped, lost, request = nsloop.run(go())
    assert reply == b"reply:query"
    assert nothing_else
    assert dropped == 2
    assert isinstance(lost, ProxyError)
    assert request == b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35query"


def test_socks5_udp_disabled(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> DatagramSession:
        outbound = Socks5Outbound("no-udp", "127.0.0.1", DANTE_PORT, fwmark=MARK, udp=False)
        return await outbound.open_datagram(Target(servers.udp_echo, "127.0.0.1"), Inbox(),
                                            timeout=30)

    with pytest.raises(ProxyError, match="UDP is disabled"):
        nsloop.run(go())


def test_aclose_ends_open_associations(env: tuple[NsLoop, Servers]) -> None:
    nsloop, servers = env

    async def go() -> bool:
        outbound = dante()
        inbox = Inbox()
        session = await outbound.open_datagram(
            Target(servers.udp_echo, "127.0.0.1"), inbox, timeout=30
        )
        await outbound.aclose()
        session.send(b"after close")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(inbox.queue.get(), 0.2)
            return False
        return not inbox.lost.done()  # a local close is no loss

    assert nsloop.run(go())

