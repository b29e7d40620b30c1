"""tunproxy.icmp.Pinger without namespaces: echo requests from a real Stack decided by
a real policy, on the hand-set clock loop. DIRECT goes to 127.0.0.1 for real where this
process may open an ICMP socket (root, or ping_group_range), else it is refused."""

from __future__ import annotations

import socket

import pytest

from stack import EchoRequest, Stack, StackConfig
from stack.wire import icmpv4
from tests.ippeer import A4, drain, icmp4_echo, ip_packet
from tests.relay_lab import ScriptedOutbound, config, run
from tunproxy.dns.service import DnsService
from tunproxy.icmp import Pinger
from tunproxy.outbounds.reject import RejectOutbound
from tunproxy.policy import Policy

RULES = """
dns: {mode: fake-ip, servers: ["udp://127.0.0.9"], hosts: {loop.test: 127.0.0.1}}
upstreams:
  proxy: {type: socks5, server: "192.0.2.1:1080"}
rules:
  - IP-CIDR,192.0.2.10/32,REJECT
  - IP-CIDR,192.0.2.11/32,DROP
  - IP-CIDR,192.0.2.12/32,proxy
  - MATCH,DIRECT
"""


def can_ping() -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_RAW):
        try:
            socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP).close()
            return True
        except PermissionError:
            continue
    return False


async def ping(dst: str, with_dns: bool = False) -> tuple[list[tuple[int, ...]], Pinger]:
    import asyncio

    loop = asyncio.get_running_loop()
    cfg = config(RULES)
    outbounds = {"DIRECT": ScriptedOutbound(), "REJECT": RejectOutbound(),
                 "proxy": ScriptedOutbound("proxy")}  # fmt: skip
    policy = Policy(cfg.ruleset, outbounds, None, None, cfg)
    if with_dns:
        policy.dns = DnsService(cfg.dns, policy.resolver_outbound, resolvers=[])
    stack = Stack(StackConfig(echo_events=True))
    pinger = Pinger(loop, stack, lambda: policy, lambda: None, None)
    out: list[tuple[int, ...]] = []
    address = dst
    if with_dns:
        assert policy.dns is not None
        fake = policy.dns.pool.address_for(dst, 4) if isinstance(policy.dns, DnsService) else None
        assert fake is not None
        address = fake
    packed = socket.inet_aton(address)
    stack.receive_packet(ip_packet(A4, packed, 1, icmp4_echo(0x4242, 5, b"probe")), loop.time())
    event = stack.next_event()
    assert isinstance(event, EchoRequest)
    pinger.handle(event)
    for _ in range(200):
        await asyncio.sleep(0)
        out.extend(o.icmp for o in drain(stack) if o.icmp is not None)  # type: ignore[misc]
        if out:
            break
    await pinger.aclose()
    return out, pinger


def test_reject_drop_and_an_upstream() -> None:
    async def body() -> None:
        out, pinger = await ping("192.0.2.10")
        assert [o[:2] for o in out] == [(icmpv4.DEST_UNREACHABLE, icmpv4.CODE_HOST_UNREACHABLE)]
        out, pinger = await ping("192.0.2.11")
        assert out == [] and pinger.counters["dropped"] == 1
        out, pinger = await ping("192.0.2.12")
        assert [o[:2] for o in out] == [(icmpv4.DEST_UNREACHABLE, icmpv4.CODE_ADMIN_PROHIBITED)]

    run(body)


@pytest.mark.parametrize("with_dns", [False, True], ids=["address", "fake-ip"])
def test_direct_pings_for_real(with_dns: bool) -> None:
    async def body() -> None:
        out, pinger = await ping("loop.test" if with_dns else "127.0.0.1", with_dns=with_dns)
        if can_ping():
            assert out == [(icmpv4.ECHO_REPLY, 0, 0x4242, 5, b"probe")]
            assert pinger.counters == {"forwarded": 1, "replied": 1, "refused": 0, "dropped": 0}
        else:  # no ICMP socket allowed here: said at once, never a made-up reply
            assert [o[:2] for o in out] == [(icmpv4.DEST_UNREACHABLE,
                                             icmpv4.CODE_ADMIN_PROHIBITED)]  # fmt: skip

    run(body)


def test_unknown_fake_address_is_unreachable() -> None:
    async def body() -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        cfg = config(RULES)
        policy = Policy(cfg.ruleset, {"DIRECT": ScriptedOutbound(), "REJECT": RejectOutbound()},
                        None, None, cfg)  # fmt: skip
        policy.dns = DnsService(cfg.dns, policy.resolver_outbound, resolvers=[])
        stack = Stack(StackConfig(echo_events=True))
        pinger = Pinger(loop, stack, lambda: policy, lambda: None, None)
        stack.receive_packet(ip_packet(A4, bytes([198, 18, 9, 9]), 1, icmp4_echo(1, 1, b"")),
                             loop.time())  # fmt: skip
        event = stack.next_event()
        assert isinstance(event, EchoRequest)
        pinger.handle(event)
        for _ in range(20):
            await asyncio.sleep(0)
        (out,) = drain(stack)
        assert out.icmp is not None and out.icmp[:2] == (icmpv4.DEST_UNREACHABLE,
                                                         icmpv4.CODE_HOST_UNREACHABLE)
        await pinger.aclose()

    run(body)
