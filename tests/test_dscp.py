"""DSCP rules: the first packet's DSCP (IP TOS >> 2, as mihomo's ``DSCP`` rule reads
it) goes from the stack's FlowOpened through the relay's flow record into the rules.

Without root: the rule engine alone, the policy with a hand-made record, and a real
Stack + Relay (``tests.relay_lab``) fed SYNs and datagrams with and without a mark.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any

import rules
from rules import FlowMeta, RuleSource
from stack import TCP, UDP, FlowKey
from stack.wire import tcp
from tests.ippeer import A4, B4, TcpPeer, ip_packet, tcp_l4, udp_l4
from tests.relay_lab import Lab, ScriptedOutbound, config, run
from tunproxy.flows import FlowRecord
from tunproxy.outbounds.reject import RejectOutbound
from tunproxy.policy import Policy

EF = 46
CFG = """\
relay: {sniff: false}
rules:
  - DSCP,46,REJECT
  - DSCP,8-10,proxy
  - MATCH,DIRECT
upstreams:
  proxy: {type: socks5, server: "127.0.0.1:1080"}
"""


def meta(dscp: int | None) -> FlowMeta:
    return FlowMeta("tcp", "10.0.0.2", 40000, "9.9.9.9", 443, dscp=dscp)


def test_rule_engine_matches_the_dscp_fact() -> None:
    lines = ["DSCP,46,REJECT", "DSCP,8-10,proxy", "MATCH,DIRECT"]
    rs = rules.compile([RuleSource(t, "c.yaml", i) for i, t in enumerate(lines, 1)], {},
                       ["proxy"])  # fmt: skip
    assert rs.match(meta(46)).target == "REJECT"
    assert rs.match(meta(9)).target == "proxy"
    assert rs.match(meta(0)).target == "DIRECT"
    assert rs.match(meta(None)).target == "DIRECT"  # unknown: no DSCP rule matches


def _policy(direct: ScriptedOutbound, proxy: ScriptedOutbound | None = None) -> Policy:
    cfg = config(CFG)
    outbounds = {"DIRECT": direct, "REJECT": RejectOutbound(),
                 "proxy": proxy or ScriptedOutbound("proxy")}  # fmt: skip
    return Policy(cfg.ruleset, outbounds, None, None, cfg)


def _record(key: FlowKey, dscp: int | None) -> FlowRecord:
    return FlowRecord(id=1, network=key.network, src=key.src_ip, src_port=key.src_port,
                      dst=key.dst_ip, dst_port=key.dst_port, dscp=dscp)  # fmt: skip


def test_policy_passes_the_records_dscp_to_the_rules() -> None:
    policy = _policy(ScriptedOutbound())
    key = FlowKey(TCP, A4, 40000, B4, 443)
    assert policy.meta(key, _record(key, EF))[0].dscp == EF

    async def decide(dscp: int | None, protocol: int = TCP) -> str:
        k = FlowKey(protocol, A4, 40000, B4, 443)
        return (await policy.decide(k, _record(k, dscp))).target_name

    async def check() -> None:
        assert await decide(EF) == "REJECT"
        assert await decide(EF, UDP) == "REJECT"
        assert await decide(10) == "proxy"
        assert await decide(0) == "DIRECT"
        assert await decide(None) == "DIRECT"

    run(check)


def lab_test(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    @functools.wraps(fn)
    def wrapper() -> None:
        run(fn)

    return wrapper


def _syn(sport: int, tos: int) -> bytes:
    seg = tcp.TcpRepr(sport, 80, 1000, 0, tcp.SYN, 65535, mss=1400)
    return ip_packet(A4, B4, 6, tcp_l4(A4, B4, seg), tos=tos)


@lab_test
async def test_relay_rejects_a_marked_syn_and_connects_an_unmarked_one() -> None:
    direct = ScriptedOutbound()
    lab = Lab.make(_policy(direct), config(CFG))
    lab.receive(_syn(41000, EF << 2))  # DSCP 46 (EF), ECN bits clear
    await lab.settle()
    outs = lab.take()
    assert [o.tcp.flags for o in outs if o.tcp is not None] == [tcp.RST | tcp.ACK]
    assert direct.attempts == []
    lab.receive(_syn(41001, 0))
    await lab.settle()
    assert len(direct.attempts) == 1
    records = {r.src_port: r for r in lab.flow_log.iter_records(ended=True)}
    assert records[41000].dscp == EF and records[41000].outbound == "REJECT"
    assert records[41001].dscp == 0


@lab_test
async def test_relay_routes_a_udp_session_by_its_first_datagrams_dscp() -> None:
    direct = ScriptedOutbound()
    proxy = ScriptedOutbound("proxy")
    lab = Lab.make(_policy(direct, proxy), config(CFG))
    lab.receive(ip_packet(A4, B4, 17, udp_l4(A4, B4, 5000, 53, b"q"), tos=9 << 2 | 2))
    await lab.settle()
    assert len(proxy.attempts) == 1 and direct.attempts == []
    # A TCP flow with the ECN bits set but no DSCP goes DIRECT.
    TcpPeer(lab.stack, A4, B4, sport=41002, dport=80).syn(lab.now)
    lab.process()
    await lab.settle()
    assert len(direct.attempts) == 1
