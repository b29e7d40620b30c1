"""ICMP through the Stack: echo answered locally, errors and discovery ignored and
counted, destination-unreachable emitted on TCP refusals."""

from __future__ import annotations

import pytest

from stack import FlowOpened, Refusal, Stack, StackConfig
from stack.wire import icmpv4, icmpv6, tcp
from tests.ippeer import (
    A4,
    A6,
    B4,
    B6,
    TcpPeer,
    drain,
    events,
    icmp4_echo,
    icmp6_msg,
    ip_packet,
    parse_out,
)


def test_ping_v4_answered() -> None:
    s = Stack()
    s.receive_packet(ip_packet(A4, B4, 1, icmp4_echo(0x1234, 9, b"abcdefgh" * 7)), 0.0)
    (out,) = drain(s)
    assert (out.src, out.dst, out.proto, out.ttl) == (B4, A4, 1, 64)
    assert out.icmp == (icmpv4.ECHO_REPLY, 0, 0x1234, 9, b"abcdefgh" * 7)
    assert s.counters["icmp.echo"] == 1 and events(s) == [] and s.counters["flows.open"] == 0


def test_ping_v6_answered() -> None:
    s = Stack()
    s.receive_packet(ip_packet(A6, B6, 58, icmp6_msg(A6, B6, icmpv6.ECHO_REQUEST, 7, 1, b"hi")), 0)
    (out,) = drain(s)
    assert (out.src, out.dst, out.proto) == (B6, A6, 58)
    assert out.icmp == (icmpv6.ECHO_REPLY, 0, 7, 1, b"hi")


def test_big_ping_reassembled_and_reply_fragmented() -> None:
    s = Stack()
    msg = icmp4_echo(1, 2, bytes(range(256)) * 12)  # 3080 bytes: 3 fragments each way
    step = 1480
    for off in range(0, len(msg), step):
        flags = (off // 8) | (0x2000 if off + step < len(msg) else 0)
        s.receive_packet(ip_packet(A4, B4, 1, msg[off : off + step], ident=77,
                                   flags_frag=flags), 0.0)  # fmt: skip
    outs = [parse_out(p) for p in s.packets_to_send()]
    assert len(outs) == 3 and s.counters["reassembly.completed"] == 1
    reply = b"".join(o.l4 for o in sorted(outs, key=lambda o: o.ip4.frag_offset if o.ip4 else 0))
    assert reply[0] == icmpv4.ECHO_REPLY and reply[8:] == msg[8:]


def test_ping_disabled_and_broadcast_ignored() -> None:
    s = Stack(StackConfig(answer_ping=False))
    s.receive_packet(ip_packet(A4, B4, 1, icmp4_echo(1, 1, b"")), 0.0)
    assert drain(s) == [] and s.counters["icmp.ignored.echo"] == 1
    s = Stack()
    s.receive_packet(ip_packet(A4, bytes([255] * 4), 1, icmp4_echo(1, 1, b"")), 0.0)
    s.receive_packet(ip_packet(A6, bytes.fromhex("ff02" + "00" * 13 + "01"), 58,
                               icmp6_msg(A6, bytes.fromhex("ff02" + "00" * 13 + "01"),
                                         icmpv6.ECHO_REQUEST)), 0.0)  # fmt: skip
    assert drain(s) == []
    assert s.counters["icmp.ignored.echo_broadcast"] == 1
    assert s.counters["icmp.ignored.echo_multicast"] == 1


def test_errors_never_answered() -> None:
    s = Stack()
    unreachable = bytearray(8 + 28)
    icmpv4.Icmpv4Repr(icmpv4.DEST_UNREACHABLE, 3, data=bytes(28)).emit(unreachable)
    s.receive_packet(ip_packet(A4, B4, 1, bytes(unreachable)), 0.0)
    s.receive_packet(ip_packet(A6, B6, 58, icmp6_msg(A6, B6, 1, code=4, data=bytes(48))), 0.0)
    s.receive_packet(ip_packet(A4, B4, 1, icmp4_echo(1, 1, b"", icmpv4.ECHO_REPLY)), 0.0)
    assert drain(s) == [] and events(s) == []
    assert s.counters["icmp.ignored.error"] == 2 and s.counters["icmp.ignored.other"] == 1


@pytest.mark.parametrize(("type_", "kind"), [(133, "ndp"), (135, "ndp"), (136, "ndp"),
                                             (143, "mld"), (131, "mld")])  # fmt: skip
def test_discovery_ignored_silently(type_: int, kind: str) -> None:
    s = Stack()
    s.receive_packet(ip_packet(A6, B6, 58, icmp6_msg(A6, B6, type_, data=bytes(16))), 0.0)
    assert drain(s) == [] and s.counters[f"icmp.ignored.{kind}"] == 1


def test_bad_icmp_checksum_counted() -> None:
    s = Stack()
    msg = bytearray(icmp4_echo(1, 1, b"x"))
    msg[-1] ^= 1
    s.receive_packet(ip_packet(A4, B4, 1, bytes(msg)), 0.0)
    assert drain(s) == [] and s.counters["drop.icmp-checksum"] == 1


@pytest.mark.parametrize(
    ("how", "code4", "code6"),
    [
        (Refusal.UNREACHABLE, icmpv4.CODE_HOST_UNREACHABLE, icmpv6.CODE_ADDRESS_UNREACHABLE),
        (Refusal.PROHIBITED, icmpv4.CODE_ADMIN_PROHIBITED, icmpv6.CODE_ADMIN_PROHIBITED),
    ],
)
@pytest.mark.parametrize(("a", "b"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_tcp_refusal_by_icmp(a: bytes, b: bytes, how: str, code4: int, code6: int) -> None:
    s = Stack()
    peer = TcpPeer(s, a, b)
    syn = peer.packet(tcp.SYN, mss=1400)
    s.receive_packet(syn, 0.0)
    (opened,) = events(s)
    assert isinstance(opened, FlowOpened)
    s.refuse(opened.flow, how, 0.0)
    (out,) = drain(s)
    assert out.icmp is not None and (out.src, out.dst) == (b, a)
    expected = (icmpv4.DEST_UNREACHABLE, code4) if len(a) == 4 else (icmpv6.DEST_UNREACHABLE,
                                                                       code6)  # fmt: skip
    assert out.icmp[:2] == expected
    assert out.icmp[4] == syn  # the whole SYN fits in the quote
    assert s.counters["flows.open"] == 0 and s.counters["flows.half_open"] == 0
    assert events(s) == []
