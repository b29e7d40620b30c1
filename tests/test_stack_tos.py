"""FlowOpened carries the IPv4 TOS / IPv6 Traffic Class of the flow's first packet."""

from __future__ import annotations

import pytest

from stack import FlowKey, FlowOpened, Stack, StackConfig
from stack.wire import tcp
from tests.ippeer import A4, A6, B4, B6, events, ip_packet, tcp_l4, udp_l4

EF = 46  # Expedited Forwarding (RFC 3246)
VERSIONS = [pytest.param(A4, B4, id="v4"), pytest.param(A6, B6, id="v6")]


def syn(src: bytes, dst: bytes, sport: int, tos: int) -> bytes:
    seg = tcp.TcpRepr(sport, 443, 1000, 0, tcp.SYN, 65535, mss=1400)
    return ip_packet(src, dst, 6, tcp_l4(src, dst, seg), tos=tos)


@pytest.mark.parametrize(("a", "b"), VERSIONS)
def test_tcp_flow_opened_has_the_tos_of_the_syn(a: bytes, b: bytes) -> None:
    s = Stack(StackConfig(seed=1))
    s.receive_packet(syn(a, b, 50000, EF << 2 | 1), 0.0)  # with ECN bits: ECT(1)
    s.receive_packet(syn(a, b, 50001, 0), 0.0)
    marked, plain = events(s)
    assert marked == FlowOpened(1, FlowKey(6, a, 50000, b, 443), EF << 2 | 1)
    assert isinstance(marked, FlowOpened) and marked.dscp == EF
    assert isinstance(plain, FlowOpened) and plain.tos == 0 and plain.dscp == 0


@pytest.mark.parametrize(("a", "b"), VERSIONS)
def test_udp_flow_opened_has_the_tos_of_the_first_datagram(a: bytes, b: bytes) -> None:
    s = Stack(StackConfig(seed=2))
    dgram = udp_l4(a, b, 5000, 53, b"q")
    s.receive_packet(ip_packet(a, b, 17, dgram, tos=10 << 2), 0.0)
    # A later datagram of the same session with another mark opens nothing.
    s.receive_packet(ip_packet(a, b, 17, dgram, tos=EF << 2), 0.1)
    opened = [e for e in events(s) if isinstance(e, FlowOpened)]
    assert opened == [FlowOpened(1, FlowKey(17, a, 5000, b, 53), 10 << 2)]
    assert opened[0].dscp == 10
