"""Flow identity: the 5-tuple as the local application sees it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = ["TCP", "UDP", "FlowKey", "ip_text"]

TCP = 6
UDP = 17


@dataclass(frozen=True, slots=True)
class FlowKey:
    """``src`` is the local application's address, ``dst`` the address it wanted to reach.

    Addresses are packed bytes (4 bytes for IPv4, 16 for IPv6) so that building
    and hashing a key costs no ``ipaddress`` object on the per-packet path.
    """

    protocol: int
    src: bytes
    src_port: int
    dst: bytes
    dst_port: int

    @property
    def version(self) -> int:
        return 4 if len(self.dst) == 4 else 6

    @property
    def network(self) -> str:
        return "tcp" if self.protocol == TCP else "udp"

    @property
    def src_ip(self) -> str:
        return ip_text(self.src)

    @property
    def dst_ip(self) -> str:
        return ip_text(self.dst)

    def __str__(self) -> str:
        if self.version == 4:
            return f"{self.network} {self.src_ip}:{self.src_port} -> {self.dst_ip}:{self.dst_port}"
        return f"{self.network} [{self.src_ip}]:{self.src_port} -> [{self.dst_ip}]:{self.dst_port}"


def ip_text(addr: bytes) -> str:
    """An address in the usual text form (RFC 5952 for IPv6). IPv4 is formatted here:
    a quarter of what ipaddress takes, and every new flow's log line needs two."""
    if len(addr) == 4:
        return f"{addr[0]}.{addr[1]}.{addr[2]}.{addr[3]}"
    return str(ipaddress.IPv6Address(addr))
