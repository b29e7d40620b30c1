"""Which flows a capture keeps: ``process=curl``, ``pid=4242``, ``uid=1000``,
``domain=example.com`` (and its subdomains), ``rule=PROCESS-NAME`` (a part of the rule's
text), ``flow=12``. Sans-I/O: a pure predicate over flow records.

Several selectors: a flow must match every key given, and any of the values given for one
key (``process=curl process=wget domain=example.com``: curl's or wget's flows to
example.com).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tunproxy.errors import ConfigError
from tunproxy.flows import FlowRecord

__all__ = ["KEYS", "Selection", "parse_selection"]

KEYS = ("process", "pid", "uid", "domain", "rule", "flow")
_NUMERIC = {"pid", "uid", "flow"}


@dataclass(frozen=True, slots=True)
class Selection:
    wanted: dict[str, frozenset[str]] = field(default_factory=dict)

    def matches(self, record: FlowRecord) -> bool:
        return all(self._key_matches(key, values, record) for key, values in self.wanted.items())

    @staticmethod
    def _key_matches(key: str, values: frozenset[str], record: FlowRecord) -> bool:
        if key == "process":
            return record.process in values
        if key == "pid":
            return str(record.pid) in values
        if key == "uid":
            return str(record.uid) in values
        if key == "flow":
            return str(record.id) in values
        if key == "domain":
            domain = (record.domain or "").lower().rstrip(".")
            return any(domain == v or domain.endswith("." + v) for v in values)
        rule = record.rule or ""
        return any(v in rule for v in values)


def parse_selection(items: Iterable[str]) -> Selection | None:
    """``["process=curl", ...]`` -> a Selection (None for no items); ConfigError if bad."""
    wanted: dict[str, set[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not sep or not value:
            raise ConfigError(f"capture selector {item!r}: expected KEY=VALUE "
                              f"(keys: {', '.join(KEYS)})")
        if key not in KEYS:
            raise ConfigError(f"capture selector {item!r}: unknown key {key!r} "
                              f"(keys: {', '.join(KEYS)})")
        if key in _NUMERIC and not value.isdigit():
            raise ConfigError(f"capture selector {item!r}: {key} takes a number")
        if key == "domain":
            value = value.lower().rstrip(".")
        wanted.setdefault(key, set()).add(value)
    if not wanted:
        return None
    return Selection({k: frozenset(v) for k, v in wanted.items()})
