"""Domain patterns as the ``dns:`` section spells them.

``example.com`` matches that name only; ``*.example.com`` matches exactly one
more label (``a.example.com``, not ``a.b.example.com`` nor ``example.com``);
``+.example.com`` matches the name and every name below it. Lookups walk the
labels from the right, so a set of any size costs one dict probe per label.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

__all__ = ["DomainMap", "DomainSet", "normalize_domain", "valid_pattern"]

V = TypeVar("V")


def normalize_domain(name: str) -> str:
    """Lower case, no trailing dot: the one spelling every table uses."""
    return name.rstrip(".").lower()


def valid_pattern(pattern: str) -> bool:
    body = pattern[2:] if pattern.startswith(("+.", "*.")) else pattern
    body = body[:-1] if body.endswith(".") else body  # a trailing root dot is fine
    if not body or len(body) > 253:
        return False
    return all(0 < len(label) <= 63 and "*" not in label for label in body.split("."))


class DomainMap(Generic[V]):
    """Pattern -> value. The most specific pattern wins: exact, then ``*.``, then the
    longest ``+.`` suffix."""

    def __init__(self, items: Iterable[tuple[str, V]] = ()) -> None:
        self._exact: dict[str, V] = {}
        self._one_label: dict[str, V] = {}  # "*.x" stored under "x"
        self._suffix: dict[str, V] = {}  # "+.x" stored under "x"
        for pattern, value in items:
            self.add(pattern, value)

    def add(self, pattern: str, value: V) -> None:
        pattern = normalize_domain(pattern)
        if pattern.startswith("+."):
            self._suffix[pattern[2:]] = value
        elif pattern.startswith("*."):
            self._one_label[pattern[2:]] = value
        else:
            self._exact[pattern] = value

    def __len__(self) -> int:
        return len(self._exact) + len(self._one_label) + len(self._suffix)

    def get(self, name: str) -> V | None:
        name = normalize_domain(name)
        if name in self._exact:
            return self._exact[name]
        if name in self._suffix:
            return self._suffix[name]
        labels = name.split(".")
        if len(labels) > 1:
            parent = ".".join(labels[1:])
            if parent in self._one_label:
                return self._one_label[parent]
        # Longest suffix first: drop one more leading label each round.
        for i in range(1, len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self._suffix:
                return self._suffix[suffix]
        return None


class DomainSet:
    """A set of patterns; ``name in domain_set``."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self._map: DomainMap[bool] = DomainMap((p, True) for p in patterns)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._map.get(name) is not None

    def __len__(self) -> int:
        return len(self._map)
