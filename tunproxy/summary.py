"""``tunproxy run --summary``: what the command talked to, like ``strace -c`` for the network.

One row per destination (the domain when known, else the address) and protocol/port:
flows, bytes each way, the rule (and outbound) that carried them, and how the flows that
did not end normally ended (refused, reset, unreachable, timed out, rejected...).
Built from the flow records only.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from tunproxy.flows import FlowRecord

__all__ = ["NORMAL_ENDS", "SummaryRow", "SummaryTable", "format_rows", "format_summary",
           "summarize"]

# Ends that are no error: a close (by either side), an idle session, the run ending under an
# open flow. A reset by the client is the app's own choice, but still worth seeing: counted.
NORMAL_ENDS = frozenset({"closed", "closed-by-client", "closed-by-server", "upstream-closed",
                         "idle", "shutdown", "idle-timeout", None})


@dataclass(slots=True)
class SummaryRow:
    destination: str
    protocol: str  # "tcp/443"
    flows: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rules: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


def _rule(record: FlowRecord) -> str:
    rule = record.rule or "-"
    if record.outbound and record.outbound != "dns":
        # "file:line: MATCH,DIRECT" -> "MATCH,DIRECT" keeps the column narrow; the rule text
        # already names the target.
        rule = rule.rsplit(": ", 1)[-1]
    return rule


class SummaryTable:
    """Rows built up one ended flow at a time, so a long run need not keep every record."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], SummaryRow] = {}

    def add(self, record: FlowRecord) -> None:
        destination = record.domain or record.dst
        protocol = f"{record.network}/{record.dst_port}"
        row = self._rows.get((destination, protocol))
        if row is None:
            row = self._rows[(destination, protocol)] = SummaryRow(destination, protocol)
        row.flows += 1
        row.bytes_up += record.bytes_up
        row.bytes_down += record.bytes_down
        row.rules[_rule(record)] += 1
        if record.end_reason not in NORMAL_ENDS:
            row.errors[str(record.end_reason)] += 1

    def rows(self) -> list[SummaryRow]:
        """Most bytes first."""
        return sorted(self._rows.values(), key=lambda r: (-(r.bytes_up + r.bytes_down),
                                                          r.destination, r.protocol))


def summarize(records: Iterable[FlowRecord]) -> list[SummaryRow]:
    table = SummaryTable()
    for record in records:
        table.add(record)
    return table.rows()


def format_summary(records: Iterable[FlowRecord]) -> str:
    return format_rows(summarize(records))


def format_rows(rows: list[SummaryRow]) -> str:
    header = ("destination", "proto", "flows", "sent", "received", "rule", "errors")
    lines = [header]
    totals = [0, 0, 0]
    for row in rows:
        errors = ", ".join(f"{reason} {n}" for reason, n in sorted(row.errors.items())) or "-"
        rules = ", ".join(rule for rule, _n in row.rules.most_common())
        lines.append((row.destination, row.protocol, str(row.flows), str(row.bytes_up),
                      str(row.bytes_down), rules, errors))
        totals[0] += row.flows
        totals[1] += row.bytes_up
        totals[2] += row.bytes_down
    lines.append(("total", "", str(totals[0]), str(totals[1]), str(totals[2]), "", ""))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 3, 4}
    out = []
    for n, line in enumerate(lines):
        cells = [cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
                 for i, cell in enumerate(line)]
        out.append("  ".join(cells).rstrip())
        if n == 0 or n == len(lines) - 2:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"
