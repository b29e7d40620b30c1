"""tunproxy.driver.TunDriver's writer over a real datagram socket (no root needed).

A SOCK_DGRAM socket pair stands in for the TUN: it keeps packet boundaries, so
every packet the driver writes must arrive as one datagram, whole and in order,
whether the writer thread uses io_uring or falls back to write(2).
"""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from stack import Stack, StackConfig
from tunproxy.driver import INLINE_WRITE_MAX, TunDriver
from tunproxy.tun import TunDevice


@pytest.mark.parametrize("method", ["io_uring", "write"])
def test_writer_thread_writes_every_packet_whole_and_in_order(method: str) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    packets = [b"small" * 10, os.urandom(65_000), bytes(INLINE_WRITE_MAX + 1), os.urandom(9)]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tun = TunDevice("sockpair", [a.fileno()], vnet_hdr=False)
        driver = TunDriver(loop, tun, Stack(StackConfig()), lambda event: None)
        if method == "write":
            if driver._batch_writer is not None:
                driver._batch_writer.close()
            driver._batch_writer = None
        elif driver.write_method != "io_uring":
            pytest.skip("io_uring is not available here")
        driver.start()
        try:
            driver._write(packets)  # more than INLINE_WRITE_MAX: the writer thread's
            async with asyncio.timeout(10):
                got = [await loop.sock_recv(b, 70_000) for _ in packets]
            assert driver.write_method == method  # io_uring did not give up on the way
        finally:
            driver.stop()
        assert got == packets
        assert driver.write_errors == 0

    b.setblocking(False)
    with a, b:
        asyncio.run(main())
