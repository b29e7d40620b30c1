"""Regenerate the sniffing fixtures in this directory (run from anywhere).

- ``tls_client_hello.bin``: the first flight of Python's ssl client for
  ``www.example.test`` (a real ClientHello, one TLS record).
- ``quic_initial.bin``: aioquic's first client datagram for ``quic.example.test``.
- ``quic_initial_big.bin``: datagrams whose ClientHello (long ALPN list) spans
  two Initial packets for ``big.example.test``, as length-prefixed records.
"""

from __future__ import annotations

import contextlib
import pathlib
import ssl
import struct

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import QuicProtocolVersion

HERE = pathlib.Path(__file__).parent


def tls_client_hello(server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()  # wants the server's answer: the ClientHello is out
    return outgoing.read()


def quic_initial_datagrams(
    server_name: str, alpn: list[str], version: int = QuicProtocolVersion.VERSION_1
) -> list[bytes]:
    configuration = QuicConfiguration(
        is_client=True, alpn_protocols=alpn, server_name=server_name, supported_versions=[version]
    )
    connection = QuicConnection(configuration=configuration)
    connection.connect(("192.0.2.1", 443), now=0.0)
    return [data for data, _addr in connection.datagrams_to_send(now=0.0)]


def pack_datagrams(datagrams: list[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(d)) + d for d in datagrams)


def unpack_datagrams(data: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack_from("!H", data, offset)
        out.append(data[offset + 2 : offset + 2 + length])
        offset += 2 + length
    return out


def main() -> None:
    (HERE / "tls_client_hello.bin").write_bytes(tls_client_hello("www.example.test"))
    (HERE / "quic_initial.bin").write_bytes(
        pack_datagrams(quic_initial_datagrams("quic.example.test", ["h3"]))
    )
    long_alpn = [f"proto-{i:03d}-" + "x" * 40 for i in range(40)]
    (HERE / "quic_initial_big.bin").write_bytes(
        pack_datagrams(quic_initial_datagrams("big.example.test", long_alpn))
    )


if __name__ == "__main__":
    main()
