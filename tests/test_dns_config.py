"""The ``dns:`` section: defaults, parsing, and an error naming the key for each mistake."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from tunproxy.dns.config import DnsConfig, HijackSpec, parse_dns_config, parse_server_url
from tunproxy.errors import ConfigError

SERVERS = {"servers": ["udp://10.0.0.1"]}


def parse(section: dict[str, Any]) -> DnsConfig:
    return parse_dns_config({**SERVERS, **section}, "tunproxy.yaml")


def test_defaults() -> None:
    config = parse({})
    assert config.enable and config.mode == "fake-ip"
    assert config.fake_ip_ranges == (
        ipaddress.IPv4Network("198.18.0.0/15"),
        ipaddress.IPv6Network("fc00::/18"),
    )
    assert config.hijack == (HijackSpec(None, None, 53),)
    assert 1 <= config.ttl <= 10 and config.timeout == 5.0
    assert config.block_response == "nxdomain" and config.fake_ip_persist is None


def test_disabled_needs_no_servers() -> None:
    assert not parse_dns_config({"enable": False}, "f").enable


def test_full_section_from_yaml() -> None:
    section = yaml.safe_load(
        """
        mode: real-ip
        fake-ip-range: 10.128.0.0/16
        fake-ip-filter: [+.lan, "*.local", time.test.]
        fake-ip-persist: /var/lib/tunproxy/fakeip.json
        servers:
          - udp://10.0.0.1
          - tcp://[2001:db8::1]:5353
          - tls://dns.test#ip=10.0.0.2&ca=/ca.pem
          - https://10.0.0.3/q#sni=doh.test&insecure=1
          - quic://10.0.0.4:8853
        hosts: {Router.LAN: 192.168.1.1, dual.test: [10.1.1.1, "2001:db8::7"]}
        block: [+.ads.test]
        block-response: zero
        hijack: [any:53, "tcp://10.0.0.53:5353", "udp://[fd00::1]:53"]
        ttl: 3
        timeout: 1.5
        cache-size: 100
        """
    )
    config = parse_dns_config(section, "f.yaml")
    assert config.mode == "real-ip"
    assert config.fake_ip_ranges == (ipaddress.IPv4Network("10.128.0.0/16"),)
    assert config.fake_ip_filter == ("+.lan", "*.local", "time.test")
    assert [(s.scheme, s.host, s.port) for s in config.servers] == [
        ("udp", "10.0.0.1", 53),
        ("tcp", "2001:db8::1", 5353),
        ("tls", "dns.test", 853),
        ("https", "10.0.0.3", 443),
        ("quic", "10.0.0.4", 8853),
    ]
    tls = config.servers[2]
    assert tls.address == "10.0.0.2" and tls.server_name == "dns.test" and tls.ca == "/ca.pem"
    doh = config.servers[3]
    assert doh.path == "/q" and doh.server_name == "doh.test" and doh.insecure
    assert config.hosts == {
        "router.lan": ("192.168.1.1",),
        "dual.test": ("10.1.1.1", "2001:db8::7"),
    }
    assert config.block_response == "zero"
    assert config.hijack[1] == HijackSpec("tcp", "10.0.0.53", 5353)
    assert config.ttl == 3 and config.timeout == 1.5 and config.cache_size == 100


def test_hijack_matching() -> None:
    config = parse({"hijack": ["any:53", "tcp://10.0.0.53:5353", "udp://[fd00::1]:5300"]})
    specs = config.hijack

    def hijacked(address: str, port: int, network: str) -> bool:
        return any(h.matches(address, port, network) for h in specs)

    assert hijacked("8.8.8.8", 53, "udp") and hijacked("2001:db8::1", 53, "tcp")
    assert hijacked("10.0.0.53", 5353, "tcp") and not hijacked("10.0.0.53", 5353, "udp")
    assert not hijacked("10.0.0.54", 5353, "tcp")
    assert hijacked("fd00:0::1", 5300, "udp") and not hijacked("8.8.8.8", 443, "tcp")


@pytest.mark.parametrize(
    ("section", "key", "words"),
    [
        ({"mode": "fake"}, "mode", "fake-ip or real-ip"),
        ({"enable": "yes"}, "enable", "true or false"),
        ({"fake-ip-range": "198.18.0.0/33"}, "fake-ip-range", "not a network"),
        ({"fake-ip-range": "10.0.0.0/30"}, "fake-ip-range", "too small"),
        ({"fake-ip-range": ["10.0.0.0/8", "11.0.0.0/8"]}, "fake-ip-range", "more than one"),
        ({"fake-ip-filter": ["a..b"]}, "fake-ip-filter", "bad domain pattern"),
        ({"fake-ip-filter": [3]}, "fake-ip-filter", "list of strings"),
        ({"fake-ip-persist": 5}, "fake-ip-persist", "file path"),
        ({"servers": []}, "servers", "at least one"),
        ({"servers": ["dns://1.1.1.1"]}, "servers", "scheme"),
        ({"servers": ["udp://dns.test"]}, "servers", "needs an IP address"),
        ({"servers": ["tls://1.1.1.1#foo=1"]}, "servers", "unknown option"),
        ({"servers": ["https://x.test#ip=nope"]}, "servers", "not an address"),
        ({"servers": ["udp://1.1.1.1:99999"]}, "servers", "bad server URL"),
        ({"hosts": ["a"]}, "hosts", "mapping"),
        ({"hosts": {"a.test": "300.1.1.1"}}, "hosts", "not an address"),
        ({"block": "+."}, "block", "bad domain pattern"),
        ({"block-response": "refused"}, "block-response", "nxdomain or zero"),
        ({"hijack": ["53"]}, "hijack", "address:port"),
        ({"hijack": ["sctp://any:53"]}, "hijack", "udp or tcp"),
        ({"hijack": ["a.b:53"]}, "hijack", "not an address"),
        ({"ttl": 0}, "ttl", "positive"),
        ({"ttl": True}, "ttl", "positive integer"),
        ({"timeout": "5s"}, "timeout", "positive number"),
        ({"cache-size": -1}, "cache-size", "positive"),
        ({"resolvers": []}, None, "unknown key 'resolvers'"),
    ],
)
def test_errors_name_the_key(section: dict[str, Any], key: str | None, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(section)
    error = info.value
    assert error.file == "tunproxy.yaml"
    assert words in error.message
    assert error.message.startswith(f"dns.{key}:" if key else "dns:")


def test_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_dns_config(["udp://1.1.1.1"], "f")  # type: ignore[arg-type]


def test_server_url_defaults() -> None:
    assert parse_server_url("tls://1.1.1.1").port == 853
    assert parse_server_url("quic://1.1.1.1").port == 853
    h3 = parse_server_url("h3://10.0.0.5")
    assert h3.scheme == "h3" and h3.port == 443 and h3.path == "/dns-query"
    https = parse_server_url("https://dns.test")
    assert https.port == 443 and https.path == "/dns-query" and https.address is None
