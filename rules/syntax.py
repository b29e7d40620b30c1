"""Clash/mihomo rule syntax: one rule line -> a small tree of conditions.

A line is ``TYPE,VALUE,TARGET[,OPTION...]``, ``MATCH,TARGET``, or a logic rule
``AND,((TYPE,VALUE),(TYPE,VALUE)),TARGET`` (``OR``, ``NOT`` likewise, nested freely).
As in mihomo's ``parseRules``, for logic rules and ``DOMAIN-REGEX`` everything between the
type and the last field is the payload (a regex may hold commas), and they take no options.
Values are normalised here once (domains lower-case, no trailing dot, IDN in punycode;
CIDRs as integer ranges), so matching never does it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import NamedTuple

from rules.errors import RuleError

__all__ = [
    "BUILTIN_TARGETS",
    "Cidr",
    "Leaf",
    "Logic",
    "Node",
    "ParsedRule",
    "SetRef",
    "normalize_domain",
    "parse_cidr",
    "parse_condition",
    "parse_rule_line",
]

# Canonical built-in targets; REJECT-DROP is mihomo's spelling of DROP, COMPATIBLE its
# stand-in for an empty group (it goes direct). PASS: the rule matches but matching goes on
# with the next rule, as if the rule were not there.
BUILTIN_TARGETS = {
    "DIRECT": "DIRECT",
    "REJECT": "REJECT",
    "DROP": "DROP",
    "REJECT-DROP": "DROP",
    "COMPATIBLE": "DIRECT",
    "PASS": "PASS",
}

DOMAIN_KINDS = frozenset(
    {"DOMAIN", "DOMAIN-SUFFIX", "DOMAIN-KEYWORD", "DOMAIN-REGEX", "DOMAIN-WILDCARD"}
)
IP_KINDS = frozenset({"IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"})
# Looked up in a GeoIP/ASN database, or matched on the address's low bits.
GEO_KINDS = frozenset(
    {"GEOIP", "SRC-GEOIP", "IP-ASN", "SRC-IP-ASN", "IP-SUFFIX", "SRC-IP-SUFFIX"}
)
PORT_KINDS = frozenset({"DST-PORT", "SRC-PORT"})
PROCESS_KINDS = frozenset(
    {"PROCESS-NAME", "PROCESS-PATH", "UID", "PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX"}
)
# mihomo's inbound rules: tunproxy has one inbound (the TUN device), with no port, type,
# user or name that these could test, so they are accepted and never match.
INBOUND_KINDS = frozenset({"IN-PORT", "IN-TYPE", "IN-USER", "IN-NAME"})
LOGIC_KINDS = frozenset({"AND", "OR", "NOT"})
LEAF_KINDS = (
    DOMAIN_KINDS | IP_KINDS | GEO_KINDS | PORT_KINDS | PROCESS_KINDS | INBOUND_KINDS
    | {"NETWORK", "DSCP"}
)
# Types whose payload runs to the last comma (mihomo joins the middle fields back).
_JOINED_PAYLOAD = LOGIC_KINDS | {"DOMAIN-REGEX", "SUB-RULE"}
# The IP ranges mihomo's GEOIP,LAN covers (Go's netip IsPrivate, IsUnspecified, IsLoopback,
# IsMulticast, IsLinkLocalUnicast).
LAN_CIDRS = (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "0.0.0.0/32", "127.0.0.0/8",
    "224.0.0.0/4", "169.254.0.0/16", "fc00::/7", "::/128", "::1/128", "ff00::/8",
    "fe80::/10",
)  # fmt: skip
_OPTIONS = frozenset({"no-resolve", "src"})
GEOSITE_PREFIX = "geosite:"


class Cidr(NamedTuple):
    """An address range ``lo..hi`` (inclusive) in one family; IPv4-mapped IPv6 is IPv4."""

    v6: bool
    lo: int
    hi: int


class Leaf(NamedTuple):
    """One condition. ``value`` depends on ``kind``: str (domains, keyword, regex, network,
    process name/path), Cidr (IP kinds), tuple of (lo, hi) ranges (ports, UID).
    ``src`` turns IP-CIDR into a source-address match (mihomo's ``src`` option).
    A NamedTuple, not a dataclass: a 100k-entry classical set makes 100k of them."""

    kind: str
    value: "object"  # noqa: UP037 (unquoted, mypyc-compiled NamedTuple creation raises KeyError)
    no_resolve: bool = False
    src: bool = False


@dataclass(frozen=True, slots=True)
class Logic:
    op: str  # AND / OR / NOT
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class SetRef:
    """``RULE-SET,name``: options apply to every entry of the set."""

    name: str
    no_resolve: bool = False
    src: bool = False


Node = Leaf | Logic | SetRef


@dataclass(frozen=True, slots=True)
class ParsedRule:
    """A full rule line: ``node`` is None for MATCH. For ``SUB-RULE,(cond),name``
    ``sub_rule`` is the name and ``target`` is empty."""

    node: Node | None
    target: str
    sub_rule: str | None = None


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\Z")
_WILD_DOMAIN_RE = re.compile(rf"(?:(?:{_LABEL}|\*)\.)*(?:{_LABEL}|\*)\Z")
_V6_CHARS_RE = re.compile(r"[0-9a-fA-F:]+\Z")
_V4_CIDR_RE = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:/(\d{1,2}))?\Z")


def normalize_domain(value: str, *, wildcard: bool = False) -> str:
    """Lower-case, without the trailing dot, IDN labels in punycode (as DNS carries them).

    Raises ValueError when it is not a host name. ``wildcard`` allows ``*`` labels."""
    d = value.strip().rstrip(".").lower()
    if not d:
        raise ValueError("empty domain")
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise ValueError(f"bad internationalised domain {value!r}: {exc}") from None
    if (_WILD_DOMAIN_RE if wildcard else _DOMAIN_RE).match(d) is None:
        raise ValueError(f"{value!r} is not a domain name")
    return d


def parse_cidr(value: str) -> Cidr:
    """``1.2.3.0/24``, ``2001:db8::/32`` or a bare address; host bits are masked off
    (as mihomo's ``netip.Prefix.Masked``). ``::ffff:a.b.c.d/n`` stays an IPv6 range: flow
    addresses are unmapped (IPv4-mapped is IPv4), so, as in mihomo, it matches nothing."""
    text = value.strip()
    m = _V4_CIDR_RE.match(text)
    if m is not None:
        # The common case, parsed without ipaddress (a 100k-entry set has thousands).
        a, b, c, d, plen_text = m.groups()
        octets = (int(a), int(b), int(c), int(d))
        plen = 32 if plen_text is None else int(plen_text)
        if max(octets) > 255 or plen > 32 or any(o != "0" and o[0] == "0" for o in (a, b, c, d)):
            raise ValueError(f"{value!r} is not an IP CIDR")
        n = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
        host = (1 << (32 - plen)) - 1
        return Cidr(False, n & ~host & 0xFFFFFFFF, (n & ~host & 0xFFFFFFFF) | host)
    if ":" in text:
        fast = _parse_v6_cidr(text)
        if fast is not None:
            return fast
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP CIDR") from None
    lo = int(net.network_address)
    hi = int(net.broadcast_address)
    if net.version == 6:
        return Cidr(True, lo, hi)
    return Cidr(False, lo, hi)


def _parse_v6_cidr(text: str) -> Cidr | None:
    """Plain hex-group IPv6 CIDRs without ipaddress (25 us each there); None for anything
    unusual (embedded IPv4, zone, bad syntax), which ipaddress then judges."""
    addr, _, plen_text = text.partition("/")
    if not _V6_CHARS_RE.match(addr):
        return None
    head, sep, tail = addr.partition("::")
    if sep:
        h = head.split(":") if head else []
        t = tail.split(":") if tail else []
        missing = 8 - len(h) - len(t)
        if missing < 1:
            return None
        groups = [*h, *(["0"] * missing), *t]
    else:
        groups = addr.split(":")
        if len(groups) != 8:
            return None
    n = 0
    for g in groups:
        if not 1 <= len(g) <= 4:
            return None
        n = (n << 16) | int(g, 16)
    if plen_text:
        if not plen_text.isdigit() or int(plen_text) > 128:
            return None
        plen = int(plen_text)
    else:
        plen = 128
    host = (1 << (128 - plen)) - 1
    lo = n & ~host
    return Cidr(True, lo, lo | host)


def _parse_ranges(value: str, top: int, what: str) -> tuple[tuple[int, int], ...]:
    """``80``, ``80/443``, ``1000-2000``, ``80/8000-8080`` -> ((lo, hi), ...)."""
    out: list[tuple[int, int]] = []
    for part in value.split("/"):
        lo_s, sep, hi_s = part.strip().partition("-")
        try:
            lo = int(lo_s, 10)
            hi = int(hi_s, 10) if sep else lo
        except ValueError:
            raise ValueError(f"{value!r} is not a {what} or {what} range") from None
        if not (0 <= lo <= hi <= top):
            raise ValueError(f"{what} range {part.strip()!r} is out of 0-{top} or reversed")
        out.append((lo, hi))
    return tuple(out)


def _leaf(kind: str, value: str, options: list[str]) -> Leaf:
    # mihomo reads the options it knows for the rule type and ignores every other one
    # (``DOMAIN,x,DIRECT,src`` is DOMAIN,x,DIRECT).
    opts = {o.strip().lower() for o in options}
    no_resolve = "no-resolve" in opts
    src = "src" in opts and kind in ("IP-CIDR", "IP-CIDR6")
    if kind in ("GEOIP", "IP-ASN", "IP-SUFFIX"):
        src = "src" in opts
    elif kind.startswith("SRC-") and kind in GEO_KINDS:
        kind, src = kind[4:], True
    value = value.strip()
    if not value:
        raise ValueError(f"{kind} needs a value")
    parsed: object
    if kind == "GEOIP" and value.lower() == "lan":
        kind = "GEOIP-LAN"
        parsed = tuple(parse_cidr(c) for c in LAN_CIDRS)
    elif kind == "GEOIP":
        parsed = value.lower()  # mihomo compares lower-case country codes
    elif kind == "IP-ASN":
        if not value.isdigit():
            raise ValueError(f"IP-ASN takes an AS number, not {value!r}")
        parsed = str(int(value))
    elif kind == "IP-SUFFIX":
        addr, _, bits_text = value.partition("/")
        try:
            a = ipaddress.ip_address(addr)
            bits = int(bits_text) if bits_text else a.max_prefixlen
        except ValueError:
            raise ValueError(f"{value!r} is not ADDRESS/BITS") from None
        if not 0 <= bits <= a.max_prefixlen:
            raise ValueError(f"{value!r}: bits out of range")
        mask = (1 << bits) - 1
        parsed = (a.version == 6, int(a) & mask, mask)
    elif kind == "DOMAIN-WILDCARD":
        # '*' any run of characters (dots too), '?' one character (mihomo's wildcard match).
        pattern = value.lower().rstrip(".")
        parsed = "^" + "".join(
            ".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern
        ) + r"\Z"
    elif kind in ("PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX"):
        try:
            re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"bad regex {value!r}: {exc}") from None
        parsed = value
    elif kind == "DSCP":
        parsed = _parse_ranges(value, 63, "DSCP value")
    elif kind in INBOUND_KINDS:
        parsed = value
    elif kind in ("DOMAIN", "DOMAIN-SUFFIX"):
        parsed = normalize_domain(value)
    elif kind == "DOMAIN-KEYWORD":
        # mihomo: idna.ToASCII(lower(keyword)), so an IDN keyword meets punycode hosts.
        parsed = value.lower()
        if not parsed.isascii():
            with contextlib.suppress(UnicodeError):
                parsed = parsed.encode("idna").decode("ascii")
    elif kind == "DOMAIN-REGEX":
        try:
            re.compile(value, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"bad regex {value!r}: {exc}") from None
        parsed = value
    elif kind in IP_KINDS:
        parsed = parse_cidr(value)
    elif kind in PORT_KINDS:
        parsed = _parse_ranges(value, 65535, "port")
    elif kind == "UID":
        parsed = _parse_ranges(value, 0xFFFFFFFF, "uid")
    elif kind == "NETWORK":
        parsed = value.lower()
        if parsed not in ("tcp", "udp"):
            raise ValueError(f"NETWORK must be tcp or udp, not {value!r}")
    elif kind == "PROCESS-NAME" or kind == "PROCESS-PATH":
        parsed = value.casefold()  # mihomo compares with strings.EqualFold
    else:  # pragma: no cover - callers check the kind first
        raise ValueError(f"unknown rule type {kind!r}")
    return Leaf(kind, parsed, no_resolve, src)


def _split_groups(payload: str) -> list[str]:
    """``((A,x),(B,y))`` -> ``["A,x", "B,y"]`` (the top-level parenthesised groups)."""
    p = payload.strip()
    if len(p) < 2 or p[0] != "(" or p[-1] != ")":
        raise ValueError(f"logic payload must be ((...),(...)), not {payload!r}")
    inner = p[1:-1]
    groups: list[str] = []
    depth = 0
    start = -1
    for i, ch in enumerate(inner):
        if ch == "(":
            if depth == 0:
                start = i + 1
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced parentheses in {payload!r}")
            if depth == 0:
                groups.append(inner[start:i])
        elif depth == 0 and ch not in ", \t":
            raise ValueError(f"unexpected {ch!r} between sub-rules in {payload!r}")
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in {payload!r}")
    if not groups:
        raise ValueError(f"logic rule without sub-rules: {payload!r}")
    return groups


def _node(kind: str, payload: str, options: list[str], rule_sets: Container[str] | None) -> Node:
    if kind in LOGIC_KINDS:
        children = tuple(parse_condition(g, rule_sets) for g in _split_groups(payload))
        if kind == "NOT" and len(children) != 1:
            raise ValueError("NOT takes exactly one sub-rule")
        return Logic(kind, children)
    if kind == "GEOSITE":
        # A named list in the geosite database, filed like a RULE-SET (rules.engine asks
        # the compile-time geosite callback for it).
        code = payload.strip().lower()
        if not code:
            raise ValueError("GEOSITE needs a list name")
        return SetRef(GEOSITE_PREFIX + code)
    if kind == "RULE-SET":
        name = payload.strip()
        if rule_sets is not None and name not in rule_sets:
            raise ValueError(f"unknown rule set {name!r}")
        opts = {o.strip().lower() for o in options}
        return SetRef(name, "no-resolve" in opts, "src" in opts)
    if kind in LEAF_KINDS:
        return _leaf(kind, payload, options)
    if kind == "MATCH":
        raise ValueError("MATCH cannot be a sub-rule")
    raise ValueError(f"unknown rule type {kind!r}")


def _split(text: str) -> tuple[str, list[str]]:
    parts = [p.strip() for p in text.split(",")]
    return parts[0].upper(), parts


def parse_condition(text: str, rule_sets: Container[str] | None = None) -> Node:
    """A rule without target: a logic sub-rule or a classical rule-set line.
    ``rule_sets`` (a container of names, or None to skip the check) validates RULE-SET names.
    Raises ValueError."""
    kind, parts = _split(text)
    if kind == "MATCH":
        raise ValueError("MATCH cannot be a sub-rule or a rule-set entry")
    if kind in _JOINED_PAYLOAD:
        return _node(kind, ",".join(parts[1:]), [], rule_sets)
    if len(parts) < 2:
        raise ValueError(f"{kind or 'rule'} needs a value")
    return _node(kind, parts[1], parts[2:], rule_sets)


def parse_rule_line(
    text: str,
    file: str,
    line: int,
    *,
    targets: Container[str],
    rule_sets: Container[str] | None,
    aliases: Mapping[str, str] | None = None,
    refused: Mapping[str, str] | None = None,
) -> ParsedRule:
    """Parse a full rule line. ``targets`` is a container of upstream names; ``aliases``
    maps further names onto a built-in target or an upstream; a target in ``refused`` is an
    error with its message (a proxy of a type tunproxy lacks).
    Raises RuleError(message, file, line)."""
    kind, parts = _split(text)
    try:
        if kind == "MATCH":
            if len(parts) != 2:
                raise ValueError("MATCH takes exactly one field: MATCH,TARGET")
            node: Node | None = None
            target = parts[1]
        elif kind == "SUB-RULE":
            # SUB-RULE,(CONDITION),NAME: the condition is one parenthesised sub-rule.
            if len(parts) < 3:
                raise ValueError("SUB-RULE needs SUB-RULE,(CONDITION),NAME")
            cond = ",".join(parts[1:-1]).strip()
            if not (cond.startswith("(") and cond.endswith(")")):
                raise ValueError(f"SUB-RULE condition must be in parentheses, not {cond!r}")
            node = parse_condition(cond[1:-1], rule_sets)
            if not parts[-1]:
                raise ValueError("SUB-RULE needs a sub-rule name")
            return ParsedRule(node, "", parts[-1])
        elif kind in _JOINED_PAYLOAD:
            if len(parts) < 3:
                raise ValueError(f"{kind} needs a payload and a target")
            target = parts[-1]
            node = _node(kind, ",".join(parts[1:-1]), [], rule_sets)
        else:
            if len(parts) < 3:
                raise ValueError(f"{kind or 'rule'} needs {kind or 'TYPE'},VALUE,TARGET")
            target = parts[2]
            node = _node(kind, parts[1], parts[3:], rule_sets)
        if not target:
            raise ValueError("empty target")
        if refused and target in refused:
            raise ValueError(refused[target])
        canonical = BUILTIN_TARGETS.get(target)
        if canonical is None and aliases:
            canonical = aliases.get(target)
        if canonical is None:
            if target not in targets:
                raise ValueError(
                    f"unknown target {target!r} (not DIRECT/REJECT/DROP or an upstream)"
                )
            canonical = target
    except ValueError as exc:
        raise RuleError(str(exc), file, line) from None
    return ParsedRule(node, canonical)
