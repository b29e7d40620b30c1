"""The mihomo (Clash.Meta) config dialect, translated into tunproxy's own sections.

``translate`` runs on the parsed YAML tree (every value still carries its line) before
``tunproxy.config`` validates it, so errors in translated values still name ``file:line``.
A file is read as mihomo's when it has one of mihomo's own top-level keys (``proxies``,
``proxy-groups``, ``rule-providers``, ``mixed-port`` ...); tunproxy's dialect is left as it is.

What maps where:

- ``proxies:`` entries of type ``socks5`` become ``upstreams`` (``server``+``port``,
  ``username``/``password``, ``udp``: false unless given, as in mihomo). Other types are one
  warning each; a rule naming one is an error naming its type.
- ``proxy-groups:`` (select, fallback, url-test, load-balance) become
  ``tunproxy.outbounds.group`` groups; members of types tunproxy lacks are left out with a
  warning, and a group left empty is refused like such a proxy.
- ``rule-providers`` is ``rule-sets``; ``hosts`` goes into ``dns.hosts``.
- ``tun:``: ``device`` -> ``name``, ``inet4-address``/``inet6-address`` -> ``address``,
  ``route-exclude-address`` -> ``route-exclude``, ``include-uid-range``, ``dns-hijack`` ->
  ``dns.hijack``.
- ``dns:``: ``enhanced-mode`` -> ``mode`` (``redir-host`` is ``real-ip``), ``nameserver``
  -> ``servers`` (a bare address is ``udp://``), ``default-nameserver`` is used when there
  is no ``nameserver``.

Every key left out is one warning ``file:line: mihomo KEY: why``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tunproxy.config import _Node
from tunproxy.errors import ConfigError

__all__ = ["MIHOMO_KEYS", "Translation", "is_mihomo", "translate"]

log = logging.getLogger("tunproxy.config")

# Top-level keys only mihomo has: their presence selects this dialect.
MIHOMO_KEYS = frozenset({
    "proxies", "proxy-groups", "rule-providers", "proxy-providers", "mixed-port", "port",
    "socks-port", "redir-port", "tproxy-port", "allow-lan", "bind-address", "mode",
    "log-level", "external-controller", "external-ui", "secret", "sub-rules", "hosts",
    "geodata-mode", "geox-url", "sniffer", "profile", "find-process-mode", "unified-delay",
    "tcp-concurrent", "global-client-fingerprint", "ipv6", "keep-alive-interval",
})  # fmt: skip
# tunproxy's own sections, passed through unchanged.
_NATIVE = ("tun", "upstreams", "dns", "rules", "rule-sets", "relay", "debug-faults", "log",
           "controller", "sub-rules", "geodata")
_WHY_IGNORED = {
    "mixed-port": "tunproxy has no local proxy port (the TUN device takes the traffic)",
    "port": "tunproxy has no local proxy port",
    "socks-port": "tunproxy has no local proxy port",
    "redir-port": "tunproxy has no local proxy port",
    "tproxy-port": "tunproxy has no local proxy port",
    "mode": "tunproxy always follows the rules (mode: rule)",
}
# Keys inside tun:/dns: that mean the same in tunproxy.
_TUN_SAME = ("mtu", "auto-route", "name", "address", "route-exclude", "include-uid",
             "exclude-uid", "fwmark", "table", "rule-priority", "offload", "queues",
             "txqueuelen")
_DNS_SAME = ("enable", "fake-ip-range", "fake-ip-filter", "hijack", "servers", "mode",
             "hosts", "block", "block-response", "ttl", "timeout", "cache-size",
             "realip-size", "fake-ip-persist", "fake-ip-size")
_DNS_IGNORED = {
    "fallback": "tunproxy asks 'nameserver' only (no fallback by GeoIP)",
    "fallback-filter": "tunproxy asks 'nameserver' only",
    "nameserver-policy": "per-domain resolvers are not implemented; 'nameserver' answers all",
    "proxy-server-nameserver": "upstream host names are resolved with the system resolver",
    "respect-rules": "resolver connections do not go through the rules",
    "default-nameserver": "resolver host names are resolved with the system resolver",
}


@dataclass
class Translation:
    """What the rule compiler needs beyond the upstream names."""

    aliases: dict[str, str] = field(default_factory=dict)  # name -> target
    refused: dict[str, str] = field(default_factory=dict)  # proxy -> why it cannot be used
    groups: dict[str, Any] = field(default_factory=dict)  # name -> outbounds.group.GroupConfig


def is_mihomo(root: _Node) -> bool:
    return isinstance(root.value, dict) and any(k in MIHOMO_KEYS for k in root.value)


class _Ctx:
    def __init__(self, file: str, warnings: list[str]) -> None:
        self.file = file
        self.warnings = warnings

    def warn(self, line: int, key: str, why: str, outcome: str = "ignored") -> None:
        self.warnings.append(f"{self.file}:{line}: mihomo {key}: {why}; {outcome}")

    def error(self, line: int, message: str) -> ConfigError:
        return ConfigError(message, self.file, line)


def _scalar(node: _Node | None) -> Any:
    return None if node is None else node.value


def _as_list(node: _Node) -> list[_Node]:
    return node.value if isinstance(node.value, list) else [node]


def translate(root: _Node, file: str, warnings: list[str]) -> tuple[_Node, Translation]:
    """The mihomo tree ``root`` as tunproxy sections. Raises ConfigError."""
    first = len(warnings)
    try:
        return _translate(root, _Ctx(file, warnings))
    finally:
        for text in warnings[first:]:
            log.warning("%s", text)


def _translate(root: _Node, ctx: _Ctx) -> tuple[_Node, Translation]:
    src: dict[str, _Node] = root.value
    out: dict[str, _Node] = {}
    tr = Translation()
    for key, node in src.items():
        if key in _NATIVE and key not in ("tun", "dns"):
            out[key] = node
        elif key in ("tun", "dns", "hosts", "proxies", "proxy-groups", "rule-providers"):
            continue  # below
        else:
            ctx.warn(node.line, str(key), _WHY_IGNORED.get(str(key), "not implemented"))
    hijack: _Node | None = None
    if "tun" in src:
        out["tun"], hijack = _tun(src["tun"], ctx)
    dns = _dns(src.get("dns"), src.get("hosts"), hijack, ctx)
    if dns is not None:
        out["dns"] = dns
    if "rule-providers" in src:
        if "rule-sets" in out:
            raise ctx.error(src["rule-providers"].line,
                            "give 'rule-providers' or 'rule-sets', not both")
        out["rule-sets"] = src["rule-providers"]
    upstreams = _proxies(src.get("proxies"), ctx, tr)
    if upstreams:
        if "upstreams" in out:
            for name, node in upstreams.items():
                if name in out["upstreams"].value:
                    raise ctx.error(node.line, f"proxy {name!r} is also in 'upstreams'")
            out["upstreams"].value.update(upstreams)
        else:
            out["upstreams"] = _Node(upstreams, src["proxies"].line)
    if "proxy-groups" in src:
        usable = set(out["upstreams"].value) if "upstreams" in out else set()
        _groups(src["proxy-groups"], ctx, tr, usable)
    return _Node(out, root.line), tr


def _tun(node: _Node, ctx: _Ctx) -> tuple[_Node, _Node | None]:
    if not isinstance(node.value, dict):
        raise ctx.error(node.line, "'tun' must be a mapping")
    out: dict[str, _Node] = {}
    addresses: list[_Node] = []
    hijack = None
    for key, value in node.value.items():
        if key in _TUN_SAME:
            if key == "address":
                addresses.extend(_as_list(value))
            else:
                out[key] = value
        elif key == "device":
            out["name"] = value
        elif key in ("inet4-address", "inet6-address"):
            addresses.extend(_as_list(value))
        elif key == "route-exclude-address":
            out["route-exclude"] = value
        elif key == "include-uid-range" or key == "exclude-uid-range":
            ranges = [_Node(str(v.value).replace(":", "-"), v.line) for v in _as_list(value)]
            target = key.removesuffix("-range")
            prev = out.get(target)
            out[target] = _Node((_as_list(prev) if prev else []) + ranges, value.line)
        elif key == "dns-hijack":
            hijack = value
        elif key == "enable":
            if value.value is False:
                ctx.warn(value.line, "tun.enable", "tunproxy always runs its TUN device")
        else:
            ctx.warn(value.line, f"tun.{key}", "not implemented")
    if addresses:
        out["address"] = _Node(addresses, addresses[0].line)
    return _Node(out, node.line), hijack


def _server_url(item: _Node, ctx: _Ctx, key: str) -> _Node | None:
    text = str(item.value).strip()
    if text in ("system", "dhcp://system") or text.startswith(("dhcp://", "rcode://")):
        ctx.warn(item.line, f"dns.{key} {text!r}", "system and DHCP resolvers are not implemented")
        return None
    base, sep, fragment = text.partition("#")
    options: list[str] = []
    if sep:
        # mihomo's fragment: an outbound to reach the resolver through ('#PROXY'), and
        # parameters ('h3=true', 'skip-cert-verify=true', 'ecs=...', ...).
        for part in fragment.split("&"):
            name, eq, value = part.partition("=")
            if not eq:
                ctx.warn(item.line, f"dns.{key} {text!r}", f"'#{part}' (a resolver reached "
                         "through an outbound) is not implemented", "asked directly")
            elif name == "h3" and value.lower() == "true" and base.startswith("https://"):
                base = "h3://" + base[len("https://") :]
            elif name == "skip-cert-verify" and value.lower() == "true":
                options.append("insecure=1")
            elif name in ("h3", "skip-cert-verify"):
                continue
            else:
                ctx.warn(item.line, f"dns.{key} {text!r}", f"parameter {name!r} is not "
                         "implemented")
    if "://" not in base:
        base = f"udp://{base}"
    return _Node(base + ("#" + "&".join(options) if options else ""), item.line)


def _dns(node: _Node | None, hosts: _Node | None, hijack: _Node | None,
         ctx: _Ctx) -> _Node | None:
    out: dict[str, _Node] = {}
    line = node.line if node is not None else (hosts.line if hosts is not None else 1)
    if node is not None:
        if not isinstance(node.value, dict):
            raise ctx.error(node.line, "'dns' must be a mapping")
        for key, value in node.value.items():
            if key in _DNS_SAME:
                out[key] = value
            elif key == "enhanced-mode":
                mode = {"fake-ip": "fake-ip", "redir-host": "real-ip", "normal": "real-ip"}
                out["mode"] = _Node(mode.get(str(value.value), value.value), value.line)
            elif key == "nameserver" or (
                key == "default-nameserver" and "nameserver" not in node.value
            ):
                urls = [u for u in (_server_url(i, ctx, key) for i in _as_list(value)) if u]
                out["servers"] = _Node(urls, value.line)
            elif key in _DNS_IGNORED:
                ctx.warn(value.line, f"dns.{key}", _DNS_IGNORED[key])
            else:
                ctx.warn(value.line, f"dns.{key}", "not implemented")
    if hijack is not None:
        if node is None:
            ctx.warn(hijack.line, "tun.dns-hijack", "there is no 'dns:' section to answer it")
        else:
            out["hijack"] = hijack
    if hosts is not None and node is not None:
        out["hosts"] = hosts
    elif hosts is not None:
        ctx.warn(hosts.line, "hosts", "there is no 'dns:' section to answer from it")
    if node is None:
        return None
    return _Node(out, line)


def _proxies(node: _Node | None, ctx: _Ctx, tr: Translation) -> dict[str, _Node]:
    if node is None or node.value is None:
        return {}
    if not isinstance(node.value, list):
        raise ctx.error(node.line, "'proxies' must be a list")
    out: dict[str, _Node] = {}
    for item in node.value:
        if not isinstance(item.value, dict):
            raise ctx.error(item.line, "a proxy must be a mapping with name, type, server, port")
        p: dict[str, _Node] = item.value
        name = _scalar(p.get("name"))
        kind = _scalar(p.get("type"))
        if not isinstance(name, str) or not name:
            raise ctx.error(item.line, "proxy needs a 'name:'")
        if name in out or name in tr.refused:
            raise ctx.error(item.line, f"proxy {name!r} is defined twice")
        if kind != "socks5":
            why = f"proxy {name!r} is of type {kind!r}, which tunproxy does not implement"
            ctx.warnings.append(f"{ctx.file}:{item.line}: mihomo {why}; rules naming it are "
                                "errors")
            tr.refused[name] = why
            continue
        server, port = _scalar(p.get("server")), _scalar(p.get("port"))
        if not isinstance(server, str) or not isinstance(port, int | str):
            raise ctx.error(item.line, f"proxy {name!r} needs 'server:' and 'port:'")
        host = f"[{server}]" if ":" in server else server
        up: dict[str, _Node] = {
            "type": _Node("socks5", p["type"].line),
            "server": _Node(f"{host}:{port}", p["server"].line),
            # mihomo's socks5 carries UDP only when asked (udp: true).
            "udp": p.get("udp") or _Node(False, item.line),
        }
        for key in ("username", "password"):
            if key in p:
                up[key] = p[key]
        for key, value in p.items():
            if key not in ("name", "type", "server", "port", "udp", "username", "password"):
                ctx.warn(value.line, f"proxies.{name}.{key}", "not implemented")
        out[name] = _Node(up, item.line)
    return out


_GROUP_BUILTINS = {"DIRECT": "DIRECT", "REJECT": "REJECT", "REJECT-DROP": "REJECT",
                   "COMPATIBLE": "DIRECT", "PASS": "DIRECT"}


def _number(g: dict[str, _Node], key: str, default: float, ctx: _Ctx, name: str) -> float:
    node = g.get(key)
    if node is None:
        return default
    if isinstance(node.value, bool) or not isinstance(node.value, int | float) or node.value < 0:
        raise ctx.error(node.line, f"proxy group {name!r}: {key} must be a number")
    return float(node.value)


def _groups(node: _Node, ctx: _Ctx, tr: Translation, upstreams: set[str]) -> None:
    from tunproxy.outbounds.group import GROUP_KINDS, GroupConfig

    if not isinstance(node.value, list):
        raise ctx.error(node.line, "'proxy-groups' must be a list")
    raw: dict[str, tuple[dict[str, _Node], int]] = {}
    for item in node.value:
        g = item.value
        if not isinstance(g, dict) or not isinstance(_scalar(g.get("name")), str):
            raise ctx.error(item.line, "a proxy group must be a mapping with name, type, proxies")
        name = g["name"].value
        if name in raw or name in upstreams or name in tr.refused:
            raise ctx.error(item.line, f"proxy group {name!r}: the name is taken")
        raw[name] = (g, item.line)
    for name, (g, line) in raw.items():
        kind = str(_scalar(g.get("type")))
        if kind not in GROUP_KINDS:
            tr.refused[name] = (f"proxy group {name!r} is of type {kind!r}, which tunproxy does "
                                "not implement")
            ctx.warnings.append(f"{ctx.file}:{line}: mihomo {tr.refused[name]}; rules naming "
                                "it are errors")
            continue
        for key, value in g.items():
            if key not in ("name", "type", "proxies", "url", "interval", "timeout",
                           "tolerance", "lazy", "strategy", "use", "expected-status",
                           "max-failed-times"):
                ctx.warn(value.line, f"proxy-groups.{name}.{key}", "not implemented")
        if "use" in g:
            ctx.warn(g["use"].line, f"proxy-groups.{name}.use", "proxy providers are not "
                     "implemented")
        members: list[str] = []
        skipped: list[str] = []
        for m in _as_list(g["proxies"]) if g.get("proxies") is not None else []:
            member = str(m.value)
            member = _GROUP_BUILTINS.get(member, member)
            if member in upstreams or member in raw or member in ("DIRECT", "REJECT"):
                members.append(member)
            elif member in tr.refused:
                skipped.append(member)
            else:
                raise ctx.error(m.line, f"proxy group {name!r}: unknown member {member!r}")
        if skipped:
            ctx.warnings.append(f"{ctx.file}:{line}: mihomo proxy group {name!r}: members "
                                f"{', '.join(skipped)} left out (types tunproxy lacks)")
        strategy = _scalar(g.get("strategy"))
        if kind == "load-balance" and strategy not in (None, "consistent-hashing"):
            ctx.warn(g["strategy"].line, f"proxy-groups.{name}.strategy {strategy!r}",
                     "tunproxy balances by consistent hashing of the destination",
                     "consistent-hashing used")
        interval = _number(g, "interval", 300.0, ctx, name)
        tr.groups[name] = GroupConfig(
            name=name, kind=kind, members=members,
            url=str(_scalar(g.get("url")) or "http://www.gstatic.com/generate_204"),
            interval=interval or 300.0,
            # mihomo's timeout is in milliseconds.
            timeout=_number(g, "timeout", 5000.0, ctx, name) / 1000.0 or 5.0,
            tolerance=_number(g, "tolerance", 0.0, ctx, name), line=line, file=ctx.file,
            skipped=skipped,
        )
    # Groups left with no member, and groups whose members are all such groups, are refused.
    changed = True
    while changed:
        changed = False
        for name, gc in list(tr.groups.items()):
            gc.members = [m for m in gc.members if m not in tr.refused]
            if not gc.members:
                tr.refused[name] = f"proxy group {name!r} has no member tunproxy can use"
                ctx.warnings.append(f"{ctx.file}:{gc.line}: mihomo {tr.refused[name]}")
                del tr.groups[name]
                changed = True
    _check_cycles(tr.groups, ctx)


def _check_cycles(groups: dict[str, Any], ctx: _Ctx) -> None:
    state: dict[str, int] = {}

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = " -> ".join((*chain, name))
            raise ctx.error(groups[name].line, f"proxy groups in a cycle: {cycle}")
        state[name] = 1
        for m in groups[name].members:
            if m in groups:
                visit(m, (*chain, name))
        state[name] = 2

    for name in groups:
        visit(name, ())
