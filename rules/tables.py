"""Lookup structures the compiled rules are filed into. Each answers "the smallest rule
order that matches this key", so rules of one kind are never tried one by one."""

from __future__ import annotations

import heapq
import re
from bisect import bisect_right
from collections.abc import Iterable
from typing import Any

__all__ = ["NEVER", "Intervals", "Keywords", "trie_regex"]

# The order of "no rule": larger than any real rule order.
NEVER = 1 << 62


class Intervals:
    """Integer ranges (CIDRs, ports, UIDs) flattened into disjoint segments, each labelled
    with the smallest order covering it; a lookup is one bisect."""

    __slots__ = ("min_order", "orders", "starts")

    def __init__(self, items: Iterable[tuple[int, int, int]]) -> None:
        """``items`` are (lo, hi, order) with lo <= hi, inclusive."""
        ranges = sorted(items)
        self.starts: list[int] = []
        self.orders: list[int] = []
        self.min_order = min((r[2] for r in ranges), default=NEVER)
        if not ranges:
            return
        points = sorted({lo for lo, _, _ in ranges} | {hi + 1 for _, hi, _ in ranges})
        heap: list[tuple[int, int]] = []  # (order, hi) of the ranges started so far
        j = 0
        n = len(ranges)
        starts, orders = self.starts, self.orders
        for p in points:
            while j < n and ranges[j][0] <= p:
                heapq.heappush(heap, (ranges[j][2], ranges[j][1]))
                j += 1
            # Ranges that ended before p leave lazily, when they surface at the top.
            while heap and heap[0][1] < p:
                heapq.heappop(heap)
            cur = heap[0][0] if heap else NEVER
            if not orders or orders[-1] != cur:
                starts.append(p)
                orders.append(cur)

    def __bool__(self) -> bool:
        return bool(self.starts)

    def lookup(self, key: int) -> int:
        i = bisect_right(self.starts, key) - 1
        return self.orders[i] if i >= 0 else NEVER


def trie_regex(words: Iterable[str]) -> str:
    """An alternation shaped like a trie (``goo(?:gle|d)``): Python's regex engine then tries
    one branch per character instead of every word at every position."""
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        if "" in node:
            # A word ends here: any match flags the domain (the exact words are then
            # found by walking the trie), so longer words add nothing.
            return ""
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items())]
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return emit(trie)


class Keywords:
    """DOMAIN-KEYWORD: the combined regex finds whether any keyword occurs; only then the
    trie is walked from the first hit to find the smallest order among those present."""

    __slots__ = ("min_order", "search", "trie")

    def __init__(self, keywords: dict[str, int]) -> None:
        self.min_order = min(keywords.values(), default=NEVER)
        self.trie: dict[str, Any] = {}
        for word, order in keywords.items():
            node = self.trie
            for ch in word:
                node = node.setdefault(ch, {})
            prev = node.get("")
            node[""] = order if not isinstance(prev, int) else min(prev, order)
        self.search = re.compile(trie_regex(keywords)).search if keywords else None

    def first(self, domain: str) -> int:
        if self.search is None:
            return NEVER
        m = self.search(domain)
        if m is None:
            return NEVER
        best = NEVER
        trie = self.trie
        for i in range(m.start(), len(domain)):
            node = trie
            for ch in domain[i:]:
                nxt = node.get(ch)
                if nxt is None:
                    break
                node = nxt
                o = node.get("")
                if o is not None and o < best:
                    best = o
        return best
