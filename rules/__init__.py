"""tunproxy's rule engine: Clash/mihomo rule lines and rule sets, compiled for speed.

Pure: no I/O, no logging. ``compile`` turns rule lines (with the rule sets they reference,
parsed by ``parse_rule_set``) into a ``RuleSet``; ``RuleSet.match(FlowMeta)`` returns a
``Verdict`` naming the target and the rule (file:line) that chose it. Without a MATCH rule
the default is DIRECT.
"""

import tunproxy_native  # noqa: F401  (first: compiled modules or their .py, before any loads)
from rules.engine import RuleSet, compile
from rules.errors import RuleError
from rules.model import FlowMeta, ProcessInfo, RuleSource, Verdict
from rules.provider import RuleSetData, parse_rule_set

__all__ = [
    "FlowMeta",
    "ProcessInfo",
    "RuleError",
    "RuleSet",
    "RuleSetData",
    "RuleSource",
    "Verdict",
    "compile",
    "parse_rule_set",
]
