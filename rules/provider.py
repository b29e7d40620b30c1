"""Rule-set files in the Clash rule-provider formats.

Formats: ``yaml`` (a mapping with a ``payload:`` list) and ``text`` (one entry a line,
``#`` comments). Behaviours:

- ``domain``: ``example.com`` (exactly), ``+.example.com`` (it and all subdomains),
  ``.example.com`` (subdomains only), ``*.example.com`` (exactly one more label); a ``*``
  label elsewhere stands for one label.
- ``ipcidr``: one CIDR (v4 or v6) per entry.
- ``classical``: rule lines without a target (``DOMAIN-SUFFIX,example.com``,
  ``IP-CIDR,10.0.0.0/8,no-resolve``, logic rules ...).

Parsing is done once here (entries validated and normalised, each with its line number);
``rules.engine.compile`` only files them into its indexes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from rules.errors import RuleError
from rules.syntax import Cidr, Node, SetRef, normalize_domain, parse_cidr, parse_condition

__all__ = ["BEHAVIORS", "FORMATS", "DomainEntry", "RuleSetData", "parse_rule_set"]

BEHAVIORS = ("domain", "ipcidr", "classical")
FORMATS = ("yaml", "text")

# How a domain-behaviour entry matches (DomainEntry.mode).
EXACT, PLUS, SUB, ONE, PATTERN = "exact", "plus", "sub", "one", "pattern"


class DomainEntry(NamedTuple):
    mode: str  # EXACT / PLUS / SUB / ONE / PATTERN
    domain: str  # normalised, without the wildcard prefix (PATTERN keeps its '*' labels)


@dataclass(frozen=True)
class RuleSetData:
    """A parsed rule set: ``entries[i]`` as written, found at ``file:lines[i]``;
    ``parsed[i]`` its normalised form (DomainEntry, Cidr or a syntax Node)."""

    name: str
    behavior: str
    format: str
    file: str
    entries: tuple[str, ...]
    lines: tuple[int, ...]
    parsed: tuple[DomainEntry | Cidr | Node, ...] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self, index: int) -> str:
        """``"entry (file:line)"`` for the verdict."""
        return f"{self.entries[index]} ({self.file}:{self.lines[index]})"


def parse_domain_entry(text: str) -> DomainEntry:
    """One domain-behaviour entry. Raises ValueError."""
    t = text.strip()
    if t.startswith("+."):
        mode, rest = PLUS, t[2:]
    elif t.startswith("*."):
        mode, rest = ONE, t[2:]
    elif t.startswith("."):
        mode, rest = SUB, t[1:]
    else:
        mode, rest = EXACT, t
    d = normalize_domain(rest, wildcard=True)
    if "*" in d.split("."):
        # A '*' label anywhere else: keep the whole pattern (with the leading label).
        return DomainEntry(PATTERN, normalize_domain(t, wildcard=True) if mode != PLUS else d)
    return DomainEntry(mode, d)


# --- reading the two file formats -------------------------------------------------------

_YAML_ITEM = re.compile(r"\s*-\s+(.*?)\s*\Z")
_COMMENT = re.compile(r"\s+#.*\Z")


def _unquote(value: str) -> str | None:
    """A plain or simply quoted YAML scalar; None when it needs the real YAML parser."""
    if not value:
        return None
    q = value[0]
    if q == "'":
        if len(value) < 2 or value[-1] != "'":
            return None
        inner = value[1:-1]
        if "'" in inner.replace("''", ""):
            return None
        return inner.replace("''", "'")
    if q == '"':
        if len(value) < 2 or value[-1] != '"' or "\\" in value or '"' in value[1:-1]:
            return None
        return value[1:-1]
    v = _COMMENT.sub("", value)
    if v[:1] in "[]{}&*!|>%@`" or ": " in v or v.endswith(":"):
        return None
    return v


def _yaml_fast(text: str) -> list[tuple[str, int]] | None:
    """The common shape (``payload:`` then ``- item`` lines), line by line; None if the
    file is shaped otherwise (then the YAML parser reads it)."""
    out: list[tuple[str, int]] = []
    seen_payload = False
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if not seen_payload:
            if _COMMENT.sub("", s) == "payload:" and raw[0] not in " \t-":
                seen_payload = True
                continue
            return None
        m = _YAML_ITEM.match(raw)
        if m is None or raw[0] not in " -":
            return None
        value = _unquote(m.group(1))
        if value is None:
            return None
        out.append((value, n))
    return out if seen_payload else None


def _yaml_full(text: str, file: str) -> list[tuple[str, int]]:
    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise RuleError(f"bad YAML: {getattr(exc, 'problem', exc)}", file, line) from None
    if not isinstance(root, yaml.MappingNode):
        line = root.start_mark.line + 1 if root is not None else 1
        raise RuleError("a YAML rule set must be a mapping with a 'payload:' list", file, line)
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "payload":
            if isinstance(value, yaml.ScalarNode) and value.tag.endswith(":null"):
                return []
            if not isinstance(value, yaml.SequenceNode):
                raise RuleError("'payload:' must be a list", file, value.start_mark.line + 1)
            out: list[tuple[str, int]] = []
            for item in value.value:
                if not isinstance(item, yaml.ScalarNode):
                    raise RuleError(
                        "payload entries must be strings", file, item.start_mark.line + 1
                    )
                out.append((str(item.value).strip(), item.start_mark.line + 1))
            return out
    raise RuleError("no 'payload:' list in this YAML rule set", file, 1)


def _text_lines(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if s and not s.startswith("#"):
            out.append((s, n))
    return out


def parse_rule_set(name: str, text: str, *, behavior: str, format: str, file: str) -> RuleSetData:
    """Parse one rule-provider file's text. Raises RuleError naming file and line."""
    if behavior not in BEHAVIORS:
        raise RuleError(
            f"rule set {name!r}: behavior must be one of {', '.join(BEHAVIORS)}, not {behavior!r}",
            file,
        )
    if format == "yaml":
        items = _yaml_fast(text)
        if items is None:
            items = _yaml_full(text, file)
    elif format == "text":
        items = _text_lines(text)
    else:
        raise RuleError(f"rule set {name!r}: format must be yaml or text, not {format!r}", file)

    parsed: list[DomainEntry | Cidr | Node] = []
    append = parsed.append
    try:
        if behavior == "domain":
            for entry, _line in items:
                append(parse_domain_entry(entry))
        elif behavior == "ipcidr":
            for entry, _line in items:
                append(parse_cidr(entry))
        else:
            for entry, _line in items:
                node = parse_condition(entry, None)
                if isinstance(node, SetRef):
                    raise ValueError("RULE-SET cannot be used inside a rule set")
                append(node)
    except ValueError as exc:
        raise RuleError(str(exc), file, items[len(parsed)][1]) from None
    return RuleSetData(
        name=name,
        behavior=behavior,
        format=format,
        file=file,
        entries=tuple(e for e, _ in items),
        lines=tuple(n for _, n in items),
        parsed=tuple(parsed),
    )
