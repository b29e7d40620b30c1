"""Echo requests as events (StackConfig.echo_events): the stack stays sans-I/O and lets
the application answer with the real destination's reply, a refusal, or nothing."""

from __future__ import annotations

from stack import EchoRequest, Refusal, Stack, StackConfig
from stack.wire import icmpv4, icmpv6
from tests.ippeer import A4, A6, B4, B6, drain, events, icmp4_echo, icmp6_msg, ip_packet


def stack() -> Stack:
    return Stack(StackConfig(echo_events=True))


def test_v4_echo_becomes_an_event_and_the_reply_carries_the_real_data() -> None:
    s = stack()
    request_packet = ip_packet(A4, B4, 1, icmp4_echo(0x1234, 9, b"payload"))
    s.receive_packet(request_packet, 0.0)
    assert drain(s) == []  # nothing made up
    (event,) = events(s)
    assert isinstance(event, EchoRequest)
    assert (event.src, event.dst, event.ident, event.seq, event.data, event.version) == (
        A4, B4, 0x1234, 9, b"payload", 4)  # fmt: skip
    assert event.quote == request_packet
    s.send_echo_reply(event, b"echoed", 1.0)
    (out,) = drain(s)
    assert (out.src, out.dst) == (B4, A4)
    assert out.icmp == (icmpv4.ECHO_REPLY, 0, 0x1234, 9, b"echoed")
    assert s.counters["icmp.echo_events"] == 1 and s.counters["icmp.echo_replies"] == 1


def test_v6_echo_event_and_reply() -> None:
    s = stack()
    s.receive_packet(ip_packet(A6, B6, 58, icmp6_msg(A6, B6, icmpv6.ECHO_REQUEST, 7, 3, b"hi")),
                     0.0)  # fmt: skip
    (event,) = events(s)
    assert isinstance(event, EchoRequest) and event.version == 6
    s.send_echo_reply(event, b"hi", 0.0)
    (out,) = drain(s)
    assert (out.src, out.dst) == (B6, A6)
    assert out.icmp == (icmpv6.ECHO_REPLY, 0, 7, 3, b"hi")


def test_refusals_quote_the_request() -> None:
    s = stack()
    packet = ip_packet(A4, B4, 1, icmp4_echo(1, 1, b"x" * 600))
    s.receive_packet(packet, 0.0)
    (event,) = events(s)
    assert isinstance(event, EchoRequest)
    s.refuse_echo(event, Refusal.UNREACHABLE, 0.0)
    s.refuse_echo(event, Refusal.PROHIBITED, 0.0)
    s.refuse_echo(event, Refusal.DROP, 0.0)
    unreachable, prohibited = drain(s)
    assert unreachable.icmp is not None and prohibited.icmp is not None
    assert unreachable.icmp[:2] == (icmpv4.DEST_UNREACHABLE, icmpv4.CODE_HOST_UNREACHABLE)
    assert prohibited.icmp[:2] == (icmpv4.DEST_UNREACHABLE, icmpv4.CODE_ADMIN_PROHIBITED)
    assert (unreachable.src, unreachable.dst) == (B4, A4)
    assert unreachable.icmp[4] == packet[:len(unreachable.icmp[4])]  # the request's start
    s6 = stack()
    s6.receive_packet(ip_packet(A6, B6, 58, icmp6_msg(A6, B6, icmpv6.ECHO_REQUEST, 1, 1)), 0.0)
    (event6,) = events(s6)
    assert isinstance(event6, EchoRequest)
    s6.refuse_echo(event6, Refusal.UNREACHABLE, 0.0)
    (out6,) = drain(s6)
    assert out6.icmp is not None
    assert out6.icmp[:2] == (icmpv6.DEST_UNREACHABLE, icmpv6.CODE_ADDRESS_UNREACHABLE)


def test_broadcast_and_multicast_echo_make_no_event() -> None:
    s = stack()
    s.receive_packet(ip_packet(A4, bytes([255] * 4), 1, icmp4_echo(1, 1, b"")), 0.0)
    assert events(s) == [] and drain(s) == []
