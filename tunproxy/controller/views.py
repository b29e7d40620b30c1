"""The controller's JSON bodies, in the Clash/mihomo API's shapes.

Pure functions from the flow table, the rules and the outbounds to dicts, so each shape is
tested without a server. Field names and types are mihomo's (``tunnel/statistic/tracker.go``
``TrackerInfo``, ``constant/metadata.go`` ``Metadata``, ``hub/route/*.go``); what mihomo's
shape has no room for (state, end reason, the rule's file:line, the process's pid, unit and
container, rates) is under each connection's ``tunproxy`` key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from tunproxy import __version__
from tunproxy.flows import FlowRecord, FlowTable, RuleRef, source_ref
from tunproxy.outbounds.group import GroupOutbound

__all__ = [
    "SnapshotEncoder",
    "configs",
    "connection",
    "proxies",
    "rule_providers",
    "rules_list",
    "snapshot",
    "version",
]

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident memory in bytes (mihomo's ``memory``/``inuse``)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def version() -> dict[str, Any]:
    # "meta": dashboards made for mihomo (Clash.Meta) turn on their connection views with it.
    return {"version": f"tunproxy {__version__}", "meta": True}


def _rule_fields(rule: RuleRef | None) -> tuple[str, str]:
    if rule is None:
        return "", ""
    return rule.clash_type, rule.payload


def connection(r: FlowRecord, *, fake_ip: bool = False) -> dict[str, Any]:
    """One ``TrackerInfo``: mihomo's connection object, plus ``tunproxy``."""
    rule = r.rule_ref
    rule_type, payload = _rule_fields(rule)
    return {
        "id": str(r.id),
        "metadata": {
            "network": r.network,
            "type": "Tun",
            "sourceIP": r.src,
            "destinationIP": "" if fake_ip and r.domain else r.dst,
            "sourceGeoIP": None,
            "destinationGeoIP": None,
            "sourceIPASN": "",
            "destinationIPASN": "",
            "sourcePort": str(r.src_port),  # mihomo: `json:"sourcePort,string"`
            "destinationPort": str(r.dst_port),
            "inboundIP": "",
            "inboundPort": "0",
            "inboundName": "tun",
            "inboundUser": "",
            "host": r.domain or "",
            "dnsMode": "fake-ip" if fake_ip else "normal",
            "uid": r.uid if r.uid is not None else 0,
            "process": r.who if r.attribution == "remote" else (r.process or ""),
            "processPath": r.exe or "",
            "specialProxy": "",
            "specialRules": "",
            "remoteDestination": r.dst,
            "dscp": r.dscp or 0,
            "sniffHost": "",
        },
        "upload": r.bytes_up,
        "download": r.bytes_down,
        "start": rfc3339(r.started),
        "chains": [*r.via, r.outbound] if r.outbound else [],
        "rule": rule_type,
        "rulePayload": payload,
        "tunproxy": {
            "state": r.state,
            "attribution": r.attribution,
            "pid": r.pid,
            "unit": r.unit,
            "container": r.container,
            "rule": rule.to_json() if rule is not None else None,
            "uploadRate": r.rate_up,
            "downloadRate": r.rate_down,
            "ended": rfc3339(r.ended) if r.ended is not None else None,
            "endReason": r.end_reason,
        },
    }


def snapshot(table: FlowTable, *, closed: bool = False, is_fake: Any = None) -> dict[str, Any]:
    """``GET /connections``: mihomo's ``Snapshot`` (plus ``closed`` when asked for)."""
    table.sample()
    up, down = table.totals()

    def conv(r: FlowRecord) -> dict[str, Any]:
        return connection(r, fake_ip=bool(is_fake is not None and is_fake(r.dst)))

    body: dict[str, Any] = {
        "downloadTotal": down,
        "uploadTotal": up,
        "connections": [conv(r) for r in table.iter_records()],
        "memory": rss(),
    }
    if closed:
        body["closed"] = [conv(r) for r in list(table.history)]
    return body


class SnapshotEncoder:
    """``GET /connections`` as JSON text, fast enough to poll with thousands of flows open.

    A connection's fields are mostly fixed once it is routed; only its counters, rates and
    state move. So each record's fixed part is encoded once (and again only when one of
    the fields it holds changes: domain, process, rule, outbound) and each snapshot formats
    just the moving numbers around it: for 1,000 flows this takes a few milliseconds of the
    event loop where ``json.dumps(snapshot(...))`` took tens. The text decodes to exactly
    ``snapshot(...)`` (tests/test_controller.py checks it)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[tuple[Any, ...], str, str]] = {}

    def encode(self, table: FlowTable, *, closed: bool = False, is_fake: Any = None) -> str:
        table.sample()
        up, down = table.totals()
        cache = self._cache
        fresh: dict[int, tuple[tuple[Any, ...], str, str]] = {}
        parts = []
        for r in table.iter_records():
            parts.append(self._one(r, cache, fresh, is_fake))
        self._cache = fresh
        text = (f'{{"downloadTotal":{down},"uploadTotal":{up},"connections":['
                f'{",".join(parts)}],"memory":{rss()}')
        if closed:
            old: dict[int, tuple[tuple[Any, ...], str, str]] = {}
            ended = [self._one(r, {}, old, is_fake) for r in list(table.history)]
            text += f',"closed":[{",".join(ended)}]'
        return text + "}"

    @staticmethod
    def _one(
        r: FlowRecord, cache: dict[int, tuple[tuple[Any, ...], str, str]],
        fresh: dict[int, tuple[tuple[Any, ...], str, str]], is_fake: Any,
    ) -> str:
        fake = bool(is_fake is not None and is_fake(r.dst))
        key = (r.domain, r.process, r.attribution, r.verdict, r.rule, r.outbound, r.via, fake)
        hit = cache.get(r.id)
        if hit is None or hit[0] != key:
            full = connection(r, fake_ip=fake)
            extra = full.pop("tunproxy")
            for moving in ("upload", "download"):
                full.pop(moving)
            for moving in ("state", "uploadRate", "downloadRate", "ended", "endReason"):
                extra.pop(moving)
            head = json.dumps({"id": full.pop("id"), "metadata": full.pop("metadata")},
                              separators=(",", ":"))[:-1]
            rest = json.dumps(full, separators=(",", ":"))[1:-1]
            fixed = json.dumps(extra, separators=(",", ":"))[1:-1]
            hit = (key, f"{head},{rest}", fixed)
        fresh[r.id] = hit
        ended = "null" if r.ended is None else f'"{rfc3339(r.ended)}"'
        reason = "null" if r.end_reason is None else json.dumps(r.end_reason)
        return (f'{hit[1]},"upload":{r.bytes_up},"download":{r.bytes_down},"tunproxy":{{'
                f'{hit[2]},"state":"{r.state}","uploadRate":{r.rate_up!r},'
                f'"downloadRate":{r.rate_down!r},"ended":{ended},"endReason":{reason}}}}}')


def rules_list(ruleset: Any) -> dict[str, Any]:
    """``GET /rules``: ``{"rules": [{type, payload, proxy, size}]}`` (+ file, line)."""
    out = []
    for src in ruleset.rules:
        ref = source_ref(src)
        size = -1
        if ref.type == "RULE-SET":
            size = next((len(d) for d in ruleset.rule_sets if d.name == ref.payload), -1)
        out.append({"type": ref.clash_type, "payload": ref.payload, "proxy": ref.target,
                    "size": size, "file": src.file, "line": src.line})
    return {"rules": out}


def _proxy(name: str, kind: str, udp: bool = True) -> dict[str, Any]:
    return {"name": name, "type": kind, "udp": udp, "uot": False, "xudp": False,
            "tfo": False, "mptcp": False, "smux": False, "interface": "",
            "dialer-proxy": "", "routing-mark": 0, "alive": True, "history": [],
            "extra": {}, "id": name}


GROUP_TYPES = {"select": "Selector", "fallback": "Fallback", "url-test": "URLTest",
               "load-balance": "LoadBalance"}


def _delay(t: float, latency: float | None) -> dict[str, Any]:
    # mihomo's DelayHistory: delay in ms, 0 for a failed check
    return {"time": rfc3339(t), "delay": 0 if latency is None else max(1, round(latency * 1000))}


def _group(group: GroupOutbound) -> dict[str, Any]:
    """A group as mihomo shows one: its type, ``all`` members, ``now`` (the member new flows
    take; load-balance has none, as in mihomo) and its health-check ``testUrl``."""
    kind = group.config.kind
    body = {**_proxy(group.name, GROUP_TYPES.get(kind, "Selector")),
            "all": list(group.state.members), "hidden": False, "icon": ""}
    now = group.now()
    if now is not None:
        body["now"] = now
    if kind != "select":
        body["testUrl"] = group.config.url
        body["expectedStatus"] = "*"
        body["fixed"] = group.state.fixed or ""
    body["alive"] = any(group.state.alive.values())
    return body


def proxies(
    outbounds: Mapping[str, Any], upstreams: Mapping[str, Any],
    delays: Mapping[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """``GET /proxies``: DIRECT, REJECT, each upstream and each group as a proxy, and
    mihomo's GLOBAL selector listing them (dashboards look for it).

    A member's ``history`` and ``alive`` come from the latest health check of a group
    checking it (and from ``delays``, the API's own ``/delay`` tests, newest last)."""
    out: dict[str, Any] = {
        "DIRECT": _proxy("DIRECT", "Direct"),
        "REJECT": _proxy("REJECT", "Reject"),
    }
    checks: dict[str, tuple[float, float | None]] = {}  # member -> (when, latency)
    for name, ob in outbounds.items():
        if isinstance(ob, GroupOutbound):
            out[name] = _group(ob)
            for member, when in ob.checked_at.items():
                if member not in checks or checks[member][0] < when:
                    checks[member] = (when, ob.state.latency.get(member))
            continue
        if name in ("DIRECT", "REJECT"):
            continue
        up = upstreams.get(name)
        kind = {"socks5": "Socks5", "quic": "Masque"}.get(getattr(up, "type", ""), "Unknown")
        out[name] = _proxy(name, kind, bool(getattr(up, "udp", True)))
    for member, (when, latency) in checks.items():
        if member in out:
            out[member]["history"] = [_delay(when, latency)]
            out[member]["alive"] = latency is not None
    for name, history in (delays or {}).items():
        if name in out:
            merged = sorted(out[name]["history"] + history, key=lambda h: str(h["time"]))
            out[name]["history"] = merged[-10:]
            out[name]["alive"] = merged[-1]["delay"] > 0
    names = list(out)
    out["GLOBAL"] = {**_proxy("GLOBAL", "Selector"), "now": "DIRECT", "all": names,
                     "hidden": False, "icon": "", "fixed": ""}
    return {"proxies": out}


def proxy_providers(outbounds: Mapping[str, Any], upstreams: Mapping[str, Any]) -> dict[str, Any]:
    """``GET /providers/proxies``: mihomo's built-in "default" provider holding the proxies
    (not the groups, as in mihomo)."""
    items = [p for name, p in proxies(outbounds, upstreams)["proxies"].items()
             if name != "GLOBAL" and not isinstance(outbounds.get(name), GroupOutbound)]
    return {"providers": {"default": {
        "name": "default", "type": "Proxy", "vehicleType": "Compatible", "proxies": items,
        "testUrl": "", "expectedStatus": "*",
    }}}


def rule_providers(ruleset: Any, loaded_at: float) -> dict[str, Any]:
    """``GET /providers/rules``: the rule sets (``rule-sets:``) the rules use."""
    out = {}
    for data in ruleset.rule_sets:
        out[data.name] = {
            "name": data.name, "type": "Rule", "vehicleType": "File",
            "behavior": data.behavior.capitalize() if data.behavior != "ipcidr" else "IPCIDR",
            "format": "YamlRule" if data.format == "yaml" else "TextRule",
            "ruleCount": len(data), "updatedAt": rfc3339(loaded_at), "file": data.file,
        }
    return {"providers": out}


def configs(config: Any, log_level: str) -> dict[str, Any]:
    """``GET /configs``: what of mihomo's general config has a meaning here."""
    tun = config.tun
    dns = config.dns
    dns_on = dns is not None and bool(getattr(dns, "enable", True))
    return {
        "port": 0, "socks-port": 0, "redir-port": 0, "tproxy-port": 0, "mixed-port": 0,
        "allow-lan": False, "bind-address": "*", "mode": "rule", "log-level": log_level,
        "ipv6": any(a.version == 6 for a in tun.addresses),
        "sniffing": bool(config.relay.sniff),
        "tun": {
            "enable": True, "device": tun.name, "stack": "tunproxy", "mtu": tun.mtu,
            "auto-route": tun.auto_route, "dns-hijack": ["any:53"] if dns_on else [],
            "auto-detect-interface": False,
        },
        "tunproxy": {"rules-file": str(config.path), "rules": config.rule_count},
    }


def records_json(records: Iterable[FlowRecord]) -> list[dict[str, Any]]:
    return [connection(r) for r in records]
