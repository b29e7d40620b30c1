#!/usr/bin/env python3
"""Micro-benchmark of the QUIC layer's share of a UDP datagram's cost (no sockets, no
TUN, no event loop): what qh3 and tunproxy's HTTP/3 datagram code cost per datagram, so
the rest of the CPU per datagram that ``bench/run.py --only dgram`` measures can be put
where it belongs (the TUN, the stack and the relay on the client; the target socket and
the event loop on the server).

    python3 bench/bench_quic_datagrams.py               # 64-byte datagrams, 32 per batch
    python3 bench/bench_quic_datagrams.py --size 1200 --batch 1

A client and a server ``QuicConnection`` (qh3, with h3link's settings) do their handshake
in memory, datagrams passed by hand; then, per batch of ``--batch`` datagrams:

* send: the sender's work for each datagram as tunproxy does it (``datagram_prefix`` +
  payload, ``send_datagram_frame``), then one ``poll_transmit`` loop for the batch (what
  ``quicio.flush`` does once per event-loop turn): QUIC packets built and encrypted;
* receive: the receiver's work: ``receive_many_datagrams`` of those packets (decrypt,
  parse, ACK state), its events drained as ``H3Link`` does (``DatagramFrameReceived``,
  ``parse_quarter_stream_id``, ``parse_http_datagram``), and the ACKs it owes polled.

Each side's CPU (``time.process_time``) is reported per datagram.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from qh3._hazmat import pull_quic_header
from qh3.quic.connection import QuicConnection
from qh3.quic.events import DatagramFrameReceived, HandshakeCompleted

from tests.masque_peer import make_cert
from tunproxy.h3link import LinkSettings, _configuration
from tunproxy.masque import datagram_prefix, parse_http_datagram, parse_quarter_stream_id

CLIENT_ADDR = ("10.0.0.1", 40000)
SERVER_ADDR = ("10.0.0.2", 443)


def pair(datagram_size: int) -> tuple[QuicConnection, QuicConnection, list[float]]:
    settings = LinkSettings(max_datagram_size=datagram_size)
    with tempfile.TemporaryDirectory() as tmp:
        ca, cert, key = make_cert(pathlib.Path(tmp), "proxy.test")
        server_conf = _configuration(settings, is_client=False)
        server_conf.load_cert_chain(str(cert), str(key))
        client_conf = _configuration(settings, is_client=True)
        client_conf.server_name = "proxy.test"
        client_conf.load_verify_locations(cadata=ca.read_bytes())
    client = QuicConnection(configuration=client_conf)
    clock = [0.0]
    client.connect(SERVER_ADDR, now=clock[0])
    first = client.datagrams_to_send(now=clock[0])
    # The server side is made for the client's Initial, as qh3's QuicServer does.
    header = pull_quic_header(first[0][0], 0, server_conf.connection_id_length)
    server = QuicConnection(configuration=server_conf,
                            original_destination_connection_id=header[3])
    for data, _ in first:
        server.receive_datagram(data, CLIENT_ADDR, now=clock[0])
    done = False
    for _ in range(50):
        clock[0] += 0.001
        exchange(client, server, CLIENT_ADDR, clock[0])
        exchange(server, client, SERVER_ADDR, clock[0])
        for conn in (client, server):
            while (event := conn.next_event()) is not None:
                done = done or (isinstance(event, HandshakeCompleted) and conn is client)
        if done:
            break
    assert done, "no handshake"
    return client, server, clock


def exchange(sender: QuicConnection, receiver: QuicConnection, sender_addr: tuple[str, int],
             now: float) -> int:
    packets = [data for data, _ in sender.datagrams_to_send(now=now)]
    for data in packets:
        receiver.receive_datagram(data, sender_addr, now=now)
    return len(packets)


def run(size: int, batch: int, count: int, datagram_size: int) -> dict[str, float]:
    client, server, clock = pair(datagram_size)
    prefix = datagram_prefix(4)
    payload = b"x" * size
    ccore, score = client._core, server._core
    assert ccore is not None and score is not None
    send_cpu = receive_cpu = 0.0
    packets = received = 0
    for _ in range(count // batch):
        clock[0] += 0.0001
        now = clock[0]
        started = time.process_time()
        for _ in range(batch):
            client.send_datagram_frame(prefix + payload)
        out = []
        while (transmit := ccore.poll_transmit(now)) is not None:
            out.append(transmit[0])
        middle = time.process_time()
        server.receive_many_datagrams(out, CLIENT_ADDR, now=now)
        while (event := server.next_event()) is not None:
            if type(event) is DatagramFrameReceived:
                parsed = parse_quarter_stream_id(event.data)
                assert parsed is not None
                _, data = parse_http_datagram(event.data[parsed[1]:])
                received += len(data) == size
        acks = []
        while (transmit := score.poll_transmit(now)) is not None:
            acks.append(transmit[0])
        ended = time.process_time()
        send_cpu += middle - started
        receive_cpu += ended - middle
        packets += len(out)
        client.receive_many_datagrams(acks, SERVER_ADDR, now=now)  # not measured
        while client.next_event() is not None:
            pass
    sent = count // batch * batch
    return {"datagrams": sent, "received": received, "packets": packets,
            "send_us": send_cpu * 1e6 / sent, "receive_us": receive_cpu * 1e6 / sent}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    parser.add_argument("--batch", type=int, default=32, help="datagrams per flush")
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--datagram-size", type=int, default=1472, help="QUIC packet size")
    args = parser.parse_args()
    r = run(args.size, args.batch, args.count, args.datagram_size)
    print(f"{r['datagrams']:,} datagrams of {args.size} B, {args.batch} per flush, in "
          f"{r['packets']:,} QUIC packets ({r['datagrams'] / max(1, r['packets']):.1f} per "
          f"packet), {r['received']:,} received")
    print(f"send    {r['send_us']:6.2f} us CPU per datagram (frame + packets built)")
    print(f"receive {r['receive_us']:6.2f} us CPU per datagram (packets opened, events, "
          "HTTP datagram parsed, ACKs)")
    return 0 if r["received"] == r["datagrams"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
