"""The fake-ip pool: domain <-> address from a reserved range, bounded, LRU.

A fake-ip answer hands the client an address that means "the domain I gave
you"; a later flow to that address is mapped back to the domain, so rules see
names and proxies receive names (remote resolution). Per address family the
pool keeps the mapping stable while a domain is in use (every lookup in either
direction refreshes it) and, once full, recycles the least recently used
address. A flow to an address that is in the range but not in the table (a
stale answer from before a restart, say) gets ``None``: the caller refuses the
flow rather than sending it anywhere.

The network address, the first host address (the usual gateway / TUN address)
and the last address of each range never enter the pool.

Sans-I/O except for the explicit ``save``/``load`` of a JSON snapshot.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

__all__ = ["FakeIpPool"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
FIRST_OFFSET = 2  # skip the network address and the gateway (.1)


class _FamilyPool:
    def __init__(self, network: IPNetwork, size: int) -> None:
        self.network = network
        self._base = int(network.network_address)
        usable = network.num_addresses - FIRST_OFFSET - 1  # minus the last address too
        self.capacity = max(0, min(usable, size))
        self._by_domain: OrderedDict[str, int] = OrderedDict()  # LRU first
        self._by_offset: dict[int, str] = {}
        self._next = FIRST_OFFSET

    def __len__(self) -> int:
        return len(self._by_domain)

    def _address(self, offset: int) -> str:
        return str(ipaddress.ip_address(self._base + offset))

    def allocate(self, domain: str) -> str:
        offset = self._by_domain.get(domain)
        if offset is not None:
            self._by_domain.move_to_end(domain)
            return self._address(offset)
        if self._next < FIRST_OFFSET + self.capacity:
            offset = self._next
            self._next += 1
        else:
            # Full: recycle the least recently used address.
            _, offset = self._by_domain.popitem(last=False)
        self._by_domain[domain] = offset
        self._by_offset[offset] = domain
        return self._address(offset)

    def lookup(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
        domain = self._by_offset.get(int(address) - self._base)
        if domain is not None:
            self._by_domain.move_to_end(domain)
        return domain

    def peek(self, domain: str) -> str | None:
        offset = self._by_domain.get(domain)
        return None if offset is None else self._address(offset)

    def snapshot(self) -> dict[str, Any]:
        return {
            "network": str(self.network),
            "entries": [[d, o] for d, o in self._by_domain.items()],  # LRU order
        }

    def restore(self, data: dict[str, Any]) -> bool:
        if data.get("network") != str(self.network):
            return False  # the range changed: old addresses mean nothing now
        entries = data.get("entries")
        if not isinstance(entries, list):
            return False
        by_domain: OrderedDict[str, int] = OrderedDict()
        by_offset: dict[int, str] = {}
        for entry in entries:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or not isinstance(entry[0], str)
                or not isinstance(entry[1], int)
                or not FIRST_OFFSET <= entry[1] < FIRST_OFFSET + self.capacity
                or entry[1] in by_offset
                or entry[0] in by_domain
            ):
                return False
            by_domain[entry[0]] = entry[1]
            by_offset[entry[1]] = entry[0]
        self._by_domain, self._by_offset = by_domain, by_offset
        free = FIRST_OFFSET
        while free in by_offset:
            free += 1
        # Allocate above everything restored; below that, offsets are all in use or are
        # reached again only through LRU recycling, which is what we want anyway.
        self._next = max([free, *(o + 1 for o in by_offset)])
        return True


class FakeIpPool:
    """Domain <-> fake address, one LRU pool per address family."""

    def __init__(self, ranges: Iterable[IPNetwork], size: int = 65536) -> None:
        self._pools: dict[int, _FamilyPool] = {}
        for network in ranges:
            if network.version in self._pools:
                raise ValueError(f"two IPv{network.version} fake-ip ranges")
            self._pools[network.version] = _FamilyPool(network, size)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(p.network for p in self._pools.values())

    def __len__(self) -> int:
        return sum(len(p) for p in self._pools.values())

    def has_family(self, version: int) -> bool:
        return version in self._pools

    def contains(self, address: str) -> bool:
        """Is ``address`` inside a fake range (mapped or not)?"""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        pool = self._pools.get(ip.version)
        return pool is not None and ip in pool.network

    def address_for(self, domain: str, version: int) -> str | None:
        """The fake address of ``domain`` (allocated now if needed); None without a range
        of that family."""
        pool = self._pools.get(version)
        return None if pool is None else pool.allocate(domain)

    def peek(self, domain: str, version: int) -> str | None:
        """The current address of ``domain`` without allocating or refreshing."""
        pool = self._pools.get(version)
        return None if pool is None else pool.peek(domain)

    def domain_for(self, address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return None
        pool = self._pools.get(ip.version)
        if pool is None or ip not in pool.network:
            return None
        return pool.lookup(ip)

    def save(self, path: str) -> None:
        """Write a snapshot atomically (temp file + rename), so a crash mid-write
        leaves the previous snapshot intact."""
        data = {"version": 1, "pools": {str(v): p.snapshot() for v, p in self._pools.items()}}
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load(self, path: str) -> int:
        """Restore a snapshot written by ``save``; returns the number of entries restored.

        A missing file restores nothing. A family whose snapshot does not fit (other
        range, corrupt entries) is left empty rather than partly restored. Raises
        ``ValueError`` if the file is not a snapshot at all.
        """
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return 0
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a fake-ip snapshot: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError(f"{path}: not a fake-ip snapshot")
        pools = data.get("pools")
        if not isinstance(pools, dict):
            raise ValueError(f"{path}: not a fake-ip snapshot")
        restored = 0
        for version, pool in self._pools.items():
            snap = pools.get(str(version))
            if isinstance(snap, dict) and pool.restore(snap):
                restored += len(pool)
        return restored
