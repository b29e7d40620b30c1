"""A flow closed through the controller resets the app's socket even when the app has
stopped reading (its receive buffer full, its window closed): the client's kernel
takes tunproxy's RST at once (RFC 5961 3.2: at exactly its RCV.NXT), without the app
reading. The socket's pending error is the observable: a reading app (curl) sees the
reset only after the bytes already queued, which the kernel hands out first.

The stack resets at SND.UNA and at SND.MAX (tests/test_tcp_abort.py has the cases where
a single RST at SND.MAX is dropped: data lost in flight with a closed window); the Linux
peer here keeps everything it acknowledged, so this guards the path end to end."""

from __future__ import annotations

import array
import errno
import fcntl
import socket
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.netns import SERVER4, topology
from tests.test_controller_e2e import AUTH, HTTP_PORT, Lab, connections

pytestmark = pytest.mark.netns


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo, tmp_path)


def unread(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def wait_until_full(sock: socket.socket, timeout: float = 60.0) -> int:
    """Poll until the unread byte count stops growing (the window is closed)."""
    deadline = time.monotonic() + timeout
    last, steady = -1, 0
    while time.monotonic() < deadline:
        n = unread(sock)
        steady = steady + 1 if n == last and n > 0 else 0
        if steady >= 4:
            return n
        last = n
        time.sleep(0.25)
    raise AssertionError(f"the receive buffer never filled (last {last} bytes unread)")


def trickle(sock: socket.socket, seconds: float) -> None:
    """Read ~20 KB/s (as curl --limit-rate 20k does) for ``seconds``, then stop."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.recv(1024)  # the slow server streams ~1 MB/s: never waits long
        time.sleep(0.05)


@pytest.mark.parametrize("reader", ["never-reads", "stops-reading"])
def test_closing_a_flow_whose_app_is_not_reading_resets_its_socket(
    lab: Lab, reader: str
) -> None:
    lab.start()
    sock = lab.topo.client.socket()
    with sock:
        sock.settimeout(20)
        sock.connect((SERVER4, HTTP_PORT))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        port = sock.getsockname()[1]
        if reader == "stops-reading":
            worker = threading.Thread(target=trickle, args=(sock, 4.0))
            worker.start()
            worker.join(60)
            assert not worker.is_alive()
        queued = wait_until_full(sock)

        async def close(session: aiohttp.ClientSession) -> None:
            mine = [c for c in (await connections(session))["connections"]
                    if c["metadata"]["sourcePort"] == str(port)]  # fmt: skip
            assert len(mine) == 1, mine
            async with session.delete(f"/connections/{mine[0]['id']}", headers=AUTH) as resp:
                assert resp.status == 204

        lab.api(close)
        deadline = time.monotonic() + 30
        err = 0
        while time.monotonic() < deadline:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                break
            time.sleep(0.05)
        assert err == errno.ECONNRESET, (err, queued)
        assert unread(sock) > 0  # nothing was read: the reset came in over a full buffer
