"""Benchmark the rule engine on a realistic 100k-entry rule set.

The set is a Clash config's usual shape: a few inline rules, then four classical rule
sets (domain-suffix, domain, keyword and CIDR entries mixed) with different targets, then
MATCH. Reports parse and compile time, memory (tracemalloc peak and RSS growth), median
and p99 per match over a mix of flows (suffix hits, exact hits, keyword hits, CIDR hits,
misses), and the same flows through a naive first-match scan of the same rules.

    python3 bench/bench_rules.py [--entries 100000] [--flows 20000] [--seed 1]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import statistics
import string
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Measure the checkout this file is in, whatever an installed copy points at.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rules
from rules import FlowMeta, RuleSource

TLDS = ["com", "net", "org", "io", "cn", "de", "co.uk", "jp", "ru", "xyz"]
TARGETS = ["proxy", "DIRECT", "REJECT", "proxy2"]


def _label(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    return "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(lo, hi)))


@dataclass
class Generated:
    inline: list[str]
    sets: dict[str, str]  # name -> classical text
    suffixes: list[str]
    domains: list[str]
    keywords: list[str]
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network]


def generate(entries: int, rng: random.Random) -> Generated:
    """Entry mix: 55% DOMAIN-SUFFIX, 25% DOMAIN, 3% DOMAIN-KEYWORD, 17% IP-CIDR (v4 and v6)."""
    suffixes: list[str] = []
    domains: list[str] = []
    keywords: list[str] = []
    cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    lines: list[str] = []
    for _ in range(entries):
        r = rng.random()
        if r < 0.55:
            d = f"{_label(rng)}.{rng.choice(TLDS)}"
            suffixes.append(d)
            lines.append(f"DOMAIN-SUFFIX,{d}")
        elif r < 0.80:
            d = f"{_label(rng, 2, 6)}.{_label(rng)}.{rng.choice(TLDS)}"
            domains.append(d)
            lines.append(f"DOMAIN,{d}")
        elif r < 0.83:
            k = _label(rng, 5, 9)
            keywords.append(k)
            lines.append(f"DOMAIN-KEYWORD,{k}")
        elif r < 0.97:
            plen = rng.choice([8, 12, 16, 16, 20, 22, 24, 24, 24, 32])
            net = ipaddress.IPv4Network((rng.getrandbits(32), plen), strict=False)
            cidrs.append(net)
            lines.append(f"IP-CIDR,{net},no-resolve")
        else:
            plen = rng.choice([32, 36, 48, 56, 64])
            net6 = ipaddress.IPv6Network(((0x2 << 124) | rng.getrandbits(124), plen), strict=False)
            cidrs.append(net6)
            lines.append(f"IP-CIDR6,{net6},no-resolve")
    quarter = (len(lines) + 3) // 4
    sets = {f"set{i}": "\n".join(lines[i * quarter : (i + 1) * quarter]) for i in range(4)}
    inline = [
        "DOMAIN-SUFFIX,local,DIRECT",
        "IP-CIDR,127.0.0.0/8,DIRECT,no-resolve",
        "IP-CIDR,192.168.0.0/16,DIRECT,no-resolve",
        "DOMAIN-KEYWORD,adservice,REJECT",
        "DST-PORT,25,REJECT",
        "AND,((NETWORK,udp),(DST-PORT,443)),REJECT",
        *(f"RULE-SET,set{i},{TARGETS[i]}" for i in range(4)),
        "MATCH,proxy",
    ]
    return Generated(inline, sets, suffixes, domains, keywords, cidrs)


def flows(g: Generated, n: int, rng: random.Random) -> list[FlowMeta]:
    """30% suffix hits, 15% exact hits, 5% keyword hits, 25% CIDR hits, 25% misses."""
    out: list[FlowMeta] = []
    for _ in range(n):
        r = rng.random()
        dom: str | None = None
        ip: str | None = None
        if r < 0.30:
            dom = f"{_label(rng, 2, 8)}.{rng.choice(g.suffixes)}"
        elif r < 0.45:
            dom = rng.choice(g.domains)
        elif r < 0.50:
            dom = f"{_label(rng, 2, 5)}{rng.choice(g.keywords)}{_label(rng, 0, 4)}.com"
        elif r < 0.75:
            net = rng.choice(g.cidrs)
            ip = str(net.network_address + rng.randrange(net.num_addresses))
        elif r < 0.875:
            dom = f"www.{_label(rng)}.{rng.choice(TLDS)}"
        else:
            ip = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        out.append(FlowMeta("tcp", "10.0.0.2", rng.randrange(1024, 65535), ip, 443, dom))
    return out


# --- the naive baseline: one rule after the other -----------------------------------------


def naive_compile(g: Generated) -> list[tuple[Callable[[FlowMeta], bool], str]]:
    """The same rules as a flat list of (predicate, target), tried in order."""
    out: list[tuple[Callable[[FlowMeta], bool], str]] = []

    def add_line(kind: str, value: str, target: str) -> None:
        if kind == "DOMAIN-SUFFIX":
            dotted = "." + value

            def suffix_match(f: FlowMeta) -> bool:
                return f.domain is not None and (f.domain == value or f.domain.endswith(dotted))

            out.append((suffix_match, target))
        elif kind == "DOMAIN":
            out.append((lambda f: f.domain == value, target))
        elif kind == "DOMAIN-KEYWORD":
            out.append((lambda f: f.domain is not None and value in f.domain, target))
        elif kind in ("IP-CIDR", "IP-CIDR6"):
            net = ipaddress.ip_network(value)
            lo, hi, v = int(net.network_address), int(net.broadcast_address), net.version

            def ip_match(f: FlowMeta) -> bool:
                if f.dst_ip is None:
                    return False
                a = ipaddress.ip_address(f.dst_ip)
                return a.version == v and lo <= int(a) <= hi

            out.append((ip_match, target))
        elif kind == "DST-PORT":
            port = int(value)
            out.append((lambda f: f.dst_port == port, target))
        else:
            out.append((lambda f: False, target))

    for line in g.inline:
        parts = line.split(",")
        if parts[0] == "MATCH":
            out.append((lambda f: True, parts[1]))
        elif parts[0] == "RULE-SET":
            for entry in g.sets[parts[1]].splitlines():
                e = entry.split(",")
                add_line(e[0], e[1], parts[2])
        elif parts[0] == "AND":
            out.append((lambda f: f.network == "udp" and f.dst_port == 443, parts[-1]))
        else:
            add_line(parts[0], parts[1], parts[2])
    return out


def naive_match(naive: list[tuple[Callable[[FlowMeta], bool], str]], flow: FlowMeta) -> str:
    for pred, target in naive:
        if pred(flow):
            return target
    return "DIRECT"


def _percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def build(g: Generated) -> tuple[rules.RuleSet, dict[str, float]]:
    """Parse the rule sets and compile; wall and CPU seconds of each step (CPU time is the
    fairer figure on a shared machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    sets = {
        name: rules.parse_rule_set(
            name, text, behavior="classical", format="text", file=f"{name}.list"
        )
        for name, text in g.sets.items()
    }
    w1, c1 = time.perf_counter(), time.process_time()
    lines = [RuleSource(t, "config.yaml", i + 1) for i, t in enumerate(g.inline)]
    rs = rules.compile(lines, sets, ["proxy", "proxy2"])
    w2, c2 = time.perf_counter(), time.process_time()
    return rs, {"parse": w1 - w0, "parse_cpu": c1 - c0, "compile": w2 - w1, "compile_cpu": c2 - c1}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--naive-flows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    g = generate(args.entries, rng)
    fl = flows(g, args.flows, rng)

    gc.collect()
    rss0 = _rss_kib()
    rs, times = build(g)
    gc.collect()
    rss1 = _rss_kib()
    del rs
    gc.collect()
    tracemalloc.start()
    rs, _ = build(g)
    _, peak = tracemalloc.get_traced_memory()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # Warm the per-rule verdict cache and the address cache like a running proxy would.
    for f in fl[:1000]:
        rs.match(f)
    samples: list[float] = []
    clock = time.perf_counter_ns
    match = rs.match
    for f in fl:
        t = clock()
        match(f)
        samples.append((clock() - t) / 1000)
    med = statistics.median(samples)
    p99 = _percentile(samples, 0.99)

    naive = naive_compile(g)
    nsamples: list[float] = []
    agree = 0
    for f in fl[: args.naive_flows]:
        t = clock()
        target = naive_match(naive, f)
        nsamples.append((clock() - t) / 1000)
        agree += target == rs.match(f).target
    nmed = statistics.median(nsamples)

    ms = {k: v * 1000 for k, v in times.items()}
    total_cpu = ms["parse_cpu"] + ms["compile_cpu"]
    print(f"entries            {args.entries} (+{len(g.inline)} inline rules)")
    print(f"parse rule sets    {ms['parse']:.0f} ms wall, {ms['parse_cpu']:.0f} ms CPU")
    print(
        f"compile            {ms['compile']:.0f} ms wall, {ms['compile_cpu']:.0f} ms CPU"
        f"   (parse + compile: {total_cpu:.0f} ms CPU; target < 1000)"
    )
    print(
        f"memory             {held / 2**20:.1f} MiB held, {peak / 2**20:.1f} MiB peak "
        f"(tracemalloc); RSS +{(rss1 - rss0) / 1024:.1f} MiB"
    )
    print(
        f"match              median {med:.2f} us (target < 10), p99 {p99:.2f} us "
        f"(target < 50), max {max(samples):.0f} us over {len(samples)} flows"
    )
    print(
        f"naive linear scan  median {nmed:.0f} us over {len(nsamples)} flows "
        f"({nmed / med:.0f}x slower); verdicts agree on {agree}/{len(nsamples)}"
    )
    return 0 if agree == len(nsamples) else 1


if __name__ == "__main__":
    raise SystemExit(main())
