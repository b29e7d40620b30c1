"""The fake-ip pool: stable, bounded, LRU, reversible, persistent."""

from __future__ import annotations

import ipaddress
import json
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunproxy.dns.fakeip import FakeIpPool

V4 = ipaddress.IPv4Network("198.18.0.0/15")
V6 = ipaddress.IPv6Network("fc00::/18")


def test_first_addresses_skip_network_and_gateway() -> None:
    pool = FakeIpPool([V4, V6])
    assert pool.address_for("a.test", 4) == "198.18.0.2"
    assert pool.address_for("b.test", 4) == "198.18.0.3"
    assert pool.address_for("a.test", 6) == "fc00::2"


def test_same_domain_same_address_and_reverse_lookup() -> None:
    pool = FakeIpPool([V4, V6])
    first = pool.address_for("a.test", 4)
    pool.address_for("b.test", 4)
    assert pool.address_for("a.test", 4) == first
    assert first is not None
    assert pool.domain_for(first) == "a.test"
    six = pool.address_for("a.test", 6)
    assert six is not None and pool.domain_for(six) == "a.test"


def test_unknown_fake_address_is_none_and_outside_is_not_fake() -> None:
    pool = FakeIpPool([V4])
    pool.address_for("a.test", 4)
    assert pool.contains("198.19.255.1")
    assert pool.domain_for("198.19.255.1") is None
    assert not pool.contains("10.0.0.1")
    assert pool.domain_for("10.0.0.1") is None
    assert not pool.contains("not an address")
    assert pool.address_for("a.test", 6) is None  # no v6 range configured


def test_full_pool_recycles_least_recently_used() -> None:
    pool = FakeIpPool([ipaddress.IPv4Network("10.0.0.0/29")])  # 8 addresses, 5 usable
    addresses = {d: pool.address_for(d, 4) for d in ("a", "b", "c", "d", "e")}
    assert sorted(addresses.values()) == [f"10.0.0.{i}" for i in range(2, 7)]  # .7 reserved
    # Touch "a" by a reverse lookup (a flow opened to it): now "b" is the oldest.
    assert pool.domain_for(addresses["a"] or "") == "a"
    f = pool.address_for("f", 4)
    assert f == addresses["b"]
    assert pool.domain_for(f or "") == "f"
    assert pool.peek("b", 4) is None
    assert pool.address_for("a", 4) == addresses["a"]
    assert len(pool) == 5


def test_size_bounds_a_huge_range() -> None:
    pool = FakeIpPool([V6], size=3)
    for i in range(10):
        pool.address_for(f"d{i}.test", 6)
    assert len(pool) == 3
    assert pool.peek("d9.test", 6) is not None and pool.peek("d0.test", 6) is None


def test_save_and_load_round_trip(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "fakeip.json")
    pool = FakeIpPool([V4, V6])
    for name in ("a.test", "b.test", "c.test"):
        pool.address_for(name, 4)
        pool.address_for(name, 6)
    pool.domain_for(pool.peek("a.test", 4) or "")  # a.test is now most recent in v4
    pool.save(path)
    restored = FakeIpPool([V4, V6])
    assert restored.load(path) == 6
    for name in ("a.test", "b.test", "c.test"):
        assert restored.peek(name, 4) == pool.peek(name, 4)
        assert restored.peek(name, 6) == pool.peek(name, 6)
    # New allocations do not collide with restored ones.
    new = restored.address_for("d.test", 4)
    assert new not in {pool.peek(n, 4) for n in ("a.test", "b.test", "c.test")}


def test_restored_lru_order_is_kept(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "fakeip.json")
    net = ipaddress.IPv4Network("10.0.0.0/29")
    pool = FakeIpPool([net])
    for name in "abcde":
        pool.address_for(name, 4)
    pool.address_for("a", 4)  # order now b c d e a
    pool.save(path)
    restored = FakeIpPool([net])
    restored.load(path)
    restored.address_for("z", 4)  # full: evicts b
    assert restored.peek("b", 4) is None and restored.peek("a", 4) is not None


def test_load_ignores_other_range_and_missing_file(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "fakeip.json")
    pool = FakeIpPool([V4])
    pool.address_for("a.test", 4)
    pool.save(path)
    other = FakeIpPool([ipaddress.IPv4Network("100.64.0.0/10")])
    assert other.load(path) == 0
    assert other.peek("a.test", 4) is None
    assert FakeIpPool([V4]).load(str(tmp_path / "absent.json")) == 0


@pytest.mark.parametrize(
    "content",
    ["not json", "[]", json.dumps({"version": 2}), json.dumps({"version": 1, "pools": 3})],
)
def test_load_rejects_files_that_are_not_snapshots(tmp_path: pathlib.Path, content: str) -> None:
    path = tmp_path / "fakeip.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        FakeIpPool([V4]).load(str(path))


def test_load_refuses_corrupt_entries_wholesale(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "fakeip.json"
    snapshot = {
        "version": 1,
        "pools": {"4": {"network": str(V4), "entries": [["a.test", 2], ["b.test", 2]]}},
    }
    path.write_text(json.dumps(snapshot))
    pool = FakeIpPool([V4])
    assert pool.load(str(path)) == 0
    assert pool.peek("a.test", 4) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([f"d{i}.test" for i in range(12)]), max_size=80))
def test_mapping_is_always_a_bijection(names: list[str]) -> None:
    pool = FakeIpPool([ipaddress.IPv4Network("10.0.0.0/29")])
    for name in names:
        address = pool.address_for(name, 4)
        assert address is not None
        assert pool.domain_for(address) == name
    live = {n: pool.peek(n, 4) for n in set(names)}
    mapped = {n: a for n, a in live.items() if a is not None}
    assert len(set(mapped.values())) == len(mapped) <= 5
    if names:
        assert mapped.get(names[-1]) is not None  # the newest is never the one recycled
