"""The rules file: one YAML file holds the whole configuration.

Every value keeps the line it came from, so an error names ``file:line`` and
the problem. Only ``rules:`` is needed; everything else has a default::

    rules:
      - MATCH,DIRECT
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunproxy.errors import ConfigError

__all__ = [
    "Config",
    "ControllerConfig",
    "LogConfig",
    "RelayConfig",
    "TunConfig",
    "UpstreamConfig",
    "load_config",
    "parse_config",
]

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ADDRESSES = ("172.19.0.1/30", "fdfe:dcba:9876::1/126")
BUILTIN_TARGETS = frozenset({"DIRECT", "REJECT", "DROP", "REJECT-DROP"})
UPSTREAM_TYPES = ("socks5", "quic")


@dataclass(slots=True)
class TunConfig:
    name: str = "tunproxy0"
    mtu: int = 9000
    addresses: list[IPInterface] = field(
        default_factory=lambda: [ipaddress.ip_interface(a) for a in DEFAULT_ADDRESSES]
    )
    auto_route: bool = True
    # A family the TUN has no address in is refused (unreachable), not routed around it.
    strict_route: bool = True
    route_exclude: list[IPNetwork] = field(default_factory=list)
    include_uid: list[tuple[int, int]] = field(default_factory=list)
    exclude_uid: list[tuple[int, int]] = field(default_factory=list)
    fwmark: int = 0x2022
    table: int = 2022
    rule_priority: int = 9000
    # virtio-net header + TSO/USO offloads (super-packets in and out).
    offload: bool = True
    queues: int = 1
    txqueuelen: int = 5000
    # Seconds an ACK of the app's data or FIN may wait to ride on the reply; 0: at once.
    delayed_ack: float = 0.01


@dataclass(slots=True)
class UpstreamConfig:
    name: str
    type: str
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    udp: bool = True
    pipeline: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    line: int = 0


@dataclass(slots=True)
class RelayConfig:
    connect_timeout: float = 10.0
    udp_idle_timeout: float = 60.0
    dns_idle_timeout: float = 10.0
    tcp_idle_timeout: float = 0.0  # 0: never
    # Bytes queued towards an upstream before the local sender is slowed down.
    buffer_size: int = 256 * 1024
    sniff: bool = False
    sniff_timeout: float = 0.3
    # Answer the app's SYN at once and hold its bytes while the upstream connects (a failed
    # upstream then resets the app) instead of connecting before accepting.
    accept_early: bool = False
    # Echo requests: "forward" (per the rules: a real ping, unreachable or nothing) or
    # "local" (tunproxy answers every address itself).
    ping: str = "forward"


@dataclass(slots=True)
class LogConfig:
    flows: str | None = None  # JSON flow log path
    attribution: bool = True  # look up every flow's process when it opens
    history: int = 1000  # ended flows kept in the flow table


@dataclass(slots=True)
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 9090
    secret: str | None = None
    ui: str | None = None  # static files served at /ui/
    line: int = 0


@dataclass(slots=True)
class Config:
    path: Path
    tun: TunConfig
    upstreams: dict[str, UpstreamConfig]
    relay: RelayConfig
    dns: Any  # tunproxy.dns.service.DnsConfig
    ruleset: Any  # rules.RuleSet
    rule_count: int
    fault_injection: dict[str, Any] | None = None
    # One line per thing left out while loading (a skipped rule-set entry, an unknown
    # mihomo key): "file:line: what: why". Logged as warnings too.
    warnings: list[str] = field(default_factory=list)
    # Upstream groups (mihomo's proxy-groups): name -> tunproxy.outbounds.group.GroupConfig.
    groups: dict[str, Any] = field(default_factory=dict)
    # The rule-sets: settings as loaded (tunproxy.ruleremote refreshes the http ones).
    rule_set_settings: dict[str, Any] = field(default_factory=dict)
    log: LogConfig = field(default_factory=LogConfig)
    controller: ControllerConfig | None = None


# -- YAML with line numbers ---------------------------------------------------


class _Node:
    """A YAML value with the line it starts on (1-based)."""

    __slots__ = ("flow", "line", "value")

    def __init__(self, value: Any, line: int, flow: bool = False) -> None:
        self.value = value
        self.line = line
        self.flow = flow  # a [flow, style] sequence


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _plain(node: yaml.Node, loader: yaml.SafeLoader) -> _Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        items: dict[Any, _Node] = {}
        merged: set[Any] = set()  # keys from a '<<' merge, which the mapping's own override
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                # YAML merge key: the mapping's own keys win, then earlier sources.
                sources = (value_node.value if isinstance(value_node, yaml.SequenceNode)
                           else [value_node])
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        raise ConfigError("'<<' merges a mapping (or a list of them)", None,
                                          source.start_mark.line + 1)
                    for key, value in _plain(source, loader).value.items():
                        if key not in items:
                            items[key] = value
                            merged.add(key)
                continue
            key = loader.construct_object(key_node)
            if key in items and key not in merged:
                raise ConfigError(f"duplicate key {key!r}", None, key_node.start_mark.line + 1)
            merged.discard(key)
            items[key] = _plain(value_node, loader)
        return _Node(items, line)
    if isinstance(node, yaml.SequenceNode):
        return _Node([_plain(item, loader) for item in node.value], line, bool(node.flow_style))
    return _Node(loader.construct_object(node), line)


def _unwrap(node: _Node) -> Any:
    if isinstance(node.value, dict):
        return {k: _unwrap(v) for k, v in node.value.items()}
    if isinstance(node.value, list):
        return [_unwrap(v) for v in node.value]
    return node.value


def _compose(text: str, file: str) -> _Node:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            raise ConfigError("the file is empty; it needs at least a 'rules:' list", file, 1)
        return _plain(root, loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"not valid YAML: {exc.problem or exc}", file, line) from None
    except ConfigError as exc:
        exc.file = file
        raise ConfigError(exc.message, file, exc.line) from None
    finally:
        loader.dispose()


# -- section parsers ----------------------------------------------------------


class _Section:
    """Typed access to one mapping, with errors that name file and line."""

    def __init__(self, node: _Node | None, file: str, name: str, known: tuple[str, ...]) -> None:
        self.file = file
        self.name = name
        if node is None or node.value is None:
            self.items: dict[str, _Node] = {}
            self.line = 1
            return
        if not isinstance(node.value, dict):
            raise ConfigError(f"'{name}' must be a mapping", file, node.line)
        self.items = node.value
        self.line = node.line
        for key, value in self.items.items():
            if key not in known:
                raise ConfigError(
                    f"unknown key '{key}' in '{name}' (known: {', '.join(known)})", file,
                    value.line,
                )

    def error(self, key: str, message: str) -> ConfigError:
        node = self.items.get(key)
        line = node.line if node else self.line
        return ConfigError(f"{self.name}.{key}: {message}", self.file, line)

    def get(self, key: str, default: Any) -> Any:
        node = self.items.get(key)
        return default if node is None or node.value is None else node.value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.get(key, default)
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise self.error(key, f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"{value} is out of range {low}..{high}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected a number of seconds, got {value!r}")
        if not low <= value <= high:
            raise self.error(key, f"{value} is out of range {low}..{high}")
        return float(value)

    def string(self, key: str, default: str | None) -> str | None:
        value = self.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return value

    def string_list(self, key: str) -> list[tuple[str, int]]:
        node = self.items.get(key)
        if node is None or node.value is None:
            return []
        values = node.value if isinstance(node.value, list) else [node]
        out = []
        for item in values:
            if isinstance(item.value, int | str) and not isinstance(item.value, bool):
                out.append((str(item.value), item.line))
            else:
                raise ConfigError(f"{self.name}.{key}: expected a string, got {item.value!r}",
                                  self.file, item.line)
        return out


def _uid_ranges(section: _Section, key: str) -> list[tuple[int, int]]:
    ranges = []
    for text, line in section.string_list(key):
        low, sep, high = text.partition("-")
        try:
            lo = int(low)
            hi = int(high) if sep else lo
        except ValueError:
            raise ConfigError(f"tun.{key}: {text!r} is not a uid or a uid range like 1000-1999",
                              section.file, line) from None
        if not 0 <= lo <= hi <= 0xFFFFFFFE:
            raise ConfigError(f"tun.{key}: {text!r} is not a valid uid range", section.file, line)
        ranges.append((lo, hi))
    return ranges


def _parse_tun(node: _Node | None, file: str) -> TunConfig:
    s = _Section(node, file, "tun", (
        "name", "mtu", "address", "auto-route", "route-exclude", "include-uid", "exclude-uid",
        "fwmark", "table", "rule-priority", "offload", "queues", "txqueuelen", "delayed-ack",
        "strict-route",
    ))
    tun = TunConfig()
    name = s.string("name", tun.name) or tun.name
    if not 1 <= len(name) <= 15 or "/" in name or name.strip() != name or name in (".", ".."):
        raise s.error("name", f"{name!r} is not a valid interface name (1 to 15 characters)")
    tun.name = name
    tun.mtu = s.integer("mtu", tun.mtu, 1280, 65535)
    tun.delayed_ack = s.number("delayed-ack", tun.delayed_ack, 0, 0.5)  # RFC 9293: < 0.5 s
    if "address" in s.items:
        addresses = []
        for text, line in s.string_list("address"):
            try:
                addresses.append(ipaddress.ip_interface(text))
            except ValueError:
                raise ConfigError(f"tun.address: {text!r} is not an address with a prefix "
                                  "like 172.19.0.1/30", file, line) from None
        if not addresses:
            raise s.error("address", "needs at least one address")
        tun.addresses = addresses
    tun.auto_route = s.boolean("auto-route", tun.auto_route)
    tun.strict_route = s.boolean("strict-route", tun.strict_route)
    for text, line in s.string_list("route-exclude"):
        try:
            tun.route_exclude.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"tun.route-exclude: {text!r} is not a CIDR", file, line) from None
    tun.include_uid = _uid_ranges(s, "include-uid")
    tun.exclude_uid = _uid_ranges(s, "exclude-uid")
    tun.fwmark = s.integer("fwmark", tun.fwmark, 1, 0xFFFFFFFF)
    tun.table = s.integer("table", tun.table, 1, 0xFFFFFFFF)
    if tun.table in (253, 254, 255):
        raise s.error("table", f"{tun.table} is a system table (default, main, local)")
    tun.rule_priority = s.integer("rule-priority", tun.rule_priority, 1, 32000)
    tun.offload = s.boolean("offload", tun.offload)
    tun.queues = s.integer("queues", tun.queues, 1, 64)
    tun.txqueuelen = s.integer("txqueuelen", tun.txqueuelen, 0, 100000)
    return tun


def split_host_port(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); ValueError when malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(text)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(text)
    number = int(port)
    if not host or not 0 < number < 65536:
        raise ValueError(text)
    return host, number


def _parse_upstreams(node: _Node | None, file: str) -> dict[str, UpstreamConfig]:
    if node is None or node.value is None:
        return {}
    if not isinstance(node.value, dict):
        raise ConfigError("'upstreams' must be a mapping of name -> settings", file, node.line)
    upstreams = {}
    for name, entry in node.value.items():
        if not isinstance(name, str) or not name or "," in name:
            raise ConfigError(f"upstream name {name!r} must be a string without commas", file,
                              entry.line)
        if name.upper() in BUILTIN_TARGETS:
            raise ConfigError(f"upstream name {name!r} is reserved", file, entry.line)
        s = _Section(entry, file, f"upstreams.{name}", (
            "type", "server", "username", "password", "udp", "pipeline", "sni", "insecure",
            "alpn", "ca", "congestion", "cert", "key", *QUIC_KEYS,
        ))
        kind = s.string("type", None)
        if kind not in UPSTREAM_TYPES:
            raise s.error("type", f"expected one of {', '.join(UPSTREAM_TYPES)}, got {kind!r}")
        server = s.string("server", None)
        if server is None:
            raise s.error("server", "is required (host:port)")
        try:
            host, port = split_host_port(server)
        except ValueError:
            raise s.error("server", f"{server!r} is not host:port") from None
        username = s.string("username", None)
        password = s.string("password", None)
        if (username is None) != (password is None):
            raise s.error("username", "username and password go together")
        pipeline = s.boolean("pipeline", False)
        if pipeline and kind != "socks5":
            raise s.error("pipeline", "is a socks5 setting")
        options = {k: _unwrap(v) for k, v in s.items.items()
                   if k not in ("type", "server", "username", "password", "udp", "pipeline")}
        if kind == "quic":
            options = _quic_options(s, Path(file).parent)
        upstreams[name] = UpstreamConfig(
            name=name, type=kind, host=host, port=port, username=username, password=password,
            udp=s.boolean("udp", True), pipeline=pipeline, options=options, line=entry.line,
        )
    return upstreams


QUIC_KEYS = ("token", "udp-template", "keepalive", "idle-timeout", "max-datagram-size")
# The congestion controllers the QUIC library offers (h3link.CONGESTION_CONTROL, kept here
# so a config check does not load the library): qh3's Rust core implements CUBIC alone.
QUIC_CONGESTION = ("cubic",)


def quic_congestion(s: _Section) -> str:
    value = s.string("congestion", QUIC_CONGESTION[0]) or QUIC_CONGESTION[0]
    if value.lower() not in QUIC_CONGESTION:
        raise s.error("congestion", f"{value!r} is not available (the QUIC library, qh3, "
                      f"implements {', '.join(QUIC_CONGESTION)} only)")
    return value.lower()


def _quic_options(s: _Section, base: Path) -> dict[str, Any]:
    """A quic upstream's settings, checked (QuicOutbound's keyword arguments)."""
    from tunproxy.masque.request import DEFAULT_UDP_TEMPLATE, check_template

    for key in ("username", "password", "alpn"):
        if key in s.items:
            raise s.error(key, "is not a quic setting (MASQUE authenticates with 'token')"
                          if key in ("username", "password") else "is not supported for quic")
    template = s.string("udp-template", DEFAULT_UDP_TEMPLATE) or DEFAULT_UDP_TEMPLATE
    problem = check_template(template)
    if problem is not None:
        raise s.error("udp-template", problem)
    ca = s.string("ca", None)
    if ca is not None:
        ca = str(base / ca)
        if not Path(ca).is_file():
            raise s.error("ca", f"no such file: {ca}")
    # Mutual TLS: the client certificate and its key, for a proxy that asks for one.
    cert_name, key_name = s.string("cert", None), s.string("key", None)
    if (cert_name is None) != (key_name is None):
        raise s.error("key" if cert_name is None else "cert", "cert and key go together")
    certfile: str | None = None
    keyfile: str | None = None
    if cert_name is not None and key_name is not None:
        certfile, keyfile = str(base / cert_name), str(base / key_name)
        for name, path in (("cert", certfile), ("key", keyfile)):
            if not Path(path).is_file():
                raise s.error(name, f"no such file: {path}")
    return {
        "token": s.string("token", None), "sni": s.string("sni", None), "ca": ca,
        "insecure": s.boolean("insecure", False), "udp_template": template,
        "keepalive": s.number("keepalive", 10.0, 0, 600),
        "idle_timeout": s.number("idle-timeout", 30.0, 1, 3600),
        "max_datagram_size": s.integer("max-datagram-size", 1200, 1200, 65527),
        "congestion": quic_congestion(s), "cert": certfile, "key": keyfile,
    }


def _parse_relay(node: _Node | None, file: str) -> RelayConfig:
    s = _Section(node, file, "relay", (
        "connect-timeout", "udp-idle-timeout", "dns-idle-timeout", "tcp-idle-timeout",
        "buffer-size", "sniff", "sniff-timeout", "accept-early", "ping",
    ))
    r = RelayConfig()
    r.connect_timeout = s.number("connect-timeout", r.connect_timeout, 0.1, 300)
    r.udp_idle_timeout = s.number("udp-idle-timeout", r.udp_idle_timeout, 1, 86400)
    r.dns_idle_timeout = s.number("dns-idle-timeout", r.dns_idle_timeout, 1, 3600)
    r.tcp_idle_timeout = s.number("tcp-idle-timeout", r.tcp_idle_timeout, 0, 7 * 86400)
    r.buffer_size = s.integer("buffer-size", r.buffer_size, 16 * 1024, 64 * 1024 * 1024)
    r.sniff = s.boolean("sniff", r.sniff)
    r.sniff_timeout = s.number("sniff-timeout", r.sniff_timeout, 0.01, 10)
    r.accept_early = s.boolean("accept-early", r.accept_early)
    r.ping = s.string("ping", r.ping) or r.ping
    if r.ping not in ("forward", "local"):
        raise s.error("ping", f"{r.ping!r}: use forward or local")
    return r


def _parse_rule_lines(node: _Node | None, file: str) -> list[Any]:
    from rules import RuleSource

    if node is None or node.value is None:
        raise ConfigError("'rules' is required: a list of rule lines such as MATCH,DIRECT",
                          file, node.line if node else 1)
    if not isinstance(node.value, list):
        raise ConfigError("'rules' must be a list of rule lines", file, node.line)
    items = _rejoin_flow_rules(node.value) if node.flow else node.value
    lines = []
    for item in items:
        if not isinstance(item.value, str):
            raise ConfigError(f"a rule line must be a string like 'MATCH,DIRECT', got "
                              f"{item.value!r}", file, item.line)
        lines.append(RuleSource(text=item.value, file=file, line=item.line))
    return lines


def _parse_sub_rules(node: _Node | None, file: str) -> dict[str, list[Any]]:
    """mihomo's ``sub-rules:``: name -> rule lines, run by ``SUB-RULE,(cond),name``."""
    if node is None or node.value is None:
        return {}
    if not isinstance(node.value, dict):
        raise ConfigError("'sub-rules' must be a mapping of name -> rule lines", file, node.line)
    return {str(name): _parse_rule_lines(lines, file) for name, lines in node.value.items()}


def _rejoin_flow_rules(items: list[_Node]) -> list[_Node]:
    """``rules: [MATCH,DIRECT]`` is YAML for two items; read it as the one rule it means.

    In a flow sequence YAML splits at every comma, so the pieces are joined back
    and a new rule starts at each rule type (outside parentheses).
    """
    from rules.syntax import LEAF_KINDS, LOGIC_KINDS

    kinds = LEAF_KINDS | LOGIC_KINDS | {"MATCH", "RULE-SET", "GEOSITE", "SUB-RULE"}
    joined: list[_Node] = []
    depth = 0
    for item in items:
        if not isinstance(item.value, str):
            return items  # not rule pieces; let the caller report it
        text = item.value.strip()
        if (depth == 0 and text.upper() in kinds) or not joined:
            joined.append(_Node(text, item.line))
        else:
            joined[-1] = _Node(f"{joined[-1].value},{text}", joined[-1].line)
        depth += text.count("(") - text.count(")")
    return joined


def _parse_rule_sets(node: _Node | None, file: str) -> dict[str, dict[str, Any]]:
    if node is None or node.value is None:
        return {}
    if not isinstance(node.value, dict):
        raise ConfigError("'rule-sets' must be a mapping of name -> {path, behavior}", file,
                          node.line)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in node.value.items():
        if not isinstance(entry.value, dict):
            raise ConfigError(f"rule-sets.{name} must be a mapping with path and behavior", file,
                              entry.line)
        settings = _unwrap(entry)
        settings["__line__"] = entry.line
        settings["__file__"] = file
        payload = entry.value.get("payload")
        if payload is not None and isinstance(payload.value, list):
            settings["__payload_lines__"] = [item.line for item in payload.value]
        out[str(name)] = settings
    return out


def _parse_faults(node: _Node | None, file: str) -> dict[str, Any] | None:
    if node is None or node.value is None:
        return None
    s = _Section(node, file, "debug-faults", ("seed", "drop", "duplicate", "reorder", "delay"))
    faults: dict[str, Any] = {"seed": s.integer("seed", 1, 0, 2**63)}
    for key in ("drop", "duplicate", "reorder"):
        faults[key] = s.number(key, 0.0, 0.0, 1.0)
    faults["delay"] = s.number("delay", 0.0, 0.0, 10.0)
    return faults


def _parse_log(node: _Node | None, file: str) -> LogConfig:
    s = _Section(node, file, "log", ("flows", "attribution", "history"))
    out = LogConfig()
    flows = s.string("flows", None)
    if flows is not None:
        path = Path(flows)
        out.flows = str(path if path.is_absolute() else Path(file).parent / path)
    out.attribution = s.boolean("attribution", out.attribution)
    out.history = s.integer("history", out.history, 0, 1_000_000)
    return out


def _parse_controller(node: _Node | None, file: str) -> ControllerConfig | None:
    if node is None:
        return None
    s = _Section(node, file, "controller", ("listen", "secret", "ui"))
    out = ControllerConfig(line=s.line)
    listen = s.string("listen", f"{out.host}:{out.port}") or ""
    try:
        out.host, out.port = split_host_port(listen)
        ipaddress.ip_address(out.host)
    except ValueError:
        raise s.error("listen", f"{listen!r} is not an IP address and port like "
                      "127.0.0.1:9090") from None
    out.secret = s.string("secret", None) or None
    if out.secret is None and not ipaddress.ip_address(out.host).is_loopback:
        raise s.error("listen", f"{out.host} is not a loopback address: a controller that "
                      "others can reach needs a secret")
    ui = s.string("ui", None)
    if ui is not None:
        path = Path(ui)
        out.ui = str(path if path.is_absolute() else Path(file).parent / path)
    return out


TOP_LEVEL = ("tun", "upstreams", "dns", "rules", "rule-sets", "relay", "debug-faults", "log",
             "sub-rules", "geodata", "controller",
             "server")  # read by 'tunproxy server --config' (server.py), ignored here


def parse_config(text: str, path: Path, *, keep_entries: bool = False) -> Config:
    """Parse and validate the whole file; raise ConfigError naming file and line.
    ``keep_entries``: large rule sets keep their entries' text and lines (for explain)."""
    from tunproxy.dns.config import parse_dns_config
    from tunproxy.geodata import GeoData
    from tunproxy.mihomo import Translation, is_mihomo, translate
    from tunproxy.ruleload import load_rules

    file = str(path)
    root = _compose(text, file)
    if not isinstance(root.value, dict):
        raise ConfigError("the top level must be a mapping with at least a 'rules:' list", file,
                          root.line)
    warnings: list[str] = []
    mihomo = Translation()
    if is_mihomo(root):
        root, mihomo = translate(root, file, warnings)
    for key, value in root.value.items():
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown section '{key}' (known: {', '.join(TOP_LEVEL)})", file,
                              value.line)
    sections: Mapping[str, _Node] = root.value
    tun = _parse_tun(sections.get("tun"), file)
    upstreams = _parse_upstreams(sections.get("upstreams"), file)
    relay = _parse_relay(sections.get("relay"), file)
    dns_node = sections.get("dns")
    dns_section = _unwrap(dns_node) if dns_node is not None else None
    if dns_section is not None and not isinstance(dns_section, dict):
        raise ConfigError("'dns' must be a mapping", file, dns_node.line if dns_node else 1)
    if dns_node is None:
        # No dns section: DNS is not intercepted; queries are ordinary flows under the rules.
        dns_section = {"enable": False}
    try:
        dns = parse_dns_config(dns_section, file)
    except ConfigError as exc:
        if exc.line is None:
            # Point at the offending key when the message names one (e.g. "dns.servers: ...").
            key_lines = _line_map(dns_node, "dns.")
            key = exc.message.split(":", 1)[0].strip()
            exc = ConfigError(exc.message, file,
                              key_lines.get(key, dns_node.line if dns_node else None))
        raise exc from None
    lines = _parse_rule_lines(sections.get("rules"), file)
    rule_sets = _parse_rule_sets(sections.get("rule-sets"), file)
    sub_rules = _parse_sub_rules(sections.get("sub-rules"), file)
    loaded: dict[str, Any] = {}
    geo_node = sections.get("geodata")
    geodata = GeoData.from_settings(_unwrap(geo_node) if geo_node else None, path.parent, file,
                                    geo_node.line if geo_node else None)
    ruleset = load_rules(lines, rule_sets, path.parent, set(upstreams) | set(mihomo.groups),
                         warnings,
                         aliases=mihomo.aliases, refused=mihomo.refused, geodata=geodata,
                         sub_rules=sub_rules,
                         no_udp=_without_udp(upstreams, mihomo.groups),
                         on_sets=lambda sets: loaded.update(sets), keep_entries=keep_entries)
    dns = _with_domain_filter(dns, loaded, geodata, file, dns_node)
    faults = _parse_faults(sections.get("debug-faults"), file)
    return Config(
        path=path, tun=tun, upstreams=upstreams, relay=relay, dns=dns, ruleset=ruleset,
        rule_count=len(lines), fault_injection=faults, warnings=warnings, groups=mihomo.groups,
        rule_set_settings=rule_sets,
        log=_parse_log(sections.get("log"), file),
        controller=_parse_controller(sections.get("controller"), file),
    )


def _without_udp(upstreams: dict[str, UpstreamConfig], groups: dict[str, Any]) -> set[str]:
    plain = {n for n, u in upstreams.items() if not u.udp}
    if not groups:
        return plain
    from tunproxy.outbounds.group import groups_without_udp

    return plain | groups_without_udp(groups, plain)


def _with_domain_filter(dns: Any, sets: dict[str, Any], geodata: Any, file: str,
                        node: _Node | None) -> Any:
    """``fake-ip-filter`` entries naming a rule set or a geosite list (mihomo's
    ``rule-set:x``, ``geosite:x``) become a predicate the DNS service asks."""
    import dataclasses

    from tunproxy.ruleload import domain_filter

    line = _line_map(node, "dns.").get("dns.fake-ip-filter") if node else None
    match = domain_filter(dns.fake_ip_filter, sets, geodata, file, line)
    return dataclasses.replace(dns, fake_ip_filter_match=match) if match else dns


def _line_map(node: _Node | None, prefix: str = "") -> dict[str, int]:
    """Dotted key path -> line, for sections parsed elsewhere (e.g. ``servers.0``)."""
    out: dict[str, int] = {}
    if node is None:
        return out
    if isinstance(node.value, dict):
        for key, child in node.value.items():
            path = f"{prefix}{key}"
            out[path] = child.line
            out.update(_line_map(child, path + "."))
    elif isinstance(node.value, list):
        for index, child in enumerate(node.value):
            path = f"{prefix}{index}"
            out[path] = child.line
            out.update(_line_map(child, path + "."))
    return out


def load_config(path: str | Path, *, keep_entries: bool = False) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read it: {exc}", str(path)) from None
    return parse_config(text, path, keep_entries=keep_entries)
