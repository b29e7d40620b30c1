"""Servers for end-to-end tests, run inside the server namespace as a script.

    python tests/e2e_peer.py tcp HOST PORT     one thread per connection; the first line picks:
        SINK\\n             read to EOF, answer the sha256 hex of what came, close
        SOURCE n seed\\n    send n bytes of seeded data, then close (FIN)
        ECHO\\n             echo to EOF, then half-close back
        HOLD\n (or junk)    read and discard until the peer's FIN, then close
    python tests/e2e_peer.py udp HOST PORT     echo every datagram back to its sender

Seeded data is the same on both sides (``payload(seed, n)``), so each side can
check the other's bytes by hash alone.
"""

from __future__ import annotations

import hashlib
import random
import socket
import sys
import threading
from collections.abc import Iterator

CHUNK = 256 * 1024


def payload_chunks(seed: int, n: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    block = rng.randbytes(CHUNK)
    sent = 0
    while sent < n:
        size = min(CHUNK, n - sent)
        # Vary the block so reordering bugs cannot hide behind repetition.
        yield sent.to_bytes(8, "big") + block[8:size] if size > 8 else block[:size]
        sent += size


def payload_sha256(seed: int, n: int) -> str:
    digest = hashlib.sha256()
    for chunk in payload_chunks(seed, n):
        digest.update(chunk)
    return digest.hexdigest()


def _read_line(conn: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = conn.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


def _serve_tcp_conn(conn: socket.socket) -> None:
    with conn:
        words = _read_line(conn).split()
        if not words:
            return
        if words[0] == b"SINK":
            digest = hashlib.sha256()
            while data := conn.recv(CHUNK):
                digest.update(data)
            conn.sendall(digest.hexdigest().encode() + b"\n")
        elif words[0] == b"SOURCE":
            n, seed = int(words[1]), int(words[2])
            for chunk in payload_chunks(seed, n):
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(CHUNK):
                pass
        elif words[0] == b"ECHO":
            while data := conn.recv(CHUNK):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        else:  # HOLD, or anything else: read to EOF, then close cleanly (FIN, not RST)
            while conn.recv(CHUNK):
                pass


def serve_tcp(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, port))
    server.listen(1024)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_tcp_conn, args=(conn,), daemon=True).start()


def serve_udp(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


if __name__ == "__main__":
    kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    (serve_tcp if kind == "tcp" else serve_udp)(host, port)
