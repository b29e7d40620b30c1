"""The data the rule engine takes in and hands back."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FlowMeta", "GeoIP", "ProcessInfo", "RuleSource", "Verdict"]


class GeoIP(Protocol):
    """The address databases GEOIP and IP-ASN rules consult (the caller's; looked up at
    match time, so the caller decides when to open them). Addresses are (is IPv6, int)."""

    def countries(self, v6: bool, addr: int) -> Sequence[str]:
        """Lower-case country codes (or list names) of the address; empty when unknown."""
        ...

    def asn(self, v6: bool, addr: int) -> str | None:
        """The AS number, as decimal digits, or None."""
        ...

    def available(self, what: str) -> bool:
        """Whether ``countries`` (``what == "country"``) or ``asn`` (``"asn"``) has a
        database behind it; checked when a rule needing it is compiled."""
        ...


@dataclass(frozen=True, slots=True)
class RuleSource:
    """One rule line as written, and where: ``file:line``."""

    text: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.text}"


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The local process owning a flow's socket. ``name`` is the executable's file name
    (what mihomo's PROCESS-NAME matches), ``path`` its full path."""

    pid: int
    name: str
    path: str
    uid: int


@dataclass(slots=True)
class FlowMeta:
    """What the engine knows of a new flow.

    ``dst_ip`` is None for a flow known only by its domain (fake-ip). ``process`` and
    ``resolved_ips`` are lazy: the engine calls each at most once per ``match`` and only
    when a rule needing it is reached (a process rule; an IP rule without ``no-resolve``
    on a flow with no ``dst_ip``)."""

    network: str
    src_ip: str
    src_port: int
    dst_ip: str | None
    dst_port: int
    domain: str | None = None
    process: Callable[[], ProcessInfo | None] | None = None
    resolved_ips: Callable[[], Sequence[str]] | None = None
    dscp: int | None = None  # the first packet's DSCP, when the caller knows it


@dataclass(frozen=True, slots=True)
class Verdict:
    """Where a flow goes and why. ``rule`` is None for the default (DIRECT without MATCH);
    ``rule_set_entry`` names the entry of a RULE-SET that matched, as
    ``"entry (file:line)"``."""

    target: str
    rule: RuleSource | None
    rule_set_entry: str | None = None

    def explain(self) -> str:
        """One human line: the target and the rule that chose it."""
        if self.rule is None:
            return f"{self.target} (default: no rule matched and there is no MATCH rule)"
        text = f"{self.target} by {self.rule}"
        if self.rule_set_entry is not None:
            text += f", entry {self.rule_set_entry}"
        return text
