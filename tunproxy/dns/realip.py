"""Real-ip memory: answer address -> the domain the client asked for, bounded (LRU).

In real-ip mode (and for fake-ip-filter domains, ``hosts``) clients connect to
real addresses; remembering which name produced each address lets those flows
carry their domain to the rules. The newest answer wins when two names share an
address (CDNs), which is the name the client most likely just looked up.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["RealIpMemory"]


class RealIpMemory:
    def __init__(self, max_entries: int = 65536) -> None:
        self.max_entries = max_entries
        self._by_address: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_address)

    @staticmethod
    def _key(address: str) -> str | None:
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            return None

    def remember(self, domain: str, addresses: Iterable[str]) -> None:
        for address in addresses:
            key = self._key(address)
            if key is None or ipaddress.ip_address(key).is_unspecified:
                continue
            self._by_address[key] = domain
            self._by_address.move_to_end(key)
        while len(self._by_address) > self.max_entries:
            self._by_address.popitem(last=False)

    def domain_for(self, address: str) -> str | None:
        key = self._key(address)
        if key is None:
            return None
        domain = self._by_address.get(key)
        if domain is not None:
            self._by_address.move_to_end(key)
        return domain
