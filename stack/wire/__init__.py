"""Wire formats: one codec module per protocol.

Each module offers a checked zero-copy view over a buffer and a parsed form
with ``parse``/``emit`` (see shared/STYLE.md). Untrusted bytes only ever raise
``WireError`` from a parser; nothing else escapes.
"""


class WireError(ValueError):
    """Malformed or truncated input. ``reason`` is the counter name for the drop."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


__all__ = ["WireError"]
