"""Rule-set files in the Clash rule-provider formats.

Formats: ``yaml`` (a mapping with a ``payload:`` list, or ``rules:`` as mihomo also
accepts), ``text`` (one entry a line, ``#`` and ``//`` comments) and ``mrs`` (mihomo's
binary rule set, see ``rules.mrs``); ``detect_format`` tells them apart by content.
A bad entry is skipped and recorded in ``RuleSetData.skipped`` (line, reason), as mihomo
skips it with a warning; a set is refused only when nothing in it is usable.
Behaviours:

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

import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from rules.errors import RuleError
from rules.syntax import Cidr, Node, SetRef, normalize_domain, parse_cidr, parse_condition

__all__ = [
    "BEHAVIORS",
    "FORMATS",
    "DomainEntry",
    "RuleSetData",
    "detect_format",
    "parse_rule_set",
    "rule_set_from_entries",
]

BEHAVIORS = ("domain", "ipcidr", "classical")
FORMATS = ("yaml", "text", "mrs")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_YAML_HEAD = re.compile(rb"^(?:payload|rules)[ \t]*:", re.MULTILINE)

# How a domain-behaviour entry matches (DomainEntry.mode).
EXACT, PLUS, SUB, ONE, PATTERN = "exact", "plus", "sub", "one", "pattern"
PLUS_PATTERN = "plus-pattern"


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
    entries: Sequence[str]
    lines: Sequence[int]
    parsed: Sequence[DomainEntry | Cidr | Node] = field(repr=False, compare=False)
    #: Entries left out, as (line, "entry: why"); for mrs the line is the entry's number.
    skipped: tuple[tuple[int, str], ...] = ()
    #: The entry count once ``entries``/``lines`` were dropped (``stripped``); else -1.
    size: int = -1

    def __len__(self) -> int:
        return self.size if self.size >= 0 else len(self.entries)

    def stripped(self) -> RuleSetData:
        """Without the entries' text and lines (a large set's verdicts then name the entry
        by number; ``tunproxy explain`` loads the set again with them)."""
        return dataclasses.replace(self, entries=(), lines=(), parsed=(), size=len(self))

    def describe(self, index: int) -> str:
        """``"entry (file:line)"`` for the verdict."""
        if self.size >= 0:
            if self.behavior != "ipcidr":  # filed by set, not by entry (rules.tables)
                return f"an entry of {self.name} ({self.file}; tunproxy explain names it)"
            return f"entry #{index + 1} of {self.name} ({self.file})"
        if self.format in ("mrs", "geosite"):
            return f"{self.entries[index]} ({self.file}, entry {self.lines[index]})"
        return f"{self.entries[index]} ({self.file}:{self.lines[index]})"


def detect_format(data: bytes) -> str:
    """``mrs`` (zstd frame), ``yaml`` (a top-level ``payload:``/``rules:`` key) or ``text``."""
    if data.startswith(_ZSTD_MAGIC):
        return "mrs"
    return "yaml" if _YAML_HEAD.search(data) else "text"


def parse_domain_entry(text: str) -> DomainEntry:
    """One domain-behaviour entry. Raises ValueError, also for entries mihomo keeps but that
    can never match there: a trailing dot (mihomo's trie refuses it) and non-ASCII names
    (mihomo compares them with punycode hosts; write them as xn--...)."""
    t = text.strip()
    if t.endswith("."):
        raise ValueError("a trailing dot: mihomo refuses such an entry")
    if not t.isascii():
        raise ValueError("not ASCII: mihomo compares entries with punycode host names, so it "
                         "never matches; write it in punycode (xn--...)")
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
        if mode == PLUS:
            return DomainEntry(PLUS_PATTERN, d)
        return DomainEntry(PATTERN, normalize_domain(t, wildcard=True))
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
            if _COMMENT.sub("", s) in ("payload:", "rules:") and raw[0] not in " \t-":
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
        if isinstance(key, yaml.ScalarNode) and key.value in ("payload", "rules"):
            if isinstance(value, yaml.ScalarNode) and value.tag.endswith(":null"):
                return []
            if not isinstance(value, yaml.SequenceNode):
                raise RuleError("'payload:' must be a list", file, value.start_mark.line + 1)
            out: list[tuple[str, int]] = []
            for item in value.value:
                # A non-string entry is kept as "" and skipped with a reason later.
                text = str(item.value).strip() if isinstance(item, yaml.ScalarNode) else ""
                out.append((text, item.start_mark.line + 1))
            return out
    raise RuleError("no 'payload:' list in this YAML rule set", file, 1)


def _text_lines(text: str) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for n, raw in enumerate(text.splitlines(), 1):
        s = raw.strip()
        if s and not s.startswith(("#", "//")):
            out.append((s, n))
    return out


def parse_entry(behavior: str, entry: str) -> DomainEntry | Cidr | Node:
    """One entry of a ``behavior`` set. Raises ValueError."""
    if not entry:
        raise ValueError("empty or not a string")
    if behavior == "domain":
        if "/" in entry:
            raise ValueError("a domain has no '/'")  # mihomo's domainStrategy.Insert
        return parse_domain_entry(entry)
    if behavior == "ipcidr":
        return parse_cidr(entry)
    node = parse_condition(entry, None)
    if isinstance(node, SetRef):
        what = "GEOSITE" if node.name.startswith("geosite:") else "RULE-SET"
        raise ValueError(f"{what} cannot be used inside a rule set")
    return node


def rule_set_from_entries(
    name: str, items: list[tuple[str, int]], *, behavior: str, format: str, file: str
) -> RuleSetData:
    """Parse (entry, line) pairs, skipping bad ones. Raises RuleError when none is usable."""
    if behavior not in BEHAVIORS:
        raise RuleError(
            f"rule set {name!r}: behavior must be one of {', '.join(BEHAVIORS)}, not {behavior!r}",
            file,
        )
    entries: list[str] = []
    lines: list[int] = []
    parsed: list[DomainEntry | Cidr | Node] = []
    skipped: list[tuple[int, str]] = []
    for entry, line in items:
        try:
            p = parse_entry(behavior, entry)
        except ValueError as exc:
            skipped.append((line, f"{entry or '(empty)'}: {exc}"))
            continue
        entries.append(entry)
        lines.append(line)
        parsed.append(p)
    if skipped and not parsed:
        line, why = skipped[0]
        raise RuleError(
            f"rule set {name!r}: no usable {behavior} entry ({len(skipped)} bad; first: {why})",
            file,
            line,
        )
    return RuleSetData(
        name=name,
        behavior=behavior,
        format=format,
        file=file,
        entries=tuple(entries),
        lines=tuple(lines),
        parsed=tuple(parsed),
        skipped=tuple(skipped),
    )


# The shape of nearly every published domain set (Loyalsoldier, meta-rules-dat): one plain
# (optionally quoted, optionally '+.'/'.'/'*.'-prefixed) lower-case host name per item line.
_LABEL_RE = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_RE = rf"(?:{_LABEL_RE}\.)*{_LABEL_RE}"
_BULK_YAML = re.compile(
    rf"^[ \t]*-[ \t]+(['\"]?)(\+\.|\.|\*\.)?({_HOST_RE})\1[ \t]*(?:#.*)?\r?$", re.MULTILINE
)
_BULK_TEXT = re.compile(rf"^[ \t]*()(\+\.|\.|\*\.)?({_HOST_RE})[ \t]*\r?$", re.MULTILINE)
_YAML_ITEM_LINE = re.compile(r"^[ \t]*-", re.MULTILINE)
_TEXT_ENTRY_LINE = re.compile(r"^[ \t]*(?!#|//)[^ \t\r\n]", re.MULTILINE)
_CONTENT_LINE = re.compile(r"^[ \t]*[^ \t\r\n#]", re.MULTILINE)
_MODES = {"": EXACT, "+.": PLUS, ".": SUB, "*.": ONE}


class BulkDomains(Sequence[DomainEntry]):
    """The parsed entries of a plain domain set, as two lists in file order (each entry's
    mode, a shared constant, and its host name) instead of a tuple object per entry."""

    __slots__ = ("hosts", "modes")

    def __init__(self, modes: list[str], hosts: list[str]) -> None:
        self.modes = modes
        self.hosts = hosts

    def __len__(self) -> int:
        return len(self.hosts)

    def __getitem__(self, i: int) -> DomainEntry:  # type: ignore[override]
        return DomainEntry(self.modes[i], self.hosts[i])

    def __iter__(self) -> Iterator[DomainEntry]:
        return map(DomainEntry, self.modes, self.hosts)

    def by_mode(self) -> dict[str, list[str]]:
        """Host names per mode (order within the set dropped)."""
        out: dict[str, list[str]] = {EXACT: [], PLUS: [], SUB: [], ONE: []}
        for mode, host in zip(self.modes, self.hosts, strict=True):
            out[mode].append(host)
        return out


class _Lazy(Sequence[Any]):
    """``entries`` or ``lines`` of a bulk-parsed set, built on first use (a verdict of a
    small set, ``tunproxy explain``): a large set in a running proxy never needs them."""

    __slots__ = ("_build", "_data", "_n", "_part")

    def __init__(self, n: int, build: Callable[[], tuple[list[str], list[int]]], part: int):
        self._n = n
        self._build = build
        self._part = part
        self._data: Sequence[Any] | None = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if self._data is None:
            self._data = self._build()[self._part]
        return self._data[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]


def _bulk_domains(name: str, text: str, format: str, file: str) -> RuleSetData | None:
    """A whole domain set in a few C-level passes (regex over the text, zip) instead of a
    Python call per entry; None when any entry is not of the plain shape (then the general
    parser reads it, entry by entry, with its warnings). Entry text and lines are
    recovered from the text only when asked for."""
    if format == "yaml":
        head = re.search(r"^(?:payload|rules)[ \t]*:[ \t]*(?:#.*)?\r?$", text, re.MULTILINE)
        if head is None or _CONTENT_LINE.search(text, 0, head.start()):
            return None
        start = head.end()
        pattern = _BULK_YAML
        counted = _CONTENT_LINE
    else:
        start = 0
        pattern = _BULK_TEXT
        counted = _TEXT_ENTRY_LINE
    found = pattern.findall(text, start)
    if not found or len(found) != len(counted.findall(text, start)):
        return None  # another key, a nested value, an entry of another shape
    modes = [_MODES[f[1]] for f in found]
    hosts = [f[2] for f in found]
    del found

    def build() -> tuple[list[str], list[int]]:
        first = text.count("\n", 0, start) + 1
        is_item = counted.match
        lines = [n for n, ln in enumerate(text[start:].split("\n"), first) if is_item(ln)]
        prefix = {v: k for k, v in _MODES.items()}
        return [prefix[m] + h for m, h in zip(modes, hosts, strict=True)], lines

    n = len(hosts)
    return RuleSetData(
        name=name,
        behavior="domain",
        format=format,
        file=file,
        entries=_Lazy(n, build, 0),
        lines=_Lazy(n, build, 1),
        parsed=BulkDomains(modes, hosts),
    )


def parse_rule_set(
    name: str, text: str | bytes, *, behavior: str, format: str | None, file: str
) -> RuleSetData:
    """Parse one rule-provider file (text, or bytes for ``mrs``/unknown format; ``format``
    None detects it). Bad entries are skipped (``RuleSetData.skipped``); raises RuleError
    naming file and line when the file as a whole is unusable."""
    if behavior not in BEHAVIORS:
        raise RuleError(
            f"rule set {name!r}: behavior must be one of {', '.join(BEHAVIORS)}, not {behavior!r}",
            file,
        )
    if format is None:
        format = detect_format(text if isinstance(text, bytes) else text.encode())
    if format == "mrs":
        from rules.mrs import decode_mrs

        raw = text if isinstance(text, bytes) else text.encode("latin-1")
        try:
            return decode_mrs(name, raw, behavior=behavior, file=file)
        except ValueError as exc:
            raise RuleError(f"rule set {name!r}: bad mrs file: {exc}", file) from None
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise RuleError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file) from None
    if behavior == "domain" and format in ("yaml", "text"):
        bulk = _bulk_domains(name, text, format, file)
        if bulk is not None:
            return bulk
    if format == "yaml":
        items = _yaml_fast(text)
        if items is None:
            items = _yaml_full(text, file)
    elif format == "text":
        items = _text_lines(text)
    else:
        raise RuleError(
            f"rule set {name!r}: format must be yaml, text or mrs, not {format!r}", file
        )
    return rule_set_from_entries(name, items, behavior=behavior, format=format, file=file)
