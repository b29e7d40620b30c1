"""ProcessResolver against real sockets of this test process (loopback only)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tunproxy.procinfo import ProcessResolver

EXE = os.readlink("/proc/self/exe")


@pytest.fixture
def resolver() -> Iterator[ProcessResolver]:
    r = ProcessResolver()
    yield r
    r.close()


def _expect_self(info: object) -> None:
    assert info is not None
    assert info.pid == os.getpid()  # type: ignore[attr-defined]
    assert info.path == EXE  # type: ignore[attr-defined]
    assert info.name == os.path.basename(EXE)  # type: ignore[attr-defined]
    assert info.uid == os.geteuid()  # type: ignore[attr-defined]


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_connection_owner(resolver: ProcessResolver, host: str) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as listener:
        listener.bind((host, 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        try:
            src, sport = client.getsockname()[:2]
            dst, dport = client.getpeername()[:2]
            info = resolver.lookup("tcp", src, sport, dst, dport)
            _expect_self(info)
            # A second lookup is served from the inode cache (no new scan).
            scans = resolver.stats["scans"]
            _expect_self(resolver.lookup("tcp", src, sport, dst, dport))
            assert resolver.stats["scans"] == scans
            # The wrong direction is a different 4-tuple: no socket of ours has it as its
            # local end... except the server side, which is also this process.
            _expect_self(resolver.lookup("tcp", dst, dport, src, sport))
        finally:
            client.close()
            server.close()
        # Closed (and the listener side gone): no owner, not a stale answer.
        assert resolver.lookup("tcp", src, sport, dst, dport) is None


def test_unknown_tuple_is_none(resolver: ProcessResolver) -> None:
    assert resolver.lookup("tcp", "127.0.0.1", 1, "127.0.0.1", 2) is None
    assert resolver.lookup("udp", "127.0.0.1", 1, "127.0.0.1", 2) is None
    assert resolver.lookup("tcp", "not-an-ip", 1, "127.0.0.1", 2) is None


def test_ipv4_mapped_addresses(resolver: ProcessResolver) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            src, sport = client.getsockname()
            dst, dport = client.getpeername()
            _expect_self(resolver.lookup("tcp", f"::ffff:{src}", sport, f"::ffff:{dst}", dport))


@pytest.mark.parametrize("connected", [True, False])
def test_udp_owner(resolver: ProcessResolver, connected: bool) -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app,
    ):
        peer.bind(("127.0.0.1", 0))
        if connected:
            app.connect(peer.getsockname())
        else:
            app.bind(("127.0.0.1", 0))
            app.sendto(b"x", peer.getsockname())
        src, sport = app.getsockname()
        dst, dport = peer.getsockname()
        _expect_self(resolver.lookup("udp", src, sport, dst, dport))
        inode = os.fstat(app.fileno()).st_ino
        assert resolver.socket_of("udp", src, sport, dst, dport) == (os.geteuid(), inode)
    assert resolver.lookup("udp", src, sport, dst, dport) is None


def test_socket_of_reports_inode(resolver: ProcessResolver) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            src, sport = client.getsockname()
            dst, dport = client.getpeername()
            uid, inode = resolver.socket_of("tcp", src, sport, dst, dport)  # type: ignore[misc]
            assert inode == os.fstat(client.fileno()).st_ino
            assert uid == os.geteuid()


def test_stale_cache_entry_is_not_trusted(resolver: ProcessResolver) -> None:
    """A cached inode -> (pid, fd) that no longer holds the socket is dropped, not used."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            src, sport = client.getsockname()
            dst, dport = client.getpeername()
            inode = os.fstat(client.fileno()).st_ino
            # Poison the cache: claim pid 1's fd 0 holds our socket.
            resolver._inodes[inode] = (1, 0)
            info = resolver.lookup("tcp", src, sport, dst, dport)
            _expect_self(info)
            assert resolver._inodes[inode][0] == os.getpid()


def test_full_scans_are_rate_limited() -> None:
    now = [100.0]
    r = ProcessResolver(clock=lambda: now[0], scan_budget=1e-9)
    try:
        assert r._scan_uid(os.geteuid()) is True
        assert r._scan_uid(os.geteuid()) is False  # budget: wait ~forever
        now[0] += 1e9
        assert r._scan_uid(os.geteuid()) is True
    finally:
        r.close()


def test_new_socket_of_a_recent_owner_needs_no_full_scan(resolver: ProcessResolver) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as first:
            _expect_self(resolver.lookup("tcp", *first.getsockname(), *first.getpeername()))
            scans = resolver.stats["scans"]
            with socket.create_connection(listener.getsockname()) as second:
                info = resolver.lookup("tcp", *second.getsockname(), *second.getpeername())
                _expect_self(info)
            # Found among the fds of the pid that owned the last socket, not by a /proc walk.
            assert resolver.stats["scans"] == scans


def test_a_program_started_just_after_a_full_scan_is_found() -> None:
    """curl after curl: the second program's socket is found among the processes started
    since the last scan, although the full scan's rate limit says not yet."""
    import subprocess
    import sys

    now = [100.0]
    r = ProcessResolver(clock=lambda: now[0])
    code = ("import socket, sys\n"
            "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "print(c.getsockname()[1], flush=True)\nsys.stdin.read()\n")
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            port = listener.getsockname()[1]
            for round_ in range(2):
                child = subprocess.Popen([sys.executable, "-c", code, str(port)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
                try:
                    assert child.stdout is not None
                    sport = int(child.stdout.readline())
                    server, _ = listener.accept()
                    info = r.lookup("tcp", "127.0.0.1", sport, "127.0.0.1", port)
                    server.close()
                    assert info is not None and info.pid == child.pid, (round_, r.stats)
                finally:
                    child.kill()
                    child.wait()
                now[0] += 0.001  # far less than the full scan's rate limit allows
            assert r.stats["scans"] <= 1
    finally:
        r.close()
