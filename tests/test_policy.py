"""The policy: built from one config, swapped whole by a reload (no root needed).

``Proxy.reload`` is driven as SIGHUP drives it: the file on disk changes, then the
reload reads it. Each case checks what the new policy holds, what it kept from the
old one, and what a flow would be given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stack import TCP, UDP, FlowKey, Refusal
from tests.ippeer import A4, B4
from tests.relay_lab import Lab, run
from tunproxy.app import Proxy
from tunproxy.config import load_config
from tunproxy.flows import FlowRecord
from tunproxy.outbounds.base import Target
from tunproxy.outbounds.direct import DirectOutbound
from tunproxy.outbounds.reject import RejectOutbound
from tunproxy.outbounds.socks5 import Socks5Outbound
from tunproxy.procinfo import ProcessResolver

BASE = """\
upstreams:
  proxy: {type: socks5, server: "127.0.0.1:1080"}
rules:
  - DST-PORT,8080,proxy
  - MATCH,DIRECT
"""
WITH_SECOND = """\
upstreams:
  proxy: {type: socks5, server: "127.0.0.1:1080"}
  second: {type: socks5, server: "127.0.0.1:1081"}
rules:
  - DST-PORT,9090,second
  - DST-PORT,8080,proxy
  - MATCH,DIRECT
"""
DNS = """\
dns: {mode: fake-ip, servers: ["udp://127.0.0.9"], ttl: 1}
"""


def key(dport: int, protocol: int = TCP) -> FlowKey:
    return FlowKey(protocol, A4, 40000, B4, dport)


def record(k: FlowKey) -> FlowRecord:
    return FlowRecord(id=1, network=k.network, src=k.src_ip, src_port=k.src_port, dst=k.dst_ip,
                      dst_port=k.dst_port)  # fmt: skip


def started(tmp_path: Path, text: str) -> tuple[Proxy, Path]:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    proxy = Proxy(load_config(path))
    proxy.policy = proxy.build_policy(proxy.config)
    return proxy, path


async def decide(proxy: Proxy, dport: int, protocol: int = TCP) -> str | None:
    assert proxy.policy is not None
    k = key(dport, protocol)
    decision = await proxy.policy.decide(k, record(k))
    return decision.outbound.name if decision.outbound is not None else decision.refusal


def test_reload_adds_an_upstream_and_a_rule_naming_it_keeps_the_unchanged_one(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        proxy, path = started(tmp_path, BASE)
        old = proxy.policy
        assert old is not None
        assert await decide(proxy, 9090) == "DIRECT"
        path.write_text(WITH_SECOND)
        proxy.reload()
        new = proxy.policy
        assert new is not None and new is not old
        assert await decide(proxy, 9090) == "second"
        assert await decide(proxy, 8080) == "proxy"
        # Unchanged settings: the very same outbound objects (flows on them are undisturbed).
        for name in ("DIRECT", "REJECT", "proxy"):
            assert new.outbounds[name] is old.outbounds[name]
        assert old.retired_by(new).outbounds == []

    run(body)


def test_reload_removes_and_changes_upstreams(tmp_path: Path) -> None:
    proxy, path = started(tmp_path, WITH_SECOND)
    old = proxy.policy
    assert old is not None
    path.write_text(BASE.replace("1080", "1082"))
    proxy.reload()
    new = proxy.policy
    assert new is not None
    assert set(new.outbounds) == {"DIRECT", "REJECT", "proxy"}
    changed = new.outbounds["proxy"]
    assert isinstance(changed, Socks5Outbound) and changed.server_port == 1082
    retired = old.retired_by(new)
    assert {o.name for o in retired.outbounds} == {"proxy", "second"}
    assert retired.dns is None and retired.processes is None
    assert new.outbounds["DIRECT"] is old.outbounds["DIRECT"]


def test_moving_an_upstream_to_another_line_keeps_it(tmp_path: Path) -> None:
    proxy, path = started(tmp_path, BASE)
    old = proxy.policy
    assert old is not None
    path.write_text("# a comment first\n\n" + BASE)
    proxy.reload()
    assert proxy.policy is not None and proxy.policy.outbounds["proxy"] is old.outbounds["proxy"]


def test_process_rules_added_by_a_reload_get_a_process_resolver(tmp_path: Path) -> None:
    # Attribution off: then only a PROCESS rule makes a resolver.
    base = "log: {attribution: false}\n" + BASE
    proxy, path = started(tmp_path, base)
    assert proxy.policy is not None and proxy.policy.processes is None
    path.write_text(base.replace("  - MATCH", "  - PROCESS-NAME,curl,proxy\n  - MATCH"))
    proxy.reload()
    first = proxy.policy
    assert first is not None and isinstance(first.processes, ProcessResolver)
    path.write_text(base.replace("  - MATCH", "  - PROCESS-NAME,wget,REJECT\n  - MATCH"))
    proxy.reload()
    assert proxy.policy is not None and proxy.policy.processes is first.processes  # kept
    # Rules without process conditions: the resolver stays for a later reload, unused.
    path.write_text(base)
    proxy.reload()
    assert proxy.policy is not None and proxy.policy.processes is first.processes
    assert first.retired_by(proxy.policy).processes is None
    first.processes.close()


def test_attribution_makes_the_process_resolver_at_start(tmp_path: Path) -> None:
    proxy, _ = started(tmp_path, BASE)  # log.attribution is on by default
    assert proxy.policy is not None and isinstance(proxy.policy.processes, ProcessResolver)
    proxy.policy.processes.close()


def test_a_bad_file_keeps_the_old_policy_and_names_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, path = started(tmp_path, BASE)
    old = proxy.policy
    path.write_text(BASE + "  - DST-PORT,7,nowhere\n")
    with caplog.at_level(logging.ERROR, logger="tunproxy"):
        proxy.reload()
    assert proxy.policy is old
    (message,) = [r.getMessage() for r in caplog.records if "reload failed" in r.getMessage()]
    assert f"{path}:6:" in message and "nowhere" in message


def test_turning_dns_on_by_reload_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, path = started(tmp_path, BASE)
    old = proxy.policy
    path.write_text(DNS + BASE)
    with caplog.at_level(logging.ERROR, logger="tunproxy"):
        proxy.reload()
    assert proxy.policy is old
    assert any("needs a restart" in r.getMessage() for r in caplog.records)


def test_dns_kept_when_unchanged_rebuilt_with_its_fake_ips_when_changed(tmp_path: Path) -> None:
    async def body() -> None:
        proxy, path = started(tmp_path, DNS + BASE)
        old = proxy.policy
        assert old is not None and old.dns is not None
        fake = await old.dns.resolve("example.test")  # no upstream: []
        assert fake == []
        from tunproxy.dns.service import DnsService

        assert isinstance(old.dns, DnsService)
        address = old.dns.pool.address_for("kept.test", 4)
        assert address is not None
        path.write_text(DNS + BASE.replace("8080", "8081"))
        proxy.reload()
        assert proxy.policy is not None and proxy.policy.dns is old.dns  # dns section unchanged
        path.write_text(DNS.replace("ttl: 1", "ttl: 5") + BASE)
        proxy.reload()
        new = proxy.policy
        assert new is not None and isinstance(new.dns, DnsService)
        assert new.dns is not old.dns and new.dns.config.ttl == 5
        assert new.dns.pool is old.dns.pool and new.dns.realip is old.dns.realip
        assert new.dns.domain_for(address) == "kept.test"
        assert old.retired_by(new).dns is old.dns
        await old.dns.aclose()
        await new.dns.aclose()

    run(body)


def test_one_verdict_mapping_for_flows_and_resolvers(tmp_path: Path) -> None:
    async def body() -> None:
        text = BASE.replace("  - MATCH,DIRECT", "  - DST-PORT,1,REJECT\n  - DST-PORT,2,DROP\n"
                            "  - MATCH,DIRECT")  # fmt: skip
        proxy, _ = started(tmp_path, text)
        policy = proxy.policy
        assert policy is not None
        assert await decide(proxy, 1) == Refusal.RESET
        assert await decide(proxy, 1, UDP) == Refusal.UNREACHABLE
        assert await decide(proxy, 2) == Refusal.DROP
        assert await decide(proxy, 80) == "DIRECT"
        resolver = proxy._resolver_outbound
        assert isinstance(resolver("udp", Target(1, "192.0.2.1")), RejectOutbound)
        assert isinstance(resolver("tcp", Target(2, "192.0.2.1")), RejectOutbound)
        assert isinstance(resolver("tcp", Target(53, "192.0.2.1")), DirectOutbound)
        assert resolver("tcp", Target(8080, "192.0.2.1")) is policy.outbounds["proxy"]
        # A target no outbound exists for (cannot come from a loaded file): refused loudly.
        route = policy.route("ghost", True)
        assert route.outbound is None and route.refusal == Refusal.RESET

    run(body)


def test_reload_under_the_relay_swaps_its_policy(tmp_path: Path) -> None:
    async def body() -> None:
        proxy, path = started(tmp_path, WITH_SECOND)
        assert proxy.policy is not None
        lab = Lab.make(proxy.policy, proxy.config)
        proxy.relay = lab.relay
        path.write_text(BASE)
        proxy.reload()
        assert lab.relay.policy is proxy.policy
        assert "second" not in lab.relay.policy.outbounds
        await lab.settle()  # the retired outbound's close ran
        await lab.relay.aclose()

    run(body)


def test_tun_and_relay_changes_are_applied_at_the_next_start_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, path = started(tmp_path, BASE)
    path.write_text("relay: {connect-timeout: 2}\ntun: {mtu: 1400}\n" + BASE)
    with caplog.at_level(logging.WARNING, logger="tunproxy"):
        proxy.reload()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "tun section take effect at the next start" in warned
    assert "relay section take effect at the next start" in warned
    assert proxy.policy is not None and proxy.policy.config is not None
    assert proxy.policy.config.relay.connect_timeout == 2  # the policy has the new file
