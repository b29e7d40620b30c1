"""The I/O side of the rule engine: read rule-set files, hand their text to ``rules``.

``rule-sets:`` (or mihomo's ``rule-providers:``) in the config maps a name to
``{type, path, behavior, format}``; ``path`` is relative to the config file's directory,
``format`` is ``yaml``, ``text`` or ``mrs`` (by default detected from the content).
``type: inline`` carries its entries in ``payload:``. A bad entry is skipped with one
warning (``file:line: rule set NAME: entry skipped: ...``) kept in ``LoadedRules.warnings``
and logged; a file with no usable entry, a bad setting or a bad rule line is a
``ConfigError`` naming the file and line where it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import rules
from rules.provider import detect_format, rule_set_from_entries
from tunproxy.errors import ConfigError
from tunproxy.geodata import GeoData
from tunproxy.memory import release_freed_memory

__all__ = ["domain_filter", "load_rule_set", "load_rules", "skipped_warnings"]

log = logging.getLogger("tunproxy.rules")

# Keys a Clash rule-provider may carry that mean nothing here (mihomo's proxy: downloads
# through a named proxy; size-limit, header: for http).
_IGNORED_KEYS = frozenset(
    {"interval", "proxy", "size-limit", "header", "url", "__line__", "__file__"}
)
_KEYS = (
    frozenset({"path", "behavior", "format", "type", "payload", "__payload_lines__"})
    | _IGNORED_KEYS
)
FORMATS = ("yaml", "text", "mrs")


def load_rule_set(name: str, settings: Mapping[str, Any], base_dir: Path) -> rules.RuleSetData:
    """Read and parse one rule set. Raises ConfigError."""
    cfg_file = settings.get("__file__")
    cfg_line = settings.get("__line__")

    def bad(message: str) -> ConfigError:
        return ConfigError(f"rule-sets.{name}: {message}", cfg_file, cfg_line)

    unknown = sorted(str(k) for k in settings if k not in _KEYS)
    if unknown:
        raise bad(f"unknown setting {unknown[0]!r} (known: type, path, behavior, format, "
                  "payload, url, interval)")
    kind = settings.get("type", "file")
    behavior = settings.get("behavior")
    if behavior not in ("domain", "ipcidr", "classical"):
        raise bad(f"behavior must be domain, ipcidr or classical, not {behavior!r}")
    if kind == "inline":
        payload = settings.get("payload")
        if not isinstance(payload, list):
            raise bad("type: inline needs a 'payload:' list")
        lines = settings.get("__payload_lines__") or [cfg_line or 0] * len(payload)
        items = [(str(e).strip() if isinstance(e, str | int) else "", ln)
                 for e, ln in zip(payload, lines, strict=False)]
        try:
            return rule_set_from_entries(name, items, behavior=behavior, format="inline",
                                         file=cfg_file or "<config>")
        except rules.RuleError as exc:
            raise ConfigError(exc.message, exc.file, exc.line) from None
    if kind == "http":
        from tunproxy.ruleremote import cached_path

        full = cached_path(name, settings, base_dir)
    elif kind == "file":
        path = settings.get("path")
        if not isinstance(path, str) or not path:
            raise bad("needs 'path:' (a file, relative to the config file)")
        full = base_dir / path
    else:
        raise bad(f"type {kind!r} is not supported (file, http or inline)")
    fmt = settings.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise bad(f"format must be yaml, text or mrs, not {fmt!r}")
    try:
        data = full.read_bytes()
    except OSError as exc:
        raise bad(f"cannot read {full}: {exc.strerror or exc}") from None
    if fmt is None:
        fmt = detect_format(data)
    try:
        return rules.parse_rule_set(name, data, behavior=behavior, format=fmt, file=str(full))
    except rules.RuleError as exc:
        raise ConfigError(exc.message, exc.file, exc.line) from None


def skipped_warnings(data: rules.RuleSetData) -> list[str]:
    """One line per skipped entry: ``file:line: rule set NAME: entry skipped: why``."""
    where = ", entry " if data.format == "mrs" else ":"
    return [f"{data.file}{where}{line}: rule set {data.name}: entry skipped: {why}"
            for line, why in data.skipped]


def load_rules(
    rule_lines: list[rules.RuleSource],
    rule_sets: Mapping[str, Mapping[str, Any]],
    base_dir: Path,
    targets: Collection[str],
    warnings: list[str] | None = None,
    *,
    aliases: Mapping[str, str] | None = None,
    refused: Mapping[str, str] | None = None,
    geodata: GeoData | None = None,
    sub_rules: Mapping[str, list[rules.RuleSource]] | None = None,
    no_udp: Collection[str] = (),
    on_sets: Callable[[Mapping[str, rules.RuleSetData]], None] | None = None,
    keep_entries: bool = False,
) -> rules.RuleSet:
    """Load every declared rule set, then compile the rule lines against them.
    ``targets`` are the upstream names (``aliases``/``refused``: see ``rules.compile``).
    Skipped entries are logged, one warning each, and appended to ``warnings``. ``on_sets``
    sees the loaded sets (for other users of them, e.g. ``domain_filter``).
    Raises ConfigError naming file and line."""
    sets = {name: load_rule_set(name, settings, base_dir) for name, settings in rule_sets.items()}
    if on_sets is not None:
        on_sets(sets)
    for data in sets.values():
        for text in skipped_warnings(data):
            log.warning("%s", text)
            if warnings is not None:
                warnings.append(text)
    try:
        compiled = rules.compile(
            rule_lines, sets, targets, aliases=aliases, refused=refused, geoip=geodata,
            geosite=geodata.geosite if geodata is not None else None, sub_rules=sub_rules,
            no_udp=no_udp, keep_entries=keep_entries,
        )
    except rules.RuleError as exc:
        raise ConfigError(exc.message, exc.file, exc.line) from None
    del sets
    if geodata is not None:
        geodata.release()
    release_freed_memory()
    return compiled


FILTER_PREFIXES = ("rule-set:", "geosite:")


def domain_filter(
    entries: Sequence[str],
    sets: Mapping[str, rules.RuleSetData],
    geodata: GeoData | None,
    file: str,
    line: int | None,
    what: str = "dns.fake-ip-filter",
) -> Callable[[str], bool] | None:
    """mihomo's ``rule-set:NAME`` / ``geosite:CODE`` entries of a domain list (such as
    ``fake-ip-filter``) as one predicate on a domain; None when there are none.
    Raises ConfigError for an unknown set or list."""
    lines = []
    for entry in entries:
        kind, _, name = entry.partition(":")
        if kind == "rule-set":
            lines.append(rules.RuleSource(f"RULE-SET,{name},DIRECT", file, line or 0))
        elif kind == "geosite":
            lines.append(rules.RuleSource(f"GEOSITE,{name},DIRECT", file, line or 0))
    if not lines:
        return None
    try:
        compiled = rules.compile(lines, sets, (), geosite=geodata.geosite if geodata else None)
    except rules.RuleError as exc:
        raise ConfigError(f"{what}: {exc.message}", file, line) from None
    finally:
        if geodata is not None:
            geodata.release()

    def matches(domain: str) -> bool:
        flow = rules.FlowMeta("udp", "0.0.0.0", 0, None, 0, domain)
        return compiled.match(flow).rule is not None

    return matches
