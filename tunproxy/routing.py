"""Policy routing: steer the host's traffic into the TUN, and nothing of tunproxy's own.

For each address family the TUN has an address in, tunproxy adds, from
``tun.rule-priority`` (P) upwards::

    P+0   fwmark M          lookup main     tunproxy's own sockets (SO_MARK) never loop
    ...   uidrange A-B      lookup main     each exclude-uid range
    ...   ipproto udp/tcp dport 53 lookup T DNS to any server enters the TUN (dns.hijack)
    ...   lookup main suppress_prefixlength 0
                                            connected LAN subnets and other specific routes
                                            of the main table keep working; its default
                                            route does not count
    ...   to CIDR           lookup main     route-exclude, loopback, link-local, multicast,
                                            the upstream servers' own addresses
    last  lookup T                          everything else (or one per include-uid range)

and table T holds ``default dev <tun>``. With ``tun.strict-route`` (the default), a
family the TUN has no address in gets the same rules, and table T holds
``unreachable default`` for it: that family's traffic fails at once (ENETUNREACH)
instead of leaving by the main table's default route around the tunnel. Each rule
and route goes through the journal, so it is undone on exit and after a crash.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

from tunproxy.config import TunConfig
from tunproxy.errors import SetupError
from tunproxy.journal import Change, Journal

__all__ = ["ALWAYS_EXCLUDED", "check_clashes", "setup_link", "setup_routing"]

log = logging.getLogger("tunproxy.routing")

MAIN_TABLE = 254
ALWAYS_EXCLUDED = {
    socket.AF_INET: ("127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32"),
    socket.AF_INET6: ("::1/128", "fe80::/10", "ff00::/8"),
}


async def setup_link(journal: Journal, tun: TunConfig) -> int:
    """Give the TUN its MTU, queue length and addresses, and bring it up; return its index."""
    ipr = journal.ipr
    links = await ipr.link_lookup(ifname=tun.name)
    if not links:
        raise SetupError(f"the TUN device {tun.name} vanished right after it was made")
    index = int(links[0])
    journal.record(Change("link", {"ifname": tun.name, "index": index}))
    await ipr.link("set", index=index, mtu=tun.mtu, txqlen=tun.txqueuelen)
    for interface in tun.addresses:
        await journal.apply(Change("addr", {
            "ifname": tun.name, "index": index, "address": str(interface.ip),
            "prefixlen": interface.network.prefixlen,
        }))
    # Replies from the TUN carry far-away source addresses: no reverse-path filtering here.
    await journal.apply(Change("sysctl", {
        "path": f"/proc/sys/net/ipv4/conf/{tun.name}/rp_filter", "value": "0",
    }))
    await ipr.link("set", index=index, state="up")
    return index


def _families(tun: TunConfig) -> list[socket.AddressFamily]:
    """The families that get policy routing: those the TUN has an address in, and with
    strict-route the others too (to be refused)."""
    families = []
    if tun.strict_route or any(a.version == 4 for a in tun.addresses):
        families.append(socket.AF_INET)
    if tun.strict_route or any(a.version == 6 for a in tun.addresses):
        families.append(socket.AF_INET6)
    return families


def _tunnelled(tun: TunConfig, family: socket.AddressFamily) -> bool:
    version = 4 if family == socket.AF_INET else 6
    return any(a.version == version for a in tun.addresses)


async def check_clashes(journal: Journal, tun: TunConfig) -> None:
    """Refuse to start when the table or the mark is already used by something else."""
    ipr = journal.ipr
    for family in _families(tun):
        routes = await ipr.route_count(family, tun.table)
        if routes:
            raise SetupError(
                f"routing table {tun.table} is already in use ({routes} routes); set "
                "tun.table to a free table"
            )
        for rule in await ipr.rules(family):
            if rule["fwmark"] == tun.fwmark:
                raise SetupError(
                    f"fwmark {tun.fwmark:#x} is already used by an ip rule; set tun.fwmark "
                    "to a free mark"
                )
            if rule["table"] == tun.table:
                raise SetupError(
                    f"routing table {tun.table} is already used by an ip rule; set tun.table "
                    "to a free table"
                )


async def _rule(
    journal: Journal, family: int, priority: int, table: int, **match: str | int
) -> None:
    await journal.apply(Change("rule", {
        "family": family, "priority": priority, "table": table, **match,
    }))


async def setup_routing(
    journal: Journal,
    tun: TunConfig,
    index: int,
    *,
    excluded_addresses: Iterable[str] = (),
    hijack_dns: bool = False,
) -> None:
    excluded = [ipaddress.ip_network(a) for a in excluded_addresses]
    for family in _families(tun):
        priority = tun.rule_priority

        default = "default" if family == socket.AF_INET else "::/0"
        if _tunnelled(tun, family):
            await journal.apply(Change("route", {
                "family": family, "dst": default, "oif": index, "table": tun.table,
            }))
        else:  # strict-route: refused, never around the tunnel
            await journal.apply(Change("route", {
                "family": family, "dst": default, "type": "unreachable", "table": tun.table,
            }))
        await _rule(journal, family, priority, MAIN_TABLE, fwmark=tun.fwmark, fwmask=0xFFFFFFFF)
        priority += 1
        for low, high in tun.exclude_uid:
            await _rule(journal, family, priority, MAIN_TABLE, uid_range=f"{low}:{high}")
            priority += 1
        if hijack_dns:
            for proto in (socket.IPPROTO_UDP, socket.IPPROTO_TCP):
                ranges: list[tuple[int, int] | None] = [*tun.include_uid] or [None]
                for uid in ranges:
                    extra: dict[str, str | int] = {}
                    if uid is not None:
                        extra["uid_range"] = f"{uid[0]}:{uid[1]}"
                    await _rule(journal, family, priority, tun.table, ip_proto=proto,
                                dport_range="53:53", **extra)
                    priority += 1
        await _rule(journal, family, priority, MAIN_TABLE, suppress_prefixlen=0)
        priority += 1
        version = 4 if family == socket.AF_INET else 6
        cidrs = [ipaddress.ip_network(c) for c in ALWAYS_EXCLUDED[family]]
        cidrs += [n for n in tun.route_exclude if n.version == version]
        cidrs += [n for n in excluded if n.version == version]
        for net in cidrs:
            await _rule(journal, family, priority, MAIN_TABLE, dst=str(net.network_address),
                       dst_len=net.prefixlen)
            priority += 1
        if tun.include_uid:
            for low, high in tun.include_uid:
                await _rule(journal, family, priority, tun.table, uid_range=f"{low}:{high}")
                priority += 1
        else:
            await _rule(journal, family, priority, tun.table)
        log.info("policy routing for IPv%d: rules %d..%d, table %d%s", version,
                 tun.rule_priority, priority, tun.table,
                 "" if _tunnelled(tun, family) else " (no TUN address: unreachable)")
