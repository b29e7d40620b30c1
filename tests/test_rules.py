"""Rule lines: each type, its corner cases, first-match order, laziness, errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

import rules
from rules import FlowMeta, ProcessInfo, RuleError, RuleSource

UPSTREAMS = ("proxy", "other")


def compile_lines(
    lines: Sequence[str], sets: dict[str, rules.RuleSetData] | None = None
) -> rules.RuleSet:
    src = [RuleSource(text, "cfg.yaml", n) for n, text in enumerate(lines, 10)]
    return rules.compile(src, sets or {}, UPSTREAMS)


def flow(**kw: Any) -> FlowMeta:
    base: dict[str, Any] = dict(
        network="tcp",
        src_ip="10.0.0.2",
        src_port=40000,
        dst_ip="93.184.216.34",
        dst_port=443,
        domain=None,
    )
    base.update(kw)
    return FlowMeta(**base)


def target(rule: str, **kw: Any) -> str:
    """The verdict's target when ``rule`` (aimed at proxy) is followed by MATCH,DIRECT."""
    return compile_lines([rule, "MATCH,DIRECT"]).match(flow(**kw)).target


AD_REGEX = r"DOMAIN-REGEX,^ad[0-9]{1,3}\.example\.(com|net)$,proxy"

# (rule, flow, expected match)
CASES: list[tuple[str, dict[str, Any], bool]] = [
    # DOMAIN: exact, case-insensitive, trailing dot ignored on both sides, IDN as punycode
    ("DOMAIN,example.com,proxy", {"domain": "example.com"}, True),
    ("DOMAIN,example.com,proxy", {"domain": "EXAMPLE.Com."}, True),
    ("DOMAIN,Example.COM.,proxy", {"domain": "example.com"}, True),
    ("DOMAIN,example.com,proxy", {"domain": "www.example.com"}, False),
    ("DOMAIN,example.com,proxy", {"domain": None}, False),
    ("DOMAIN,bücher.de,proxy", {"domain": "xn--bcher-kva.de"}, True),
    ("DOMAIN,xn--bcher-kva.de,proxy", {"domain": "BÜCHER.de"}, True),
    # DOMAIN-SUFFIX: itself and subdomains, on label boundaries only
    ("DOMAIN-SUFFIX,example.com,proxy", {"domain": "example.com"}, True),
    ("DOMAIN-SUFFIX,example.com,proxy", {"domain": "a.b.example.com"}, True),
    ("DOMAIN-SUFFIX,example.com,proxy", {"domain": "badexample.com"}, False),
    ("DOMAIN-SUFFIX,example.com,proxy", {"domain": "example.com.evil"}, False),
    ("DOMAIN-SUFFIX,COM,proxy", {"domain": "x.com."}, True),
    # DOMAIN-KEYWORD: substring anywhere
    ("DOMAIN-KEYWORD,goog,proxy", {"domain": "www.google.com"}, True),
    ("DOMAIN-KEYWORD,GOOG,proxy", {"domain": "notgogle.com"}, False),
    ("DOMAIN-KEYWORD,e.co,proxy", {"domain": "google.com"}, True),
    # DOMAIN-REGEX: search semantics, commas allowed in the pattern
    (AD_REGEX, {"domain": "ad12.example.net"}, True),
    (AD_REGEX, {"domain": "ad1234.example.net"}, False),
    (r"DOMAIN-REGEX,cdn,proxy", {"domain": "x.cdn.y"}, True),
    # IP-CIDR / IP-CIDR6: a v4-mapped flow address is IPv4; a v4-mapped CIDR stays IPv6
    # and so, as in mihomo (netip.Prefix.Contains), matches no flow
    ("IP-CIDR,93.184.216.0/24,proxy", {}, True),
    ("IP-CIDR,93.184.217.0/24,proxy", {}, False),
    ("IP-CIDR,93.184.216.34/32,proxy", {"dst_ip": "::ffff:93.184.216.34"}, True),
    ("IP-CIDR6,::ffff:93.184.216.0/120,proxy", {}, False),
    ("IP-CIDR6,::ffff:93.184.216.0/120,proxy", {"dst_ip": "::ffff:93.184.216.34"}, False),
    ("IP-CIDR,93.184.216.34/24,proxy", {}, True),  # host bits masked, as mihomo does
    ("IP-CIDR6,2001:db8::/32,proxy", {"dst_ip": "2001:db8:1::5"}, True),
    ("IP-CIDR6,2001:db8::/32,proxy", {"dst_ip": "2001:db9::5"}, False),
    ("IP-CIDR,0.0.0.0/0,proxy", {"dst_ip": "2001:db8::1"}, False),  # families stay apart
    ("IP-CIDR6,::/0,proxy", {"dst_ip": "1.2.3.4"}, False),
    ("IP-CIDR,10.0.0.0/8,proxy,src", {"dst_ip": "1.1.1.1"}, True),  # src option
    # SRC-IP-CIDR
    ("SRC-IP-CIDR,10.0.0.0/24,proxy", {}, True),
    ("SRC-IP-CIDR,10.0.1.0/24,proxy", {}, False),
    ("SRC-IP-CIDR,fd00::/8,proxy", {"src_ip": "fd00::2"}, True),
    # ports: single, range, list
    ("DST-PORT,443,proxy", {}, True),
    ("DST-PORT,80,proxy", {}, False),
    ("DST-PORT,400-500,proxy", {}, True),
    ("DST-PORT,80/8000-8080/443,proxy", {}, True),
    ("DST-PORT,80/8000-8080,proxy", {"dst_port": 8080}, True),
    ("DST-PORT,80/8000-8080,proxy", {"dst_port": 8081}, False),
    ("SRC-PORT,40000,proxy", {}, True),
    ("SRC-PORT,1-39999,proxy", {}, False),
    # NETWORK
    ("NETWORK,udp,proxy", {"network": "udp"}, True),
    ("NETWORK,UDP,proxy", {"network": "tcp"}, False),
    # logic: nested, in Clash's parenthesised form
    ("AND,((DOMAIN,a.com),(NETWORK,udp)),proxy", {"domain": "a.com", "network": "udp"}, True),
    ("AND,((DOMAIN,a.com),(NETWORK,udp)),proxy", {"domain": "a.com"}, False),
    ("OR,((DOMAIN,a.com),(DST-PORT,443)),proxy", {"domain": "b.com"}, True),
    ("OR,((DOMAIN,a.com),(DST-PORT,80)),proxy", {"domain": "b.com"}, False),
    ("NOT,((DOMAIN-SUFFIX,a.com)),proxy", {"domain": "b.com"}, True),
    ("NOT,((DOMAIN-SUFFIX,a.com)),proxy", {"domain": "x.a.com"}, False),
    (
        "AND,((OR,((DOMAIN,a.com),(DOMAIN,b.com))),(NOT,((NETWORK,udp)))),proxy",
        {"domain": "b.com"},
        True,
    ),
    (
        "AND,((OR,((DOMAIN,a.com),(DOMAIN,b.com))),(NOT,((NETWORK,udp)))),proxy",
        {"domain": "b.com", "network": "udp"},
        False,
    ),
    ("AND,((IP-CIDR,93.184.0.0/16,no-resolve),(DST-PORT,400-500)),proxy", {}, True),
    (r"AND,((DOMAIN-REGEX,^a{1,2}\.com$),(NETWORK,tcp)),proxy", {"domain": "aa.com"}, True),
    ("NOT,((IP-CIDR,1.0.0.0/8)),proxy", {"dst_ip": None, "domain": "x.org"}, True),
]


@pytest.mark.parametrize(("rule", "kw", "matches"), CASES)
def test_rule_types(rule: str, kw: dict[str, Any], matches: bool) -> None:
    assert target(rule, **kw) == ("proxy" if matches else "DIRECT")


def test_verdict_names_rule_file_and_line() -> None:
    rs = compile_lines(["DOMAIN,a.com,REJECT", "DOMAIN-SUFFIX,b.com,proxy", "MATCH,other"])
    v = rs.match(flow(domain="x.b.com"))
    assert v.target == "proxy"
    assert v.rule == RuleSource("DOMAIN-SUFFIX,b.com,proxy", "cfg.yaml", 11)
    assert v.rule_set_entry is None
    assert "cfg.yaml:11" in v.explain()
    m = rs.match(flow(domain="nothing.org"))
    assert (m.target, m.rule) == ("other", RuleSource("MATCH,other", "cfg.yaml", 12))


def test_default_is_direct_without_match() -> None:
    rs = compile_lines(["DOMAIN,a.com,proxy"])
    v = rs.match(flow(domain="b.com"))
    assert v.target == "DIRECT"
    assert v.rule is None
    assert "default" in v.explain()


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("REJECT", "REJECT"),
        ("DROP", "DROP"),
        ("REJECT-DROP", "DROP"),
        ("DIRECT", "DIRECT"),
        ("other", "other"),
    ],
)
def test_targets(written: str, canonical: str) -> None:
    assert compile_lines([f"MATCH,{written}"]).match(flow()).target == canonical


def test_first_match_wins_across_kinds() -> None:
    """Rules of different kinds are indexed apart; order still decides."""
    lines = [
        "DST-PORT,8443,REJECT",
        "IP-CIDR,93.184.216.0/24,other,no-resolve",
        "DOMAIN-SUFFIX,example.com,proxy",
        "DOMAIN,www.example.com,DIRECT",
        "DOMAIN-KEYWORD,exam,REJECT",
        "MATCH,DROP",
    ]
    rs = compile_lines(lines)
    assert rs.match(flow(domain="www.example.com", dst_port=8443)).target == "REJECT"
    assert rs.match(flow(domain="www.example.com")).target == "other"
    assert rs.match(flow(domain="www.example.com", dst_ip="1.1.1.1")).target == "proxy"
    assert rs.match(flow(domain="examples.org", dst_ip="1.1.1.1")).target == "REJECT"
    assert rs.match(flow(domain="nothing.org", dst_ip="1.1.1.1")).target == "DROP"


def test_same_key_twice_first_wins() -> None:
    rs = compile_lines(["DOMAIN,a.com,proxy", "DOMAIN,a.com,other", "DOMAIN-SUFFIX,a.com,REJECT"])
    v = rs.match(flow(domain="a.com"))
    assert (v.target, v.rule.line) == ("proxy", 10)  # type: ignore[union-attr]


def test_rules_after_match_are_unreachable_but_checked() -> None:
    rs = compile_lines(["MATCH,proxy", "DOMAIN,a.com,DIRECT"])
    assert rs.match(flow(domain="a.com")).target == "proxy"
    with pytest.raises(RuleError):
        compile_lines(["MATCH,proxy", "DOMAIN,a.com,nowhere"])


# --- process rules: lazy, at most once, only when reached ------------------------------------


def counting(info: ProcessInfo | None) -> tuple[Callable[[], ProcessInfo | None], list[int]]:
    calls = [0]

    def get() -> ProcessInfo | None:
        calls[0] += 1
        return info

    return get, calls


CURL = ProcessInfo(pid=42, name="curl", path="/usr/bin/curl", uid=1000)


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        ("PROCESS-NAME,curl,proxy", True),
        ("PROCESS-NAME,CURL,proxy", True),  # mihomo compares with EqualFold
        ("PROCESS-NAME,wget,proxy", False),
        ("PROCESS-PATH,/usr/bin/curl,proxy", True),
        ("PROCESS-PATH,/bin/curl,proxy", False),
        ("UID,1000,proxy", True),
        ("UID,0/500-999,proxy", False),
        ("UID,1000-1999,proxy", True),
        ("AND,((PROCESS-NAME,curl),(UID,1000)),proxy", True),
        ("NOT,((PROCESS-NAME,curl)),proxy", False),
    ],
)
def test_process_rules(rule: str, matches: bool) -> None:
    get, calls = counting(CURL)
    rs = compile_lines([rule, "PROCESS-NAME,never,DIRECT", "MATCH,DIRECT"])
    assert rs.needs_process
    assert rs.match(flow(process=get)).target == ("proxy" if matches else "DIRECT")
    assert calls[0] == 1


def test_process_unknown_never_matches() -> None:
    get, calls = counting(None)
    rs = compile_lines(["PROCESS-NAME,curl,proxy", "UID,0,other", "MATCH,DIRECT"])
    assert rs.match(flow(process=get)).target == "DIRECT"
    assert calls[0] == 1
    assert rs.match(flow(process=None)).target == "DIRECT"


def test_process_not_looked_up_when_an_earlier_rule_matches() -> None:
    rs = compile_lines(
        [
            "DOMAIN-SUFFIX,a.com,REJECT",
            "AND,((NETWORK,tcp),(PROCESS-NAME,curl)),proxy",
            "PROCESS-PATH,/usr/bin/curl,other",
            "MATCH,DIRECT",
        ]
    )
    get, calls = counting(CURL)
    assert rs.match(flow(domain="x.a.com", process=get)).target == "REJECT"
    assert calls[0] == 0
    assert rs.match(flow(domain="b.com", process=get)).target == "proxy"
    assert calls[0] == 1


def test_needs_process_only_if_reachable() -> None:
    assert not compile_lines(["DOMAIN,a.com,proxy", "MATCH,DIRECT"]).needs_process
    assert not compile_lines(["MATCH,DIRECT", "PROCESS-NAME,curl,proxy"]).needs_process
    assert compile_lines(["OR,((DOMAIN,a.com),(UID,0)),proxy"]).needs_process


# --- IP rules on domain-only flows (fake-ip): no-resolve and resolution -------------------------


def resolver(ips: list[str]) -> tuple[Callable[[], list[str]], list[int]]:
    calls = [0]

    def get() -> list[str]:
        calls[0] += 1
        return ips

    return get, calls


def test_no_resolve_skips_domain_only_flows() -> None:
    rs = compile_lines(["IP-CIDR,1.0.0.0/8,proxy,no-resolve", "MATCH,DIRECT"])
    get, calls = resolver(["1.2.3.4"])
    assert not rs.needs_resolve
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "DIRECT"
    assert calls[0] == 0


def test_ip_rule_resolves_domain_when_reached() -> None:
    rs = compile_lines(["DOMAIN,early.com,other", "IP-CIDR,1.0.0.0/8,proxy", "MATCH,DIRECT"])
    assert rs.needs_resolve
    # Of several addresses the rules see one: the first IPv4 one (mihomo: a random IPv4 one).
    get, calls = resolver(["2001:db8::1", "1.2.3.4", "9.9.9.9"])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "proxy"
    assert calls[0] == 1
    get, _ = resolver(["9.9.9.9", "1.2.3.4"])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "DIRECT"
    get, calls = resolver(["1.2.3.4"])
    assert rs.match(flow(dst_ip=None, domain="early.com", resolved_ips=get)).target == "other"
    assert calls[0] == 0  # an earlier rule matched: never resolved
    # A flow with an address never resolves.
    get, calls = resolver(["9.9.9.9"])
    assert rs.match(flow(dst_ip="1.1.1.1", domain="a.com", resolved_ips=get)).target == "proxy"
    assert calls[0] == 0


def test_no_resolve_rules_after_resolution_see_the_address() -> None:
    """mihomo: once an IP rule resolved the domain, later no-resolve rules match it too;
    earlier no-resolve rules never saw an address."""
    rs = compile_lines(
        [
            "IP-CIDR,1.2.3.0/24,REJECT,no-resolve",
            "IP-CIDR,8.8.8.8/32,other",
            "IP-CIDR,1.2.0.0/16,proxy,no-resolve",
            "MATCH,DIRECT",
        ]
    )
    get, _ = resolver(["1.2.3.4"])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "proxy"


def test_resolution_failure_means_no_ip_match() -> None:
    rs = compile_lines(["IP-CIDR,1.0.0.0/8,proxy", "MATCH,DIRECT"])
    get, calls = resolver([])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "DIRECT"
    assert calls[0] == 1
    assert rs.match(flow(dst_ip=None, domain="a.com")).target == "DIRECT"


def test_resolved_ipv6_and_mapped() -> None:
    rs = compile_lines(["IP-CIDR6,2001:db8::/32,proxy", "IP-CIDR,5.0.0.0/8,other", "MATCH,DIRECT"])
    get, _ = resolver(["2001:db8::1"])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "proxy"
    get, _ = resolver(["::ffff:5.6.7.8"])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "other"


def test_logic_rule_with_ip_resolves() -> None:
    rs = compile_lines(["AND,((IP-CIDR,1.0.0.0/8),(DST-PORT,443)),proxy", "MATCH,DIRECT"])
    assert rs.needs_resolve
    get, calls = resolver(["1.1.1.1"])
    assert rs.match(flow(dst_ip=None, domain="a.com", resolved_ips=get)).target == "proxy"
    assert calls[0] == 1


# --- errors: file and line --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("URL-REGEX,^http://x,DIRECT", "unknown rule type"),
        ("DOMAIN,a.com", "needs"),
        ("DOMAIN,a.com,nowhere", "unknown target"),
        ("DOMAIN,,proxy", "needs a value"),
        ("DOMAIN,a b.com,proxy", "not a domain"),
        ("DOMAIN,a..com,proxy", "not a domain"),
        ("DOMAIN-SUFFIX,-a.com,proxy", "not a domain"),
        ("IP-CIDR,1.2.3.0/33,proxy", "not an IP CIDR"),
        ("IP-CIDR,example.com,proxy", "not an IP CIDR"),
        ("DST-PORT,70000,proxy", "out of"),
        ("DST-PORT,90-80,proxy", "reversed"),
        ("DST-PORT,http,proxy", "not a port"),
        ("SRC-PORT,1-,proxy", "not a port"),
        ("NETWORK,icmp,proxy", "tcp or udp"),
        ("UID,root,proxy", "not a uid"),
        ("DOMAIN-REGEX,(unclosed,proxy", "bad regex"),
        ("AND,(DOMAIN,a.com),proxy", "between sub-rules"),
        ("AND,((DOMAIN,a.com),(NETWORK,udp),proxy", "unbalanced"),
        ("NOT,((DOMAIN,a.com),(DOMAIN,b.com)),proxy", "exactly one"),
        ("AND,((DOMAIN,a.com),(MATCH)),proxy", "MATCH cannot"),
        ("AND,((FOO,a.com)),proxy", "unknown rule type"),
        ("AND,((DOMAIN,a.com)) junk,proxy", "logic payload"),
        ("RULE-SET,missing,proxy", "unknown rule set"),
        ("MATCH,proxy,extra", "exactly one"),
        ("MATCH,", "empty target"),
    ],
)
def test_errors_name_file_and_line(line: str, problem: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_lines(["DOMAIN,fine.com,proxy", line])
    err = info.value
    assert (err.file, err.line) == ("cfg.yaml", 11)
    assert problem in err.message
    assert str(err) == f"cfg.yaml:11: {err.message}"


def test_needs_resolve_for_a_flow() -> None:
    rs = compile_lines(
        [
            "DOMAIN-SUFFIX,early.com,other",
            "PROCESS-NAME,curl,REJECT",
            "IP-CIDR,1.0.0.0/8,proxy",
            "MATCH,DIRECT",
        ]
    )
    get, calls = counting(None)
    early = flow(dst_ip=None, domain="x.early.com", process=get)
    assert not rs.needs_resolve_for(early)
    assert calls[0] == 0
    late = flow(dst_ip=None, domain="late.org", process=get)
    assert rs.needs_resolve_for(late)
    assert calls[0] == 1
    late.resolved_ips = lambda: ["1.2.3.4"]
    assert rs.match(late).target == "proxy"
    assert calls[0] == 1  # the process lookup was remembered, not repeated
    assert not rs.needs_resolve_for(flow(dst_ip="1.2.3.4", domain="late.org"))
    curl = flow(dst_ip=None, domain="late.org", process=lambda: CURL)
    assert not rs.needs_resolve_for(curl)  # PROCESS-NAME matches first
