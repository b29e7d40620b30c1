"""Rule-provider files (tests/data/rules/) in both formats, and loading them from a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import rules
from rules import FlowMeta, RuleError, RuleSource
from tunproxy.errors import ConfigError
from tunproxy.ruleload import load_rules

DATA = Path(__file__).parent / "data" / "rules"


def load(name: str, behavior: str, fmt: str) -> rules.RuleSetData:
    path = DATA / name
    return rules.parse_rule_set(
        path.stem, path.read_text(), behavior=behavior, format=fmt, file=str(path)
    )


def flow(**kw: Any) -> FlowMeta:
    base: dict[str, Any] = dict(
        network="tcp", src_ip="192.0.2.2", src_port=40000, dst_ip=None, dst_port=443, domain=None
    )
    base.update(kw)
    return FlowMeta(**base)


def one_set(data: rules.RuleSetData, option: str = "") -> rules.RuleSet:
    lines = [
        RuleSource(f"RULE-SET,s,REJECT{option}", "cfg.yaml", 7),
        RuleSource("MATCH,DIRECT", "cfg.yaml", 8),
    ]
    return rules.compile(lines, {"s": data}, ())


# --- domain behaviour ----------------------------------------------------------------------

DOMAIN_CASES = [
    ("doubleclick.net", True),  # +. : the domain itself
    ("ad.g.doubleclick.net", True),  # +. : and every subdomain
    ("notdoubleclick.net", False),
    ("tracking.example", False),  # .  : not the domain itself
    ("a.b.tracking.example", True),  # .  : any subdomain
    ("cdn.example", False),  # *. : not itself
    ("img.cdn.example", True),  # *. : one more label
    ("a.img.cdn.example", False),  # *. : not two
    ("ads.example.org", True),  # plain: exactly
    ("x.ads.example.org", False),
    ("ad.eu.example.com", True),  # middle '*': one label
    ("ad.example.com", False),
    ("ad.a.b.example.com", False),
    # An IDN entry and a trailing-dot entry are skipped (mihomo keeps the first, which then
    # never meets a punycode host, and refuses the second).
    ("xn--mnchen-ads-9db.de", False),
    ("www.MÜNCHEN-ADS.de.", False),
    ("trailingdot.example", False),
    ("AD.EU.example.COM.", True),  # a query in any case, with a trailing dot
]


@pytest.mark.parametrize(("fixture", "fmt"), [("reject.yaml", "yaml"), ("reject.txt", "text")])
@pytest.mark.parametrize(("domain", "matches"), DOMAIN_CASES)
def test_domain_set(fixture: str, fmt: str, domain: str, matches: bool) -> None:
    rs = one_set(load(fixture, "domain", fmt))
    assert rs.match(flow(domain=domain)).target == ("REJECT" if matches else "DIRECT")


def test_domain_set_entry_and_line_in_verdict() -> None:
    data = load("reject.yaml", "domain", "yaml")
    assert len(data) == 6
    assert [why.split(":")[0] for _, why in data.skipped] == [
        "+.münchen-ads.de", "+.TrailingDot.Example."]
    v = one_set(data).match(flow(domain="x.tracking.example"))
    assert v.rule == RuleSource("RULE-SET,s,REJECT", "cfg.yaml", 7)
    assert v.rule_set_entry == f".tracking.example ({DATA / 'reject.yaml'}:5)"
    text = load("reject.txt", "domain", "text")
    v = one_set(text).match(flow(domain="x.tracking.example"))
    assert v.rule_set_entry == f".tracking.example ({DATA / 'reject.txt'}:4)"


def test_yaml_and_text_formats_agree() -> None:
    y = load("reject.yaml", "domain", "yaml")
    t = load("reject.txt", "domain", "text")
    assert y.parsed == t.parsed
    assert (
        load("apps.yaml", "classical", "yaml").parsed
        == load("apps.list", "classical", "text").parsed
    )


def test_yaml_shapes_the_fast_reader_leaves_to_yaml() -> None:
    """Flow lists, anchors and escapes go through the YAML parser, with the same lines."""
    text = 'payload: ["+.a.com",\n  "b.com"]\n'
    d = rules.parse_rule_set("x", text, behavior="domain", format="yaml", file="x.yaml")
    assert d.entries == ("+.a.com", "b.com")
    assert d.lines == (1, 2)
    text = 'other: 1\npayload:\n  - "c\\u002ecom"\n'
    d = rules.parse_rule_set("x", text, behavior="domain", format="yaml", file="x.yaml")
    assert d.entries == ("c.com",)
    assert d.lines == (3,)
    empty = rules.parse_rule_set("x", "payload:\n", behavior="domain", format="yaml", file="x")
    assert len(empty) == 0


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("payload:\n  - 'bad domain'\n  - 'a/b'\n", 2, "no usable domain entry (2 bad"),
        ("payload: nope\n", 1, "must be a list"),
        ("- a.com\n", 1, "mapping"),
        ("entries:\n  - a.com\n", 1, "no 'payload:'"),
        ("payload:\n  - [a.com]\n", 2, "not a string"),
        ("payload:\n  - 'a.com\n", 3, "bad YAML"),  # where the parser noticed
    ],
)
def test_bad_yaml_sets(text: str, line: int, problem: str) -> None:
    with pytest.raises(RuleError) as info:
        rules.parse_rule_set("x", text, behavior="domain", format="yaml", file="x.yaml")
    assert (info.value.file, info.value.line) == ("x.yaml", line)
    assert problem in info.value.message


def test_bad_behavior_and_format() -> None:
    with pytest.raises(RuleError, match="behavior"):
        rules.parse_rule_set("x", "", behavior="geosite", format="text", file="x")
    with pytest.raises(RuleError, match="format"):
        rules.parse_rule_set("x", "", behavior="domain", format="json", file="x")


# --- ipcidr behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "matches"),
    [
        ("10.1.2.3", True),
        ("172.31.255.255", True),
        ("172.32.0.0", False),
        ("::ffff:192.168.1.1", True),
        ("fd12::1", True),
        ("fe80::1", False),
        ("100.64.0.1", False),  # a v4-mapped entry matches nothing, as in mihomo
        ("100.128.0.1", False),
        ("8.8.8.8", False),
    ],
)
def test_ipcidr_set(ip: str, matches: bool) -> None:
    rs = one_set(load("lan.yaml", "ipcidr", "yaml"))
    assert rs.match(flow(dst_ip=ip)).target == ("REJECT" if matches else "DIRECT")


def test_ipcidr_text_and_src_option() -> None:
    data = load("cn.txt", "ipcidr", "text")
    assert data.lines == (2, 3, 4)
    assert one_set(data).match(flow(dst_ip="1.0.3.9")).target == "REJECT"
    assert one_set(data).match(flow(dst_ip="2001:251::1")).target == "REJECT"
    src = one_set(data, ",src")
    assert src.match(flow(dst_ip="1.0.1.1")).target == "DIRECT"
    assert src.match(flow(dst_ip="8.8.8.8", src_ip="1.0.1.1")).target == "REJECT"


def test_ipcidr_set_resolves_unless_no_resolve() -> None:
    data = load("cn.txt", "ipcidr", "text")
    assert one_set(data).needs_resolve
    assert not one_set(data, ",no-resolve").needs_resolve
    f = flow(domain="a.cn", resolved_ips=lambda: ["1.0.1.7"])
    assert one_set(data).match(f).target == "REJECT"
    assert one_set(data, ",no-resolve").match(f).target == "DIRECT"


def test_bad_ipcidr_entry_is_skipped_with_its_line() -> None:
    data = load("bad_entry.yaml", "ipcidr", "yaml")
    assert data.entries == ("10.0.0.0/8",)
    assert [line for line, _ in data.skipped] == [3]


# --- classical behaviour -------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["apps.yaml", "apps.list"])
def test_classical_set(fixture: str) -> None:
    fmt = "yaml" if fixture.endswith(".yaml") else "text"
    data = load(fixture, "classical", fmt)
    rs = one_set(data)
    assert rs.needs_process
    assert rs.match(flow(domain="cdn.steamcontent.com")).target == "REJECT"
    assert rs.match(flow(domain="my-torrents.org")).target == "REJECT"
    assert rs.match(flow(dst_ip="91.108.5.1")).target == "REJECT"
    assert rs.match(flow(dst_ip="1.1.1.1", network="udp", dst_port=27020)).target == "REJECT"
    assert rs.match(flow(dst_ip="1.1.1.1", network="udp", dst_port=27031)).target == "DIRECT"
    qb = rules.ProcessInfo(1, "qbittorrent", "/usr/bin/qbittorrent", 1000)
    v = rs.match(flow(dst_ip="1.1.1.1", process=lambda: qb))
    assert v.target == "REJECT"
    assert v.rule_set_entry is not None and v.rule_set_entry.startswith("PROCESS-NAME,qbittorrent")
    # Entries have no target: the RULE-SET line's is used; a field after the value is an
    # option, ignored unless it is one the rule type knows (as mihomo reads it).
    data = rules.parse_rule_set(
        "x",
        "DOMAIN,a.com\nDOMAIN,b.com,DIRECT\n",
        behavior="classical",
        format="text",
        file="c.list",
    )
    assert data.entries == ("DOMAIN,a.com", "DOMAIN,b.com,DIRECT")
    assert one_set(data).match(flow(domain="b.com")).target == "REJECT"


def test_rule_set_inside_logic_rule() -> None:
    data = load("reject.yaml", "domain", "yaml")
    lines = [
        RuleSource("AND,((RULE-SET,ads),(NETWORK,udp)),REJECT", "cfg.yaml", 1),
        RuleSource("NOT,((RULE-SET,ads)),proxy", "cfg.yaml", 2),
    ]
    rs = rules.compile(lines, {"ads": data}, ["proxy"])
    assert rs.match(flow(domain="doubleclick.net", network="udp")).target == "REJECT"
    assert rs.match(flow(domain="doubleclick.net")).target == "DIRECT"
    assert rs.match(flow(domain="example.net")).target == "proxy"


def test_large_set_is_indexed() -> None:
    """20k entries (in packed tables): a hit on the last entry names the set, or the entry with
    its text and line when the entries are kept (tunproxy explain)."""
    text = "\n".join(f"+.d{i}.example" for i in range(20000))
    data = rules.parse_rule_set("big", text, behavior="domain", format="text", file="big.txt")
    v = one_set(data).match(flow(domain="www.d19999.example"))
    assert v.rule_set_entry == "an entry of big (big.txt; tunproxy explain names it)"
    assert one_set(data).match(flow(domain="d19999.example.com")).target == "DIRECT"
    kept = rules.compile([RuleSource("RULE-SET,big,REJECT", "cfg.yaml", 7)], {"big": data}, (),
                         keep_entries=True)
    v = kept.match(flow(domain="www.d19999.example"))
    assert v.rule_set_entry == "+.d19999.example (big.txt:20000)"


# --- loading through ruleload (the config's rule-sets: section) -----------------------------


def settings(**kw: Any) -> dict[str, Any]:
    return {"__file__": str(DATA / "config.yaml"), "__line__": 7, **kw}


def test_load_rules_from_files() -> None:
    sets = {
        "reject": settings(path="reject.yaml", behavior="domain"),
        "lan": settings(path="lan.yaml", behavior="ipcidr"),
        "cn": settings(path="cn.txt", behavior="ipcidr", format="text"),
        "apps": settings(path="apps.list", behavior="classical"),  # format from the name
    }
    lines = [
        RuleSource(t, "config.yaml", n)
        for n, t in enumerate(
            [
                "RULE-SET,reject,REJECT",
                "RULE-SET,lan,DIRECT,no-resolve",
                "RULE-SET,apps,DIRECT",
                "RULE-SET,cn,DIRECT",
                "MATCH,proxy",
            ],
            20,
        )
    ]
    rs = load_rules(lines, sets, DATA, {"proxy"})
    assert rs.match(flow(domain="x.doubleclick.net")).target == "REJECT"
    assert rs.match(flow(dst_ip="10.0.0.1")).target == "DIRECT"
    assert rs.match(flow(dst_ip="8.8.8.8")).target == "proxy"
    v = rs.match(flow(dst_ip="1.0.1.1"))
    assert v.rule == lines[3]
    assert v.rule_set_entry == f"1.0.1.0/24 ({DATA / 'cn.txt'}:2)"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"path": "missing.yaml", "behavior": "domain"}, "cannot read"),
        ({"behavior": "domain"}, "needs 'path:'"),
        ({"path": "reject.yaml", "behavior": "geoip"}, "behavior"),
        ({"path": "reject.yaml", "behavior": "domain", "format": "json"}, "format"),
        ({"path": "reject.yaml", "behavior": "domain", "type": "ftp"}, "not supported"),
        ({"behavior": "domain", "type": "http", "url": "ftp://x"}, "needs 'url:'"),
        ({"behavior": "domain", "type": "inline"}, "needs a 'payload:'"),
        ({"path": "reject.yaml", "behavior": "domain", "urls": "x"}, "unknown setting"),
    ],
)
def test_bad_rule_set_settings_point_at_config(entry: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_rules([], {"s": settings(**entry)}, DATA, ())
    assert (info.value.file, info.value.line) == (str(DATA / "config.yaml"), 7)
    assert problem in info.value.message


def test_bad_entry_is_skipped_with_a_warning_naming_file_and_line() -> None:
    warnings: list[str] = []
    lines = [RuleSource("RULE-SET,s,REJECT", "config.yaml", 3)]
    rs = load_rules(lines, {"s": settings(path="bad_entry.yaml", behavior="ipcidr")}, DATA, (),
                    warnings)
    assert warnings == [
        f"{DATA / 'bad_entry.yaml'}:3: rule set s: entry skipped: 10.0.0.0/33: "
        "'10.0.0.0/33' is not an IP CIDR"
    ]
    assert rs.match(flow(dst_ip="10.1.2.3")).target == "REJECT"


def test_bad_rule_line_points_at_config() -> None:
    lines = [RuleSource("DOMAIN,a.com,nowhere", "config.yaml", 31)]
    with pytest.raises(ConfigError) as info:
        load_rules(lines, {}, DATA, ())
    assert (
        str(info.value) == "config.yaml:31: unknown target 'nowhere' "
        "(not DIRECT/REJECT/DROP or an upstream)"
    )
