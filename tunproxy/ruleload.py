"""The I/O side of the rule engine: read rule-set files, hand their text to ``rules``.

``rule-sets:`` in the config maps a name to ``{path, behavior, format}``; ``path`` is
relative to the config file's directory, ``format`` is ``yaml`` or ``text`` (by default
from the file name: ``.yaml``/``.yml`` are YAML, anything else text). Every problem becomes a
``ConfigError`` naming the file and line where it is: the rule-set file for a bad entry,
the config for a bad ``rule-sets:`` setting or rule line.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import rules
from tunproxy.errors import ConfigError

__all__ = ["load_rule_set", "load_rules"]

# Keys a Clash rule-provider may carry that mean nothing for a local file.
_IGNORED_KEYS = frozenset({"interval", "__line__", "__file__"})
_KEYS = frozenset({"path", "behavior", "format", "type"}) | _IGNORED_KEYS


def _default_format(path: str) -> str:
    return "yaml" if path.lower().endswith((".yaml", ".yml")) else "text"


def load_rule_set(name: str, settings: Mapping[str, Any], base_dir: Path) -> rules.RuleSetData:
    """Read and parse one rule set. Raises ConfigError."""
    cfg_file = settings.get("__file__")
    cfg_line = settings.get("__line__")

    def bad(message: str) -> ConfigError:
        return ConfigError(f"rule-sets.{name}: {message}", cfg_file, cfg_line)

    unknown = sorted(str(k) for k in settings if k not in _KEYS)
    if unknown:
        raise bad(f"unknown setting {unknown[0]!r} (known: path, behavior, format)")
    kind = settings.get("type", "file")
    if kind != "file":
        raise bad(f"type {kind!r} is not supported: rule sets are local files (type: file)")
    path = settings.get("path")
    if not isinstance(path, str) or not path:
        raise bad("needs 'path:' (a file, relative to the config file)")
    behavior = settings.get("behavior")
    if behavior not in ("domain", "ipcidr", "classical"):
        raise bad(f"behavior must be domain, ipcidr or classical, not {behavior!r}")
    fmt = settings.get("format") or _default_format(path)
    if fmt not in ("yaml", "text"):
        raise bad(f"format must be yaml or text, not {fmt!r}")
    full = base_dir / path
    try:
        text = full.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise bad(f"cannot read {full}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", str(full)) from None
    try:
        return rules.parse_rule_set(name, text, behavior=behavior, format=fmt, file=str(full))
    except rules.RuleError as exc:
        raise ConfigError(exc.message, exc.file, exc.line) from None


def load_rules(
    rule_lines: list[rules.RuleSource],
    rule_sets: Mapping[str, Mapping[str, Any]],
    base_dir: Path,
    targets: Collection[str],
) -> rules.RuleSet:
    """Load every declared rule set, then compile the rule lines against them.
    ``targets`` are the upstream names. Raises ConfigError naming file and line."""
    sets = {name: load_rule_set(name, settings, base_dir) for name, settings in rule_sets.items()}
    try:
        return rules.compile(rule_lines, sets, targets)
    except rules.RuleError as exc:
        raise ConfigError(exc.message, exc.file, exc.line) from None
