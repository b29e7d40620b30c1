"""A mihomo (Clash.Meta) config, written after mihomo's documented examples, loads as it is."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from rules import FlowMeta
from tunproxy.cli import main
from tunproxy.config import load_config
from tunproxy.errors import ConfigError

CONFIG = """\
mixed-port: 7890
allow-lan: false
mode: rule
log-level: info
ipv6: true
external-controller: 127.0.0.1:9090
profile: {store-selected: true}

tun:
  enable: true
  stack: system
  device: mihomo0
  auto-route: true
  auto-detect-interface: true
  dns-hijack:
    - any:53
    - tcp://any:53
  inet4-address: [198.19.0.1/30]
  route-exclude-address: [192.168.0.0/16]
  include-uid-range: ['1000:1999']

dns:
  enable: true
  listen: 0.0.0.0:1053
  enhanced-mode: fake-ip
  fake-ip-range: 198.18.0.1/16
  fake-ip-filter: ['*.lan', 'time.example']
  default-nameserver: [223.5.5.5, 119.29.29.29]
  nameserver: [223.5.5.5, 'https://doh.pub/dns-query', 'tls://1.0.0.1#PROXY', 'dhcp://en0']
  fallback: ['tls://8.8.4.4']
  nameserver-policy: {'geosite:cn': [223.5.5.5]}
  proxy-server-nameserver: [223.5.5.5]
  respect-rules: true

hosts:
  router.lan: 192.168.1.1

socks: &socks
  type: socks5
  udp: true

proxies:
  - {name: hk, <<: *socks, server: 10.0.0.1, port: 1080}
  - name: jp
    <<: *socks
    server: 10.0.0.2
    port: 1081
    username: u
    password: pw
  - name: vm
    type: vmess
    server: vm.example
    port: 443
    uuid: 5e4f3a2b-0000-4000-8000-000000000000
    alterId: 0
    cipher: auto

proxy-groups:
  - name: Proxy
    type: select
    proxies: [Auto, hk, jp, DIRECT]
  - name: Auto
    type: url-test
    proxies: [vm, jp, hk]
    url: http://www.gstatic.com/generate_204
    interval: 300
  - {name: Ads, type: select, proxies: [REJECT, DIRECT]}

rule-providers:
  reject:
    type: file
    behavior: domain
    path: ./ruleset/reject.yaml
  cncidr:
    type: http
    behavior: ipcidr
    url: "https://cdn.example/cncidr.txt"
    path: ./ruleset/cncidr.yaml
    interval: 86400
  private:
    type: inline
    behavior: domain
    payload: ['+.lan', '+.local']

rules:
  - RULE-SET,private,DIRECT
  - RULE-SET,reject,Ads
  - DOMAIN-SUFFIX,pass.example,PASS
  - DOMAIN-SUFFIX,google.com,Proxy,src
  - DOMAIN,hk.example,hk
  - RULE-SET,cncidr,DIRECT,no-resolve
  - IP-CIDR,10.0.0.0/8,COMPATIBLE,no-resolve
  - MATCH,Proxy
"""


def write(tmp_path: Path, text: str = CONFIG) -> Path:
    (tmp_path / "ruleset").mkdir(exist_ok=True)
    (tmp_path / "ruleset" / "reject.yaml").write_text("payload:\n  - '+.ads.example'\n")
    # The http provider's cached copy (fresh: no download is tried).
    (tmp_path / "ruleset" / "cncidr.yaml").write_text("payload:\n  - '1.0.1.0/24'\n")
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text)
    return cfg


def flow(domain: str | None = None, dst_ip: str | None = None) -> FlowMeta:
    return FlowMeta("tcp", "172.19.0.2", 40000, dst_ip, 443, domain)


def test_mihomo_config_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    assert config.tun.name == "mihomo0"
    assert config.tun.addresses == [ipaddress.ip_interface("198.19.0.1/30")]
    assert config.tun.route_exclude == [ipaddress.ip_network("192.168.0.0/16")]
    assert config.tun.include_uid == [(1000, 1999)]
    up = config.upstreams
    assert sorted(up) == ["hk", "jp"]
    assert (up["hk"].type, up["hk"].host, up["hk"].port, up["hk"].udp) == (
        "socks5", "10.0.0.1", 1080, True)
    assert (up["jp"].username, up["jp"].password) == ("u", "pw")
    dns = config.dns
    assert dns.enable and dns.mode == "fake-ip"
    assert [s.url or f"{s.scheme}://{s.host}" for s in dns.servers][:1] == ["udp://223.5.5.5"]
    assert [s.scheme for s in dns.servers] == ["udp", "https", "tls"]
    assert [(h.network, h.port) for h in dns.hijack] == [(None, 53), ("tcp", 53)]
    assert dns.hosts["router.lan"] == ("192.168.1.1",)
    rs = config.ruleset
    assert rs.match(flow("printer.lan")).target == "DIRECT"
    assert rs.match(flow("x.ads.example")).target == "Ads"
    assert rs.match(flow("www.google.com")).target == "Proxy"
    groups = {g.name: (g.kind, g.members) for g in config.groups.values()}
    assert groups == {
        "Proxy": ("select", ["Auto", "hk", "jp", "DIRECT"]),
        "Auto": ("url-test", ["jp", "hk"]),
        "Ads": ("select", ["REJECT", "DIRECT"]),
    }
    auto = config.groups["Auto"]
    assert (auto.url, auto.interval, auto.skipped) == (
        "http://www.gstatic.com/generate_204", 300.0, ["vm"])
    assert rs.match(flow("hk.example")).target == "hk"
    assert rs.match(flow(dst_ip="1.0.1.9")).target == "DIRECT"
    assert rs.match(flow(dst_ip="10.9.9.9")).target == "DIRECT"  # COMPATIBLE
    v = rs.match(flow("pass.example"))  # PASS: on to MATCH
    assert v.target == "Proxy" and v.rule is not None and v.rule.text == "MATCH,Proxy"


def test_every_ignored_key_is_one_warning(tmp_path: Path) -> None:
    config = load_config(write(tmp_path))
    f = str(tmp_path / "config.yaml")
    lines = CONFIG.splitlines()

    def line_of(text: str) -> int:
        return next(i for i, t in enumerate(lines, 1) if text in t)

    by_key = {w.split(": mihomo ", 1)[1].split(":")[0]: w for w in config.warnings}
    for key, anchor in [("mixed-port", "mixed-port:"), ("mode", "mode: rule"),
                        ("tun.stack", "stack:"), ("dns.listen", "listen:"),
                        ("dns.fallback", "fallback:"), ("dns.nameserver-policy", "policy:"),
                        ("dns.respect-rules", "respect-rules"), ("socks", "socks: &")]:
        assert key in by_key, key
        assert by_key[key].startswith(f"{f}:{line_of(anchor)}: "), by_key[key]
    assert any("type 'vmess', which tunproxy does not implement" in w for w in config.warnings)
    assert any("'Auto': members vm left out" in w for w in config.warnings)
    assert any("'#PROXY'" in w for w in config.warnings)
    assert any("dhcp://en0" in w for w in config.warnings)
    assert len(config.warnings) == len(set(config.warnings))


def test_check_prints_the_warning_count(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write(tmp_path)
    assert main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    n = len(load_config(cfg).warnings)
    assert f"{n} warnings" in out and "upstreams: hk (socks5 10.0.0.1:1080)" in out
    assert "group Auto (url-test: jp, hk)" in out


@pytest.mark.parametrize(
    ("change", "line_text", "problem"),
    [
        (("  - DOMAIN,hk.example,hk", "  - DOMAIN,hk.example,vm"), "DOMAIN,hk.example,vm",
         "proxy 'vm' is of type 'vmess'"),
        (("  - MATCH,Proxy", "  - MATCH,Nowhere"), "MATCH,Nowhere", "unknown target"),
        (("proxies: [REJECT, DIRECT]}", "proxies: [REJECT, Nope]}"), "name: Ads",
         "unknown member 'Nope'"),
        (("    proxies: [vm, jp, hk]", "    proxies: [vm, Proxy]"), "name: Proxy",
         "cycle: Proxy -> Auto -> Proxy"),
        (("    port: 1081", "    port: 99999"), "server: 10.0.0.2", "not host:port"),
        (("  fake-ip-range: 198.18.0.1/16", "  fake-ip-range: nope"), "fake-ip-range",
         "fake-ip-range"),
        (("    path: ./ruleset/reject.yaml", "    path: ./ruleset/missing.yaml"),
        "    type: file", "cannot read"),
    ],
)
def test_errors_name_file_and_line(tmp_path: Path, change: tuple[str, str], line_text: str,
                                   problem: str) -> None:
    text = CONFIG.replace(*change)
    assert text != CONFIG
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    line = next(i for i, t in enumerate(text.splitlines(), 1) if line_text in t)
    assert (info.value.file, info.value.line) == (str(tmp_path / "config.yaml"), line)
    assert problem in info.value.message


def test_merge_keys_in_the_tunproxy_dialect(tmp_path: Path) -> None:
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "upstreams:\n"
        "  a: &a {type: socks5, server: '127.0.0.1:1080', udp: false}\n"
        "  b:\n"
        "    <<: *a\n"
        "    server: '127.0.0.1:1081'\n"
        "rules:\n  - MATCH,b\n"
    )
    config = load_config(cfg)
    assert (config.upstreams["b"].port, config.upstreams["b"].udp) == (1081, False)
    assert config.warnings == []
    cfg.write_text("upstreams:\n  b:\n    <<: *nope\nrules: [MATCH,DIRECT]\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert info.value.line == 3
    cfg.write_text("tun:\n  <<: {mtu: 1500}\n  mtu: 1400\n  mtu: 1300\nrules: [MATCH,DIRECT]\n")
    with pytest.raises(ConfigError, match="duplicate key 'mtu'") as info:
        load_config(cfg)
    assert info.value.line == 4


def test_dns_url_parameters(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "mode: rule\n"
        "dns:\n  enable: true\n  nameserver:\n"
        "    - 'https://1.1.1.1/dns-query#h3=true'\n"
        "    - 'tls://9.9.9.9#skip-cert-verify=true&ecs=1.2.3.0/24'\n"
        "    - '8.8.8.8:5353'\n"
        "rules:\n  - MATCH,DIRECT\n"
    )
    config = load_config(cfg)
    servers = config.dns.servers
    assert [(s.scheme, s.host, s.port, s.insecure) for s in servers] == [
        ("h3", "1.1.1.1", 443, False),
        ("tls", "9.9.9.9", 853, True),
        ("udp", "8.8.8.8", 5353, False),
    ]
    assert any("parameter 'ecs' is not implemented" in w for w in config.warnings)
