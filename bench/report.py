"""What a benchmark run produced, and how it is shown: the table, the targets, the JSON.

A run is a list of ``Section``s (one per MTU), each a list of ``Column``s (baseline, DIRECT,
SOCKS5, with offloads on or off), each holding one ``Cell`` per figure. A section is
measured in rounds: every round measures the baseline and then every column once, so each
tunproxy sample has a baseline sample taken a minute or two before it on the same machine.
The figure shown is the median of a cell's samples; its ratio is the median of the per-round
ratios (sample / that round's baseline sample), which cancels most of the drift of a shared,
noisy machine.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

# -- figures ------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    test: str  # the --only group that measures it
    digits: int = 0
    # Latencies also show the time added over the baseline.
    show_added: bool = False


METRICS: tuple[Metric, ...] = (
    Metric("tcp_up", "TCP upload, 1 stream", "Gbit/s", True, "tcp", 2),
    Metric("tcp_down", "TCP download, 1 stream (-R)", "Gbit/s", True, "tcp", 2),
    Metric("tcp_up_p4", "TCP upload, 4 streams (-P 4)", "Gbit/s", True, "tcp", 2),
    Metric("cps", "connections/s (connect + 1 B echo + close)", "conn/s", True, "cps"),
    Metric("conn_p50", "  new connection latency p50", "us", False, "cps", 0, True),
    Metric("conn_p99", "  new connection latency p99", "us", False, "cps", 0, True),
    Metric("rr_p50", "request/response latency p50 (64 B)", "us", False, "latency", 0, True),
    Metric("rr_p99", "request/response latency p99 (64 B)", "us", False, "latency", 0, True),
    Metric("udp_rr", "UDP request/response rate (64 B)", "req/s", True, "udp"),
    Metric("dgram", "UDP datagrams/s echoed (32 in flight, 64 B)", "dgram/s", True, "dgram"),
    Metric("dns_qps", "DNS answers/s (fake-ip; baseline: dnsmasq)", "answers/s", True, "dns"),
    Metric("rss_rest", "proxy RSS at rest", "MiB", False, "mem", 1),
    Metric("rss_per_flow", "proxy RSS per idle TCP flow", "KiB", False, "mem", 1),
    # The proxy process's user + system CPU (tunproxy or a peer; /proc, like `time`).
    Metric("cpu_conn", "proxy CPU per connection (connections/s run)", "us", False, "cps"),
    Metric("cpu_conn_sys", "  of which system (kernel, in its system calls)", "us", False,
           "cps"),
    Metric("cpu_udp", "proxy CPU per UDP round trip (64 B, request/response run)", "us", False,
           "udp", 1),
    Metric("cpu_gb_up", "proxy CPU per GB, TCP upload", "ms", False, "tcp"),
    Metric("cpu_gb_down", "proxy CPU per GB, TCP download", "ms", False, "tcp"),
    # Per datagram echoed (one up, one down) in the datagrams/s run; the QUIC columns' MASQUE
    # server (tunproxy server, h2o) is a process of its own.
    Metric("cpu_dgram", "proxy CPU per datagram echoed", "us", False, "dgram", 1),
    Metric("cpu_dgram_server", "  MASQUE server CPU per datagram echoed", "us", False, "dgram",
           1),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
TESTS = ("tcp", "cps", "latency", "mem", "udp", "dgram", "dns")
PATHS = ("baseline", "direct", "socks5", "hev", "redsocks", "socks5-only", "quic", "quic-h2o",
         "direct-api", "capture-other", "capture-self")
# Peers (bench/peers.py): other proxies through the same SOCKS5 server, measured in the same run.
PEER_LABELS = {"hev": "hev > SOCKS5", "redsocks": "redsocks > SOCKS5"}
# Measured only when asked for (--paths): DIRECT with a dashboard polling the controller API
# every second while 1,000 idle flows are open (issue 13's cost of the flow table and API).
OPT_IN_PATHS = ("direct-api",)
# DIRECT while a pcapng capture runs (issue 14, GET /capture through the controller): of
# another process's flows (the measured flow only pays the selection check), or of the
# measured flow itself (what a capture costs the flow it records). Their cells are also
# shown as a ratio to DIRECT, measured in the same round.
CAPTURE_PATHS = {"capture-other": "DIRECT +capture other", "capture-self": "DIRECT +capture self"}
RELATIVE_TO = {"capture-other": "direct", "capture-self": "direct"}


# -- results ------------------------------------------------------------------


@dataclass
class Cell:
    samples: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round each sample was taken in
    errors: list[str] = field(default_factory=list)
    note: str | None = None

    def add(self, value: float, round_index: int) -> None:
        self.samples.append(value)
        self.rounds.append(round_index)

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def error(self) -> str | None:
        """Why there is no figure (the first failure), if there is none."""
        return None if self.samples or not self.errors else self.errors[0]


@dataclass
class Column:
    # baseline | direct | socks5 | hev | redsocks | socks5-only (the SOCKS5 server alone)
    # | quic (through tunproxy server) | quic-h2o (through h2o)
    path: str
    offload: bool = True
    tests: tuple[str, ...] = TESTS
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.path == "baseline":
            return "baseline"
        if self.path == "socks5-only":
            return "SOCKS5 only"
        if self.path in PEER_LABELS:
            return PEER_LABELS[self.path]
        name = {"direct": "DIRECT", "socks5": "SOCKS5", "quic": "QUIC",
                "quic-h2o": "QUIC h2o", "direct-api": "DIRECT +API", **CAPTURE_PATHS}[self.path]
        return name if self.offload else f"{name} no-offload"

    def cell(self, key: str) -> Cell:
        return self.cells.setdefault(key, Cell())

    def value(self, key: str) -> float | None:
        cell = self.cells.get(key)
        return cell.value if cell is not None else None


@dataclass
class Section:
    mtu: int
    columns: list[Column]

    def column(self, path: str) -> Column | None:
        return next((c for c in self.columns if c.path == path), None)

    @property
    def baseline(self) -> Column | None:
        return self.column("baseline")

    def round_ratios(self, column: Column, key: str,
                     reference: Column | None = None) -> list[float]:
        """Each round's ratio to the baseline's (or ``reference``'s) sample of that round."""
        base = reference or self.baseline
        if base is None or base is column:
            return []
        cell, base_cell = column.cells.get(key), base.cells.get(key)
        if cell is None or base_cell is None:
            return []
        by_round = dict(zip(base_cell.rounds, base_cell.samples, strict=True))
        return [value / by_round[r] for value, r in zip(cell.samples, cell.rounds, strict=True)
                if by_round.get(r)]

    def ratio(self, column: Column, key: str, reference: Column | None = None) -> float | None:
        """Median of the per-round ratios to the baseline (or to ``reference``); without
        pairs, ratio of medians."""
        base = reference or self.baseline
        if base is None or base is column:
            return None
        cell, base_cell = column.cells.get(key), base.cells.get(key)
        if cell is None or base_cell is None or not cell.samples or not base_cell.samples:
            return None
        pairs = self.round_ratios(column, key, reference)
        if pairs:
            return statistics.median(pairs)
        reference, value = base_cell.value, cell.value
        if not reference or value is None:
            return None
        return value / reference


# -- table ----------------------------------------------------------------------


def format_number(value: float, digits: int) -> str:
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def render_cell(section: Section, column: Column, metric: Metric, notes: list[str]) -> str:
    if metric.test not in column.tests:
        return "-"
    cell = column.cells.get(metric.key)
    if cell is None:
        return "-"
    value = cell.value
    if value is None:
        if cell.error is None:
            return "-"
        reason = cell.error
        if reason not in notes:
            notes.append(reason)
        return f"n/a [{notes.index(reason) + 1}]"
    text = format_number(value, metric.digits)
    ratio = section.ratio(column, metric.key)
    if ratio is not None:
        base = section.baseline
        assert base is not None
        added = ""
        reference = base.value(metric.key)
        if metric.show_added and reference is not None:
            added = f", +{value - reference:,.0f}" if value >= reference else \
                f", {value - reference:,.0f}"
        text += f" ({ratio:.2f}x{added})"
    relative = section.column(RELATIVE_TO.get(column.path, ""))
    if relative is not None:
        # Against the same run's column it adds to (a capture: against DIRECT).
        to = section.ratio(column, metric.key, reference=relative)
        if to is not None and ratio is not None:
            text = text[:-1] + f", {to:.2f}x {relative.label})"
        elif to is not None:
            text += f" ({to:.2f}x {relative.label})"
    if cell.note:
        if cell.note not in notes:
            notes.append(cell.note)
        text += f" [{notes.index(cell.note) + 1}]"
    return text


def render_table(sections: list[Section]) -> str:
    notes: list[str] = []
    blocks: list[str] = []
    for section in sections:
        header = [f"MTU {section.mtu}", *(c.label for c in section.columns)]
        rows = [header]
        for metric in METRICS:
            if not any(metric.test in c.tests for c in section.columns):
                continue
            rows.append([
                f"{metric.title} [{metric.unit}]",
                *(render_cell(section, c, metric, notes) for c in section.columns),
            ])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = []
        for index, row in enumerate(rows):
            first = row[0].ljust(widths[0])
            rest = [text.rjust(width) for text, width in zip(row[1:], widths[1:], strict=True)]
            lines.append("  ".join([first, *rest]).rstrip())
            if index == 0:
                lines.append("-" * len(lines[0]))
        blocks.append("\n".join(lines))
    text = "\n\n".join(blocks)
    if notes:
        text += "\n\n" + "\n".join(f"[{i + 1}] {note}" for i, note in enumerate(notes))
    return text


# -- targets (issue 7) ----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    path: str
    key: str
    # "ratio": median per-round ratio to ``reference`` >= limit; "ratio_max": that ratio
    # <= limit; "max": median <= limit; "below": median < limit (absolute figures).
    kind: str
    limit: float
    # The column a ratio is taken against: the baseline, or a peer measured in the same run.
    reference: str = "baseline"


TARGETS: tuple[Target, ...] = (
    Target("TCP upload via SOCKS5 >= 0.30x baseline", "socks5", "tcp_up", "ratio", 0.30),
    Target("TCP download via SOCKS5 >= 0.30x baseline", "socks5", "tcp_down", "ratio", 0.30),
    Target("TCP upload via DIRECT >= 0.40x baseline", "direct", "tcp_up", "ratio", 0.40),
    Target("TCP download via DIRECT >= 0.40x baseline", "direct", "tcp_down", "ratio", 0.40),
    Target("connections/s via SOCKS5 >= 0.35x baseline", "socks5", "cps", "ratio", 0.35),
    Target("RSS per idle TCP flow via DIRECT <= 16 KiB", "direct", "rss_per_flow", "max", 16.0),
    Target("RSS per idle TCP flow via SOCKS5 <= 16 KiB", "socks5", "rss_per_flow", "max", 16.0),
    Target("RSS at rest via DIRECT < 60 MiB", "direct", "rss_rest", "below", 60.0),
    Target("RSS at rest via SOCKS5 < 60 MiB", "socks5", "rss_rest", "below", 60.0),
    # Issue 17: against the peers, through the same SOCKS5 server, in the same run.
    Target("connections/s via SOCKS5 >= 1.00x hev's", "socks5", "cps", "ratio", 1.0, "hev"),
    Target("connections/s via DIRECT >= 0.30x baseline", "direct", "cps", "ratio", 0.30),
    Target("new connection latency p50 via SOCKS5 <= hev's", "socks5", "conn_p50",
           "ratio_max", 1.0, "hev"),
    Target("UDP request/response via SOCKS5 >= 1.00x hev's", "socks5", "udp_rr", "ratio", 1.0,
           "hev"),
    Target("TCP upload via SOCKS5 >= 3.00x hev's", "socks5", "tcp_up", "ratio", 3.0, "hev"),
    Target("TCP download via SOCKS5 >= 3.00x hev's", "socks5", "tcp_down", "ratio", 3.0, "hev"),
    Target("TCP upload via SOCKS5 >= 0.90x redsocks'", "socks5", "tcp_up", "ratio", 0.9,
           "redsocks"),
    Target("TCP download via SOCKS5 >= 0.90x redsocks'", "socks5", "tcp_down", "ratio", 0.9,
           "redsocks"),
    Target("RSS at rest via DIRECT <= 25 MiB", "direct", "rss_rest", "max", 25.0),
    Target("RSS at rest via SOCKS5 <= 25 MiB", "socks5", "rss_rest", "max", 25.0),
    # Issue 14: a capture of another process leaves this flow's throughput within noise.
    Target("TCP upload, another process captured >= 0.95x DIRECT", "capture-other", "tcp_up",
           "ratio", 0.95, "direct"),
    Target("TCP download, another process captured >= 0.95x DIRECT", "capture-other",
           "tcp_down", "ratio", 0.95, "direct"),
)


@dataclass(frozen=True)
class Verdict:
    target: Target
    mtu: int
    status: str  # PASS | FAIL | SKIP
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target.name, "mtu": self.mtu, "status": self.status,
                "detail": self.detail}


def check_targets(sections: list[Section]) -> list[Verdict]:
    """Targets apply to the offload-on columns (tunproxy's default), at every MTU measured.

    A figure that was planned but could not be measured FAILs (the target is not shown to
    be met); one that was not asked for (``--only``, ``--paths``) is a SKIP.
    """
    verdicts = []
    for section in sections:
        for target in TARGETS:
            column = next(
                (c for c in section.columns if c.path == target.path and c.offload), None
            )
            metric = METRIC_BY_KEY[target.key]
            if column is None or metric.test not in column.tests:
                verdicts.append(Verdict(target, section.mtu, "SKIP", "not measured in this run"))
                continue
            cell = column.cells.get(target.key)
            if cell is None or cell.value is None:
                reason = cell.error if cell is not None and cell.error else "no figure"
                if len(reason) > 90:
                    reason = reason[:87] + "..."
                verdicts.append(Verdict(target, section.mtu, "FAIL", f"n/a: {reason}"))
                continue
            if target.kind in ("ratio", "ratio_max"):
                reference = section.column(target.reference)
                ratio = None if reference is None else section.ratio(
                    column, target.key, reference=reference)
                if ratio is None:
                    verdicts.append(Verdict(target, section.mtu, "SKIP",
                                            f"no {target.reference} figure"))
                    continue
                ok = ratio >= target.limit if target.kind == "ratio" else ratio <= target.limit
                detail = f"{ratio:.2f}x (limit {target.limit:.2f}x)"
                if target.reference == "baseline":
                    detail += _ceiling(section, column, target.key)
                else:
                    assert reference is not None
                    own = reference.value(target.key)
                    if own is not None:
                        detail += (f"; {reference.label}: "
                                   f"{format_number(own, metric.digits)} {metric.unit}")
                    rounds = section.round_ratios(column, target.key, reference)
                    if len(rounds) > 1:
                        # The round-to-round spread: how much of the ratio is noise.
                        detail += f"; by round {', '.join(f'{r:.2f}' for r in rounds)}"
            else:
                value = cell.value
                ok = value < target.limit if target.kind == "below" else value <= target.limit
                detail = f"{value:.1f} {metric.unit} (limit {target.limit:g} {metric.unit})"
            verdicts.append(Verdict(target, section.mtu, "PASS" if ok else "FAIL", detail))
    return verdicts


def _ceiling(section: Section, column: Column, key: str) -> str:
    """For a SOCKS5 figure: what the SOCKS5 server reaches alone, without tunproxy (the
    most any proxy in front of it can reach), and how much of that tunproxy keeps."""
    only = section.column("socks5-only")
    if column.path != "socks5" or only is None:
        return ""
    alone = section.ratio(only, key)
    kept = section.ratio(column, key, reference=only)
    if alone is None or kept is None:
        return ""
    return f"; the SOCKS5 server alone: {alone:.2f}x, tunproxy keeps {kept:.2f} of it"


def render_targets(verdicts: list[Verdict]) -> str:
    width = max((len(v.target.name) for v in verdicts), default=0)
    return "\n".join(
        f"{v.status:4}  MTU {v.mtu:<5} {v.target.name.ljust(width)}  {v.detail}" for v in verdicts
    )


# -- JSON ---------------------------------------------------------------------------


def sections_as_dict(sections: list[Section]) -> list[dict[str, Any]]:
    out = []
    for section in sections:
        columns = []
        for column in section.columns:
            figures = {}
            for key, cell in column.cells.items():
                metric = METRIC_BY_KEY[key]
                figures[key] = {
                    "unit": metric.unit, "median": cell.value, "samples": cell.samples,
                    "rounds": cell.rounds,
                    "ratio": section.ratio(column, key), "error": cell.error,
                    "errors": cell.errors, "note": cell.note,
                }
            columns.append({
                "label": column.label, "path": column.path,
                "offload": (column.offload if column.path not in ("baseline", "socks5-only")
                            else None),
                "tests": list(column.tests), "figures": figures,
            })
        out.append({"mtu": section.mtu, "columns": columns})
    return out
