"""Benchmark the rule engine on a realistic 100k-entry rule set.

The set is a Clash config's usual shape: a few inline rules, then four classical rule
sets (domain-suffix, domain, keyword and CIDR entries mixed) with different targets, then
MATCH. Reports parse and compile time, memory (tracemalloc peak and RSS growth), median
and p99 per match over a mix of flows (suffix hits, exact hits, keyword hits, CIDR hits,
misses), and the same flows through a naive first-match scan of the same rules.

    python3 bench/bench_rules.py [--entries 100000] [--flows 20000] [--seed 1]

``--loyalsoldier`` instead measures a whole config of Loyalsoldier/clash-rules' shape
(generated: domain sets of '+.name' entries in YAML, CIDR sets, a small classical set;
~270k entries, ``--scale`` to change it), loaded by ``tunproxy.config`` in a fresh
process: CPU seconds to load, RSS at rest (the whole process), bytes kept per domain and
per CIDR entry, and the match median.

    python3 bench/bench_rules.py --loyalsoldier [--scale 1.0]
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


# --- a Loyalsoldier/clash-rules-shaped config -----------------------------------------------

# Entry counts of the usual Loyalsoldier config (direct, proxy, reject, gfw, ... and cncidr),
# ~270k entries in all.
LOYAL_DOMAIN_SETS = {"reject": 100_000, "direct": 110_000, "proxy": 40_000, "gfw": 6_000,
                     "private": 120, "tld-not-cn": 100, "icloud": 80, "apple": 250,
                     "google": 120}
LOYAL_CIDR_SETS = {"cncidr": 12_000, "lancidr": 20, "telegramcidr": 20}
LOYAL_CONFIG = """\
mixed-port: 7890
mode: rule
rule-providers:
{providers}
rules:
  - RULE-SET,applications,DIRECT
  - DOMAIN,clash.razord.top,DIRECT
  - DOMAIN,yacd.haishan.me,DIRECT
  - RULE-SET,private,DIRECT
  - RULE-SET,reject,REJECT
  - RULE-SET,icloud,DIRECT
  - RULE-SET,apple,DIRECT
  - RULE-SET,google,DIRECT
  - RULE-SET,proxy,DIRECT
  - RULE-SET,direct,DIRECT
  - RULE-SET,lancidr,DIRECT
  - RULE-SET,cncidr,DIRECT
  - RULE-SET,telegramcidr,DIRECT
  - GEOIP,LAN,DIRECT
  - MATCH,DIRECT
"""


def _domain(rng: random.Random) -> str:
    depth = rng.choices([1, 2, 3], weights=[70, 25, 5])[0]
    return ".".join(_label(rng, 2, 12) for _ in range(depth)) + "." + rng.choice(TLDS)


def write_loyalsoldier(directory: Path, rng: random.Random, scale: float) -> dict[str, list[str]]:
    """Write the rule files and config.yaml; returns some entries of each set (for flows)."""
    providers = []
    samples: dict[str, list[str]] = {}
    for name, count in LOYAL_DOMAIN_SETS.items():
        names = [_domain(rng) for _ in range(max(1, int(count * scale)))]
        samples[name] = names[:: max(1, len(names) // 200)]
        body = "".join(f"  - '+.{d}'\n" for d in names)
        (directory / f"{name}.txt").write_text(f"payload:\n{body}")
        providers.append(f"  {name}: {{type: file, behavior: domain, path: ./{name}.txt}}")
    for name, count in LOYAL_CIDR_SETS.items():
        nets = []
        for i in range(max(1, int(count * scale))):
            if i % 8 == 7:
                nets.append(f"240e:{rng.randrange(65536):x}:{rng.randrange(65536):x}::/48")
            else:
                a, b, c = rng.randrange(1, 223), rng.randrange(256), rng.randrange(256)
                nets.append(f"{a}.{b}.{c}.0/24")
        samples[name] = [n.split("/")[0] for n in nets[:: max(1, len(nets) // 200)]]
        body = "".join(f"  - '{n}'\n" for n in nets)
        (directory / f"{name}.txt").write_text(f"payload:\n{body}")
        providers.append(f"  {name}: {{type: file, behavior: ipcidr, path: ./{name}.txt}}")
    apps = "".join(f"  - PROCESS-NAME,app{i}\n" for i in range(60))
    (directory / "applications.txt").write_text(f"payload:\n{apps}")
    providers.append("  applications: {type: file, behavior: classical, path: ./applications.txt}")
    (directory / "config.yaml").write_text(LOYAL_CONFIG.format(providers="\n".join(providers)))
    return samples


def measure_config(config: Path, flows_file: Path | None) -> dict[str, float]:
    """In this (fresh) process: load the config, then RSS at rest and match times."""
    import json

    from tunproxy.config import load_config

    c0, w0 = time.process_time(), time.perf_counter()
    loaded = load_config(config)
    c1, w1 = time.process_time(), time.perf_counter()
    gc.collect()
    out = {"load_cpu": c1 - c0, "load_wall": w1 - w0, "rss_kib": _rss_kib()}
    if flows_file is not None:
        targets = json.loads(flows_file.read_text())
        fl = [FlowMeta("tcp", "172.19.0.2", 40000, ip, 443, domain) for domain, ip in targets]
        match = loaded.ruleset.match
        for f in fl[:500]:
            match(f)
        samples = []
        clock = time.perf_counter_ns
        for f in fl:
            t = clock()
            match(f)
            samples.append((clock() - t) / 1000)
        out["match_median_us"] = statistics.median(samples)
        out["match_p99_us"] = _percentile(samples, 0.99)
    return out


def bytes_per_entry(rng: random.Random, n: int = 50_000) -> tuple[float, float]:
    """Bytes kept (tracemalloc, after compiling; the parsed set freed) per '+.domain' entry
    and per CIDR entry."""
    domains = "\n".join("+." + _domain(rng) for _ in range(n))
    cidrs = "\n".join(f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.0/24"
                      for _ in range(n))
    out = []
    for behavior, text in (("domain", domains), ("ipcidr", cidrs)):
        gc.collect()
        tracemalloc.start()
        data = rules.parse_rule_set("s", text, behavior=behavior, format="text", file="s.txt")
        rs = rules.compile([RuleSource("RULE-SET,s,DIRECT", "c.yaml", 1)], {"s": data}, ())
        del data
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out.append(held / n)
        del rs
    return out[0], out[1]


def loyalsoldier(args: argparse.Namespace) -> int:
    import json
    import subprocess
    import tempfile

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="tunproxy-bench-") as tmp:
        directory = Path(tmp)
        samples = write_loyalsoldier(directory, rng, args.scale)
        entries = sum(max(1, int(c * args.scale)) for c in
                      [*LOYAL_DOMAIN_SETS.values(), *LOYAL_CIDR_SETS.values()]) + 60
        flows: list[tuple[str | None, str | None]] = []
        for name, values in samples.items():
            for v in values:
                if name in LOYAL_CIDR_SETS:
                    flows.append((None, v))
                else:
                    flows.append(("www." + v, "203.0.113.9"))
        flows += [(_domain(rng), "203.0.113.10") for _ in range(len(flows))]  # misses
        rng.shuffle(flows)
        (directory / "flows.json").write_text(json.dumps(flows))
        proc = subprocess.run(
            [sys.executable, __file__, "--measure-config", str(directory / "config.yaml"),
             "--flows-file", str(directory / "flows.json")],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        m = json.loads(proc.stdout)
    per_domain, per_cidr = bytes_per_entry(rng)
    print(f"config             Loyalsoldier-shaped, {entries} entries (scale {args.scale})")
    print(f"load               {m['load_cpu']:.2f} s CPU, {m['load_wall']:.2f} s wall "
          "(target < 1 s CPU)")
    print(f"RSS at rest        {m['rss_kib'] / 1024:.1f} MiB, whole process (target < 60)")
    print(f"kept per entry     {per_domain:.0f} B a domain entry (target <= 120), "
          f"{per_cidr:.0f} B a CIDR entry (target <= 40)")
    print(f"match              median {m['match_median_us']:.2f} us (target < 10), "
          f"p99 {m['match_p99_us']:.2f} us over {len(flows)} flows")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--flows", type=int, default=20_000)
    ap.add_argument("--naive-flows", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--loyalsoldier", action="store_true",
                    help="measure a whole Loyalsoldier-shaped config instead")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--measure-config", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--flows-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure_config is not None:
        import json

        print(json.dumps(measure_config(args.measure_config, args.flows_file)))
        return 0
    if args.loyalsoldier:
        return loyalsoldier(args)
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
