"""mihomo's further rule types: GEOIP (MMDB built here with mmdb-writer), IP-ASN, GEOSITE
(a geosite.dat encoded here), IP-SUFFIX, process regexes, DOMAIN-WILDCARD, DSCP, IN-*,
SUB-RULE."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmdb_writer import MMDBWriter
from netaddr import IPSet

import rules
from rules import FlowMeta, ProcessInfo, RuleSource
from tunproxy.config import load_config
from tunproxy.errors import ConfigError
from tunproxy.geodata import GeoData


def flow(domain: str | None = None, dst_ip: str | None = "9.9.9.9", src_ip: str = "10.0.0.2",
         **kw: object) -> FlowMeta:
    return FlowMeta("tcp", src_ip, 40000, dst_ip, 443, domain, **kw)  # type: ignore[arg-type]


def compile_lines(lines: list[str], geo: GeoData | None = None,
                  sub_rules: dict[str, list[str]] | None = None) -> rules.RuleSet:
    def src(texts: list[str]) -> list[RuleSource]:
        return [RuleSource(t, "c.yaml", i) for i, t in enumerate(texts, 1)]

    return rules.compile(src(lines), {}, ["proxy"], geoip=geo,
                         geosite=geo.geosite if geo else None,
                         sub_rules={k: src(v) for k, v in (sub_rules or {}).items()})


@pytest.fixture
def dbs(tmp_path: Path) -> GeoData:
    country = MMDBWriter(ip_version=6, database_type="GeoLite2-Country", ipv4_compatible=True)
    country.insert_network(IPSet(["1.0.1.0/24"]), {"country": {"iso_code": "CN"}})
    country.insert_network(IPSet(["2001:db8::/32"]), {"country": {"iso_code": "JP"}})
    country.to_db_file(str(tmp_path / "Country.mmdb"))
    asn = MMDBWriter(ip_version=6, database_type="GeoLite2-ASN", ipv4_compatible=True)
    asn.insert_network(IPSet(["104.16.0.0/13"]), {"autonomous_system_number": 13335,
                                                  "autonomous_system_organization": "CF"})
    asn.to_db_file(str(tmp_path / "GeoLite2-ASN.mmdb"))
    (tmp_path / "GeoSite.dat").write_bytes(geosite_dat({
        "GOOGLE": [(2, "google.com", []), (3, "www.youtube.com", []),
                   (0, "gstatic", []), (1, r"^ads\d+\.example$", ["ads"]),
                   (2, "google.cn", ["cn"])],
        "CN": [(2, "cn", [])],
    }))
    return GeoData.from_settings(None, tmp_path)


# --- a geosite.dat encoder (v2ray's GeoSiteList protobuf) ----------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def geosite_dat(lists: dict[str, list[tuple[int, str, list[str]]]]) -> bytes:
    out = b""
    for code, domains in lists.items():
        site = _field(1, code.encode())
        for kind, value, attrs in domains:
            d = (_field(1, kind) if kind else b"") + _field(2, value.encode())
            for a in attrs:
                d += _field(3, _field(1, a.encode()) + _field(2, 1))
            site += _field(2, d)
        out += _field(1, site)
    return out


# --- GEOIP / IP-ASN --------------------------------------------------------------------------


def test_geoip_country_lan_and_src(dbs: GeoData) -> None:
    rs = compile_lines(["GEOIP,LAN,DIRECT", "GEOIP,cn,REJECT", "SRC-GEOIP,JP,DROP",
                        "MATCH,proxy"], dbs)
    assert dbs._readers == {}  # not opened at compile time
    assert rs.match(flow(dst_ip="192.168.1.1")).target == "DIRECT"
    assert rs.match(flow(dst_ip="fe80::1")).target == "DIRECT"
    assert dbs._readers == {}  # GEOIP,LAN needs no database
    assert rs.match(flow(dst_ip="1.0.1.7")).target == "REJECT"
    assert rs.match(flow(dst_ip="::ffff:1.0.1.7")).target == "REJECT"
    assert rs.match(flow(dst_ip="8.8.8.8", src_ip="2001:db8::5")).target == "DROP"
    assert rs.match(flow(dst_ip="8.8.8.8")).target == "proxy"
    assert "mmdb" in dbs._readers


def test_geoip_resolves_a_domain_unless_no_resolve(dbs: GeoData) -> None:
    rs = compile_lines(["GEOIP,CN,REJECT,no-resolve", "MATCH,proxy"], dbs)
    f = flow("a.cn", dst_ip=None, resolved_ips=lambda: ["1.0.1.1"])
    assert rs.match(f).target == "proxy"
    rs = compile_lines(["GEOIP,CN,REJECT", "MATCH,proxy"], dbs)
    assert rs.needs_resolve
    assert rs.match(flow("a.cn", dst_ip=None, resolved_ips=lambda: ["1.0.1.1"])).target == "REJECT"


def test_ip_asn(dbs: GeoData) -> None:
    rs = compile_lines(["IP-ASN,13335,REJECT", "SRC-IP-ASN,13335,DROP"], dbs)
    assert rs.match(flow(dst_ip="104.16.1.1")).target == "REJECT"
    assert rs.match(flow(dst_ip="9.9.9.9", src_ip="104.17.0.1")).target == "DROP"
    assert rs.match(flow(dst_ip="9.9.9.9")).target == "DIRECT"


def test_geo_rules_without_a_database_name_the_line(tmp_path: Path) -> None:
    empty = GeoData.from_settings(None, tmp_path)
    for line, what in [("GEOIP,CN,proxy", "GeoIP database"), ("IP-ASN,1,proxy", "ASN database"),
                       ("GEOSITE,google,proxy", "geosite database")]:
        with pytest.raises(rules.RuleError) as info:
            compile_lines(["MATCH,DIRECT", line], empty)
        assert info.value.line == 2 and what in info.value.message


def test_metadb_style_country_lists(tmp_path: Path) -> None:
    w = MMDBWriter(ip_version=6, database_type="Meta-geoip0", ipv4_compatible=True)
    w.insert_network(IPSet(["1.1.1.0/24"]), ["cloudflare", "us"])
    w.to_db_file(str(tmp_path / "geoip.metadb"))
    geo = GeoData.from_settings(None, tmp_path)
    rs = compile_lines(["GEOIP,US,REJECT", "GEOIP,cloudflare,DROP"], geo)
    assert rs.match(flow(dst_ip="1.1.1.1")).target == "REJECT"


# --- GEOSITE -------------------------------------------------------------------------------


def test_geosite_kinds_and_attributes(dbs: GeoData) -> None:
    rs = compile_lines(["GEOSITE,google@cn,DIRECT", "GEOSITE,GOOGLE,proxy",
                        "GEOSITE,cn,REJECT"], dbs)
    assert rs.match(flow("maps.google.cn")).target == "DIRECT"
    assert rs.match(flow("mail.google.com")).target == "proxy"
    assert rs.match(flow("google.com")).target == "proxy"
    assert rs.match(flow("www.youtube.com")).target == "proxy"
    assert rs.match(flow("m.youtube.com")).target == "DIRECT"
    assert rs.match(flow("x.gstatic.net")).target == "proxy"  # Plain: keyword
    assert rs.match(flow("ads12.example")).target == "proxy"  # Regex
    v = rs.match(flow("baidu.cn"))
    assert v.target == "REJECT" and v.rule_set_entry is not None
    assert "DOMAIN-SUFFIX,cn" in v.rule_set_entry and "GeoSite.dat (cn)" in v.rule_set_entry
    rs = compile_lines(["AND,((GEOSITE,cn),(NETWORK,tcp)),REJECT"], dbs)
    assert rs.match(flow("baidu.cn")).target == "REJECT"
    with pytest.raises(rules.RuleError, match="no list 'nope'"):
        compile_lines(["GEOSITE,nope,proxy"], dbs)


# --- the other new types -------------------------------------------------------------------


def test_ip_suffix() -> None:
    rs = compile_lines(["IP-SUFFIX,0.0.0.8/8,REJECT", "SRC-IP-SUFFIX,0.0.0.2/8,DROP",
                        "IP-SUFFIX,::1:0/32,proxy"])
    assert rs.match(flow(dst_ip="1.2.3.8")).target == "REJECT"
    assert rs.match(flow(dst_ip="1.2.3.9")).target == "DROP"  # source 10.0.0.2
    assert rs.match(flow(dst_ip="1.2.3.9", src_ip="10.0.0.3")).target == "DIRECT"
    assert rs.match(flow(dst_ip="2001:db8::5:1:0", src_ip="::5")).target == "proxy"


def test_process_regexes() -> None:
    rs = compile_lines(["PROCESS-NAME-REGEX,^fire.*,REJECT",
                        "PROCESS-PATH-REGEX,/opt/.*/bin/,proxy"])
    assert rs.needs_process
    ff = ProcessInfo(1, "Firefox", "/usr/lib/firefox/firefox", 1000)
    opt = ProcessInfo(2, "tool", "/opt/x/bin/tool", 1000)
    assert rs.match(flow(process=lambda: ff)).target == "REJECT"
    assert rs.match(flow(process=lambda: opt)).target == "proxy"
    assert rs.match(flow(process=lambda: None)).target == "DIRECT"


def test_domain_wildcard() -> None:
    rs = compile_lines(["DOMAIN-WILDCARD,*.goo?le.com,REJECT"])
    assert rs.match(flow("www.google.com")).target == "REJECT"
    assert rs.match(flow("a.b.goozle.com")).target == "REJECT"
    assert rs.match(flow("google.com")).target == "DIRECT"
    assert rs.match(flow("www.gooogle.com")).target == "DIRECT"


def test_dscp_and_inbound_rules() -> None:
    rs = compile_lines(["IN-PORT,7890,REJECT", "IN-TYPE,SOCKS,REJECT", "IN-USER,me,REJECT",
                        "IN-NAME,ss,REJECT", "DSCP,4/10-12,proxy"])
    assert rs.match(flow()).target == "DIRECT"  # IN-* never match; no DSCP known
    assert rs.match(flow(dscp=11)).target == "proxy"
    assert rs.match(flow(dscp=5)).target == "DIRECT"
    with pytest.raises(rules.RuleError, match="out of 0-63"):
        compile_lines(["DSCP,64,proxy"])


def test_sub_rules() -> None:
    subs = {
        "web": ["DOMAIN-SUFFIX,ads.example,REJECT", "SUB-RULE,(DST-PORT,443),tls"],
        "tls": ["DOMAIN,secure.example,proxy"],
    }
    rs = compile_lines(["SUB-RULE,(NETWORK,tcp),web", "DOMAIN-SUFFIX,example,DROP",
                        "MATCH,DIRECT"], sub_rules=subs)
    v = rs.match(flow("x.ads.example"))
    assert (v.target, v.rule and v.rule.text) == ("REJECT", "DOMAIN-SUFFIX,ads.example,REJECT")
    assert rs.match(flow("secure.example")).target == "proxy"  # nested sub-rule
    # No sub-rule matches: on with the next rule.
    assert rs.match(flow("other.example")).target == "DROP"
    udp = FlowMeta("udp", "10.0.0.2", 1, "9.9.9.9", 443, "x.ads.example")
    assert rs.match(udp).target == "DROP"  # the condition did not hold
    with pytest.raises(rules.RuleError, match="unknown sub-rule 'nope'"):
        compile_lines(["SUB-RULE,(NETWORK,tcp),nope"], sub_rules=subs)
    with pytest.raises(rules.RuleError, match="runs itself"):
        compile_lines(["SUB-RULE,(NETWORK,tcp),a"], sub_rules={"a": ["SUB-RULE,(NETWORK,tcp),a"]})


def test_config_with_geodata_and_sub_rules(tmp_path: Path, dbs: GeoData) -> None:
    cfg = tmp_path / "c.yaml"
    (tmp_path / "db").mkdir()
    (tmp_path / "Country.mmdb").rename(tmp_path / "db" / "c.mmdb")
    cfg.write_text(
        "geodata:\n  mmdb: db/c.mmdb\n"
        "sub-rules:\n  s1:\n    - GEOIP,CN,REJECT\n"
        "rules:\n  - SUB-RULE,(NETWORK,tcp),s1\n  - GEOSITE,google,DROP\n  - MATCH,DIRECT\n"
    )
    rs = load_config(cfg).ruleset
    assert rs.match(flow(dst_ip="1.0.1.1")).target == "REJECT"
    assert rs.match(flow("google.com")).target == "DROP"
    cfg.write_text("geodata:\n  mmdb: nope.mmdb\nrules:\n  - MATCH,DIRECT\n  - GEOIP,CN,REJECT\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.line == 5 and "GeoIP database" in info.value.message
