"""The relay without root: a real Stack, a scripted outbound and a hand-set clock.

Each test plays the app (real IP packets into the stack) and the upstream (what the
outbound does), and checks what the app sees (SYN-ACK, RST, ICMP unreachable, bytes),
that ``relay.flows`` is empty afterwards, and that the flow's end is logged once
with its reason. Every case runs with and without sniffing.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from dnslib import QTYPE, DNSRecord

from rules import ProcessInfo
from stack import EchoRequest
from stack.wire import icmpv4, tcp
from tests.ippeer import A4, B4, Out, TcpPeer, icmp4_echo, ip_packet, udp_l4
from tests.relay_lab import Lab, ScriptedOutbound, config, run
from tunproxy.config import Config
from tunproxy.flows import FlowRecord
from tunproxy.outbounds.reject import RejectOutbound
from tunproxy.policy import Policy
from tunproxy.relay import DNS_TCP_MAX_BUFFER, MIN_UPSTREAM_READ, TcpFlow

SNIFF = """
relay: {sniff: true, sniff-timeout: 0.3, connect-timeout: 5}
rules:
  - DOMAIN,proxied.test,proxy
  - DOMAIN,rejected.test,REJECT
  - DOMAIN,dropped.test,DROP
  - MATCH,DIRECT
upstreams:
  proxy: {type: socks5, server: "127.0.0.1:1080"}
"""
PLAIN = SNIFF.replace("sniff: true", "sniff: false")
HTTP_GET = b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n"


def policy_for(cfg: Config, direct: ScriptedOutbound,
               proxy: ScriptedOutbound | None = None, dns: Any = None) -> Policy:  # fmt: skip
    outbounds = {"DIRECT": direct, "REJECT": RejectOutbound(),
                 "proxy": proxy or ScriptedOutbound("proxy")}  # fmt: skip
    return Policy(cfg.ruleset, outbounds, dns, None, cfg)


def lab_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a ManualClockLoop."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        run(lambda: fn(*args, **kwargs))

    return wrapper


def flags(o: Out) -> int:
    assert o.tcp is not None
    return o.tcp.flags


def tcp_out(outs: list[Out]) -> list[Out]:
    return [o for o in outs if o.tcp is not None]


def has(outs: list[Out], flag: int) -> bool:
    return any(o.tcp is not None and o.tcp.flags & flag for o in outs)


def assert_ended_once(lab: Lab, reason: str) -> None:
    assert lab.relay.flows == {}
    assert lab.ended() == {reason: 1}


async def handshake(lab: Lab, peer: TcpPeer) -> None:
    """SYN from the app; the SYN-ACK must come; the app ACKs it."""
    peer.syn(lab.now)
    lab.process()
    await lab.settle()
    outs = lab.take()
    assert any(flags(o) & tcp.SYN and flags(o) & tcp.ACK for o in tcp_out(outs)), outs
    peer.take(outs)
    peer.deliver(tcp.ACK, now=lab.now)
    lab.process()


def sniffing(cfg_text: str) -> bool:
    return "sniff: true" in cfg_text


both = pytest.mark.parametrize("cfg_text", [PLAIN, SNIFF], ids=["plain", "sniff"])


# -- TCP ---------------------------------------------------------------------------------


@both
@lab_test
async def test_tcp_accepted_bytes_both_ways_and_orderly_close(cfg_text: str) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    request = HTTP_GET % b"example.com"
    peer.deliver(tcp.ACK | tcp.PSH, request, now=lab.now)
    lab.process()
    await lab.settle()
    if sniffing(cfg_text):
        assert lab.relay.flows[1].record.domain == "example.com"
        assert direct.attempts[0].target.domain == "example.com"
    (attempt,) = direct.attempts
    upstream = attempt.transport
    assert upstream is not None and upstream.written == request
    upstream.feed(b"HTTP/1.1 200 OK\r\n\r\nhello")
    await lab.settle()
    outs = lab.take()
    peer.take(outs)
    assert bytes(peer.received) == b"HTTP/1.1 200 OK\r\n\r\nhello"
    # The app closes first, then the server.
    peer.deliver(tcp.ACK | tcp.FIN, now=lab.now)
    lab.process()
    assert upstream.eof_written
    upstream.feed_eof()
    await lab.settle()
    outs = lab.take()
    assert has(outs, tcp.FIN)
    peer.take(outs)
    peer.deliver(tcp.ACK, now=lab.now)
    lab.process()
    await lab.advance(5)  # through TIME_WAIT
    assert_ended_once(lab, "closed-by-client")
    assert upstream.closed and not upstream.aborted


@both
@pytest.mark.parametrize(("behaviour", "reason"), [
    ("refuse", "refused"), ("unreachable", "unreachable"), ("timeout", "connect-timeout"),
    ("bug", "internal-error: RuntimeError"),
])  # fmt: skip
@lab_test
async def test_tcp_upstream_failure_is_told_to_the_app_once(
    cfg_text: str, behaviour: str, reason: str
) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound(script=[behaviour])
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    peer.syn(lab.now)
    lab.process()
    await lab.settle()
    if sniffing(cfg_text):
        # Accepted at once for sniffing; the route is chosen from the first bytes.
        outs = lab.take()
        assert any(flags(o) == tcp.SYN | tcp.ACK for o in tcp_out(outs))
        peer.take(outs)
        peer.deliver(tcp.ACK, now=lab.now)
        peer.deliver(tcp.ACK | tcp.PSH, HTTP_GET % b"example.com", now=lab.now)
        lab.process()
    await lab.advance(6)  # past connect-timeout (5 s)
    outs = lab.take()
    assert len(direct.attempts) == 1
    if sniffing(cfg_text) or behaviour in ("refuse", "timeout", "bug"):
        # Refused before accept, or too late for anything but an RST.
        assert has(outs, tcp.RST), outs
        assert not has(outs, tcp.SYN)
    else:
        (icmp,) = [o.icmp for o in outs if o.icmp is not None]
        assert icmp[:2] == (icmpv4.DEST_UNREACHABLE, icmpv4.CODE_HOST_UNREACHABLE)
        assert not tcp_out(outs)
    assert_ended_once(lab, reason)
    # What the app sends afterwards meets no flow: a stray segment gets an RST, no new flow.
    peer.deliver(tcp.ACK, b"late", now=lab.now)
    lab.process()
    assert lab.relay.flows == {} and len(direct.attempts) == 1


@both
@lab_test
async def test_tcp_upstream_dies_after_accept(cfg_text: str) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    peer.deliver(tcp.ACK | tcp.PSH, HTTP_GET % b"example.com", now=lab.now)
    lab.process()
    await lab.settle()
    upstream = direct.attempts[0].transport
    assert upstream is not None
    upstream.feed(b"partial")
    await lab.settle()
    upstream.die()
    await lab.settle()
    outs = lab.take()
    peer.take(outs)
    assert bytes(peer.received) == b"partial"
    assert has(outs, tcp.RST)
    assert_ended_once(lab, "upstream-reset")


@both
@lab_test
async def test_tcp_upstream_closes_without_eof_is_a_reset(cfg_text: str) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    peer.deliver(tcp.ACK | tcp.PSH, HTTP_GET % b"example.com", now=lab.now)
    lab.process()
    await lab.settle()
    upstream = direct.attempts[0].transport
    assert upstream is not None
    upstream.protocol.connection_lost(None)  # closed, no EOF seen first
    await lab.settle()
    assert has(lab.take(), tcp.RST)
    assert_ended_once(lab, "upstream-closed")


@lab_test
async def test_tcp_upstream_lost_during_handover_refuses_the_syn() -> None:
    cfg = config(PLAIN)
    direct = ScriptedOutbound(script=["die-in-handover"])
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    peer.syn(lab.now)
    lab.process()
    await lab.settle()
    outs = lab.take()
    assert has(outs, tcp.RST) and not has(outs, tcp.SYN)
    assert_ended_once(lab, "upstream-reset")


@both
@lab_test
async def test_tcp_app_gives_up_while_the_upstream_stalls(cfg_text: str) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound(script=["stall"])
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    peer.syn(lab.now)
    lab.process()
    await lab.settle()
    if sniffing(cfg_text):
        peer.take(lab.take())
        peer.deliver(tcp.ACK, now=lab.now)
        peer.deliver(tcp.ACK | tcp.PSH, HTTP_GET % b"example.com", now=lab.now)
        lab.process()
        await lab.settle()
    assert len(direct.attempts) == 1 and not direct.attempts[0].cancelled
    peer.deliver(tcp.RST | tcp.ACK, now=lab.now)
    lab.process()
    await lab.settle()
    assert direct.attempts[0].cancelled
    assert_ended_once(lab, "reset-by-client")


@lab_test
async def test_tcp_syn_never_accepted_times_out_in_the_stack() -> None:
    cfg = config(PLAIN)
    direct = ScriptedOutbound(script=["stall"])
    lab = Lab.make(policy_for(cfg, direct), cfg, accept_timeout=3.0)
    peer = TcpPeer(lab.stack, dport=80)
    peer.syn(lab.now)
    lab.process()
    await lab.advance(4)
    assert has(lab.take(), tcp.RST)
    assert direct.attempts[0].cancelled
    (reason,) = lab.ended()
    assert lab.relay.flows == {} and lab.ended() == {reason: 1}


@both
@pytest.mark.parametrize(("domain", "reason", "told"), [
    (b"rejected.test", "rejected", "rst"), (b"dropped.test", "dropped", "nothing"),
])  # fmt: skip
@lab_test
async def test_tcp_rules_refuse(cfg_text: str, domain: bytes, reason: str, told: str) -> None:
    """Without sniffing the domain is unknown (MATCH: DIRECT), so route by address."""
    text = cfg_text.replace(f"DOMAIN,{domain.decode()}", "IP-CIDR,93.184.216.34/32")
    cfg = config(text)
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    peer.syn(lab.now)
    lab.process()
    await lab.settle()
    if sniffing(cfg_text):
        peer.take(lab.take())
        peer.deliver(tcp.ACK, now=lab.now)
        peer.deliver(tcp.ACK | tcp.PSH, HTTP_GET % domain, now=lab.now)
        lab.process()
        await lab.settle()
        told = "rst"  # accepted already: silence would leave the app hanging
    outs = lab.take()
    if told == "rst":
        assert has(outs, tcp.RST)
    else:
        assert outs == []
    assert direct.attempts == []
    assert_ended_once(lab, reason)


@lab_test
async def test_tcp_sniffed_domain_picks_the_proxy() -> None:
    cfg = config(SNIFF)
    direct, proxy = ScriptedOutbound(), ScriptedOutbound("proxy")
    lab = Lab.make(policy_for(cfg, direct, proxy), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    peer.deliver(tcp.ACK | tcp.PSH, HTTP_GET % b"proxied.test", now=lab.now)
    peer.deliver(tcp.ACK | tcp.FIN, now=lab.now)
    lab.process()
    await lab.settle()
    assert direct.attempts == []
    (attempt,) = proxy.attempts
    assert attempt.target.domain == "proxied.test" and attempt.transport is not None
    # The bytes held while sniffing, and the FIN that came with them, are passed on.
    assert attempt.transport.written == HTTP_GET % b"proxied.test"
    assert attempt.transport.eof_written
    assert lab.relay.flows[1].record.rule is not None
    attempt.transport.feed_eof()
    await lab.settle()
    peer.take(lab.take())
    peer.deliver(tcp.ACK, now=lab.now)
    lab.process()
    await lab.advance(5)
    assert_ended_once(lab, "closed-by-client")


@lab_test
async def test_tcp_sniff_timeout_connects_without_a_domain() -> None:
    cfg = config(SNIFF)
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=443)
    await handshake(lab, peer)
    assert direct.attempts == []
    await lab.advance(0.5, step=0.1)  # sniff-timeout 0.3 s, no byte from the app
    (attempt,) = direct.attempts
    assert attempt.target.domain is None and attempt.target.address == "93.184.216.34"
    assert lab.relay.flows[1].accepted


@lab_test
async def test_tcp_idle_timeout_resets_both_sides() -> None:
    cfg = config("relay: {tcp-idle-timeout: 8}\nrules: [MATCH,DIRECT]\n")
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    upstream = direct.attempts[0].transport
    assert upstream is not None
    await lab.advance(6, step=1)
    assert lab.relay.flows  # not idle long enough yet
    await lab.advance(6, step=1)
    assert has(lab.take(), tcp.RST)
    assert upstream.aborted
    assert_ended_once(lab, "idle-timeout")


@lab_test
async def test_tcp_backpressure_both_ways() -> None:
    cfg = config()
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg, tcp_send_buffer=64 * 1024)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    upstream = direct.attempts[0].transport
    assert upstream is not None and upstream.high_water == cfg.relay.buffer_size
    # Upstream -> app: the stack's send buffer fills, the upstream read pauses ...
    upstream.feed(bytes(200 * 1024))
    assert not upstream.reading
    # ... and the app reading (ACKing) it drains the buffer: FlowWritable resumes reading.
    for _ in range(100):
        peer.take(lab.take())
        peer.deliver(tcp.ACK, now=lab.now)
        lab.process()
        if upstream.reading:
            break
    assert upstream.reading
    # App -> upstream: the upstream's buffer over its high-water mark pauses the app.
    flow = lab.relay.flows[1]
    assert isinstance(flow, TcpFlow)
    flow.pause_writing()
    flow.resume_writing()
    await lab.relay.aclose()
    assert_ended_once(lab, "shutdown")
    assert upstream.aborted


@lab_test
async def test_tcp_upstream_reads_no_more_than_the_send_buffer_takes() -> None:
    """A flow whose app stops reading holds at most its send buffer plus one read of the
    floor size: each upstream read is sized to the buffer's free space (it was 1 MiB, so a
    stalled flow held up to ~2 MiB whatever the buffers were)."""
    cfg = config()
    direct = ScriptedOutbound()
    send_buffer = 2 * MIN_UPSTREAM_READ
    lab = Lab.make(policy_for(cfg, direct), cfg, tcp_send_buffer=send_buffer)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    upstream = direct.attempts[0].transport
    flow = lab.relay.flows[1]
    assert upstream is not None and isinstance(flow, TcpFlow)
    assert len(flow.get_buffer(-1)) == send_buffer
    flow.buffer_updated(MIN_UPSTREAM_READ // 2)
    assert len(flow.get_buffer(-1)) == send_buffer - MIN_UPSTREAM_READ // 2 and upstream.reading
    flow.buffer_updated(send_buffer - MIN_UPSTREAM_READ // 2)
    assert not upstream.reading and lab.stack.send_buffer_free(1) == 0
    # Never an empty buffer (asyncio's contract): a read of the floor size at most.
    assert len(flow.get_buffer(-1)) == MIN_UPSTREAM_READ
    await lab.relay.aclose()


# -- UDP ---------------------------------------------------------------------------------


def udp_packet(payload: bytes, dport: int = 5000, sport: int = 40000) -> bytes:
    return ip_packet(A4, B4, 17, udp_l4(A4, B4, sport, dport, payload))


@both
@lab_test
async def test_udp_carried_both_ways_then_session_lost(cfg_text: str) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound(script=["stall"])
    lab = Lab.make(policy_for(cfg, direct), cfg)
    lab.receive(udp_packet(b"one"))
    lab.receive(udp_packet(b"two"))  # held while the session opens
    await lab.settle()
    (attempt,) = direct.attempts
    assert attempt.behaviour == "stall"
    # Let the stalled open finish as an accepted session instead: a second flow does.
    direct.default = "accept"
    lab.receive(udp_packet(b"three", sport=40001))
    await lab.settle()
    session = direct.attempts[1].session
    assert session is not None and session.sent == [b"three"]
    session.reply(b"answer")
    await lab.settle()
    (reply,) = [o for o in lab.take() if o.proto == 17]
    assert reply.payload == b"answer" and reply.dport == 40001
    session.die()
    await lab.settle()
    assert 2 not in lab.relay.flows
    assert lab.ended() == {"upstream-closed": 1}
    await lab.relay.aclose()
    assert attempt.cancelled
    assert lab.relay.flows == {} and lab.ended() == {"upstream-closed": 1, "shutdown": 1}


@both
@pytest.mark.parametrize(("behaviour", "reason"), [
    ("refuse", "refused"), ("timeout", "connect-timeout"), ("unreachable", "unreachable"),
])  # fmt: skip
@lab_test
async def test_udp_upstream_failure_is_port_unreachable(
    cfg_text: str, behaviour: str, reason: str
) -> None:
    cfg = config(cfg_text)
    direct = ScriptedOutbound(script=[behaviour])
    lab = Lab.make(policy_for(cfg, direct), cfg)
    lab.receive(udp_packet(b"hello", dport=443))  # QUIC port: sniffed when sniffing
    await lab.advance(6)
    (icmp,) = [o.icmp for o in lab.take() if o.icmp is not None]
    assert icmp[:2] == (icmpv4.DEST_UNREACHABLE, icmpv4.CODE_PORT_UNREACHABLE)
    assert_ended_once(lab, reason)


@lab_test
async def test_udp_session_idles_out_while_the_upstream_stalls() -> None:
    cfg = config()
    direct = ScriptedOutbound(script=["stall"])
    lab = Lab.make(policy_for(cfg, direct), cfg, udp_idle_timeout=5.0)
    lab.receive(udp_packet(b"x"))
    await lab.advance(7)
    assert direct.attempts[0].cancelled
    assert_ended_once(lab, "idle")


# -- DNS ---------------------------------------------------------------------------------

DNS = """
dns: {mode: fake-ip, servers: ["udp://127.0.0.9"], hosts: {static.test: 192.0.2.7}}
rules:
  - DOMAIN,proxied.test,proxy
  - MATCH,DIRECT
upstreams:
  proxy: {type: socks5, server: "127.0.0.1:1080"}
"""


def dns_service(cfg: Config, policy_ref: list[Policy]) -> Any:
    from tunproxy.dns.service import DnsService

    return DnsService(cfg.dns, lambda n, t: policy_ref[0].resolver_outbound(n, t),
                      resolvers=[])  # fmt: skip


def dns_lab(cfg_text: str, direct: ScriptedOutbound, proxy: ScriptedOutbound) -> Lab:
    cfg = config(DNS + cfg_text)
    ref: list[Policy] = []
    policy = policy_for(cfg, direct, proxy, dns=None)
    ref.append(policy)
    policy.dns = dns_service(cfg, ref)
    return Lab.make(policy, cfg)


def query(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


@both
@lab_test
async def test_dns_over_udp_answers_then_idles_out(cfg_text: str) -> None:
    relay_section = cfg_text.split("rules:")[0].replace("relay:", "relay:", 1)
    direct, proxy = ScriptedOutbound(), ScriptedOutbound("proxy")
    lab = dns_lab(relay_section, direct, proxy)
    lab.receive(ip_packet(A4, B4, 17, udp_l4(A4, B4, 40000, 53, query("proxied.test"))))
    await lab.settle()
    (answer,) = [o for o in lab.take() if o.proto == 17]
    reply = DNSRecord.parse(answer.payload)
    (rr,) = reply.rr
    fake = str(rr.rdata)
    assert rr.rtype == QTYPE.A and fake.startswith("198.18.")
    assert direct.attempts == [] and proxy.attempts == []
    # A TCP flow to the fake address goes to the proxy by name, never by address.
    peer = TcpPeer(lab.stack, dst=bytes(int(x) for x in fake.split(".")), dport=443)
    await handshake(lab, peer)
    (attempt,) = proxy.attempts
    assert attempt.target.domain == "proxied.test" and attempt.target.address is None
    await lab.advance(12, step=1)  # dns-idle-timeout 10 s
    assert "idle" in lab.ended()
    await lab.relay.aclose()
    assert lab.relay.flows == {}
    assert lab.ended() == {"idle": 1, "shutdown": 1}


@lab_test
async def test_dns_over_tcp_answers_and_closes() -> None:
    direct, proxy = ScriptedOutbound(), ScriptedOutbound("proxy")
    lab = dns_lab("", direct, proxy)
    peer = TcpPeer(lab.stack, dport=53)
    await handshake(lab, peer)
    q = query("static.test")
    # Two queries in one segment, the second split across two.
    wire = struct.pack("!H", len(q)) + q
    peer.deliver(tcp.ACK | tcp.PSH, wire + wire[:5], now=lab.now)
    peer.deliver(tcp.ACK | tcp.PSH, wire[5:], now=lab.now)
    lab.process()
    await lab.settle()
    peer.take(lab.take())
    data = bytes(peer.received)
    answers = []
    while data:
        (n,) = struct.unpack_from("!H", data)
        answers.append(DNSRecord.parse(data[2 : 2 + n]))
        data = data[2 + n :]
    assert [str(a.rr[0].rdata) for a in answers] == ["192.0.2.7", "192.0.2.7"]
    peer.deliver(tcp.ACK | tcp.FIN, now=lab.now)
    lab.process()
    await lab.settle()
    outs = lab.take()
    assert has(outs, tcp.FIN)
    peer.take(outs)
    peer.deliver(tcp.ACK, now=lab.now)
    lab.process()
    await lab.advance(5)
    assert lab.relay.flows == {} and len(lab.ended()) == 1
    assert direct.attempts == [] and proxy.attempts == []


@lab_test
async def test_dns_over_tcp_garbage_is_reset() -> None:
    lab = dns_lab("", ScriptedOutbound(), ScriptedOutbound("proxy"))
    peer = TcpPeer(lab.stack, dport=53)
    await handshake(lab, peer)
    peer.deliver(tcp.ACK, b"\xff\xff" + bytes(1000), now=lab.now)  # a 64 KiB message begins
    lab.process()
    (flow,) = lab.relay.flows.values()
    # More than the relay holds for one connection arrives in one piece (segments are
    # delivered one by one, so this is the relay's guard on its own).
    flow.on_data(bytes(DNS_TCP_MAX_BUFFER))
    await lab.settle()
    assert has(lab.take(), tcp.RST)
    assert_ended_once(lab, "dns-garbage")


@lab_test
async def test_unknown_fake_ip_is_refused_not_leaked() -> None:
    direct, proxy = ScriptedOutbound(), ScriptedOutbound("proxy")
    lab = dns_lab("", direct, proxy)
    peer = TcpPeer(lab.stack, dst=bytes([198, 18, 3, 3]), dport=443)
    peer.syn(lab.now)
    lab.process()
    await lab.settle()
    assert has(lab.take(), tcp.RST)
    assert direct.attempts == [] and proxy.attempts == []
    assert_ended_once(lab, "unknown-fake-ip")


# -- the policy swapped under running flows ------------------------------------------------


@lab_test
async def test_set_policy_keeps_running_flows_and_closes_a_removed_outbound_after_them() -> None:
    cfg = config(PLAIN.replace("MATCH,DIRECT", "MATCH,proxy"))
    direct, proxy = ScriptedOutbound(), ScriptedOutbound("proxy")
    lab = Lab.make(policy_for(cfg, direct, proxy), cfg)
    peer = TcpPeer(lab.stack, dport=80)
    await handshake(lab, peer)
    (attempt,) = proxy.attempts
    assert attempt.transport is not None
    # The reload drops "proxy" and sends everything to "second".
    second = ScriptedOutbound("second")
    new_cfg = config(PLAIN.replace("proxy", "second"))
    lab.relay.set_policy(Policy(new_cfg.ruleset, {"DIRECT": direct, "REJECT": RejectOutbound(),
                                                  "second": second}, None, None, new_cfg))
    await lab.settle()
    assert proxy.closed == 0  # one flow still runs on it
    peer.deliver(tcp.ACK | tcp.PSH, b"still here", now=lab.now)
    lab.process()
    assert attempt.transport.written == b"still here"
    # A new flow is decided by the new policy.
    TcpPeer(lab.stack, sport=40001, dport=80).syn(lab.now)
    lab.process()
    await lab.settle()
    assert len(direct.attempts) == 1 and len(proxy.attempts) == 1
    # The old flow ends: only now is its outbound closed.
    attempt.transport.die()
    await lab.settle()
    assert proxy.closed == 1
    assert direct.closed == 0 and second.closed == 0
    await lab.relay.aclose()
    assert lab.relay.flows == {}


@lab_test
async def test_echo_requests_go_to_on_echo_not_to_flows() -> None:
    cfg = config()
    lab = Lab.make(policy_for(cfg, ScriptedOutbound()), cfg, echo_events=True)
    lab.receive(ip_packet(A4, B4, 1, icmp4_echo(7, 1, b"x")))  # nobody listening: ignored
    seen: list[EchoRequest] = []
    lab.relay.on_echo = seen.append
    lab.receive(ip_packet(A4, B4, 1, icmp4_echo(7, 2, b"x")))
    assert [e.seq for e in seen] == [2]
    assert lab.relay.flows == {} and lab.take() == []


# -- attribution ---------------------------------------------------------------------------

CURL = ProcessInfo(pid=4242, name="curl", path="/usr/bin/curl", uid=1000)


def attributing(lab: Lab, *outbounds: ScriptedOutbound) -> list[int]:
    """Attribute every flow to curl; each entry: the upstream connects begun by then."""
    begun: list[int] = []

    def attribute(record: FlowRecord) -> None:
        begun.append(sum(len(o.attempts) for o in outbounds))
        record.set_process(CURL)

    lab.flow_log.attribute = attribute
    return begun


@pytest.mark.parametrize("process_rule", [False, True], ids=["deferred", "rules-need-it"])
@lab_test
async def test_attribution_waits_until_the_upstream_connect_began(process_rule: bool) -> None:
    """The process lookup is off the connection's critical path: it runs once the upstream
    connect started, unless a PROCESS-NAME rule needs it to decide."""
    text = PLAIN.replace("  - MATCH,DIRECT", "  - PROCESS-NAME,curl,proxy\n  - MATCH,DIRECT")
    cfg = config(text if process_rule else PLAIN)
    direct = ScriptedOutbound(script=["stall"])
    proxy = ScriptedOutbound("proxy", script=["stall"])
    lab = Lab.make(policy_for(cfg, direct, proxy), cfg)
    begun = attributing(lab, direct, proxy)
    TcpPeer(lab.stack, dport=80).syn(lab.now)
    lab.process()
    assert begun == ([0] if process_rule else [])
    await lab.settle()
    assert begun == [0] if process_rule else [1]  # once, and (deferred) after the connect
    assert len((proxy if process_rule else direct).attempts) == 1
    assert lab.relay.flows[1].record.process == "curl"
    await lab.relay.aclose()  # the stalled connect is cancelled


@lab_test
async def test_a_flow_refused_before_its_deferred_lookup_is_still_attributed() -> None:
    """Refused by the rules in the connect task's first step, before the deferred lookup's
    turn: the end line (and the history) name the process all the same."""
    cfg = config(PLAIN.replace("DOMAIN,rejected.test", "IP-CIDR,93.184.216.34/32"))
    direct = ScriptedOutbound()
    lab = Lab.make(policy_for(cfg, direct), cfg)
    begun = attributing(lab, direct)
    TcpPeer(lab.stack, dport=80).syn(lab.now)
    lab.process()
    await lab.settle()
    assert lab.ended() == {"rejected": 1} and direct.attempts == []
    (record,) = lab.flow_log.history
    assert begun == [0] and record.process == "curl" and record.attribution == "process"


@pytest.mark.parametrize("mode", ["sniff", "accept-early"])
@lab_test
async def test_a_flow_answered_at_once_is_attributed_before_its_syn_ack(mode: str) -> None:
    """Sniffing or accept-early answer the SYN in the same turn: the app may close as soon
    as the SYN-ACK arrives, leaving no owner to find, so the lookup is not deferred."""
    text = SNIFF if mode == "sniff" else PLAIN.replace("sniff: false", "accept-early: true")
    cfg = config(text)
    direct = ScriptedOutbound(script=["stall"])
    lab = Lab.make(policy_for(cfg, direct), cfg)
    begun = attributing(lab, direct)
    TcpPeer(lab.stack, dport=80).syn(lab.now)
    lab.process()
    assert has(lab.take(), tcp.SYN) and begun == [0]
    await lab.settle()
    assert begun == [0]  # once
    assert lab.relay.flows[1].record.process == "curl"
    await lab.relay.aclose()
    assert lab.ended() == {"shutdown": 1} and begun == [0]
