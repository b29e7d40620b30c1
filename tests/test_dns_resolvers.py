"""Upstream resolvers against real servers on 127.0.0.1 (in-process, fast).

The servers (tests/data/dns/servers.py) are small but real: a UDP/TCP server
answering from a zone, DoT and DoH over Python's ssl, DoQ over aioquic. The
resolvers reach them through the DIRECT outbound, as they would in tunproxy.
"""

from __future__ import annotations

import asyncio
import pathlib
import socket
import sys
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from tunproxy.dns.config import parse_server_url
from tunproxy.dns.resolvers import ResolverError, make_resolver
from tunproxy.outbounds.base import Outbound, Target
from tunproxy.outbounds.direct import DirectOutbound

sys.path.insert(0, str(pathlib.Path(__file__).parent / "data" / "dns"))
from dnstest_servers import (
    Zone,
    make_certificate,
    server_tls,
    start_doh,
    start_doh3,
    start_doq,
    start_tcp,
    start_udp,
)

T = TypeVar("T")
ZONE_LINES = [
    "name.test. 60 IN A 10.9.8.7",
    "name.test. 60 IN AAAA 2001:db8::7",
    "slow.test. 60 IN A 10.0.0.1",
    "fast.test. 60 IN A 10.0.0.2",
]
DIRECT = DirectOutbound()
flows: list[tuple[str, Target]] = []


def outbound_for(network: str, target: Target) -> Outbound:
    flows.append((network, target))
    return DIRECT


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


def query(name: str, qtype: str = "A", ident: int = 0x4242) -> bytes:
    record = DNSRecord.question(name, qtype)
    record.header.id = ident
    return bytes(record.pack())


def free_port_pair() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            udp.close()
            tcp.close()
        return port
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return make_certificate(tmp_path_factory.mktemp("cert"), ["dns.test"], ["127.0.0.1"])


def answers(wire: bytes) -> list[str]:
    return [str(rr.rdata) for rr in DNSRecord.parse(wire).rr]


def test_udp_answer_keeps_the_callers_id() -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        server = await start_udp(zone, "127.0.0.1", port)
        resolver = make_resolver(parse_server_url(f"udp://127.0.0.1:{port}"), outbound_for)
        flows.clear()
        wire = await resolver.exchange(query("name.test"), timeout=2)
        assert wire[:2] == b"\x42\x42"
        assert answers(wire) == ["10.9.8.7"]
        assert zone.asked == [("name.test", "A")] and server.received == 1
        assert flows == [("udp", Target(port=port, address="127.0.0.1"))]
        assert server.transport is not None
        server.transport.close()

    run(main())


def test_udp_truncated_answer_is_retried_over_tcp() -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        udp = await start_udp(zone, "127.0.0.1", port, truncate=True)
        tcp, stats = await start_tcp(zone, "127.0.0.1", port)
        resolver = make_resolver(parse_server_url(f"udp://127.0.0.1:{port}"), outbound_for)
        wire = await resolver.exchange(query("name.test", "AAAA"), timeout=2)
        assert answers(wire) == ["2001:db8::7"]
        assert not DNSRecord.parse(wire).header.tc
        assert udp.received == 1 and stats.requests == 1
        await resolver.aclose()
        tcp.close()
        assert udp.transport is not None
        udp.transport.close()

    run(main())


def test_tcp_pipelines_queries_and_matches_out_of_order_answers() -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES, delays={"slow.test": 0.3})
        port = free_port_pair()
        server, stats = await start_tcp(zone, "127.0.0.1", port)
        resolver = make_resolver(parse_server_url(f"tcp://127.0.0.1:{port}"), outbound_for)
        order: list[str] = []

        async def ask(name: str, ident: int) -> bytes:
            wire = await resolver.exchange(query(name, ident=ident), timeout=2)
            order.append(name)
            return wire

        slow, fast = await asyncio.gather(ask("slow.test", 1), ask("fast.test", 2))
        assert (answers(slow), answers(fast)) == (["10.0.0.1"], ["10.0.0.2"])
        assert slow[:2] == b"\x00\x01" and fast[:2] == b"\x00\x02"
        assert order == ["fast.test", "slow.test"]  # the fast answer overtook
        assert stats.connections == 1 and stats.requests == 2
        # The connection is reused for the next query.
        await resolver.exchange(query("name.test"), timeout=2)
        assert stats.connections == 1
        await resolver.aclose()
        server.close()

    run(main())


def test_tcp_reconnects_after_the_server_closed_the_idle_connection() -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        server, stats = await start_tcp(zone, "127.0.0.1", port)
        resolver = make_resolver(parse_server_url(f"tcp://127.0.0.1:{port}"), outbound_for)
        await resolver.exchange(query("name.test"), timeout=2)
        stats.close_connections()
        # The FIN may still be in flight: the query either sees the closed connection
        # and reconnects, or is lost with it and is retried on a new one.
        wire = await resolver.exchange(query("fast.test"), timeout=2)
        assert answers(wire) == ["10.0.0.2"] and stats.connections == 2
        await resolver.aclose()
        server.close()

    run(main())


def test_dot_with_a_self_signed_ca(cert: tuple[str, str]) -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        tls = server_tls(*cert, ["dot"])
        server, stats = await start_tcp(zone, "127.0.0.1", port, tls=tls)
        url = f"tls://127.0.0.1:{port}#sni=dns.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        results = await asyncio.gather(
            *(resolver.exchange(query(n, ident=i), timeout=3)
              for i, n in enumerate(["name.test", "fast.test", "slow.test"]))
        )  # fmt: skip
        assert [answers(w) for w in results] == [["10.9.8.7"], ["10.0.0.2"], ["10.0.0.1"]]
        assert stats.connections == 1 and stats.requests == 3
        await resolver.aclose()
        server.close()

    run(main())


def test_dot_refuses_a_certificate_for_another_name(cert: tuple[str, str]) -> None:
    async def main() -> None:
        port = free_port_pair()
        server, stats = await start_tcp(
            Zone(ZONE_LINES), "127.0.0.1", port, tls=server_tls(*cert, ["dot"])
        )
        url = f"tls://127.0.0.1:{port}#sni=other.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        with pytest.raises(ResolverError, match="TLS handshake failed"):
            await resolver.exchange(query("name.test"), timeout=3)
        assert stats.requests == 0
        await resolver.aclose()
        server.close()

    run(main())


def test_doh_keeps_one_connection_alive(cert: tuple[str, str]) -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        server, stats = await start_doh(zone, "127.0.0.1", port, server_tls(*cert, ["http/1.1"]))
        url = f"https://127.0.0.1:{port}/dns-query#sni=dns.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        for ident, name in enumerate(["name.test", "fast.test", "nothing.test"], start=7):
            wire = await resolver.exchange(query(name, ident=ident), timeout=3)
            assert wire[:2] == ident.to_bytes(2, "big")
        assert DNSRecord.parse(wire).header.rcode == RCODE.NXDOMAIN
        assert stats.connections == 1 and stats.requests == 3
        await resolver.aclose()
        server.close()

    run(main())


@pytest.mark.parametrize(("style", "connections"), [("chunked", 1), ("close", 2)])
def test_doh_chunked_and_connection_close(
    cert: tuple[str, str], style: str, connections: int
) -> None:
    async def main() -> None:
        port = free_port_pair()
        tls = server_tls(*cert, ["http/1.1"])
        server, stats = await start_doh(Zone(ZONE_LINES), "127.0.0.1", port, tls, style=style)
        url = f"https://127.0.0.1:{port}/dns-query#sni=dns.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        for name, address in (("name.test", "10.9.8.7"), ("fast.test", "10.0.0.2")):
            assert answers(await resolver.exchange(query(name), timeout=3)) == [address]
        assert stats.connections == connections and stats.requests == 2
        await resolver.aclose()
        server.close()

    run(main())


def test_doh_http_error_is_a_resolver_error(cert: tuple[str, str]) -> None:
    async def main() -> None:
        port = free_port_pair()
        server, _ = await start_doh(
            Zone(ZONE_LINES), "127.0.0.1", port, server_tls(*cert, ["http/1.1"])
        )
        url = f"https://127.0.0.1:{port}/wrong-path#sni=dns.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        with pytest.raises(ResolverError, match="HTTP status 404"):
            await resolver.exchange(query("name.test"), timeout=3)
        await resolver.aclose()
        server.close()

    run(main())


def test_doq_one_connection_one_stream_per_query(cert: tuple[str, str]) -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        server, stats = await start_doq(zone, "127.0.0.1", port, *cert)
        url = f"quic://127.0.0.1:{port}#sni=dns.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        flows.clear()
        results = await asyncio.gather(
            *(resolver.exchange(query(n, ident=100 + i), timeout=3)
              for i, n in enumerate(["name.test", "fast.test", "slow.test"]))
        )  # fmt: skip
        assert [answers(w) for w in results] == [["10.9.8.7"], ["10.0.0.2"], ["10.0.0.1"]]
        assert [w[:2] for w in results] == [b"\x00\x64", b"\x00\x65", b"\x00\x66"]
        assert stats.connections == 1 and stats.requests == 3
        assert {n for n, _ in flows} == {"udp"}
        await resolver.aclose()
        server.close()

    run(main())


def test_doh_over_http3(cert: tuple[str, str]) -> None:
    async def main() -> None:
        zone = Zone(ZONE_LINES)
        port = free_port_pair()
        server, stats = await start_doh3(zone, "127.0.0.1", port, *cert)
        url = f"h3://127.0.0.1:{port}/dns-query#sni=dns.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        results = await asyncio.gather(
            *(resolver.exchange(query(n, ident=7 + i), timeout=3)
              for i, n in enumerate(["name.test", "fast.test", "nothing.test"]))
        )  # fmt: skip
        assert [answers(w) for w in results] == [["10.9.8.7"], ["10.0.0.2"], []]
        assert DNSRecord.parse(results[2]).header.rcode == RCODE.NXDOMAIN
        assert [w[:2] for w in results] == [b"\x00\x07", b"\x00\x08", b"\x00\x09"]
        assert stats.connections == 1 and stats.requests == 3
        await resolver.aclose()
        bad = make_resolver(parse_server_url(url.replace("/dns-query", "/nope")), outbound_for)
        with pytest.raises(ResolverError, match="HTTP status 404"):
            await bad.exchange(query("name.test"), timeout=3)
        await bad.aclose()
        server.close()

    run(main())


def test_doq_server_certificate_is_verified(cert: tuple[str, str]) -> None:
    async def main() -> None:
        port = free_port_pair()
        server, stats = await start_doq(Zone(ZONE_LINES), "127.0.0.1", port, *cert)
        url = f"quic://127.0.0.1:{port}#sni=wrong.test&ca={cert[0]}"
        resolver = make_resolver(parse_server_url(url), outbound_for)
        with pytest.raises(ResolverError):
            await resolver.exchange(query("name.test"), timeout=3)
        assert stats.requests == 0
        await resolver.aclose()
        server.close()

    run(main())


def test_udp_silent_server_fails_within_the_timeout() -> None:
    async def main() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        resolver = make_resolver(parse_server_url(f"udp://127.0.0.1:{port}"), outbound_for)
        start = time.monotonic()
        with pytest.raises(ResolverError, match="no answer within"):
            await resolver.exchange(query("name.test"), timeout=1.5)
        elapsed = time.monotonic() - start
        assert 1.4 <= elapsed < 4.0  # upper bound loose: timers run late on a loaded machine
        # It was asked twice: once at once and once after the retransmit interval.
        silent.setblocking(False)
        received = 0
        while True:
            try:
                silent.recv(512)
            except BlockingIOError:
                break
            received += 1
        assert received == 2
        silent.close()

    run(main())


def test_udp_answer_to_another_question_is_rejected() -> None:
    async def main() -> None:
        async def liar(q: bytes) -> bytes:
            request = DNSRecord.parse(q)
            other = DNSRecord.question("evil.test")
            other.header.id = request.header.id
            return bytes(other.reply().pack())

        port = free_port_pair()
        server = await start_udp(liar, "127.0.0.1", port)
        resolver = make_resolver(parse_server_url(f"udp://127.0.0.1:{port}"), outbound_for)
        with pytest.raises(ResolverError, match="another question"):
            await resolver.exchange(query("name.test"), timeout=2)
        assert server.transport is not None
        server.transport.close()

    run(main())


def test_tcp_refused_is_a_resolver_error_at_once() -> None:
    async def main() -> None:
        port = free_port_pair()  # nothing listens there
        resolver = make_resolver(parse_server_url(f"tcp://127.0.0.1:{port}"), outbound_for)
        start = time.monotonic()
        with pytest.raises(ResolverError):
            await resolver.exchange(query("name.test"), timeout=5)
        assert time.monotonic() - start < 4  # at once, not the 5 s timeout (loose: load)
        await resolver.aclose()

    run(main())


def test_qtype_constant() -> None:
    assert QTYPE.A == 1  # the zone helper relies on dnslib's numbering


QUIC_LOADED = """
import sys
import tunproxy.app, tunproxy.cli, tunproxy.dns.service, tunproxy.relay, tunproxy.sniff
loaded = lambda: any(m.split(".")[0] in ("aioquic", "cryptography") for m in sys.modules)
print(loaded())
"""


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        ("", ["False"]),
        ("from tunproxy.dns.config import parse_server_url\n"
         "from tunproxy.dns.resolvers import make_resolver\n"
         "make_resolver(parse_server_url('tls://127.0.0.1'), lambda n, t: None)\n"
         "print(loaded())\n"
         "print(type(make_resolver(parse_server_url('quic://127.0.0.1'), lambda n, t: None)))\n"
         "print(loaded())\n",
         ["False", "False", "<class 'tunproxy.dns.quic.QuicResolver'>", "True"]),
        # A relay that sniffs loads it at start-up, not at its first QUIC flow.
        ("import asyncio\n"
         "from stack import Stack, StackConfig\n"
         "from tunproxy.config import RelayConfig\n"
         "from tunproxy.flows import FlowLog\n"
         "for sniff in (False, True):\n"
         "    tunproxy.relay.Relay(asyncio.new_event_loop(), Stack(StackConfig()), None,\n"
         "                         RelayConfig(sniff=sniff, tcp_idle_timeout=0), FlowLog(),\n"
         "                         lambda: None)\n"
         "    print(loaded())\n",
         ["False", "False", "True"]),
    ],
    ids=["modules", "resolvers", "relay"],
)
def test_aioquic_loads_only_when_quic_is_configured(then: str, expected: list[str]) -> None:
    """tunproxy's modules leave aioquic (~12 MiB of RSS, ~70 ms to import) unloaded
    until a quic:// or h3:// server or QUIC sniffing needs it."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", QUIC_LOADED + then], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected
