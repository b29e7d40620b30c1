"""A seeded fault injector for one direction of packets, sans-I/O.

Modelled on smoltcp's ``phy/fault_injector.rs`` (which drops, corrupts and
rate-limits on a seeded PRNG), extended with what loss-recovery tests need
most: duplication, reordering and delay. The driver puts one on each direction
at the TUN boundary::

    faults = FaultInjector(seed=1, drop=0.02, duplicate=0.01, reorder=0.01)
    faults.push(packet, now)            # instead of writing/handling it
    for packet in faults.pop_due(now):  # when get_timer() is due, and after every push
        write(packet)

Every packet gets a delay drawn uniformly from ``delay``; a reordered packet
is held ``reorder_delay`` longer so later packets overtake it; a duplicate is a
second copy with its own delay. Packets leave in release-time order (FIFO among
equal times). With all probabilities zero and no delay, ``pop_due(now)`` right
after ``push`` returns the packet: a transparent pass-through.
"""

from __future__ import annotations

import heapq
import random

__all__ = ["FaultInjector"]


class FaultInjector:
    __slots__ = (
        "_heap",
        "_rng",
        "_seq",
        "corrupt",
        "counters",
        "delay",
        "drop",
        "duplicate",
        "max_queue",
        "reorder",
        "reorder_delay",
    )

    def __init__(
        self,
        seed: int,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: tuple[float, float] = (0.0, 0.0),
        *,
        reorder_delay: float = 0.002,
        corrupt: float = 0.0,
        max_queue: int = 100_000,
    ) -> None:
        for name, p in (("drop", drop), ("duplicate", duplicate), ("reorder", reorder),
                        ("corrupt", corrupt)):  # fmt: skip
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, got {p}")
        if not 0.0 <= delay[0] <= delay[1]:
            raise ValueError(f"delay must be (min, max) with 0 <= min <= max, got {delay}")
        self._rng = random.Random(seed)
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.reorder_delay = reorder_delay
        self.corrupt = corrupt
        self.max_queue = max_queue
        self._heap: list[tuple[float, int, bytes]] = []
        self._seq = 0
        self.counters: dict[str, int] = {
            "pushed": 0, "dropped": 0, "duplicated": 0, "reordered": 0, "corrupted": 0,
            "overflow": 0, "released": 0,
        }  # fmt: skip

    def __len__(self) -> int:
        """Packets held."""
        return len(self._heap)

    def push(self, packet: bytes, now: float) -> None:
        """Take one packet; it leaves through ``pop_due`` (or never, if dropped)."""
        rng = self._rng
        self.counters["pushed"] += 1
        if self.drop and rng.random() < self.drop:
            self.counters["dropped"] += 1
            return
        copies = 1
        if self.duplicate and rng.random() < self.duplicate:
            self.counters["duplicated"] += 1
            copies = 2
        for _ in range(copies):
            if len(self._heap) >= self.max_queue:
                self.counters["overflow"] += 1
                return
            lo, hi = self.delay
            release = now + (rng.uniform(lo, hi) if hi else 0.0)
            if self.reorder and rng.random() < self.reorder:
                self.counters["reordered"] += 1
                release += self.reorder_delay
            data = packet
            if self.corrupt and data and rng.random() < self.corrupt:
                self.counters["corrupted"] += 1
                buf = bytearray(data)
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
                data = bytes(buf)
            self._seq += 1
            heapq.heappush(self._heap, (release, self._seq, data))

    def pop_due(self, now: float) -> list[bytes]:
        """Packets whose release time has come, in release order."""
        heap = self._heap
        out: list[bytes] = []
        while heap and heap[0][0] <= now:
            out.append(heapq.heappop(heap)[2])
        self.counters["released"] += len(out)
        return out

    def get_timer(self) -> float | None:
        """When the next held packet is due, or None."""
        return self._heap[0][0] if self._heap else None
