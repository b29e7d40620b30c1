"""The ``dns:`` section of the config file, checked and parsed.

Every mistake raises ``tunproxy.errors.ConfigError`` naming the key, so the
user never meets a half-configured resolver at run time.

Server URLs (``servers:``)::

    udp://1.1.1.1            plain DNS over UDP (port 53), TC=1 answers retried over TCP
    tcp://1.1.1.1:53         plain DNS over TCP (RFC 7766, pipelined)
    tls://1.1.1.1            DNS over TLS (RFC 7858, port 853)
    https://1.1.1.1/dns-query  DNS over HTTPS (RFC 8484, HTTP/1.1 POST, keep-alive)
    quic://1.1.1.1           DNS over QUIC (RFC 9250, port 853)
    h3://1.1.1.1/dns-query   DNS over HTTPS over HTTP/3 (RFC 8484 + RFC 9114, port 443)

A fragment carries options for the encrypted transports, e.g.
``tls://10.0.0.1#sni=dns.test&ca=/etc/tunproxy/ca.pem``: ``sni`` (name to verify, default
the URL's host), ``ca`` (PEM file of trusted roots, default the system store),
``insecure=1`` (skip verification; for tests), ``ip`` (connect to this address
instead of resolving the host).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from tunproxy.dns.domains import normalize_domain, valid_pattern
from tunproxy.errors import ConfigError

__all__ = [
    "DEFAULT_FAKE_IP_RANGES",
    "DnsConfig",
    "HijackSpec",
    "ServerSpec",
    "parse_dns_config",
    "parse_server_url",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_FAKE_IP_RANGES: tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("198.18.0.0/15"),  # RFC 2544 benchmarking range
    ipaddress.IPv6Network("fc00::/18"),
)

DEFAULT_PORTS = {"udp": 53, "tcp": 53, "tls": 853, "https": 443, "quic": 853, "h3": 443}


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """One upstream resolver."""

    scheme: Literal["udp", "tcp", "tls", "https", "quic", "h3"]
    host: str  # IP literal or domain name
    port: int
    path: str = "/dns-query"  # DoH (https://, h3://) only
    sni: str | None = None  # name verified in the certificate (TLS, HTTPS, QUIC)
    ca: str | None = None
    insecure: bool = False
    ip: str | None = None  # connect here instead of resolving ``host``
    url: str = ""

    @property
    def address(self) -> str | None:
        """The IP literal to connect to, if known without resolving anything."""
        if self.ip is not None:
            return self.ip
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return None
        return self.host

    @property
    def server_name(self) -> str:
        return self.sni if self.sni is not None else self.host


@dataclass(frozen=True, slots=True)
class HijackSpec:
    """``[network://]address:port``; network None = UDP and TCP, address None = any."""

    network: str | None
    address: str | None
    port: int

    def matches(self, address: str, port: int, network: str) -> bool:
        if port != self.port:
            return False
        if self.network is not None and network != self.network:
            return False
        if self.address is None:
            return True
        try:
            return ipaddress.ip_address(address) == ipaddress.ip_address(self.address)
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class DnsConfig:
    enable: bool = True
    mode: Literal["fake-ip", "real-ip"] = "fake-ip"
    fake_ip_ranges: tuple[IPNetwork, ...] = DEFAULT_FAKE_IP_RANGES
    fake_ip_filter: tuple[str, ...] = ()
    fake_ip_persist: str | None = None
    fake_ip_size: int = 65536  # LRU bound per address family
    servers: tuple[ServerSpec, ...] = ()
    hosts: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    block: tuple[str, ...] = ()
    block_response: Literal["nxdomain", "zero"] = "nxdomain"
    hijack: tuple[HijackSpec, ...] = (HijackSpec(None, None, 53),)
    ttl: int = 1  # TTL of fake answers: short, so clients come back and keep the entry in use
    timeout: float = 5.0  # whole budget for one upstream answer; SERVFAIL after it
    cache_size: int = 4096
    realip_size: int = 65536
    # fake-ip-filter's rule-set:/geosite: entries, as a predicate (built by tunproxy.config
    # once the rule sets are loaded).
    fake_ip_filter_match: Callable[[str], bool] | None = None


KNOWN_KEYS = {
    "enable", "mode", "fake-ip-range", "fake-ip-filter", "fake-ip-persist", "fake-ip-size",
    "servers", "hosts", "block", "block-response", "hijack", "ttl", "timeout", "cache-size",
    "realip-size",
}  # fmt: skip


def _fail(message: str, file: str, key: str | None = None) -> ConfigError:
    where = f"dns.{key}: " if key else "dns: "
    return ConfigError(where + message, file, None)


def _str_list(value: Any, key: str, file: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail("expected a string or a list of strings", file, key)
    return list(value)


def _positive(value: Any, key: str, file: str, *, kind: type = int) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _fail(f"expected a positive {'number' if kind is float else 'integer'}", file, key)
    if value <= 0:
        raise _fail(f"must be positive, got {value}", file, key)
    return kind(value)


def parse_server_url(url: str, file: str = "<config>") -> ServerSpec:
    """``udp://1.1.1.1``, ``tls://dns.test:853#ca=/x.pem`` ... -> ServerSpec."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _fail(f"bad server URL {url!r}: {exc}", file, "servers") from exc
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise _fail(
            f"bad server URL {url!r}: scheme must be one of udp, tcp, tls, https, quic, h3",
            file, "servers",
        )  # fmt: skip
    host = parts.hostname
    if not host:
        raise _fail(f"bad server URL {url!r}: no host", file, "servers")
    options = dict(parse_qsl(parts.fragment, keep_blank_values=True))
    unknown = set(options) - {"sni", "ca", "insecure", "ip"}
    if unknown:
        raise _fail(f"bad server URL {url!r}: unknown option {sorted(unknown)[0]!r}", file,
                    "servers")  # fmt: skip
    ip = options.get("ip")
    if ip is not None:
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise _fail(f"bad server URL {url!r}: ip={ip!r} is not an address", file,
                        "servers") from exc  # fmt: skip
    if scheme in ("udp", "tcp") and ip is None:
        try:
            ipaddress.ip_address(host)
        except ValueError as exc:
            # Plain DNS to a name would need DNS to find DNS; say so now.
            raise _fail(f"bad server URL {url!r}: {scheme}:// needs an IP address", file,
                        "servers") from exc  # fmt: skip
    path = parts.path or "/dns-query"
    return ServerSpec(
        scheme=scheme,  # type: ignore[arg-type]
        host=host,
        port=port if port is not None else DEFAULT_PORTS[scheme],
        path=path,
        sni=options.get("sni") or None,
        ca=options.get("ca") or None,
        insecure=options.get("insecure", "0").lower() in ("1", "true", "yes"),
        ip=ip,
        url=url,
    )


def _parse_hijack(item: str, file: str) -> HijackSpec:
    text = item.strip()
    network: str | None = None
    if "://" in text:
        network, text = text.split("://", 1)
        network = network.lower()
        if network not in ("udp", "tcp"):
            raise _fail(f"bad entry {item!r}: network must be udp or tcp", file, "hijack")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _fail(f"bad entry {item!r}: expected [udp://|tcp://]address:port", file, "hijack")
    host = host.strip("[]")
    address: str | None
    if host in ("any", "*", ""):
        address = None
    else:
        try:
            address = str(ipaddress.ip_address(host))
        except ValueError as exc:
            raise _fail(f"bad entry {item!r}: {host!r} is not an address", file,
                        "hijack") from exc  # fmt: skip
    return HijackSpec(network, address, int(port_text))


def parse_dns_config(section: Mapping[str, Any] | None, file: str) -> DnsConfig:
    """Check and parse the YAML ``dns:`` mapping (None or absent = all defaults)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise _fail("expected a mapping", file)
    for key in section:
        if key not in KNOWN_KEYS:
            raise _fail(f"unknown key {key!r}", file)
    kwargs: dict[str, Any] = {}

    enable = section.get("enable", True)
    if not isinstance(enable, bool):
        raise _fail("expected true or false", file, "enable")
    kwargs["enable"] = enable

    mode = section.get("mode", "fake-ip")
    if mode not in ("fake-ip", "real-ip"):
        raise _fail(f"expected fake-ip or real-ip, got {mode!r}", file, "mode")
    kwargs["mode"] = mode

    if "fake-ip-range" in section:
        ranges: list[IPNetwork] = []
        for text in _str_list(section["fake-ip-range"], "fake-ip-range", file):
            try:
                net = ipaddress.ip_network(text, strict=False)
            except ValueError as exc:
                raise _fail(f"{text!r} is not a network", file, "fake-ip-range") from exc
            # Network, first (gateway) and last addresses are kept out of the pool.
            if net.num_addresses < 8:
                raise _fail(f"{text} is too small (at least /29 or /125)", file,
                            "fake-ip-range")  # fmt: skip
            if any(net.version == other.version for other in ranges):
                raise _fail(f"more than one IPv{net.version} range", file, "fake-ip-range")
            ranges.append(net)
        kwargs["fake_ip_ranges"] = tuple(ranges)

    for key, attr in (("fake-ip-filter", "fake_ip_filter"), ("block", "block")):
        if key in section:
            patterns = _str_list(section[key], key, file)
            for p in patterns:
                if not valid_pattern(p):
                    raise _fail(f"bad domain pattern {p!r}", file, key)
            kwargs[attr] = tuple(normalize_domain(p) for p in patterns)

    persist = section.get("fake-ip-persist")
    if persist is not None and (not isinstance(persist, str) or not persist):
        raise _fail("expected a file path or null", file, "fake-ip-persist")
    kwargs["fake_ip_persist"] = persist

    if "servers" in section:
        urls = _str_list(section["servers"], "servers", file)
        kwargs["servers"] = tuple(parse_server_url(u, file) for u in urls)
    if enable and not kwargs.get("servers"):
        raise _fail("at least one upstream resolver URL is required", file, "servers")

    hosts = section.get("hosts", {}) or {}
    if not isinstance(hosts, Mapping):
        raise _fail("expected a mapping of domain -> address or list of addresses", file, "hosts")
    parsed_hosts: dict[str, tuple[str, ...]] = {}
    for name, value in hosts.items():
        if not isinstance(name, str) or not valid_pattern(name):
            raise _fail(f"bad domain {name!r}", file, "hosts")
        addresses = []
        for text in _str_list(value, "hosts", file):
            try:
                addresses.append(str(ipaddress.ip_address(text)))
            except ValueError as exc:
                raise _fail(f"{name}: {text!r} is not an address", file, "hosts") from exc
        parsed_hosts[normalize_domain(name)] = tuple(addresses)
    kwargs["hosts"] = parsed_hosts

    block_response = section.get("block-response", "nxdomain")
    if block_response not in ("nxdomain", "zero"):
        raise _fail(f"expected nxdomain or zero, got {block_response!r}", file, "block-response")
    kwargs["block_response"] = block_response

    if "hijack" in section:
        kwargs["hijack"] = tuple(
            _parse_hijack(item, file) for item in _str_list(section["hijack"], "hijack", file)
        )

    if "ttl" in section:
        kwargs["ttl"] = _positive(section["ttl"], "ttl", file)
    if "timeout" in section:
        kwargs["timeout"] = _positive(section["timeout"], "timeout", file, kind=float)
    for key, attr in (("cache-size", "cache_size"), ("fake-ip-size", "fake_ip_size"),
                      ("realip-size", "realip_size")):  # fmt: skip
        if key in section:
            kwargs[attr] = _positive(section[key], key, file)
    return DnsConfig(**kwargs)
