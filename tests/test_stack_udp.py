"""UDP sessions through the whole Stack, with a hand-set clock."""

from __future__ import annotations

import pytest

from stack import (
    DatagramReceived,
    FlowClosed,
    FlowKey,
    FlowOpened,
    Refusal,
    Stack,
    StackConfig,
)
from stack.reassembly import Ipv4Reassembler
from stack.wire import icmpv4, icmpv6, ipv4, virtio
from stack.wire.checksum import ones_sum, pseudo_header_sum
from tests.ippeer import A4, A6, B4, B6, drain, events, ip_packet, parse_out, udp_l4, with_vnet


def datagram(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    return ip_packet(src, dst, 17, udp_l4(src, dst, sport, dport, payload))


@pytest.mark.parametrize(("a", "b"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_session_open_datagrams_reply(a: bytes, b: bytes) -> None:
    s = Stack(StackConfig())
    s.receive_packet(datagram(a, b, 5353, 53, b"query"), 1.0)
    s.receive_packet(datagram(a, b, 5353, 53, b"again"), 1.1)
    evs = events(s)
    assert evs[0] == FlowOpened(1, FlowKey(17, a, 5353, b, 53))
    assert evs[1:] == [DatagramReceived(1, b"query"), DatagramReceived(1, b"again")]
    assert s.flow_key(1) == FlowKey(17, a, 5353, b, 53)
    s.accept(1, 1.2)  # a no-op for UDP beyond releasing the quote
    s.send_datagram(1, b"answer", 1.2)
    (out,) = drain(s)
    # The reply comes from the original destination (RFC 768 ports swapped).
    assert (out.src, out.dst, out.sport, out.dport, out.payload) == (b, a, 53, 5353, b"answer")
    assert out.ttl == 64
    if out.ip4 is not None:
        assert out.ip4.dont_fragment
    assert s.counters["flows.udp"] == 1 and s.counters["udp.datagrams_out"] == 1


def test_other_tuple_is_other_session() -> None:
    s = Stack()
    s.receive_packet(datagram(A4, B4, 1000, 53, b"x"), 0.0)
    s.receive_packet(datagram(A4, B4, 1001, 53, b"y"), 0.0)
    opened = [e for e in events(s) if isinstance(e, FlowOpened)]
    assert [e.flow for e in opened] == [1, 2]
    assert s.counters["flows.open"] == 2


def test_idle_expiry_is_refreshed_by_traffic_both_ways() -> None:
    s = Stack(StackConfig(udp_idle_timeout=10.0))
    s.receive_packet(datagram(A4, B4, 1000, 53, b"x"), 0.0)
    events(s)
    assert s.get_timer() == 10.0
    s.send_datagram(1, b"reply", 6.0)  # activity pushes the expiry to 16
    drain(s)
    s.handle_timer(10.0)
    assert events(s) == [] and s.flow_key(1) is not None
    assert s.get_timer() == 16.0
    s.receive_packet(datagram(A4, B4, 1000, 53, b"y"), 12.0)
    s.handle_timer(16.0)
    assert events(s) == [DatagramReceived(1, b"y")]
    s.handle_timer(22.0)
    assert events(s) == [FlowClosed(1, "idle")]
    assert s.flow_key(1) is None and s.get_timer() is None
    assert s.counters["flows.open"] == 0
    # The same 5-tuple afterwards is a new session.
    s.receive_packet(datagram(A4, B4, 1000, 53, b"z"), 30.0)
    assert events(s)[0] == FlowOpened(2, FlowKey(17, A4, 1000, B4, 53))


@pytest.mark.parametrize(
    ("how", "code4", "code6"),
    [
        (Refusal.UNREACHABLE, icmpv4.CODE_PORT_UNREACHABLE, icmpv6.CODE_PORT_UNREACHABLE),
        (Refusal.RESET, icmpv4.CODE_PORT_UNREACHABLE, icmpv6.CODE_PORT_UNREACHABLE),
        (Refusal.PROHIBITED, icmpv4.CODE_ADMIN_PROHIBITED, icmpv6.CODE_ADMIN_PROHIBITED),
    ],
)
@pytest.mark.parametrize(("a", "b"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_refusal_sends_icmp_quoting_first_datagram(
    a: bytes, b: bytes, how: str, code4: int, code6: int
) -> None:
    s = Stack()
    first = datagram(a, b, 4444, 9999, b"first" * 200)
    s.receive_packet(first, 0.0)
    s.receive_packet(datagram(a, b, 4444, 9999, b"second"), 0.0)
    events(s)
    s.refuse(1, how, 0.1)
    (out,) = drain(s)
    assert (out.src, out.dst) == (b, a)
    assert out.icmp is not None
    type_, code, _, _, quote = out.icmp
    if len(a) == 4:
        assert (type_, code) == (icmpv4.DEST_UNREACHABLE, code4)
        assert len(out.raw) <= 576  # RFC 1812 4.3.2.3
    else:
        assert (type_, code) == (icmpv6.DEST_UNREACHABLE, code6)
        assert len(out.raw) <= 1280  # RFC 4443 2.4 (c)
    assert first.startswith(quote) and len(quote) > 28
    assert s.flow_key(1) is None and s.counters["flows.open"] == 0
    assert events(s) == []  # the application asked: no event


def test_refuse_drop_and_after_accept_send_nothing() -> None:
    s = Stack()
    s.receive_packet(datagram(A4, B4, 1, 2, b"a"), 0.0)
    s.receive_packet(datagram(A4, B4, 3, 4, b"b"), 0.0)
    s.refuse(1, Refusal.DROP, 0.0)
    s.accept(2, 0.0)
    s.refuse(2, Refusal.UNREACHABLE, 0.0)  # quote released by accept
    assert drain(s) == []
    assert s.counters["flows.open"] == 0


def test_no_icmp_about_multicast_or_broadcast() -> None:
    s = Stack()
    s.receive_packet(datagram(A4, bytes([224, 0, 0, 251]), 5353, 5353, b"mdns"), 0.0)
    s.receive_packet(datagram(A4, bytes([255] * 4), 68, 67, b"dhcp"), 0.0)
    s.refuse(1, Refusal.UNREACHABLE, 0.0)
    s.refuse(2, Refusal.UNREACHABLE, 0.0)
    assert drain(s) == []


def test_abort_closes_silently() -> None:
    s = Stack()
    s.receive_packet(datagram(A4, B4, 1, 2, b"a"), 0.0)
    events(s)
    s.abort(1, 0.0)
    s.send_datagram(1, b"late", 0.0)  # a dead handle is ignored
    assert drain(s) == [] and events(s) == [] and s.flow_key(1) is None


def test_large_reply_is_fragmented_v4() -> None:
    s = Stack(StackConfig(mtu=1500))
    s.receive_packet(datagram(A4, B4, 1000, 53, b"q"), 0.0)
    events(s)
    payload = bytes(range(256)) * 16  # 4096 bytes
    s.send_datagram(1, payload, 0.0)
    raws = s.packets_to_send()
    assert len(raws) == 3 and all(len(r) <= 1500 for r in raws)
    frags = [parse_out(r) for r in raws]
    assert {f.ip4.ident for f in frags if f.ip4} == {frags[0].ip4.ident if frags[0].ip4 else -1}
    assert all(f.ip4 is not None and not f.ip4.dont_fragment for f in frags)
    r = Ipv4Reassembler(1 << 20, 30.0, {})
    done = None
    for raw in reversed(raws):  # any order
        done = r.receive(ipv4.Ipv4Packet(memoryview(raw)), 0.0) or done
    assert done is not None
    _, dgram = done
    assert ones_sum(dgram, pseudo_header_sum(B4, A4, 17, len(dgram))) == 0
    assert dgram[8:] == payload


def test_large_reply_is_fragmented_v6() -> None:
    s = Stack(StackConfig(mtu=1280))
    s.receive_packet(datagram(A6, B6, 1000, 53, b"q"), 0.0)
    events(s)
    payload = b"\x42" * 3000
    s.send_datagram(1, payload, 0.0)
    frags = [parse_out(r) for r in s.packets_to_send()]
    assert len(frags) == 3 and all(len(f.raw) <= 1280 for f in frags)
    assert all(f.frag is not None for f in frags)
    idents = {f.frag[2] for f in frags if f.frag}
    assert len(idents) == 1
    whole = bytearray()
    for f in sorted(frags, key=lambda f: f.frag[0] if f.frag else 0):
        assert f.frag is not None and f.frag[0] == len(whole)
        whole += f.l4
    assert [f.frag[1] for f in frags if f.frag] == [True, True, False]
    assert ones_sum(whole, pseudo_header_sum(B6, A6, 17, len(whole))) == 0
    assert whole[8:] == payload


def test_too_large_reply_dropped_and_counted() -> None:
    s = Stack()
    s.receive_packet(datagram(A4, B4, 1000, 53, b"q"), 0.0)
    s.send_datagram(1, bytes(65508), 0.0)
    assert drain(s) == [] and s.counters["drop.udp-too-large"] == 1


def test_checksums() -> None:
    s = Stack()
    bad = bytearray(datagram(A4, B4, 1, 2, b"data"))
    bad[-1] ^= 0xFF
    s.receive_packet(bytes(bad), 0.0)
    assert s.counters["drop.udp-checksum"] == 1 and events(s) == []
    # IPv4: checksum 0 means "none" (RFC 768); IPv6: a zero checksum is invalid (RFC 8200 8.1).
    for a, b in ((A4, B4), (A6, B6)):
        l4 = bytearray(udp_l4(a, b, 7, 8, b"nocsum"))
        l4[6:8] = b"\0\0"
        s.receive_packet(ip_packet(a, b, 17, bytes(l4)), 0.0)
    assert s.counters["drop.udp6-zero-checksum"] == 1
    assert [e for e in events(s) if isinstance(e, DatagramReceived)] == [
        DatagramReceived(1, b"nocsum")
    ]


def test_vnet_needs_csum_in_and_out() -> None:
    s = Stack(StackConfig(vnet_hdr=True))
    l4 = bytearray(udp_l4(A4, B4, 7, 8, b"partial"))
    # The kernel's CHECKSUM_PARTIAL form: the field holds the pseudo-header sum only.
    l4[6:8] = pseudo_header_sum(A4, B4, 17, len(l4)).to_bytes(2, "big")
    s.receive_packet(with_vnet(ip_packet(A4, B4, 17, bytes(l4)), flags=virtio.F_NEEDS_CSUM,
                               csum_start=20, csum_offset=6), 0.0)  # fmt: skip
    assert events(s)[1] == DatagramReceived(1, b"partial")
    s.send_datagram(1, b"reply", 0.0)
    (out,) = drain(s)  # parse_out completes the partial checksum and verifies it
    assert out.vnet is not None and out.vnet.flags == virtio.F_NEEDS_CSUM
    assert (out.vnet.csum_start, out.vnet.csum_offset, out.vnet.gso_type) == (20, 6, 0)
    assert out.payload == b"reply"


@pytest.mark.parametrize(("a", "b"), [(A4, B4), (A6, B6)], ids=["v4", "v6"])
def test_udp_l4_gso_super_packet_is_split(a: bytes, b: bytes) -> None:
    s = Stack(StackConfig(vnet_hdr=True))
    chunks = [bytes([i]) * 1000 for i in range(5)] + [b"tail"]
    payload = b"".join(chunks)
    l4 = bytearray(udp_l4(a, b, 7, 8, payload))
    l4[4:6] = b"\0\0"  # the length field of a super-packet is not meaningful
    l4[6:8] = pseudo_header_sum(a, b, 17, len(l4) & 0xFFFF).to_bytes(2, "big")
    ip_len = 20 if len(a) == 4 else 40
    pkt = with_vnet(ip_packet(a, b, 17, bytes(l4)), flags=virtio.F_NEEDS_CSUM,
                    gso_type=virtio.GSO_UDP_L4, gso_size=1000, hdr_len=ip_len + 8,
                    csum_start=ip_len, csum_offset=6)  # fmt: skip
    s.receive_packet(pkt, 0.0)
    got = [e.data for e in events(s) if isinstance(e, DatagramReceived)]
    assert got == chunks
    assert s.counters["udp.gso_in"] == 1 and s.counters["udp.datagrams_in"] == 6


def test_max_flows_limit() -> None:
    s = Stack(StackConfig(max_flows=2))
    for port in range(3):
        s.receive_packet(datagram(A4, B4, 1000 + port, 53, b"x"), 0.0)
    assert s.counters["flows.open"] == 2 and s.counters["drop.limit.flows"] == 1
    assert len([e for e in events(s) if isinstance(e, FlowOpened)]) == 2


def test_icmp_errors_are_rate_limited() -> None:
    s = Stack(StackConfig(icmp_error_rate=10.0, icmp_error_burst=3))
    sent = []
    for i in range(10):
        s.receive_packet(datagram(A4, B4, 2000 + i, 9, b"x"), 0.0)
        s.refuse(i + 1, Refusal.UNREACHABLE, 0.0)
        sent.append(len(s.packets_to_send()))
    assert sent == [1, 1, 1] + [0] * 7 and s.counters["icmp.rate_limited"] == 7
    s.receive_packet(datagram(A4, B4, 3000, 9, b"x"), 0.2)  # 0.2 s later: 2 tokens back
    s.refuse(11, Refusal.UNREACHABLE, 0.2)
    assert len(s.packets_to_send()) == 1
