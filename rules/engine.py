"""Compiling rule lines into indexes, and matching a flow against them.

First match wins, but rules are not tried one by one. Every rule (and every entry of a
referenced rule set) gets an *order*: its position in the flattened list. Rules of one kind
are filed into one index that answers "the smallest order that matches" in one probe:

- domains: hashed sets walked label by label (exact, suffix, one-label wildcard), keywords
  through one trie-shaped regex, regexes in order;
- addresses (v4 and v6 apart, IPv4-mapped IPv6 folded into v4), ports and UIDs: disjoint
  ranges labelled with the smallest order, found by bisect;
- network, process name and path: dicts.

The answer is the smallest order over all indexes. What cannot be indexed (logic rules) or
costs something (the process lookup; resolving the domain for IP rules) sits in an ordered
list of *stages* tried only while its order is below the best match found so far: a stage is
reached exactly when a linear first-match scan would reach it, so the lazy process and
resolver callbacks are called only then.

Resolution follows mihomo (``tunnel.match``): the first IP rule without ``no-resolve``
resolves the domain; from there on, every IP rule (``no-resolve`` or not) sees the resolved
addresses; before it, IP rules cannot match a flow known only by its domain. A flow matches
when any of the resolved addresses does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import re
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any, cast

from rules.errors import RuleError
from rules.model import FlowMeta, GeoIP, ProcessInfo, RuleSource, Verdict
from rules.provider import (
    EXACT,
    ONE,
    PATTERN,
    PLUS,
    PLUS_PATTERN,
    SUB,
    BulkDomains,
    RuleSetData,
)
from rules.syntax import GEOSITE_PREFIX, Cidr, Leaf, Logic, Node, SetRef, parse_rule_line
from rules.tables import COMPACT_MIN, NEVER, Intervals, Keywords, compact_map

__all__ = ["RuleSet", "compile"]

Addr = tuple[bool, int]  # (is IPv6, address as int); IPv4-mapped IPv6 is IPv4
_DEFAULT = Verdict("DIRECT", None, None)

# Stage kinds.
_PRED, _PROC, _RESOLVE, _SWAP = 0, 1, 2, 3


@lru_cache(maxsize=16384)
def _addr(text: str) -> Addr | None:
    try:
        a = ipaddress.ip_address(text)
    except ValueError:
        return None
    n = int(a)
    if a.version == 6:
        if n >> 32 == 0xFFFF:
            return (False, n & 0xFFFFFFFF)
        return (True, n)
    return (False, n)


def _norm_domain(d: str) -> str:
    d = d.lower().rstrip(".")
    if not d.isascii():
        with contextlib.suppress(UnicodeError):
            d = d.encode("idna").decode("ascii")
    return d


class _Ctx:
    """One match's view of the flow, with the lazy lookups done at most once."""

    __slots__ = (
        "_ips",
        "_parent",
        "_proc",
        "allow_resolve",
        "domain",
        "dport",
        "dst",
        "flow",
        "network",
        "sport",
        "src",
        "subs",
    )

    def __init__(self, flow: FlowMeta) -> None:
        self.flow = flow
        d = flow.domain
        self.domain = _norm_domain(d) if d else None
        self.dst = _addr(flow.dst_ip) if flow.dst_ip else None
        self.src = _addr(flow.src_ip) if flow.src_ip else None
        self.sport = flow.src_port
        self.dport = flow.dst_port
        self.network = flow.network.lower()
        self._proc: ProcessInfo | bool | None = False  # False: not asked yet
        self._ips: list[Addr] | None = None
        self.allow_resolve = False
        self.subs: dict[int, Verdict] | None = None  # SUB-RULE order -> the sub-rule's verdict
        self._parent: _Ctx | None = None

    def swapped(self) -> _Ctx:
        """The flow with source and destination (addresses and ports) swapped, as mihomo's
        ``SwapSrcDst`` does for ``RULE-SET,...,src``; the domain stays. The destination
        address it swaps is the resolved one when resolution is allowed at this point."""
        # __init__ sets flow and domain, the rest is set below. Not ``_Ctx.__new__(_Ctx)``:
        # a mypyc-compiled class's __new__ runs __init__.
        s = _Ctx(self.flow)
        ips = self.dst_ips()
        s.src = ips[0] if ips else None
        s.dst = self.src
        s.sport, s.dport = self.dport, self.sport
        s.network = self.network
        s._proc = False
        s._ips = []
        s.allow_resolve = False
        s.subs = None
        s._parent = self
        return s

    def process(self) -> ProcessInfo | None:
        if self._parent is not None:
            return self._parent.process()
        p = self._proc
        if p is False:
            getter = self.flow.process
            p = getter() if getter is not None else None
            self._proc = p
        return p  # type: ignore[return-value]

    def resolved(self) -> list[Addr]:
        """The one address mihomo's resolver hands the rules: an IPv4 one when there is
        any, else an IPv6 one (mihomo picks at random among them; we take the first)."""
        if self._ips is None:
            getter = self.flow.resolved_ips
            v6: Addr | None = None
            picked: Addr | None = None
            if getter is not None and self.domain is not None:
                for text in getter():
                    a = _addr(text)
                    if a is None:
                        continue
                    if not a[0]:
                        picked = a
                        break
                    if v6 is None:
                        v6 = a
            picked = picked or v6
            self._ips = [picked] if picked is not None else []
        return self._ips

    def dst_ips(self) -> list[Addr]:
        """Destination addresses IP conditions inside logic rules see."""
        if self.dst is not None:
            return [self.dst]
        if self.allow_resolve:
            return self.resolved()
        return []


Pred = Callable[[_Ctx], bool]


def _in_ranges(value: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= value <= hi for lo, hi in ranges)


class _Index:
    """A compiled list of rules; ``first(ctx)`` is the smallest matching order or NEVER."""

    def __init__(
        self,
        rule_sets: Mapping[str, RuleSetData],
        nested: bool,
        geo: _Geo | None = None,
    ) -> None:
        self.rule_sets = rule_sets
        self.nested = nested
        self.geo = geo if geo is not None else _Geo(None, None)
        # str -> order: dicts while rules are added, then a dict or a HashIndex (finish()).
        # Any, not a type lie: compiled by mypyc, an attribute's type is checked at run time.
        self.exact: Any = {}
        self.sub: Any = {}
        self.one: Any = {}
        # Entries of large domain sets, (order, keys) per table, packed by finish().
        self._bulk: dict[str, list[tuple[int, Sequence[str]]]] = {
            "exact": [], "sub": [], "one": []
        }
        self.keep_entries = False  # compile(keep_entries=True): every entry its own order
        self.keywords: dict[str, int] = {}
        self.regex_src: list[tuple[int, str]] = []
        self.dst_items: list[tuple[bool, int, int, int]] = []
        self.src_items: list[tuple[bool, int, int, int]] = []
        self.dport_items: list[tuple[int, int, int]] = []
        self.sport_items: list[tuple[int, int, int]] = []
        self.uid_items: list[tuple[int, int, int]] = []
        self.network: dict[str, int] = {}
        self.pname: dict[str, int] = {}
        self.ppath: dict[str, int] = {}
        self.preds: list[tuple[int, Pred, bool]] = []  # (order, predicate, needs process)
        # RULE-SET,...,src over a classical set: (base order, the set on its own), evaluated
        # on the swapped flow.
        self.swaps: list[tuple[int, _Index]] = []
        self.match_order = NEVER
        self.resolve_first = NEVER  # order of the first rule that resolves the domain
        self.process_first = NEVER  # order of the first plain process/uid rule
        self._subsets: dict[tuple[str, bool, bool], _Index] = {}

    # --- filing rules -------------------------------------------------------------------

    def add_match(self, order: int) -> None:
        self.match_order = min(self.match_order, order)

    def add(self, node: Node, order: int, no_resolve: bool = False, src: bool = False) -> None:
        """File one rule (or rule-set entry) at ``order``; the RULE-SET line's options
        (``no_resolve``, ``src``) add to the entry's own. Raises ValueError."""
        if isinstance(node, Leaf):
            self._add_leaf(node, order, no_resolve or node.no_resolve, src or node.src)
        elif isinstance(node, SetRef):
            self.add_set(self._set(node.name), order, node.no_resolve, node.src)
        else:
            pred, needs_proc, resolves = self._pred(node, no_resolve, src)
            self.preds.append((order, pred, needs_proc))
            if resolves:
                self.resolve_first = min(self.resolve_first, order)

    def _set(self, name: str) -> RuleSetData:
        if name.startswith(GEOSITE_PREFIX):
            return self.geo.site(name[len(GEOSITE_PREFIX) :])
        data = self.rule_sets.get(name)
        if data is None:
            raise ValueError(f"unknown rule set {name!r}")
        return data

    def add_set(self, data: RuleSetData, base: int, no_resolve: bool, src: bool) -> None:
        """File every entry of ``data``: entry i gets order ``base + i``."""
        parsed = data.parsed
        if data.behavior == "domain" and len(parsed) >= COMPACT_MIN and not self.keep_entries:
            # A large set: all its entries at ``base`` (the verdict names the set, not the
            # entry), into packed tables.
            modes: dict[str, list[Any]] = (
                parsed.by_mode() if isinstance(parsed, BulkDomains) else _by_mode(parsed)
            )
            bulk = self._bulk
            bulk["exact"] += [(base, modes[EXACT]), (base, modes[PLUS])]
            bulk["sub"] += [(base, modes[SUB]), (base, modes[PLUS])]
            bulk["one"].append((base, modes[ONE]))
            for mode, d in modes.get("patterns", ()):
                self.regex_src.append((base, _pattern_regex(d, plus=mode is PLUS_PATTERN)))
        elif data.behavior == "domain":
            exact, sub, one = self.exact, self.sub, self.one
            for i, e in enumerate(parsed):
                order = base + i
                mode, d = e  # type: ignore[misc]
                if mode is EXACT:
                    exact.setdefault(d, order)
                elif mode is PLUS:
                    exact.setdefault(d, order)
                    sub.setdefault(d, order)
                elif mode is SUB:
                    sub.setdefault(d, order)
                elif mode is ONE:
                    one.setdefault(d, order)
                elif mode is PLUS_PATTERN:
                    self.regex_src.append((order, _pattern_regex(d, plus=True)))
                else:
                    self.regex_src.append((order, _pattern_regex(d)))
        elif data.behavior == "ipcidr":
            items = self.src_items if src else self.dst_items
            for i, c in enumerate(parsed):
                assert isinstance(c, Cidr)
                items.append((c.v6, c.lo, c.hi, base + i))
            if not src and not no_resolve and parsed:
                self.resolve_first = min(self.resolve_first, base)
        elif src:
            swapped = self._swapped_set(data, no_resolve)
            self.swaps.append((base, swapped))
            if swapped.resolve_first < NEVER:
                self.resolve_first = min(self.resolve_first, base)
        else:
            before = self.resolve_first
            if len(parsed) >= COMPACT_MIN and not self.keep_entries:
                # A large classical set (ACL4SSR lists, geosite): its DOMAIN and
                # DOMAIN-SUFFIX entries go to the packed tables at ``base`` (they share the
                # set's target; the verdict names the set), the rest entry by entry.
                full: list[str] = []
                suffix: list[str] = []
                for i, node in enumerate(parsed):
                    kind = node.kind if isinstance(node, Leaf) else None
                    if kind == "DOMAIN":
                        full.append(cast(str, node.value))  # type: ignore[union-attr]
                    elif kind == "DOMAIN-SUFFIX":
                        suffix.append(cast(str, node.value))  # type: ignore[union-attr]
                    else:
                        self.add(node, base + i, no_resolve, src)  # type: ignore[arg-type]
                self._bulk["exact"] += [(base, full), (base, suffix)]
                self._bulk["sub"].append((base, suffix))
            else:
                for i, node in enumerate(parsed):
                    self.add(node, base + i, no_resolve, src)  # type: ignore[arg-type]
            if self.resolve_first < before:
                # mihomo resolves before trying a classical set that holds an IP rule, so
                # every entry of the set (no-resolve ones too) sees the address.
                self.resolve_first = base

    def _swapped_set(self, data: RuleSetData, no_resolve: bool) -> _Index:
        key = (data.name, no_resolve, True)
        sub = self._subsets.get(key)
        if sub is None:
            sub = _Index(self.rule_sets, nested=True, geo=self.geo)
            sub.keep_entries = self.keep_entries
            sub.add_set(data, 0, no_resolve, False)
            sub.finish()
            self._subsets[key] = sub
        return sub

    def _add_leaf(self, leaf: Leaf, order: int, no_resolve: bool, src: bool) -> None:
        kind, v = leaf.kind, leaf.value
        if kind == "DOMAIN":
            self.exact.setdefault(v, order)
        elif kind == "DOMAIN-SUFFIX":
            self.exact.setdefault(v, order)
            self.sub.setdefault(v, order)
        elif kind == "DOMAIN-KEYWORD":
            self.keywords.setdefault(v, order)  # type: ignore[arg-type]
        elif kind == "DOMAIN-REGEX":
            self.regex_src.append((order, v))  # type: ignore[arg-type]
        elif kind in ("IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"):
            assert isinstance(v, Cidr)
            if src or kind == "SRC-IP-CIDR":
                self.src_items.append((v.v6, v.lo, v.hi, order))
            else:
                self.dst_items.append((v.v6, v.lo, v.hi, order))
                if not no_resolve:
                    self.resolve_first = min(self.resolve_first, order)
        elif kind == "DST-PORT":
            self.dport_items.extend((lo, hi, order) for lo, hi in v)  # type: ignore[attr-defined]
        elif kind == "SRC-PORT":
            self.sport_items.extend((lo, hi, order) for lo, hi in v)  # type: ignore[attr-defined]
        elif kind == "NETWORK":
            self.network.setdefault(v, order)  # type: ignore[arg-type]
        elif kind == "PROCESS-NAME":
            self.pname.setdefault(v, order)  # type: ignore[arg-type]
            self.process_first = min(self.process_first, order)
        elif kind == "PROCESS-PATH":
            self.ppath.setdefault(v, order)  # type: ignore[arg-type]
            self.process_first = min(self.process_first, order)
        elif kind == "UID":
            self.uid_items.extend((lo, hi, order) for lo, hi in v)  # type: ignore[attr-defined]
            self.process_first = min(self.process_first, order)
        elif kind == "GEOIP-LAN":
            items = self.src_items if src else self.dst_items
            for c in v:  # type: ignore[attr-defined]
                items.append((c.v6, c.lo, c.hi, order))
            if not src and not no_resolve:
                self.resolve_first = min(self.resolve_first, order)
        elif kind == "DOMAIN-WILDCARD":
            self.regex_src.append((order, v))  # type: ignore[arg-type]
        else:
            # Not indexed (database lookups, regexes over the process, DSCP, inbounds):
            # tried in order like a logic rule.
            pred, needs_proc, resolves = self._leaf_pred(leaf, no_resolve, src)
            self.preds.append((order, pred, needs_proc))
            if resolves:
                self.resolve_first = min(self.resolve_first, order)

    # --- logic rules: predicates evaluated in order -----------------------------------------

    def _pred(self, node: Node, no_resolve: bool, src: bool) -> tuple[Pred, bool, bool]:
        """(predicate, needs the process, may resolve the domain)."""
        if isinstance(node, Logic):
            parts = [self._pred(c, no_resolve, src) for c in node.children]
            fns = [p[0] for p in parts]
            needs = any(p[1] for p in parts)
            resolves = any(p[2] for p in parts)
            if node.op == "AND":
                return (lambda c: all(f(c) for f in fns)), needs, resolves
            if node.op == "OR":
                return (lambda c: any(f(c) for f in fns)), needs, resolves
            only = fns[0]
            return (lambda c: not only(c)), needs, resolves
        if isinstance(node, SetRef):
            key = (node.name, node.no_resolve or no_resolve, node.src or src)
            data = self._set(node.name)
            if key[2] and data.behavior == "classical":
                swapped = self._swapped_set(data, key[1])
                return (
                    (lambda c: swapped.first(c.swapped()) < NEVER),
                    swapped.needs_process_before(NEVER),
                    swapped.resolve_first < NEVER,
                )
            sub = self._subsets.get(key)
            if sub is None:
                sub = _Index(self.rule_sets, nested=True, geo=self.geo)
                sub.keep_entries = self.keep_entries
                sub.add_set(self._set(node.name), 0, key[1], key[2])
                sub.finish()
                self._subsets[key] = sub
            s = sub
            return (
                (lambda c: s.first(c) < NEVER),
                s.needs_process_before(NEVER),
                s.resolve_first < NEVER,
            )
        return self._leaf_pred(node, no_resolve or node.no_resolve, src or node.src)

    def _leaf_pred(self, leaf: Leaf, no_resolve: bool, src: bool) -> tuple[Pred, bool, bool]:
        return _leaf_pred(leaf, no_resolve, src, self.geo)

    # --- freezing into lookup tables --------------------------------------------------------

    def finish(self) -> None:
        def ranges(items: list[tuple[bool, int, int, int]], v6: bool, start: int) -> Intervals:
            return Intervals((lo, hi, o) for f, lo, hi, o in items if f is v6 and o >= start)

        self.dst4 = ranges(self.dst_items, False, 0)
        self.dst6 = ranges(self.dst_items, True, 0)
        # Resolved addresses only meet IP rules from the first resolving rule on (the whole
        # nested set when the outer rule allows resolution).
        late = 0 if self.nested else self.resolve_first
        first_ip = min((o for *_, o in self.dst_items), default=NEVER)
        if late <= first_ip:  # every IP rule is past the first resolving one: one table
            self.late4, self.late6 = self.dst4, self.dst6
        else:
            self.late4 = ranges(self.dst_items, False, late)
            self.late6 = ranges(self.dst_items, True, late)
        self.src4 = ranges(self.src_items, False, 0)
        self.src6 = ranges(self.src_items, True, 0)
        self.dport = Intervals(self.dport_items)
        self.sport = Intervals(self.sport_items)
        self.uid = Intervals(self.uid_items)
        self.kw = Keywords(self.keywords) if self.keywords else None
        self.regexes = [(o, re.compile(p, re.IGNORECASE).search) for o, p in sorted(self.regex_src)]
        self.domain_min = min(
            [
                *self.exact.values(),
                *self.sub.values(),
                *self.one.values(),
                *self.keywords.values(),
                *(o for o, _ in self.regex_src),
                *(o for groups in self._bulk.values() for o, keys in groups if keys),
                NEVER,
            ]
        )
        self.network_min = min(self.network.values(), default=NEVER)
        # Large domain tables (rule sets) go into packed hash arrays.
        self.exact = compact_map(self.exact, self._bulk["exact"])
        self.sub = compact_map(self.sub, self._bulk["sub"])
        self.one = compact_map(self.one, self._bulk["one"])
        self._bulk = {}
        stages: list[tuple[int, int, Any]] = [(o, _PRED, p) for o, p, _ in self.preds]
        if self.process_first < NEVER:
            stages.append((self.process_first, _PROC, None))
        stages.extend((o, _SWAP, sub) for o, sub in self.swaps)
        if self.dst_items:
            r = min(o for *_, o in self.dst_items) if self.nested else self.resolve_first
            if r < NEVER:
                stages.append((r, _RESOLVE, None))
        stages.sort(key=lambda s: (s[0], s[1]))
        self.stages = stages
        # Drop what the tables now hold, and the parsed rule sets (100k parsed entries are
        # a third of the memory; only their text and lines are kept, for verdicts).
        self.dst_items = []
        self.src_items = []
        self.dport_items = []
        self.sport_items = []
        self.uid_items = []
        self.regex_src = []
        self.rule_sets = {}

    def needs_process_before(self, limit: int) -> bool:
        return (
            self.process_first < limit
            or any(o < limit and n for o, _, n in self.preds)
            or any(o < limit and sub.needs_process_before(NEVER) for o, sub in self.swaps)
        )

    # --- matching -----------------------------------------------------------------------------

    def first(self, c: _Ctx) -> int:
        best = self.match_order
        d = c.domain
        if d is not None and self.domain_min < best:
            o = self.exact.get(d)
            if o is not None and o < best:
                best = o
            sub = self.sub
            one = self.one
            if sub or one:
                i = d.find(".")
                parent = True
                while i >= 0:
                    s = d[i + 1 :]
                    o = sub.get(s)
                    if o is not None and o < best:
                        best = o
                    if parent:
                        parent = False
                        o = one.get(s)
                        if o is not None and o < best:
                            best = o
                    i = d.find(".", i + 1)
            kw = self.kw
            if kw is not None and kw.min_order < best:
                o = kw.first(d)
                if o < best:
                    best = o
            for o, search in self.regexes:
                if o >= best:
                    break
                if search(d) is not None:
                    best = o
                    break
        a = c.dst
        if a is not None:
            t = self.dst6 if a[0] else self.dst4
            if t.min_order < best:
                o = t.lookup(a[1])
                if o < best:
                    best = o
        a = c.src
        if a is not None:
            t = self.src6 if a[0] else self.src4
            if t.min_order < best:
                o = t.lookup(a[1])
                if o < best:
                    best = o
        if self.dport.min_order < best:
            o = self.dport.lookup(c.dport)
            if o < best:
                best = o
        if self.sport.min_order < best:
            o = self.sport.lookup(c.sport)
            if o < best:
                best = o
        if self.network_min < best:
            o = self.network.get(c.network)
            if o is not None and o < best:
                best = o
        for o, kind, pred in self.stages:
            if o >= best:
                break
            if kind == _PRED:
                if not self.nested:
                    c.allow_resolve = o >= self.resolve_first
                if pred(c):
                    best = o
            elif kind == _SWAP:
                if not self.nested:
                    c.allow_resolve = o >= self.resolve_first
                found = pred.first(c.swapped())
                if o + found < best:
                    best = o + found
            elif kind == _PROC:
                p = c.process()
                if p is not None:
                    best = min(
                        best,
                        self.pname.get(p.name.casefold(), NEVER),
                        self.ppath.get(p.path.casefold(), NEVER),
                        self.uid.lookup(p.uid),
                    )
            elif c.dst is None and c.domain is not None and (not self.nested or c.allow_resolve):
                for a in c.resolved():
                    t = self.late6 if a[0] else self.late4
                    o = t.lookup(a[1])
                    if o < best:
                        best = o
        return best


def _by_mode(parsed: Sequence[object]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {EXACT: [], PLUS: [], SUB: [], ONE: [], "patterns": []}
    for e in parsed:
        mode, d = cast(tuple[str, str], e)
        if mode in (PATTERN, PLUS_PATTERN):
            out["patterns"].append((mode, d))
        else:
            out[mode].append(d)
    return out


def _pattern_regex(pattern: str, plus: bool = False) -> str:
    """A domain with ``*`` labels (one label each) as an anchored regex; ``plus``: it or
    any name under it (``+.*.x`` is ``*.x`` and everything below, as in mihomo's trie)."""
    return (
        ("^(?:.+\\.)?" if plus else "^")
        + r"\.".join("[^.]+" if lbl == "*" else re.escape(lbl) for lbl in pattern.split("."))
        + r"\Z"
    )


class _Geo:
    """What the compiled rules consult outside themselves: GeoIP/ASN lookups at match time
    and geosite lists at compile time."""

    def __init__(
        self, ip: GeoIP | None, site: Callable[[str], RuleSetData] | None
    ) -> None:
        self.ip = ip
        self._site = site
        self._sites: dict[str, RuleSetData] = {}

    def site(self, code: str) -> RuleSetData:
        data = self._sites.get(code)
        if data is None:
            if self._site is None:
                raise ValueError(f"GEOSITE,{code} needs a geosite database (none is configured)")
            data = self._site(code)  # raises ValueError for an unknown list
            self._sites[code] = data
        return data

    def lookup(self, what: str) -> GeoIP:
        if self.ip is None or not self.ip.available(what):
            rule = "GEOIP" if what == "country" else "IP-ASN"
            raise ValueError(f"{rule} rules need a {'GeoIP' if what == 'country' else 'ASN'} "
                             "database (none is configured)")
        return self.ip


def _addresses(c: _Ctx, src: bool) -> list[Addr]:
    if src:
        return [c.src] if c.src is not None else []
    return c.dst_ips()


def _leaf_pred(
    leaf: Leaf, no_resolve: bool, src: bool, geo: _Geo | None = None
) -> tuple[Pred, bool, bool]:
    kind, v = leaf.kind, leaf.value
    if kind == "GEOIP-LAN":
        cidrs = v

        def lan(c: _Ctx) -> bool:
            return any(a[0] is r.v6 and r.lo <= a[1] <= r.hi
                       for a in _addresses(c, src) for r in cidrs)  # type: ignore[attr-defined]

        return lan, False, not (src or no_resolve)
    if kind == "GEOIP":
        db = (geo or _Geo(None, None)).lookup("country")
        code = v

        def country(c: _Ctx) -> bool:
            return any(code in db.countries(a[0], a[1]) for a in _addresses(c, src))

        return country, False, not (src or no_resolve)
    if kind == "IP-ASN":
        db = (geo or _Geo(None, None)).lookup("asn")
        asn = v

        def by_asn(c: _Ctx) -> bool:
            return any(db.asn(a[0], a[1]) == asn for a in _addresses(c, src))

        return by_asn, False, not (src or no_resolve)
    if kind == "IP-SUFFIX":
        v6, low, mask = cast(tuple[bool, int, int], v)

        def suffix(c: _Ctx) -> bool:
            return any(a[0] is v6 and a[1] & mask == low for a in _addresses(c, src))

        return suffix, False, not (src or no_resolve)
    if kind == "DOMAIN-WILDCARD":
        match = re.compile(str(v)).match
        return (lambda c: c.domain is not None and match(c.domain) is not None), False, False
    if kind in ("PROCESS-NAME-REGEX", "PROCESS-PATH-REGEX"):
        search = re.compile(str(v), re.IGNORECASE).search
        on_path = kind == "PROCESS-PATH-REGEX"

        def by_regex(c: _Ctx) -> bool:
            p = c.process()
            return p is not None and search(p.path if on_path else p.name) is not None

        return by_regex, True, False
    if kind == "DSCP":
        r = v

        def by_dscp(c: _Ctx) -> bool:
            d = c.flow.dscp
            return d is not None and _in_ranges(d, r)  # type: ignore[arg-type]

        return by_dscp, False, False
    if kind in ("IN-PORT", "IN-TYPE", "IN-USER", "IN-NAME"):
        return (lambda c: False), False, False
    if kind == "DOMAIN":
        return (lambda c: c.domain == v), False, False
    if kind == "DOMAIN-SUFFIX":
        dotted = "." + str(v)
        return (
            (lambda c: c.domain is not None and (c.domain == v or c.domain.endswith(dotted))),
            False,
            False,
        )
    if kind == "DOMAIN-KEYWORD":
        kw = str(v)
        return (lambda c: c.domain is not None and kw in c.domain), False, False
    if kind == "DOMAIN-REGEX":
        search = re.compile(str(v), re.IGNORECASE).search
        return (lambda c: c.domain is not None and search(c.domain) is not None), False, False
    if kind in ("IP-CIDR", "IP-CIDR6", "SRC-IP-CIDR"):
        assert isinstance(v, Cidr)
        v6, lo, hi = v.v6, v.lo, v.hi
        if src or kind == "SRC-IP-CIDR":
            return (
                (lambda c: c.src is not None and c.src[0] is v6 and lo <= c.src[1] <= hi),
                False,
                False,
            )
        return (
            (lambda c: any(a[0] is v6 and lo <= a[1] <= hi for a in c.dst_ips())),
            False,
            not no_resolve,
        )
    if kind == "DST-PORT":
        r = v
        return (lambda c: _in_ranges(c.dport, r)), False, False  # type: ignore[arg-type]
    if kind == "SRC-PORT":
        r = v
        return (lambda c: _in_ranges(c.sport, r)), False, False  # type: ignore[arg-type]
    if kind == "NETWORK":
        return (lambda c: c.network == v), False, False
    if kind == "PROCESS-NAME":

        def by_name(c: _Ctx) -> bool:
            p = c.process()
            return p is not None and p.name.casefold() == v

        return by_name, True, False
    if kind == "PROCESS-PATH":

        def by_path(c: _Ctx) -> bool:
            p = c.process()
            return p is not None and p.path.casefold() == v

        return by_path, True, False
    if kind == "UID":
        r = v

        def by_uid(c: _Ctx) -> bool:
            p = c.process()
            return p is not None and _in_ranges(p.uid, r)  # type: ignore[arg-type]

        return by_uid, True, False
    raise ValueError(f"unknown rule type {kind!r}")  # pragma: no cover


class _ResolveReached(Exception):
    """Raised by the probe resolver of ``RuleSet.needs_resolve_for``."""


def _needs_resolve() -> list[str]:
    raise _ResolveReached


class RuleSet:
    """Compiled rules. ``match(flow)`` gives the first matching rule's verdict."""

    def __init__(
        self,
        index: _Index,
        rules: list[RuleSource],
        targets: list[str],
        bases: list[int],
        sets: list[RuleSetData | None],
        sub_orders: frozenset[int] = frozenset(),
    ) -> None:
        self._index = index
        self._sub_orders = sub_orders
        self._udp: RuleSet | None = None
        self.rules: tuple[RuleSource, ...] = tuple(rules)
        self._targets = targets
        self._bases = bases
        self._sets = sets
        self._verdicts: dict[int, Verdict] = {}
        reachable = index.match_order
        #: A PROCESS-NAME/PROCESS-PATH/UID rule can be reached (before any MATCH).
        self.needs_process: bool = index.needs_process_before(reachable)
        #: An IP rule without no-resolve can be reached: a domain-only flow may need resolving.
        self.needs_resolve: bool = index.resolve_first < reachable

    def __len__(self) -> int:
        return len(self.rules)

    def attach_udp(self, udp: RuleSet) -> None:
        """Serve UDP flows from ``udp`` (the rules without targets lacking UDP)."""
        self._udp = udp
        self.needs_process = self.needs_process or udp.needs_process
        self.needs_resolve = self.needs_resolve or udp.needs_resolve

    @property
    def rule_sets(self) -> list[RuleSetData]:
        """The rule sets the rules reference, each once, in rule order."""
        seen: dict[str, RuleSetData] = {}
        for data in self._sets:
            if data is not None and data.name not in seen:
                seen[data.name] = data
        return list(seen.values())

    def match(self, flow: FlowMeta) -> Verdict:
        if self._udp is not None and flow.network.lower() == "udp":
            return self._udp.match(flow)
        ctx = _Ctx(flow)
        order = self._index.first(ctx)
        if order >= NEVER:
            return _DEFAULT
        if order in self._sub_orders and ctx.subs is not None:
            return ctx.subs[order]
        return self.verdict_at(order)

    def verdict_at(self, order: int) -> Verdict:
        v = self._verdicts.get(order)
        if v is None:
            v = self._verdict(order)
            self._verdicts[order] = v
        return v

    def needs_resolve_for(self, flow: FlowMeta) -> bool:
        """Would matching ``flow`` reach a rule that resolves its domain? For a caller that
        must resolve asynchronously before ``match``: resolve only when this says so.

        ``flow.process`` is replaced by a memo of itself, so the process is looked up at most
        once across this call and the following ``match``."""
        if self._udp is not None and flow.network.lower() == "udp":
            return self._udp.needs_resolve_for(flow)
        if not self.needs_resolve or flow.dst_ip is not None or not flow.domain:
            return False
        getter = flow.process
        if getter is not None:
            memo: list[ProcessInfo | None] = []

            def process() -> ProcessInfo | None:
                if not memo:
                    memo.append(getter())
                return memo[0]

            flow.process = process
        probe = FlowMeta(
            flow.network,
            flow.src_ip,
            flow.src_port,
            flow.dst_ip,
            flow.dst_port,
            flow.domain,
            flow.process,
            _needs_resolve,
        )
        try:
            self._index.first(_Ctx(probe))
        except _ResolveReached:
            return True
        return False

    def _verdict(self, order: int) -> Verdict:
        i = bisect_right(self._bases, order) - 1
        data = self._sets[i]
        entry = data.describe(order - self._bases[i]) if data is not None else None
        return Verdict(self._targets[i], self.rules[i], entry)


def compile(
    rule_lines: Sequence[RuleSource],
    rule_sets: Mapping[str, RuleSetData],
    targets: Collection[str],
    *,
    aliases: Mapping[str, str] | None = None,
    refused: Mapping[str, str] | None = None,
    geoip: GeoIP | None = None,
    geosite: Callable[[str], RuleSetData] | None = None,
    sub_rules: Mapping[str, Sequence[RuleSource]] | None = None,
    no_udp: Collection[str] = (),
    keep_entries: bool = False,
) -> RuleSet:
    """Compile rule lines (with the rule sets they reference) for ``targets`` (upstream
    names; DIRECT, REJECT, DROP, REJECT-DROP, COMPATIBLE and PASS are built in).
    ``aliases`` maps more target names onto those; a target in ``refused`` is an error
    with its message. A rule whose target is PASS is checked but never chosen.
    ``geoip`` answers GEOIP/IP-ASN lookups; ``geosite(code)`` gives a GEOSITE list as a
    rule set (ValueError when there is none); ``sub_rules`` are the named rule lists
    ``SUB-RULE,(condition),name`` runs. A UDP flow skips rules whose target is in
    ``no_udp`` (upstreams without UDP), as mihomo moves on to the next rule: when a rule
    names one, a second index without them serves UDP flows. Rule sets of COMPACT_MIN
    entries or more keep no entry text unless ``keep_entries`` (what ``tunproxy explain``
    asks for): their verdicts name the entry by number.
    Raises RuleError(message, file, line) for the first bad line."""
    geo = _Geo(geoip, geosite)
    comp = _Compiler(rule_sets, targets, aliases, refused, geo, sub_rules or {})
    comp.keep_entries = keep_entries
    main = comp.compile(rule_lines, ())
    skip = frozenset(no_udp)
    if skip and skip.intersection(main._targets):
        udp = _Compiler(rule_sets, targets, aliases, refused, geo, sub_rules or {}, skip)
        udp.keep_entries = keep_entries
        main.attach_udp(udp.compile(rule_lines, ()))
    return main


class _Compiler:
    """Shared by the main rule list and the sub-rule lists it reaches."""

    def __init__(
        self,
        rule_sets: Mapping[str, RuleSetData],
        targets: Collection[str],
        aliases: Mapping[str, str] | None,
        refused: Mapping[str, str] | None,
        geo: _Geo,
        sub_rules: Mapping[str, Sequence[RuleSource]],
        pass_targets: frozenset[str] = frozenset(),
    ) -> None:
        self.pass_targets = pass_targets
        self.keep_entries = False
        self.rule_sets = rule_sets
        self.targets = targets
        self.aliases = aliases
        self.refused = refused
        self.geo = geo
        self.sub_rules = sub_rules
        self.compiled: dict[str, RuleSet] = {}

    def sub(self, name: str, chain: tuple[str, ...]) -> RuleSet:
        if name in chain:
            raise ValueError(f"sub-rule {name!r} runs itself ({' -> '.join((*chain, name))})")
        rs = self.compiled.get(name)
        if rs is None:
            lines = self.sub_rules.get(name)
            if lines is None:
                raise ValueError(f"unknown sub-rule {name!r}")
            rs = self.compile(lines, (*chain, name))
            self.compiled[name] = rs
        return rs

    def compile(self, rule_lines: Sequence[RuleSource], chain: tuple[str, ...]) -> RuleSet:
        return _compile_list(self, rule_lines, chain)


_RESOLVING = frozenset({"IP-CIDR", "IP-CIDR6", "GEOIP", "GEOIP-LAN", "IP-ASN", "IP-SUFFIX"})


def _resolves(index: _Index, node: Node, no_resolve: bool, src: bool) -> bool:
    """Whether mihomo resolves the domain on reaching this rule (ShouldResolveIP)."""
    if isinstance(node, Leaf):
        return (node.kind in _RESOLVING and not (no_resolve or node.no_resolve)
                and not (src or node.src))
    if isinstance(node, Logic):
        return any(_resolves(index, c, no_resolve, src) for c in node.children)
    if node.no_resolve or no_resolve:
        return False
    data = index._set(node.name)
    if data.behavior == "ipcidr":
        return not (node.src or src) and len(data) > 0
    if data.behavior == "classical":
        return any(_resolves(index, e, False, False) for e in data.parsed)  # type: ignore[arg-type]
    return False


def _sub_rule_pred(order: int, cond: Pred, sub: RuleSet) -> Pred:
    def pred(c: _Ctx) -> bool:
        if not cond(c):
            return False
        o = sub._index.first(c)
        if o >= NEVER:
            return False  # no sub-rule matched: mihomo goes on with the next rule
        if o in sub._sub_orders and c.subs is not None and o in c.subs:
            v = c.subs[o]
        else:
            v = sub.verdict_at(o)
        if c.subs is None:
            c.subs = {}
        c.subs[order] = v
        return True

    return pred


def _compile_list(
    comp: _Compiler, rule_lines: Sequence[RuleSource], chain: tuple[str, ...]
) -> RuleSet:
    rule_sets, targets, aliases, refused = comp.rule_sets, comp.targets, comp.aliases, comp.refused
    index = _Index(rule_sets, nested=False, geo=comp.geo)
    index.keep_entries = comp.keep_entries
    sub_orders: set[int] = set()
    rules: list[RuleSource] = []
    tgts: list[str] = []
    bases: list[int] = []
    sets: list[RuleSetData | None] = []
    order = 0
    for src in rule_lines:
        parsed = parse_rule_line(src.text, src.file, src.line, targets=targets,
                                 rule_sets=rule_sets, aliases=aliases, refused=refused)
        if parsed.sub_rule is not None:
            assert parsed.node is not None
            try:
                sub = comp.sub(parsed.sub_rule, chain)
                cond, needs, resolves = index._pred(parsed.node, False, False)
            except (ValueError, re.error) as exc:
                raise RuleError(str(exc), src.file, src.line) from None
            index.preds.append(
                (order, _sub_rule_pred(order, cond, sub), needs or sub.needs_process)
            )
            if resolves or sub.needs_resolve:
                index.resolve_first = min(index.resolve_first, order)
            rules.append(src)
            tgts.append(f"SUB-RULE {parsed.sub_rule}")
            bases.append(order)
            sets.append(None)
            sub_orders.add(order)
            order += 1
            continue
        rules.append(src)
        tgts.append(parsed.target)
        bases.append(order)
        node = parsed.node
        try:
            if parsed.target == "PASS" or parsed.target in comp.pass_targets:
                # mihomo goes on to the next rule: for the verdict it is not there, but an
                # IP rule reached still resolves the domain for the rules after it.
                if node is not None and _resolves(index, node, False, False):
                    index.resolve_first = min(index.resolve_first, order)
                sets.append(None)
                order += 1
            elif node is None:
                index.add_match(order)
                sets.append(None)
                order += 1
            elif isinstance(node, SetRef):
                data = index._set(node.name)
                index.add_set(data, order, node.no_resolve, node.src)
                # A large set keeps no entry text: a verdict names the entry by number.
                big = len(data) >= COMPACT_MIN and not comp.keep_entries
                sets.append(data.stripped() if big else dataclasses.replace(data, parsed=()))
                order += len(data)
            else:
                index.add(node, order)
                sets.append(None)
                order += 1
        except (ValueError, re.error) as exc:
            raise RuleError(str(exc), src.file, src.line) from None
    index.finish()
    return RuleSet(index, rules, tgts, bases, sets, frozenset(sub_orders))
