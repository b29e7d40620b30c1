"""Lookup structures the compiled rules are filed into. Each answers "the smallest rule
order that matches this key", so rules of one kind are never tried one by one."""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any, Final

__all__ = ["COMPACT_MIN", "NEVER", "HashIndex", "Intervals", "Keywords", "compact_map"]

# Below this many keys a plain dict is both small enough and fastest.
COMPACT_MIN = 1024

# The order of "no rule": larger than any real rule order.
NEVER = 1 << 62


class Intervals:
    """Integer ranges (CIDRs, ports, UIDs) flattened into disjoint segments, each labelled
    with the smallest order covering it; a lookup is one bisect."""

    __slots__ = ("min_order", "orders", "starts")

    def __init__(self, items: Iterable[tuple[int, int, int]]) -> None:
        """``items`` are (lo, hi, order) with lo <= hi, inclusive."""
        ranges = sorted(items)
        self.starts: list[int] | array[int] = []
        self.orders: list[int] | array[int] = []
        self.min_order = min((r[2] for r in ranges), default=NEVER)
        if not ranges:
            return
        points = sorted({lo for lo, _, _ in ranges} | {hi + 1 for _, hi, _ in ranges})
        heap: list[tuple[int, int]] = []  # (order, hi) of the ranges started so far
        j = 0
        n = len(ranges)
        starts: Any = self.starts
        orders: Any = self.orders
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
        # Packed: 8 bytes a start (when they fit: IPv4, ports, UIDs) and 8 an order, instead
        # of two Python ints (~70 bytes).
        if len(starts) >= 64:
            self.orders = array("q", orders)
            if starts[-1] < 1 << 64:
                self.starts = array("Q", starts)

    def __bool__(self) -> bool:
        return bool(self.starts)

    def lookup(self, key: int) -> int:
        i = bisect_right(self.starts, key) - 1
        return self.orders[i] if i >= 0 else NEVER


class HashIndex:
    """A read-only ``str -> order`` table packed into one sorted ``array('Q')``: per key,
    48 bits of its hash and 16 bits naming its order (8 bytes a key, where a dict slot, the
    key string and an int take ~150). A lookup is one bisect.

    Large rule sets file all their entries at the RULE-SET line's order (the engine needs
    no more to choose the target), so a few thousand distinct orders are plenty; past
    65536 the caller keeps a dict. Two keys whose 48 hash bits agree are one key with the
    smaller order: with n keys, a lookup errs with odds about n / 2**48 (1e-9 for 270k).
    ``hash(str)`` is salted per process: build and look up in the same process."""

    __slots__ = ("min_order", "orders", "packed")

    MAX_ORDERS: Final = 1 << 16
    _MASK: Final = (1 << 48) - 1

    def __init__(self, groups: Iterable[tuple[int, Sequence[str]]]) -> None:
        """``groups``: (order, keys filed at it)."""
        groups = list(groups)
        self.orders = sorted({o for o, _ in groups})
        if len(self.orders) > self.MAX_ORDERS:
            raise ValueError("too many orders for a HashIndex")
        rank = {o: r for r, o in enumerate(self.orders)}
        mask = self._MASK
        packed: list[int] = []
        for order, keys in groups:
            r = rank[order]
            packed += [(h & mask) << 16 | r for h in map(hash, keys)]
        packed.sort()
        self.packed = array("Q", packed)
        self.min_order = self.orders[0] if self.orders else NEVER

    def __len__(self) -> int:
        return len(self.packed)

    def get(self, key: str, default: int | None = None) -> int | None:
        k = (hash(key) & self._MASK) << 16
        packed = self.packed
        i = bisect_left(packed, k)
        # The smallest rank sorts first among equal hashes: it is the smallest order.
        if i < len(packed) and packed[i] >> 16 == k >> 16:
            return self.orders[packed[i] & 0xFFFF]
        return default


def compact_map(
    items: dict[str, int], groups: list[tuple[int, Sequence[str]]]
) -> dict[str, int] | HashIndex:
    """``items`` and the large sets' ``groups`` (order, keys) as one table: a dict when
    small, else a HashIndex."""
    total = len(items) + sum(len(k) for _, k in groups)
    if total < COMPACT_MIN or len(items) + len(groups) >= HashIndex.MAX_ORDERS:
        for order, keys in groups:
            for k in keys:
                if items.get(k, NEVER) > order:
                    items[k] = order
        return items
    return HashIndex([*groups, *(((o, [k]) for k, o in items.items()))])


class Keywords:
    """DOMAIN-KEYWORD. Every keyword's first ``m`` characters (``m`` = the shortest keyword's
    length, at most 4) go into one set; a domain is cut into its ``m``-character windows
    and tested against it in one C-level ``isdisjoint`` pass (about 3x faster than a
    trie-shaped regex alternation over 3000 keywords). Only on a hit is the trie walked, from
    the windows that hit, to find the smallest order among the keywords present."""

    __slots__ = ("m", "min_order", "prefixes", "trie")

    def __init__(self, keywords: dict[str, int]) -> None:
        self.min_order = min(keywords.values(), default=NEVER)
        self.m = min(4, min((len(k) for k in keywords), default=1))
        self.prefixes = frozenset(k[: self.m] for k in keywords)
        self.trie: dict[str, Any] = {}
        for word, order in keywords.items():
            node = self.trie
            for ch in word:
                node = node.setdefault(ch, {})
            prev = node.get("")
            node[""] = order if prev is None else min(prev, order)

    def first(self, domain: str) -> int:
        m = self.m
        n = len(domain) - m + 1
        if n <= 0:
            return NEVER
        windows = _WINDOWS[m] if n <= _MAX_WINDOWS else [slice(i, i + m) for i in range(n)]
        prefixes = self.prefixes
        if prefixes.isdisjoint(map(domain.__getitem__, islice(windows, n))):
            return NEVER
        best = NEVER
        trie = self.trie
        for i in range(n):
            if domain[i : i + m] not in prefixes:
                continue
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


# slice(i, i + m) for every start in a domain of up to 255 characters, per window size.
_MAX_WINDOWS = 256
_WINDOWS = {m: [slice(i, i + m) for i in range(_MAX_WINDOWS)] for m in range(1, 5)}
