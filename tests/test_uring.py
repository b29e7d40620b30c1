"""tunproxy.uring.BatchWriter against real kernel objects (no root needed).

A SOCK_DGRAM socket pair keeps packet boundaries the way a TUN does: each
submission entry must arrive as one datagram, whole and in order.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

import pytest

from tunproxy.uring import BatchWriter


@pytest.fixture
def dgram_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    with a, b:
        yield a, b


def _writer(fd: int, entries: int) -> BatchWriter:
    try:
        return BatchWriter(fd, entries)
    except OSError as exc:
        pytest.skip(f"io_uring is not available here: {exc.strerror}")


def test_batches_larger_than_the_ring_arrive_whole_and_in_order(
    dgram_pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = dgram_pair
    writer = _writer(tx.fileno(), entries=8)
    try:
        assert writer.entries == 8
        packets = [os.urandom(1 + (i * 7919) % 60000) for i in range(45)]  # 6 rings' worth
        assert writer.write(packets) == []
        got = [rx.recv(65536) for _ in packets]
        assert got == packets
        rx.setblocking(False)
        with pytest.raises(BlockingIOError):
            rx.recv(1)  # nothing was written twice
    finally:
        writer.close()


def test_each_failed_packet_reports_its_errno_and_the_rest_still_go(
    dgram_pair: tuple[socket.socket, socket.socket],
) -> None:
    tx, rx = dgram_pair
    writer = _writer(tx.fileno(), entries=4)
    try:
        too_big = bytes(8 << 20)  # beyond SO_SNDBUF: EMSGSIZE for that datagram only
        packets = [b"first", too_big, b"third", too_big, b"fifth"]
        assert writer.write(packets) == [errno.EMSGSIZE, errno.EMSGSIZE]
        assert [rx.recv(100) for _ in range(3)] == [b"first", b"third", b"fifth"]
    finally:
        writer.close()


def test_a_closed_reader_fails_every_packet() -> None:
    r, w = os.pipe()
    os.close(r)
    writer = _writer(w, entries=4)
    try:
        assert writer.write([b"a", b"b", b"c"]) == [errno.EPIPE] * 3
    finally:
        writer.close()
        os.close(w)


def test_close_releases_the_ring() -> None:
    r, w = os.pipe()
    try:
        writer = _writer(w, entries=4)
        ring_fd = writer._ring_fd
        writer.close()
        with pytest.raises(OSError):
            os.fstat(ring_fd)
        writer.close()  # twice is harmless
    finally:
        os.close(r)
        os.close(w)
