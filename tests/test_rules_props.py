"""The indexed engine against a plain first-match interpreter, on random rules and flows.

The reference walks the rules one by one with mihomo's semantics (``tunnel.match``): the
first rule that needs an address resolves the domain to one address (an IPv4 one when there
is any: mihomo picks one at random, tunproxy and the reference the first), and every later IP
rule sees it; ``RULE-SET,...,src`` matches its set against the flow with source and
destination swapped (``SwapSrcDst``); a UDP flow skips rules whose target has no UDP. Both
must name the same rule (and rule-set entry), call the process lookup only when a linear
scan would reach a process rule, and never call the resolver when a linear scan would not.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rules
from rules import FlowMeta, ProcessInfo, RuleSource
from rules.provider import DomainEntry
from rules.syntax import Cidr, Leaf, Logic, Node, SetRef, parse_cidr, parse_rule_line
from rules.tables import NEVER, Intervals, Keywords

LABELS = ["a", "b", "ab", "c"]
TLDS = ["com", "net"]
DOMAINS = [f"{x}.{t}" for x in LABELS for t in TLDS] + [
    f"{y}.{x}.{t}" for y in LABELS for x in LABELS[:2] for t in TLDS
]
V4 = ["10.0.0.1", "10.0.1.7", "10.1.0.1", "192.0.2.9", "::ffff:10.0.0.1"]
V6 = ["2001:db8::1", "2001:db8:1::1", "fd00::5"]
CIDRS = [
    "10.0.0.0/8",
    "10.0.0.0/24",
    "10.0.1.0/24",
    "10.0.0.1/32",
    "192.0.2.0/24",
    "2001:db8::/32",
    "2001:db8::/48",
    "fd00::/8",
    "::ffff:10.0.0.0/120",
]
PORTS = ["80", "443", "400-500", "80/8080", "1-1000"]
PROCS = [ProcessInfo(1, "curl", "/usr/bin/curl", 1000), ProcessInfo(2, "apt", "/usr/bin/apt", 0)]

DOMAIN_SET = ["+.a.com", ".b.net", "*.ab.com", "c.net", "a.*.com", "+.*.b.com"]
IP_SET = ["10.0.1.0/24", "2001:db8:1::/48", "192.0.2.9"]
CLASSICAL_SET = [
    "DOMAIN-KEYWORD,ab",
    "IP-CIDR,10.1.0.0/16,no-resolve",
    "IP-CIDR,192.0.2.0/28",
    "UID,0",
    "AND,((NETWORK,udp),(DST-PORT,443))",
]


def leaf_texts() -> st.SearchStrategy[str]:
    opt = st.sampled_from(["", ",no-resolve"])
    return st.one_of(
        st.builds(lambda d: f"DOMAIN,{d}", st.sampled_from(DOMAINS)),
        st.builds(lambda d: f"DOMAIN-SUFFIX,{d}", st.sampled_from(DOMAINS + TLDS)),
        st.builds(lambda k: f"DOMAIN-KEYWORD,{k}", st.sampled_from(["a", "b.", "ab", "c.n", "x"])),
        st.builds(lambda r: f"DOMAIN-REGEX,{r}", st.sampled_from([r"^a\.", r"b\.(com|net)$"])),
        st.builds(lambda c, o: f"IP-CIDR,{c}{o}", st.sampled_from(CIDRS), opt),
        st.builds(lambda c: f"SRC-IP-CIDR,{c}", st.sampled_from(["10.9.0.0/16", "10.9.9.9/32"])),
        st.builds(lambda p: f"DST-PORT,{p}", st.sampled_from(PORTS)),
        st.builds(lambda p: f"SRC-PORT,{p}", st.sampled_from(PORTS)),
        st.builds(lambda n: f"NETWORK,{n}", st.sampled_from(["tcp", "udp"])),
        st.builds(lambda n: f"PROCESS-NAME,{n}", st.sampled_from(["curl", "apt"])),
        st.just("PROCESS-PATH,/usr/bin/apt"),
        st.builds(lambda u: f"UID,{u}", st.sampled_from(["0", "1000", "500-2000"])),
    )


def _logic(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    def wrap(op: str, parts: list[str]) -> str:
        if op == "NOT":
            parts = parts[:1]
        return op + ",(" + ",".join(f"({p})" for p in parts) + ")"

    return st.builds(
        wrap, st.sampled_from(["AND", "OR", "NOT"]), st.lists(children, min_size=1, max_size=3)
    )


conditions = st.recursive(leaf_texts(), _logic, max_leaves=6)


def rule_texts() -> st.SearchStrategy[str]:
    target = st.sampled_from(["DIRECT", "REJECT", "proxy", "noudp"])
    sets = st.builds(
        lambda n, o: f"RULE-SET,{n}", st.sampled_from(["dom", "ips", "cls"]), st.just("")
    )
    set_opts = st.sampled_from(["", ",no-resolve", ",src"])

    def line(cond: str, tgt: str) -> str:
        # Options follow the target on a rule line (inside logic they follow the value).
        if cond.endswith(",no-resolve") and not cond.startswith(("AND", "OR", "NOT")):
            return f"{cond[: -len(',no-resolve')]},{tgt},no-resolve"
        return f"{cond},{tgt}"

    return st.one_of(
        st.builds(line, conditions, target),
        st.builds(lambda s, t, o: f"{s},{t}{o}", sets, target, set_opts),
    )


rule_lists = st.builds(
    lambda body, match: body + match,
    st.lists(rule_texts(), min_size=1, max_size=12),
    st.sampled_from([[], ["MATCH,proxy"]]),
)


@st.composite
def flows(draw: st.DrawFn) -> dict[str, Any]:
    domain = draw(st.sampled_from([None, *DOMAINS, "A.COM.", "x.ab.com", "a.b.ab.com", "c.x.com"]))
    # Domain-only flows (fake-ip) half the time when there is a domain: resolution matters.
    dst = None if domain and draw(st.booleans()) else draw(st.sampled_from(V4 + V6))
    return {
        "network": draw(st.sampled_from(["tcp", "udp"])),
        "src_ip": draw(st.sampled_from(["10.9.9.9", "10.8.0.1", "10.0.1.1"])),
        "src_port": draw(st.sampled_from([80, 443, 8080, 50000])),
        "dst_ip": dst,
        "dst_port": draw(st.sampled_from([80, 443, 450, 8080, 5353])),
        "domain": domain,
        "process": draw(st.sampled_from([None, *PROCS])),
        "resolved": draw(st.lists(st.sampled_from(V4 + V6), min_size=1, max_size=2)),
    }


SETS = {
    "dom": rules.parse_rule_set(
        "dom", "\n".join(DOMAIN_SET), behavior="domain", format="text", file="dom.txt"
    ),
    "ips": rules.parse_rule_set(
        "ips", "\n".join(IP_SET), behavior="ipcidr", format="text", file="ips.txt"
    ),
    "cls": rules.parse_rule_set(
        "cls", "\n".join(CLASSICAL_SET), behavior="classical", format="text", file="cls.txt"
    ),
}


# --- the reference: one rule after the other --------------------------------------------------


def _addr(text: str) -> tuple[int, int]:
    a = ipaddress.ip_address(text)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.version, int(a)


def _cidr_has(c: Cidr, text: str | None) -> bool:
    if text is None:
        return False
    version, n = _addr(text)
    return (version == 6) == c.v6 and c.lo <= n <= c.hi


@dataclass
class Ref:
    f: dict[str, Any]
    resolved: bool = False
    resolve_calls: int = 0
    process_calls: int = 0
    _proc: list[ProcessInfo | None] = field(default_factory=list)
    parent: Ref | None = None

    def swapped(self) -> Ref:
        """mihomo's SwapSrcDst: addresses (the resolved one included) and ports."""
        ips = self.dst_ips()
        f = dict(self.f, src_ip=ips[0] if ips else None, dst_ip=self.f["src_ip"],
                 src_port=self.f["dst_port"], dst_port=self.f["src_port"])
        return Ref(f, parent=self)

    def domain(self) -> str | None:
        d = self.f["domain"]
        return d.lower().rstrip(".") if d else None

    def dst_ips(self) -> list[str]:
        if self.f["dst_ip"] is not None:
            return [self.f["dst_ip"]]
        if not self.resolved:
            return []
        resolved = self.f["resolved"]
        v4 = [ip for ip in resolved if _addr(ip)[0] == 4]
        return (v4 or resolved)[:1]

    def process(self) -> ProcessInfo | None:
        if self.parent is not None:
            return self.parent.process()
        if not self._proc:
            self.process_calls += 1
            self._proc.append(self.f["process"])
        return self._proc[0]

    def leaf(self, leaf: Leaf, no_resolve: bool, src: bool) -> bool:
        kind, v = leaf.kind, leaf.value
        d = self.domain()
        if kind == "DOMAIN":
            return d == v
        if kind == "DOMAIN-SUFFIX":
            return d is not None and (d == v or d.endswith("." + str(v)))
        if kind == "DOMAIN-KEYWORD":
            return d is not None and str(v) in d
        if kind == "DOMAIN-REGEX":
            return d is not None and re.search(str(v), d, re.IGNORECASE) is not None
        if kind in ("IP-CIDR", "IP-CIDR6"):
            assert isinstance(v, Cidr)
            if src or leaf.src:
                return _cidr_has(v, self.f["src_ip"])
            return any(_cidr_has(v, ip) for ip in self.dst_ips())
        if kind == "SRC-IP-CIDR":
            assert isinstance(v, Cidr)
            return _cidr_has(v, self.f["src_ip"])
        if kind in ("DST-PORT", "SRC-PORT"):
            port = self.f["dst_port" if kind == "DST-PORT" else "src_port"]
            return any(lo <= port <= hi for lo, hi in v)  # type: ignore[attr-defined]
        if kind == "NETWORK":
            return bool(self.f["network"] == v)
        p = self.process()
        if p is None:
            return False
        if kind == "PROCESS-NAME":
            return p.name == v
        if kind == "PROCESS-PATH":
            return p.path == v
        return any(lo <= p.uid <= hi for lo, hi in v)  # type: ignore[attr-defined]

    def node(self, n: Node, no_resolve: bool = False, src: bool = False) -> bool:
        if isinstance(n, Leaf):
            return self.leaf(n, no_resolve, src)
        if isinstance(n, Logic):
            results = (self.node(c, no_resolve, src) for c in n.children)
            if n.op == "AND":
                return all(results)
            if n.op == "OR":
                return any(results)
            return not next(results)
        return self.set_entry(n) is not None

    def set_entry(self, ref: SetRef) -> int | None:
        data = SETS[ref.name]
        for i, e in enumerate(data.parsed):
            if isinstance(e, DomainEntry):
                d = self.domain()
                if d is None:
                    continue
                dom = e.domain
                hit = {
                    "exact": d == dom,
                    "plus": d == dom or d.endswith("." + dom),
                    "sub": d.endswith("." + dom),
                    "one": d.endswith("." + dom) and "." not in d[: -len(dom) - 1],
                    "pattern": re.fullmatch(dom.replace(".", r"\.").replace("*", "[^.]+"), d)
                    is not None,
                    "plus-pattern": re.fullmatch(
                        r"(?:.+\.)?" + dom.replace(".", r"\.").replace("*", "[^.]+"), d
                    ) is not None,
                }[e.mode]
            elif isinstance(e, Cidr):
                if ref.src:
                    hit = _cidr_has(e, self.f["src_ip"])
                else:
                    hit = any(_cidr_has(e, ip) for ip in self.dst_ips())
            elif ref.src:
                hit = self.swapped().node(e, ref.no_resolve, False)
            else:
                hit = self.node(e, ref.no_resolve, False)
            if hit:
                return i
        return None


def _leaf_resolves(n: Node, no_resolve: bool, src: bool) -> bool:
    if isinstance(n, Leaf):
        return (
            n.kind in ("IP-CIDR", "IP-CIDR6")
            and not (no_resolve or n.no_resolve)
            and not (src or n.src)
        )
    if isinstance(n, Logic):
        return any(_leaf_resolves(c, no_resolve, src) for c in n.children)
    return _set_resolves(n, no_resolve or n.no_resolve, src or n.src)


def _set_resolves(ref: SetRef, no_resolve: bool, src: bool) -> bool:
    data = SETS[ref.name]
    if data.behavior == "ipcidr":
        return not no_resolve and not src and len(data) > 0
    if data.behavior == "classical":
        # mihomo asks the set (not the swapped flow) whether it resolves.
        return any(_leaf_resolves(e, no_resolve, False) for e in data.parsed)  # type: ignore[arg-type]
    return False


def reference(
    lines: list[str], f: dict[str, Any]
) -> tuple[tuple[str, int | None, str | None], Ref]:
    ref = Ref(f)
    for n, text in enumerate(lines, 1):
        parsed = parse_rule_line(text, "cfg", n, targets={"proxy", "noudp"}, rule_sets=SETS)
        node = parsed.node
        if node is None:
            return (parsed.target, n, None), ref
        if (
            f["dst_ip"] is None
            and f["domain"]
            and not ref.resolved
            and _leaf_resolves(node, False, False)
        ):
            ref.resolved = True
            ref.resolve_calls += 1
        if f["network"] == "udp" and parsed.target == "noudp":
            continue  # the upstream has no UDP: mihomo goes on with the next rule
        if isinstance(node, SetRef):
            i = ref.set_entry(node)
            if i is not None:
                return (parsed.target, n, SETS[node.name].describe(i)), ref
        elif ref.node(node):
            return (parsed.target, n, None), ref
    return ("DIRECT", None, None), ref


def _counted(value: Any) -> tuple[Callable[[], Any], list[int]]:
    calls = [0]

    def get() -> Any:
        calls[0] += 1
        return value

    return get, calls


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_lists, st.lists(flows(), min_size=1, max_size=8))
def test_engine_agrees_with_linear_scan(lines: list[str], flow_list: list[dict[str, Any]]) -> None:
    compiled = rules.compile(
        [RuleSource(t, "cfg", n) for n, t in enumerate(lines, 1)], SETS, ["proxy", "noudp"],
        no_udp=["noudp"],
    )
    for f in flow_list:
        expected, ref = reference(lines, f)
        proc, proc_calls = _counted(f["process"])
        res, res_calls = _counted(f["resolved"])
        v = compiled.match(
            FlowMeta(
                f["network"],
                f["src_ip"],
                f["src_port"],
                f["dst_ip"],
                f["dst_port"],
                f["domain"],
                proc,
                res,
            )
        )
        got = (v.target, v.rule.line if v.rule else None, v.rule_set_entry)
        assert got == expected, (lines, f)
        assert proc_calls[0] == ref.process_calls, (lines, f)
        assert res_calls[0] <= 1
        if ref.resolve_calls == 0:
            assert res_calls[0] == 0, (lines, f)


# --- the lookup tables alone ----------------------------------------------------------------

ranges = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 20), st.integers(0, 30)).map(
        lambda t: (t[0], t[0] + t[1], t[2])
    ),
    max_size=12,
)


@given(ranges, st.lists(st.integers(-1, 90), min_size=1, max_size=20))
def test_intervals_give_smallest_covering_order(
    items: list[tuple[int, int, int]], keys: list[int]
) -> None:
    table = Intervals(items)
    for k in keys:
        expected = min((o for lo, hi, o in items if lo <= k <= hi), default=NEVER)
        assert table.lookup(k) == expected


words = st.text(alphabet="ab.-", min_size=1, max_size=5)


@given(
    st.dictionaries(words, st.integers(0, 50), min_size=1, max_size=10),
    st.lists(st.text(alphabet="abc.-", max_size=300), min_size=1, max_size=10),
)
def test_keywords_give_smallest_order_present(kws: dict[str, int], domains: list[str]) -> None:
    table = Keywords(kws)
    for d in domains:
        expected = min((o for w, o in kws.items() if w in d), default=NEVER)
        assert table.first(d) == expected


@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.booleans())
def test_ipv6_cidr_parsing_matches_ipaddress(n: int, plen: int, exploded: bool) -> None:
    addr = ipaddress.IPv6Address(n)
    text = f"{addr.exploded if exploded else addr.compressed}/{plen}"
    net = ipaddress.IPv6Network(text, strict=False)
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if plen >= 96 and lo >> 32 == 0xFFFF:  # IPv4-mapped: folded into IPv4
        assert parse_cidr(text) == Cidr(False, lo & 0xFFFFFFFF, hi & 0xFFFFFFFF)
    else:
        assert parse_cidr(text) == Cidr(True, lo, hi)


@given(st.integers(0, 2**32 - 1), st.integers(0, 32))
def test_ipv4_cidr_parsing_matches_ipaddress(n: int, plen: int) -> None:
    text = f"{ipaddress.IPv4Address(n)}/{plen}"
    net = ipaddress.IPv4Network(text, strict=False)
    assert parse_cidr(text) == Cidr(False, int(net.network_address), int(net.broadcast_address))


# --- large sets: packed tables against the same sets kept entry by entry ----------------------

BIG_LABELS = [f"n{i}" for i in range(40)]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.sampled_from(["", "+.", ".", "*."]), st.sampled_from(BIG_LABELS),
                  st.sampled_from([*BIG_LABELS, ""]), st.sampled_from(TLDS)),
        min_size=1, max_size=60,
    ),
    st.lists(st.tuples(st.sampled_from([*BIG_LABELS, "www", "x"]), st.sampled_from(BIG_LABELS),
                       st.sampled_from([*BIG_LABELS, ""]), st.sampled_from(TLDS)),
             min_size=1, max_size=30),
)
def test_packed_domain_tables_agree_with_dicts(
    entries: list[tuple[str, str, str, str]], queries: list[tuple[str, str, str, str]]
) -> None:
    """Sets over the threshold (1024 filler entries each) sharing some entries, in
    bulk-parsed YAML and text and a classical set: the packed tables give the same rule as
    dicts do."""
    def host(a: str, b: str, tld: str) -> str:
        return ".".join(p for p in (a, b, tld) if p)

    written = [p + host(a, b, t) for p, a, b, t in entries]
    half = len(written) // 2
    one = written[:half] + [f"+.f{i}.filler" for i in range(1024)]
    two = written[half // 2 :] + [f"g{i}.filler" for i in range(1024)]
    sets = {
        "one": rules.parse_rule_set("one", "payload:\n" + "".join(f"  - '{e}'\n" for e in one),
                                    behavior="domain", format=None, file="one.yaml"),
        "two": rules.parse_rule_set("two", "\n".join(two), behavior="domain", format=None,
                                    file="two.list"),
    }
    kinds = ["DOMAIN-SUFFIX", "DOMAIN", "DOMAIN-KEYWORD"]
    three = [f"{kinds[i % 3]},{host(a, b, t)}" for i, (_, a, b, t) in enumerate(entries)]
    sets["three"] = rules.parse_rule_set(
        "three", "\n".join([*three, *(f"DOMAIN-SUFFIX,h{i}.filler" for i in range(1024))]),
        behavior="classical", format="text", file="three.list")
    assert isinstance(sets["one"].parsed, rules.provider.BulkDomains)
    assert isinstance(sets["two"].parsed, rules.provider.BulkDomains)
    texts = ["DOMAIN,n1.com,proxy", "RULE-SET,three,DROP", "RULE-SET,one,REJECT",
             "RULE-SET,two,proxy", "MATCH,DIRECT"]
    lines = [RuleSource(t, "cfg", n) for n, t in enumerate(texts, 1)]
    packed = rules.compile(lines, sets, ["proxy"])
    plain = rules.compile(lines, sets, ["proxy"], keep_entries=True)
    for q in queries:
        d = host(q[0], host(q[1], q[2], ""), q[3])
        f = FlowMeta("tcp", "10.0.0.2", 1, None, 443, d)
        a, b = packed.match(f), plain.match(f)
        assert (a.target, a.rule) == (b.target, b.rule), d
