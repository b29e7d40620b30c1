"""IPv4 reassembly (RFC 791/815): orders, overlaps, timeout, memory bound; and through
the Stack with a hand-set clock."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from stack import DatagramReceived, Stack, StackConfig
from stack.reassembly import CHUNK_OVERHEAD, Ipv4Reassembler
from stack.wire import icmpv6, ipv4
from tests.ippeer import A4, A6, B4, B6, drain, events, icmp6_msg, ip_packet, udp_l4

PAYLOAD = bytes(random.Random(1).randbytes(4000))


def fragment(data: bytes, offset: int, more: bool, ident: int = 5, proto: int = 17,
             src: bytes = A4) -> ipv4.Ipv4Packet:  # fmt: skip
    flags = (offset // 8) | (ipv4.FLAG_MF if more else 0)
    raw = ip_packet(src, B4, proto, data, ident=ident, flags_frag=flags)
    return ipv4.Ipv4Packet(memoryview(raw))


def split(data: bytes, size: int) -> list[tuple[int, bytes, bool]]:
    return [(o, data[o : o + size], o + size < len(data)) for o in range(0, len(data), size)]


def feed(r: Ipv4Reassembler, pieces: list[tuple[int, bytes, bool]], now: float = 0.0,
         ident: int = 5) -> tuple[bytes, bytes] | None:  # fmt: skip
    done = None
    for off, data, more in pieces:
        result = r.receive(fragment(data, off, more, ident), now)
        if result is not None:
            assert done is None, "completed twice"
            done = result
    return done


def test_in_order_and_reversed() -> None:
    for order in (1, -1):
        counters: dict[str, int] = {}
        r = Ipv4Reassembler(1 << 20, 30.0, counters)
        done = feed(r, split(PAYLOAD, 1480)[::order])
        assert done is not None and done[1] == PAYLOAD
        header = ipv4.Ipv4Packet(memoryview(done[0] + PAYLOAD[:1480]))
        assert header.src == A4 and header.frag_offset == 0
        assert len(r) == 0 and r.memory == 0 and counters["reassembly.completed"] == 1


@settings(max_examples=50)
@given(st.integers(4, 200), st.randoms(use_true_random=False), st.booleans())
def test_any_order_with_duplicates_and_consistent_overlaps(
    size8: int, rnd: random.Random, overlap: bool
) -> None:
    pieces = split(PAYLOAD, size8 * 8)
    if overlap:  # a re-fragmented copy whose pieces straddle the original boundaries
        shift = size8 * 4 if size8 % 2 == 0 else (size8 + 1) * 4
        pieces += [(o + shift, d, m) for o, d, m in split(PAYLOAD[shift:], size8 * 8)]
    pieces += rnd.sample(pieces, min(3, len(pieces)))  # duplicates
    rnd.shuffle(pieces)
    counters: dict[str, int] = {}
    r = Ipv4Reassembler(1 << 22, 30.0, counters)
    done = None
    for off, data, more in pieces:
        res = r.receive(fragment(data, off, more), 0.0)
        if res is not None:
            done = res
            break
    assert done is not None and done[1] == PAYLOAD
    assert not any(k.startswith("drop.") for k in counters)


def test_inconsistent_overlap_drops_datagram() -> None:
    counters: dict[str, int] = {}
    r = Ipv4Reassembler(1 << 20, 30.0, counters)
    assert r.receive(fragment(PAYLOAD[:1480], 0, True), 0.0) is None
    forged = bytearray(PAYLOAD[1000:2480])
    forged[100] ^= 0xFF
    assert r.receive(fragment(bytes(forged), 1000, True), 0.0) is None
    assert counters["drop.reassembly-overlap"] == 1 and len(r) == 0 and r.memory == 0
    # The rest arriving later starts a fresh datagram that cannot complete without the start.
    assert feed(r, split(PAYLOAD, 1480)[1:]) is None


def test_conflicting_ends_drop_datagram() -> None:
    counters: dict[str, int] = {}
    r = Ipv4Reassembler(1 << 20, 30.0, counters)
    r.receive(fragment(b"x" * 16, 64, False), 0.0)
    r.receive(fragment(b"x" * 8, 64, False), 0.0)  # a second, different end
    assert counters["drop.reassembly-overlap"] == 1
    r.receive(fragment(b"x" * 16, 64, False), 0.0)
    r.receive(fragment(b"y" * 8, 80, True), 0.0)  # data past the known end
    assert counters["drop.reassembly-overlap"] == 2


def test_bad_fragments() -> None:
    counters: dict[str, int] = {}
    r = Ipv4Reassembler(1 << 20, 30.0, counters)
    r.receive(fragment(b"x" * 10, 0, True), 0.0)  # not a multiple of 8
    r.receive(fragment(b"x" * 16, 65528, False), 0.0)  # past 65535
    assert counters["drop.reassembly-bad-fragment"] == 2 and len(r) == 0


def test_timeout() -> None:
    counters: dict[str, int] = {}
    r = Ipv4Reassembler(1 << 20, 30.0, counters)
    r.receive(fragment(PAYLOAD[:1480], 0, True, ident=1), 10.0)
    r.receive(fragment(PAYLOAD[:1480], 0, True, ident=2), 20.0)
    assert r.get_timer() == 40.0
    r.expire(39.9)
    assert len(r) == 2
    r.expire(40.0)
    assert len(r) == 1 and r.get_timer() == 50.0 and counters["drop.reassembly-timeout"] == 1
    r.expire(50.0)
    assert len(r) == 0 and r.get_timer() is None and r.memory == 0


def test_memory_limit_evicts_oldest() -> None:
    counters: dict[str, int] = {}
    limit = 3 * (1480 + CHUNK_OVERHEAD)
    r = Ipv4Reassembler(limit, 30.0, counters)
    for ident in range(5):
        r.receive(fragment(PAYLOAD[:1480], 0, True, ident=ident), float(ident))
        assert r.memory <= limit
    assert len(r) == 3 and counters["drop.reassembly-limit"] == 2
    assert r.get_timer() == 32.0  # ident 0 and 1 were evicted
    # A single datagram larger than the limit cannot be held at all.
    small = Ipv4Reassembler(2000, 30.0, counters)
    assert feed(small, split(PAYLOAD, 1480)) is None
    assert small.memory <= 2000


def test_too_many_fragments() -> None:
    counters: dict[str, int] = {}
    r = Ipv4Reassembler(1 << 24, 30.0, counters)
    data = bytes(8 * 300)
    assert feed(r, split(data, 8)) is None
    assert counters["drop.reassembly-too-many-fragments"] == 1


def test_through_stack_with_timer() -> None:
    s = Stack(StackConfig(reassembly_timeout=5.0))
    l4 = udp_l4(A4, B4, 1234, 53, PAYLOAD)
    pieces = split(l4, 1480)
    for off, data, more in reversed(pieces):
        flags = (off // 8) | (ipv4.FLAG_MF if more else 0)
        s.receive_packet(ip_packet(A4, B4, 17, data, ident=9, flags_frag=flags), 1.0)
    assert [e for e in events(s) if isinstance(e, DatagramReceived)] == [
        DatagramReceived(1, PAYLOAD)
    ]
    # An incomplete one expires through the stack's single timer.
    off, data, more = pieces[0]
    s.receive_packet(ip_packet(A4, B4, 17, data, ident=10, flags_frag=ipv4.FLAG_MF), 2.0)
    assert s.get_timer() == 7.0
    s.handle_timer(7.0)
    assert s.counters["drop.reassembly-timeout"] == 1
    assert s.counters["reassembly.bytes"] == 0


# -- IPv6 (RFC 8200 4.5) ---------------------------------------------------------


def frag6(src: bytes, dst: bytes, nh: int, data: bytes, offset: int, more: bool, ident: int,
          before: bytes = b"") -> bytes:  # fmt: skip
    """An IPv6 fragment; ``before`` is a hop-by-hop header placed ahead of the fragment
    header (unfragmentable part)."""
    frag = bytes([nh, 0]) + (offset | int(more)).to_bytes(2, "big") + ident.to_bytes(4, "big")
    if before:
        return ip_packet(src, dst, 0, bytes([44]) + before[1:] + frag + data)
    return ip_packet(src, dst, 44, frag + data)


def test_ipv6_fragments_reassembled_any_order() -> None:
    s = Stack()
    l4 = udp_l4(A6, B6, 5000, 443, PAYLOAD)
    pieces = split(l4, 1232)
    hop_by_hop = bytes(8)  # next header patched by frag6, length 0 (8 bytes), PadN
    for off, data, more in reversed(pieces):
        s.receive_packet(frag6(A6, B6, 17, data, off, more, 0xABCDEF, before=hop_by_hop), 1.0)
    assert [e for e in events(s) if isinstance(e, DatagramReceived)] == [
        DatagramReceived(1, PAYLOAD)
    ]
    assert s.counters["reassembly.completed"] == 1 and s.counters["reassembly.bytes"] == 0


def test_ipv6_fragmentable_part_with_destination_options() -> None:
    s = Stack()
    dest_opts = bytes([17, 0, 1, 4, 0, 0, 0, 0])  # next header UDP, 8 bytes, PadN
    body = dest_opts + udp_l4(A6, B6, 7, 8, b"behind options" * 100)
    pieces = split(body, 1000)
    for off, data, more in pieces:
        s.receive_packet(frag6(A6, B6, 60, data, off, more, 1), 0.0)
    got = [e for e in events(s) if isinstance(e, DatagramReceived)]
    assert got == [DatagramReceived(1, b"behind options" * 100)]


def test_ipv6_any_overlap_drops_datagram() -> None:
    s = Stack()
    l4 = udp_l4(A6, B6, 5000, 443, PAYLOAD[:2000])
    s.receive_packet(frag6(A6, B6, 17, l4[:1000], 0, True, 9), 0.0)
    # Consistent bytes, but overlapping: RFC 5722 drops the whole datagram.
    s.receive_packet(frag6(A6, B6, 17, l4[992:], 992, False, 9), 0.0)
    assert s.counters["drop.reassembly-overlap"] == 1 and events(s) == []
    # An exact duplicate is no overlap.
    for off, data, more in split(l4, 1000) + split(l4, 1000)[:1]:
        s.receive_packet(frag6(A6, B6, 17, data, off, more, 10), 0.0)
    assert len([e for e in events(s) if isinstance(e, DatagramReceived)]) == 1


def test_ipv6_big_ping_answered() -> None:
    s = Stack(StackConfig(mtu=1280))
    msg = icmp6_msg(A6, B6, icmpv6.ECHO_REQUEST, 3, 4, bytes(range(256)) * 8)
    for off, data, more in split(msg, 1232):
        s.receive_packet(frag6(A6, B6, 58, data, off, more, 77), 0.0)
    outs = drain(s)
    assert len(outs) == 2 and all(o.frag is not None for o in outs)
    reply = b"".join(o.l4 for o in sorted(outs, key=lambda o: o.frag[0] if o.frag else 0))
    assert reply[0] == icmpv6.ECHO_REPLY and reply[8:] == msg[8:]
