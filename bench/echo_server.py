"""TCP and UDP echo server for the benchmarks; runs in the server namespace.

Standalone (stdlib + optional uvloop) so it can be started with ``ip netns exec NS python3
bench/echo_server.py ...`` without the repository on ``sys.path``. It prints nothing: the
harness waits for readiness by watching ``ss`` for the bound ports, never by sleeping.

TCP: every byte received is written back; EOF from the client closes the connection (the
connections-per-second client does connect, 1-byte echo, close). UDP: every datagram is sent
back to its source.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
import socket
from typing import cast


class TcpEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio's, hence the cast instead of a check.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # The latency figures measure the path, not Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        # Returning False closes our side too: the client's close ends the connection.
        return False


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


def raise_nofile_limit() -> None:
    """1,000 idle flows plus the connections of a run need more than the usual 1,024 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(hosts: list[str], tcp_port: int, udp_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    transports = []
    for host in hosts:
        if tcp_port:
            servers.append(
                await loop.create_server(TcpEcho, host, tcp_port, backlog=4096, reuse_address=True)
            )
        if udp_port:
            transport, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=(host, udp_port))
            transports.append(transport)
    await stop.wait()
    for server in servers:
        server.close()
    for transport in transports:
        transport.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="append", required=True, help="address to bind (repeat)")
    parser.add_argument("--tcp-port", type=int, default=7007, help="0 = no TCP echo")
    parser.add_argument("--udp-port", type=int, default=7007, help="0 = no UDP echo")
    args = parser.parse_args(argv)
    raise_nofile_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.tcp_port, args.udp_port))
    else:
        uvloop.run(serve(args.host, args.tcp_port, args.udp_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
