"""The rule engine's one exception.

    RuleError      a rule line, rule-set entry or reference is wrong: file, line, problem

``tunproxy.ruleload`` turns it into ``tunproxy.errors.ConfigError`` with the same file and line.
"""

from __future__ import annotations

__all__ = ["RuleError"]


class RuleError(Exception):
    """``str(err) == "file:line: message"`` (or ``"file: message"`` without a line)."""

    def __init__(self, message: str, file: str = "<rules>", line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}: {self.message}"
