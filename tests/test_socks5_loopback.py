"""The SOCKS5 outbound against in-process servers on loopback: no root, no namespace.

The scripted SOCKS5 server, echo servers and client-side helpers are the ones
``tests/test_outbounds.py`` runs inside its namespace; here they listen on this
host's 127.0.0.1 only (ports the kernel picks), and the outbound runs without a
fwmark (setting SO_MARK needs CAP_NET_ADMIN). The last test carries a flow from
the relay (a real Stack, on the ordinary event loop) through the outbound.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from stack import Stack, StackConfig
from stack.wire import tcp
from tests.ippeer import TcpPeer, drain
from tests.relay_lab import config
from tests.test_outbounds import (
    REPLY_CODE_PORT,
    STALL_PORT,
    Inbox,
    Servers,
    Sink,
    listening_socket,
    start_servers,
    stop_servers,
)
from tunproxy.errors import ConnectRefused, ConnectTimeout, ProxyError, Unreachable
from tunproxy.flows import FlowLog
from tunproxy.outbounds import Socks5Outbound, Target
from tunproxy.outbounds.reject import RejectOutbound
from tunproxy.policy import Policy
from tunproxy.relay import Relay

USER, PASSWORD = "tp-user", "tp-secret"


def run(test: Callable[[Servers], Awaitable[None]]) -> None:
    async def main() -> None:
        servers = await start_servers()
        try:
            await asyncio.wait_for(test(servers), 30)
        finally:
            await stop_servers(servers)

    asyncio.run(main())


def fake(servers: Servers, **kw: Any) -> Socks5Outbound:
    return Socks5Outbound("fake", "127.0.0.1", servers.fake_socks, **kw)


def echo_target(servers: Servers) -> Target:
    return Target(port=servers.tcp_echo, address="127.0.0.1")


# -- an RFC 1929 server, for the credential exchange (the scripted fake is no-auth) -------------


class AuthSocks5(asyncio.Protocol):
    """Username/password only; CONNECT succeeds (and echoes) when the credentials match."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.buf = bytearray()
        self.stage = "greeting"

    def data_received(self, data: bytes) -> None:
        if self.stage == "echo":
            self.transport.write(data)
            return
        self.buf += data
        if self.stage == "greeting" and len(self.buf) >= 2:
            if len(self.buf) < 2 + self.buf[1]:
                return
            offered = bytes(self.buf[2 : 2 + self.buf[1]])
            del self.buf[: 2 + self.buf[1]]
            self.transport.write(b"\x05\x02" if 2 in offered else b"\x05\xff")
            self.stage = "auth"
        if self.stage == "auth" and len(self.buf) >= 2:
            ulen = self.buf[1]
            if len(self.buf) < 3 + ulen or len(self.buf) < 3 + ulen + self.buf[2 + ulen]:
                return
            plen = self.buf[2 + ulen]
            user = bytes(self.buf[2 : 2 + ulen]).decode()
            password = bytes(self.buf[3 + ulen : 3 + ulen + plen]).decode()
            del self.buf[: 3 + ulen + plen]
            ok = (user, password) == (USER, PASSWORD)
            self.transport.write(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                self.transport.close()
                return
            self.stage = "request"
        if self.stage == "request" and len(self.buf) >= 10:
            del self.buf[:10]
            self.transport.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")
            self.stage = "echo"


class Garbage(asyncio.Protocol):
    """Answers the greeting with bytes that are not SOCKS5."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


class HangUp(asyncio.Protocol):
    """Closes as soon as the greeting arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.close()


async def serve(factory: Callable[[], asyncio.Protocol]) -> tuple[asyncio.Server, int]:
    sock = listening_socket(socket.SOCK_STREAM)
    server = await asyncio.get_running_loop().create_server(factory, sock=sock)
    return server, sock.getsockname()[1]


# -- TCP ------------------------------------------------------------------------------------


def test_connect_echo_with_the_bytes_glued_to_the_reply_and_half_close() -> None:
    async def body(servers: Servers) -> None:
        outbound = fake(servers)
        sink = Sink()
        transport = await outbound.open_stream(echo_target(servers), sink, timeout=30)
        assert sink.calls[:2] == ["connection_made", "data_received"]
        assert sink.head.startswith(b"early bytes")
        transport.write(b"ping")
        await sink.received_at_least(len(b"early bytes") + 4)
        request = servers.fake.requests[-1]
        assert request[:4] == b"\x05\x01\x00\x01" and request[4:8] == socket.inet_aton("127.0.0.1")
        transport.close()
        await asyncio.wait_for(sink.lost, 5)
        await outbound.aclose()

    run(body)


@pytest.mark.parametrize("pipeline", [False, True])
def test_connect_by_domain_sends_the_name(pipeline: bool) -> None:
    async def body(servers: Servers) -> None:
        outbound = fake(servers, pipeline=pipeline)
        sink = Sink()
        target = Target(port=servers.tcp_echo, domain="echo.test")
        transport = await outbound.open_stream(target, sink, timeout=30)
        request = servers.fake.requests[-1]
        assert request[3] == 3 and request[5 : 5 + request[4]] == b"echo.test"
        transport.close()

    run(body)


def test_proxy_given_by_name_is_resolved() -> None:
    async def body(servers: Servers) -> None:
        outbound = Socks5Outbound("named", "localhost", servers.fake_socks)
        sink = Sink()
        try:
            transport = await outbound.open_stream(echo_target(servers), sink, timeout=30)
        except ProxyError as exc:  # localhost may resolve to ::1 first, where nothing listens
            assert "is down" in str(exc)
            return
        transport.close()
        unresolvable = Socks5Outbound("bad", "no-such-host.invalid", 1080)
        with pytest.raises(ProxyError, match="cannot resolve"):
            await unresolvable.open_stream(echo_target(servers), Sink(), timeout=30)

    run(body)


@pytest.mark.parametrize(("code", "error"), [
    (5, ConnectRefused), (3, Unreachable), (4, Unreachable), (6, ConnectTimeout),
    (1, ProxyError), (2, ProxyError),
])  # fmt: skip
def test_reply_codes_map_to_what_the_app_would_see(code: int, error: type[Exception]) -> None:
    async def body(servers: Servers) -> None:
        target = Target(port=REPLY_CODE_PORT + code, address="127.0.0.1")
        with pytest.raises(error):
            await fake(servers).open_stream(target, Sink(), timeout=30)

    run(body)


@pytest.mark.parametrize("pipeline", [False, True])
def test_destination_silent_behind_the_proxy_is_connect_timeout(pipeline: bool) -> None:
    async def body(servers: Servers) -> None:
        target = Target(port=STALL_PORT, address="127.0.0.1")
        with pytest.raises(ConnectTimeout, match="no answer within"):
            await fake(servers, pipeline=pipeline).open_stream(target, Sink(), timeout=0.5)

    run(body)


@pytest.mark.parametrize("pipeline", [False, True])
def test_silent_proxy_is_proxy_error(pipeline: bool) -> None:
    async def body(servers: Servers) -> None:
        outbound = Socks5Outbound("silent", "127.0.0.1", servers.silent, pipeline=pipeline)
        message = "pipelined" if pipeline else "did not answer"
        with pytest.raises(ProxyError, match=message):
            await outbound.open_stream(echo_target(servers), Sink(), timeout=0.5)

    run(body)


def test_dead_garbled_and_hanging_proxies_are_proxy_errors() -> None:
    async def body(servers: Servers) -> None:
        dead = listening_socket(socket.SOCK_STREAM)
        port = dead.getsockname()[1]
        dead.close()  # nothing listens there now
        with pytest.raises(ProxyError, match="is down"):
            await Socks5Outbound("dead", "127.0.0.1", port).open_stream(
                echo_target(servers), Sink(), timeout=30)  # fmt: skip
        for factory, match in ((Garbage, "broke the protocol"), (HangUp, "closed")):
            server, port = await serve(factory)
            with pytest.raises(ProxyError, match=match):
                await Socks5Outbound("bad", "127.0.0.1", port).open_stream(
                    echo_target(servers), Sink(), timeout=30)  # fmt: skip
            server.close()

    run(body)


def test_username_and_password() -> None:
    async def body(servers: Servers) -> None:
        server, port = await serve(AuthSocks5)
        good = Socks5Outbound("auth", "127.0.0.1", port, username=USER, password=PASSWORD)
        sink = Sink()
        transport = await good.open_stream(echo_target(servers), sink, timeout=30)
        transport.write(b"hello")
        await sink.received_at_least(5)
        assert sink.head == b"hello"
        transport.close()
        bad = Socks5Outbound("auth", "127.0.0.1", port, username=USER, password="wrong")
        with pytest.raises(ProxyError):
            await bad.open_stream(echo_target(servers), Sink(), timeout=30)
        with pytest.raises(ValueError):
            Socks5Outbound("half", "127.0.0.1", port, username=USER)
        server.close()

    run(body)


def test_a_target_socks5_cannot_express_is_unreachable_up_front() -> None:
    async def body(servers: Servers) -> None:
        target = Target(port=80, domain="x" * 300)
        with pytest.raises(Unreachable, match="cannot be sent through SOCKS5"):
            await fake(servers).open_stream(target, Sink(), timeout=30)
        assert servers.fake.requests == []
        assert repr(fake(servers)).startswith("Socks5Outbound('fake', 127.0.0.1:")
        assert "[::1]" in repr(Socks5Outbound("v6", "::1", 1080))

    run(body)


# -- UDP ------------------------------------------------------------------------------------


def test_udp_associate_filters_and_ends_with_its_control_connection() -> None:
    async def body(servers: Servers) -> None:
        outbound = fake(servers)
        inbox = Inbox()
        target = Target(port=servers.udp_echo, address="127.0.0.1")
        session = await outbound.open_datagram(target, inbox, timeout=30)
        assert "socks5-udp" in repr(session)
        session.send(b"hi")
        # The fake sends a fragment, a truncated header and a stranger's datagram first.
        assert await asyncio.wait_for(inbox.queue.get(), 5) == b"reply:hi"
        assert inbox.queue.empty()
        assert cast(Any, session).dropped >= 2
        servers.fake.controls[-1].close()  # the proxy ends the association
        exc = await asyncio.wait_for(inbox.lost, 5)
        assert isinstance(exc, ProxyError)
        session.send(b"after")  # ignored once closed
        second = await outbound.open_datagram(target, Inbox(), timeout=30)
        await outbound.aclose()  # closes what is open, without session_lost
        second.close()

    run(body)


def test_udp_disabled_and_refused() -> None:
    async def body(servers: Servers) -> None:
        target = Target(port=servers.udp_echo, address="127.0.0.1")
        with pytest.raises(ProxyError, match="disabled"):
            await fake(servers, udp=False).open_datagram(target, Inbox(), timeout=30)
        server, port = await serve(HangUp)
        with pytest.raises(ProxyError):
            await Socks5Outbound("x", "127.0.0.1", port).open_datagram(target, Inbox(), timeout=30)
        silent = Socks5Outbound("s", "127.0.0.1", servers.silent)
        with pytest.raises(ProxyError, match="no UDP ASSOCIATE"):
            await silent.open_datagram(target, Inbox(), timeout=0.5)
        server.close()

    run(body)


# -- through the relay ------------------------------------------------------------------------


def test_relay_carries_a_tcp_flow_through_socks5_on_loopback() -> None:
    """A real Stack and Relay on the ordinary loop, the flow's address rewritten to the
    loopback echo server by the proxy's request (the fake always connects to it)."""

    async def body(servers: Servers) -> None:
        loop = asyncio.get_running_loop()
        cfg = config("rules: [MATCH,proxy]\nupstreams:\n  proxy: {type: socks5, "
                     "server: '127.0.0.1:1080'}\n")  # fmt: skip
        outbound = fake(servers)
        stack = Stack(StackConfig(seed=3))
        out: list[Any] = []
        done = asyncio.Event()

        def process() -> None:
            while (event := stack.next_event()) is not None:
                relay.handle_event(event)
            out.extend(drain(stack))
            done.set()

        def flush() -> None:  # as the driver does: later, once
            loop.call_soon(process)

        policy = Policy(cfg.ruleset, {"DIRECT": outbound, "REJECT": RejectOutbound(),
                                      "proxy": outbound}, None, None, cfg)  # fmt: skip
        relay = Relay(loop, stack, policy, cfg.relay, FlowLog(), flush)
        peer = TcpPeer(stack, dport=7)
        peer.syn(loop.time())
        process()

        async def until(cond: Callable[[], bool]) -> None:
            async with asyncio.timeout(5):
                while not cond():
                    done.clear()
                    await done.wait()

        await until(lambda: any(o.tcp and o.tcp.flags & tcp.SYN for o in out))
        peer.take(out)
        out.clear()
        peer.deliver(tcp.ACK | tcp.PSH, b"through the proxy", now=loop.time())
        process()
        want = b"early bytes" + b"through the proxy"

        def got() -> bool:
            peer.take(out)
            out.clear()
            return bytes(peer.received) == want

        await until(got)
        request = servers.fake.requests[-1]
        assert struct.unpack("!H", request[-2:])[0] == 7
        await relay.aclose()
        assert relay.flows == {} and dict(relay.flow_log.ended_by_reason) == {"shutdown": 1}

    run(body)
