"""Verdicts that agree with mihomo's, item by item (each names the mihomo code it follows)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import rules
from rules import FlowMeta, RuleSource
from tests.test_dns_service import ZONE, Clock, StubResolver, Zone, ask, no_outbound
from tunproxy.config import load_config
from tunproxy.dns.service import DnsService


def compile_lines(lines: list[str], sets: dict[str, rules.RuleSetData] | None = None,
                  **kw: object) -> rules.RuleSet:
    return rules.compile([RuleSource(t, "c.yaml", i) for i, t in enumerate(lines, 1)],
                         sets or {}, ["proxy", "tcp-only"], **kw)  # type: ignore[arg-type]


def flow(network: str = "tcp", src: str = "10.0.0.2", sport: int = 40000,
         dst: str | None = "9.9.9.9", dport: int = 443, domain: str | None = None,
         resolved: list[str] | None = None) -> FlowMeta:
    return FlowMeta(network, src, sport, dst, dport, domain,
                    resolved_ips=(lambda: resolved) if resolved is not None else None)


def test_one_resolved_address_ipv4_first() -> None:
    # mihomo ResolveIP: an IPv4 address when there is one (tunnel.match sets DstIP to it).
    rs = compile_lines(["IP-CIDR6,2001:db8::/32,REJECT", "IP-CIDR,1.0.0.0/8,proxy"])
    f = flow(dst=None, domain="a.com", resolved=["2001:db8::1", "1.2.3.4"])
    assert rs.match(f).target == "proxy"
    f = flow(dst=None, domain="a.com", resolved=["2001:db8::1"])
    assert rs.match(f).target == "REJECT"


def test_v4_mapped_cidr_matches_nothing() -> None:
    rs = compile_lines(["IP-CIDR6,::ffff:1.2.3.0/120,REJECT", "IP-CIDR,1.2.3.0/24,proxy"])
    assert rs.match(flow(dst="1.2.3.4")).target == "proxy"
    assert rs.match(flow(dst="::ffff:1.2.3.4")).target == "proxy"


def test_rule_set_src_swaps_addresses_and_ports() -> None:
    cls = rules.parse_rule_set("cls", "DST-PORT,40000\nSRC-IP-CIDR,9.9.9.0/24\n",
                               behavior="classical", format="text", file="cls.list")
    rs = compile_lines(["RULE-SET,cls,REJECT,src"], {"cls": cls})
    # Swapped: DST-PORT sees the source port 40000.
    v = rs.match(flow(dport=443, sport=40000, dst="8.8.8.8"))
    assert v.target == "REJECT" and v.rule_set_entry is not None
    assert v.rule_set_entry.startswith("DST-PORT,40000")
    # SRC-IP-CIDR sees the destination address.
    v = rs.match(flow(sport=1, dst="9.9.9.9"))
    assert v.rule_set_entry is not None and v.rule_set_entry.startswith("SRC-IP-CIDR")
    assert rs.match(flow(sport=1, dst="8.8.8.8")).target == "DIRECT"


def test_domain_set_entries_like_mihomos_trie() -> None:
    data = rules.parse_rule_set("d", "+.*.x.com\ntrailing.example.\nbücher.example\n",
                                behavior="domain", format="text", file="d.list")
    assert data.entries == ("+.*.x.com",)
    assert len(data.skipped) == 2
    rs = compile_lines(["RULE-SET,d,REJECT"], {"d": data})
    for domain, hit in [("a.x.com", True), ("b.a.x.com", True), ("x.com", False)]:
        assert (rs.match(flow(domain=domain)).target == "REJECT") is hit, domain


def test_idn_keyword_meets_punycode_hosts() -> None:
    # mihomo: idna.ToASCII(strings.ToLower(keyword)).
    rs = compile_lines(["DOMAIN-KEYWORD,bücher,REJECT"])
    assert rs.match(flow(domain="www.xn--bcher-kva.example")).target == "REJECT"


def test_udp_skips_rules_whose_upstream_has_no_udp() -> None:
    # mihomo tunnel.match: "UDP is not supported" -> continue with the next rule; an IP
    # rule skipped that way has still resolved the domain for the rules after it.
    rs = compile_lines(["IP-CIDR,1.0.0.0/8,tcp-only", "IP-CIDR,1.2.3.0/24,REJECT,no-resolve",
                        "MATCH,proxy"], no_udp=["tcp-only"])
    f = flow(dst=None, domain="a.com", resolved=["1.2.3.4"])
    assert rs.match(f).target == "tcp-only"
    f = flow("udp", dst=None, domain="a.com", resolved=["1.2.3.4"])
    assert rs.needs_resolve_for(f)
    v = rs.match(f)
    assert (v.target, v.rule and v.rule.line) == ("REJECT", 2)


def test_config_skips_upstreams_without_udp(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("upstreams:\n  t: {type: socks5, server: '127.0.0.1:1080', udp: false}\n"
                   "rules:\n  - DST-PORT,53,t\n  - MATCH,DIRECT\n")
    rs = load_config(cfg).ruleset
    assert rs.match(flow(dport=53)).target == "t"
    assert rs.match(flow("udp", dport=53)).target == "DIRECT"


def test_fake_ip_filter_rule_set_entries(tmp_path: Path) -> None:
    (tmp_path / "lan.list").write_text("+.test\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "rule-sets:\n  lan: {path: lan.list, behavior: domain}\n"
        "dns:\n  servers: ['udp://192.0.2.53']\n"
        "  fake-ip-filter: ['rule-set:lan']\n"
        "rules:\n  - MATCH,DIRECT\n"
    )
    config = load_config(cfg)
    match = config.dns.fake_ip_filter_match
    assert match is not None and match("lan.test") and not match("example.com")
    svc = DnsService(config.dns, no_outbound, clock=Clock(), resolvers=[StubResolver(Zone(ZONE))])
    filtered = asyncio.run(ask(svc, "lan.test"))
    assert [str(rr.rdata) for rr in filtered.rr] == ["192.168.1.20"]  # a real answer
    other = asyncio.run(ask(svc, "example.org"))
    assert str(other.rr[0].rdata).startswith("198.18.")  # not filtered: a fake address
