"""The seeded fault injector: deterministic, honours its probabilities, orders by release."""

from __future__ import annotations

import itertools

import pytest

from stack.fault import FaultInjector


def _run(f: FaultInjector, n: int, step: float = 0.001) -> list[bytes]:
    out: list[bytes] = []
    now = 0.0
    for i in range(n):
        f.push(i.to_bytes(4, "big"), now)
        out += f.pop_due(now)
        now += step
    while (t := f.get_timer()) is not None:
        out += f.pop_due(t)
    return out


def test_pass_through_without_faults() -> None:
    f = FaultInjector(seed=1)
    f.push(b"a", 5.0)
    assert f.get_timer() == 5.0
    assert f.pop_due(5.0) == [b"a"]
    assert f.get_timer() is None and len(f) == 0


def test_same_seed_same_faults() -> None:
    def make() -> FaultInjector:
        return FaultInjector(7, drop=0.1, duplicate=0.1, reorder=0.1, delay=(0.0, 0.003))

    assert _run(make(), 2000) == _run(make(), 2000)
    assert _run(make(), 2000) != _run(FaultInjector(8, drop=0.1, duplicate=0.1, reorder=0.1,
                                                    delay=(0.0, 0.003)), 2000)  # fmt: skip


def test_rates_are_roughly_honoured() -> None:
    f = FaultInjector(3, drop=0.05, duplicate=0.05)
    out = _run(f, 20000)
    c = f.counters
    assert 800 < c["dropped"] < 1200
    assert 800 < c["duplicated"] < 1200
    assert len(out) == 20000 - c["dropped"] + c["duplicated"]
    assert c["released"] == len(out)


def test_reorder_lets_later_packets_overtake() -> None:
    f = FaultInjector(5, reorder=0.2, reorder_delay=0.01)
    out = _run(f, 1000, step=0.001)
    numbers = [int.from_bytes(p, "big") for p in out]
    assert sorted(numbers) == list(range(1000))  # nothing lost or duplicated
    inversions = sum(1 for a, b in itertools.pairwise(numbers) if a > b)
    assert inversions > 50


def test_delay_holds_packets_until_due() -> None:
    f = FaultInjector(9, delay=(0.010, 0.020))
    f.push(b"x", 1.0)
    assert f.pop_due(1.009) == []
    t = f.get_timer()
    assert t is not None and 1.010 <= t <= 1.020
    assert f.pop_due(t) == [b"x"]


def test_corrupt_flips_one_bit() -> None:
    f = FaultInjector(1, corrupt=1.0)
    f.push(bytes(32), 0.0)
    (p,) = f.pop_due(0.0)
    assert sum(bin(b).count("1") for b in p) == 1


def test_queue_bound_and_validation() -> None:
    f = FaultInjector(1, delay=(1.0, 1.0), max_queue=3)
    for _ in range(5):
        f.push(b"p", 0.0)
    assert len(f) == 3 and f.counters["overflow"] == 2
    with pytest.raises(ValueError):
        FaultInjector(1, drop=1.5)
    with pytest.raises(ValueError):
        FaultInjector(1, delay=(0.2, 0.1))
