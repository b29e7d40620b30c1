"""Malformed packets are dropped and counted by reason, never raised."""

from __future__ import annotations

import pytest

from stack import Stack, StackConfig
from stack.wire import ipv6, tcp
from tests.ippeer import A4, A6, B4, B6, icmp4_echo, ip_packet, tcp_l4, udp_l4, with_vnet


def _flip(data: bytes, at: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[at] ^= mask
    return bytes(b)


UDP4 = ip_packet(A4, B4, 17, udp_l4(A4, B4, 1, 2, b"x"))
SYN4 = ip_packet(A4, B4, 6, tcp_l4(A4, B4, tcp.TcpRepr(1, 2, 0, 0, tcp.SYN, 100)))
_frag6 = bytes([17, 0, 0, 9, 0, 0, 0, 1])  # offset 0, M=1: a real fragment
FRAG6 = ip_packet(A6, B6, ipv6.FRAGMENT, _frag6 + udp_l4(A6, B6, 1, 2, b"y"))

CASES = [
    (b"", "empty"),
    (b"\x45", "ipv4-truncated"),
    (b"\x70" + bytes(40), "ip-version"),
    (UDP4[:-1], "ipv4-truncated"),
    (_flip(UDP4, 8, 1), "ipv4-checksum"),  # TTL changed under the checksum
    (_flip(UDP4, 3, 0xFF), "ipv4-truncated"),
    (_flip(UDP4, len(UDP4) - 1), "udp-checksum"),
    (ip_packet(A4, B4, 17, b"\0\1\0"), "udp-truncated"),
    (ip_packet(A4, B4, 6, b"\0" * 10), "tcp-checksum"),
    (_flip(SYN4, len(SYN4) - 1), "tcp-checksum"),
    (ip_packet(A4, B4, 47, b"gre"), "unknown-protocol"),
    (ip_packet(A4, B4, 1, b"\x08\0"), "icmp-truncated"),
    (_flip(ip_packet(A4, B4, 1, icmp4_echo(1, 1, b"")), 22, 1), "icmp-checksum"),
    (FRAG6, "reassembly-bad-fragment"),  # M=1 with 9 bytes: not a multiple of 8
    (ip_packet(A6, B6, 17, udp_l4(A6, B6, 1, 0, b"z")), "port-zero"),
    (ip_packet(A4, bytes([224, 0, 0, 1]), 6,
               tcp_l4(A4, bytes([224, 0, 0, 1]), tcp.TcpRepr(1, 2, 0, 0, tcp.SYN, 100))),
     "tcp-multicast"),
]  # fmt: skip


@pytest.mark.parametrize(("packet", "reason"), CASES, ids=[c[1] for c in CASES])
def test_dropped_and_counted(packet: bytes, reason: str) -> None:
    s = Stack()
    s.receive_packet(packet, 0.0)
    drops = {k: v for k, v in s.counters.items() if k.startswith("drop.")}
    assert drops == {f"drop.{reason}": 1}
    assert s.next_event() is None and s.packets_to_send() == []
    assert s.counters["packets.in"] == 1 and s.counters["flows.open"] == 0


def test_virtio_header_errors() -> None:
    s = Stack(StackConfig(vnet_hdr=True))
    s.receive_packet(b"\0" * 5, 0.0)
    s.receive_packet(with_vnet(UDP4, gso_type=9), 0.0)
    s.receive_packet(with_vnet(b""), 0.0)
    assert s.counters["drop.virtio-truncated"] == 1
    assert s.counters["drop.virtio-gso-type"] == 1
    assert s.counters["drop.empty"] == 1


def test_accepts_bytearray_and_memoryview() -> None:
    s = Stack()
    s.receive_packet(bytearray(UDP4), 0.0)
    s.receive_packet(memoryview(UDP4), 0.0)
    assert s.counters["udp.datagrams_in"] == 2
