"""The policy: everything a config says about where flows go, built together and
swapped whole.

A ``Policy`` holds the compiled rules, the outbounds they name, the process
resolver (when a rule needs one) and the DNS service. ``build_policy`` makes one
from a ``Config``; on SIGHUP the proxy builds a new one from the new file and hands
it to the relay in one step (``Relay.set_policy``), so a flow is always decided
by one consistent set: a rule never names an upstream the policy lacks, and a
PROCESS-NAME rule added by a reload finds a process resolver.

What a reload keeps from the previous policy, so that nothing in use is rebuilt:
an outbound whose settings did not change (the same object: flows running on it
are not disturbed), a ``select`` group's chosen member (when the group still has it),
the process resolver (once made), and the DNS service when the ``dns``
section did not change. A DNS service that did change is rebuilt but inherits the
fake-ip table and the real-ip memory when the fake-ip ranges stay the same, so
addresses already handed out keep their meaning. What the new policy no longer
uses is returned by ``Policy.retired_by`` and closed by the caller once no flow
uses it.

The verdict -> outbound mapping is written once, ``Policy.route``: the relay uses
it for flows from the TUN, the DNS service for its resolver flows.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import rules
from stack import TCP, FlowKey, Refusal
from tunproxy.flows import OFF as ATTRIBUTION_OFF
from tunproxy.flows import FlowRecord
from tunproxy.outbounds.base import Outbound, Target

if TYPE_CHECKING:
    from tunproxy.config import Config, UpstreamConfig

__all__ = [
    "Decision",
    "DnsPolicy",
    "OutboundBuilder",
    "Policy",
    "ProcessLookup",
    "Retired",
    "Route",
    "build_policy",
]

log = logging.getLogger("tunproxy.policy")


class DnsPolicy(Protocol):
    """What the relay and the policy need of the DNS service (``tunproxy.dns.service``)."""

    def hijacks(self, address: str, port: int, network: str) -> bool: ...

    def is_fake(self, address: str) -> bool: ...

    def domain_for(self, address: str) -> str | None: ...

    async def resolve(self, domain: str) -> list[str]: ...

    async def handle_query(
        self, query: bytes, *, network: str, client: tuple[str, int]
    ) -> bytes | None: ...

    async def aclose(self) -> None: ...


class ProcessLookup(Protocol):
    """The local process owning a flow's socket (``tunproxy.procinfo.ProcessResolver``)."""

    def lookup(
        self, network: str, src: str, sport: int, dst: str, dport: int
    ) -> rules.ProcessInfo | None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class Decision:
    """What to do with a new flow: carry it (``outbound``), or refuse it (``refusal``)."""

    target_name: str
    rule: rules.Verdict | None  # None: decided before any rule (reason says why)
    outbound: Outbound | None = None
    target: Target | None = None
    refusal: str | None = None  # Refusal.RESET / UNREACHABLE / DROP
    reason: str | None = None


class Route(NamedTuple):
    """A verdict's target resolved: an outbound, or a refusal with its reason."""

    outbound: Outbound | None
    refusal: str | None = None
    reason: str | None = None


class Policy:
    """Rules + outbounds + process lookup + DNS: a Decision for each new flow."""

    def __init__(
        self,
        ruleset: rules.RuleSet,
        outbounds: dict[str, Outbound],
        dns: DnsPolicy | None = None,
        processes: ProcessLookup | None = None,
        config: Config | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.outbounds = outbounds
        self.dns = dns
        self.processes = processes
        self.config = config  # what it was built from (None for hand-made policies)

    # -- the verdict -> outbound mapping, once ----------------------------------------
    def route(self, name: str, tcp: bool) -> Route:
        """Where a verdict's target ``name`` sends a flow (TCP, or else UDP/ICMP)."""
        upper = name.upper()
        if upper == "REJECT":
            return Route(None, Refusal.RESET if tcp else Refusal.UNREACHABLE, "rejected")
        if upper in ("DROP", "REJECT-DROP"):
            return Route(None, Refusal.DROP, "dropped")
        outbound = self.outbounds.get("DIRECT" if upper == "DIRECT" else name)
        if outbound is None:
            # Config loading checks rule targets against the upstreams of the same file,
            # and a policy is swapped whole, so this is our bug, said loudly.
            log.error("bug: the rules name %r, which this policy has no outbound for", name)
            return Route(None, Refusal.RESET if tcp else Refusal.UNREACHABLE,
                         "internal-error: no-such-outbound")  # fmt: skip
        return Route(outbound)

    def resolver_outbound(self, network: str, target: Target) -> Outbound:
        """The outbound for one of the DNS service's own upstream flows: decided by the
        rules like any other flow; a refusal becomes the REJECT outbound."""
        verdict = self.ruleset.match(rules.FlowMeta(
            network=network, src_ip="0.0.0.0", src_port=0, dst_ip=target.address,
            dst_port=target.port, domain=target.domain,
        ))  # fmt: skip
        route = self.route(verdict.target, network == "tcp")
        if route.outbound is not None:
            return route.outbound
        return self.outbounds["REJECT"]

    # -- deciding a flow from the TUN ------------------------------------------------
    def meta(self, key: FlowKey, record: FlowRecord) -> tuple[rules.FlowMeta, bool]:
        dst_ip = key.dst_ip
        dns = self.dns
        fake = False
        if dns is not None:
            record.domain = record.domain or dns.domain_for(dst_ip)
            fake = dns.is_fake(dst_ip)
        process = None
        if self.ruleset.needs_process and (
            self.processes is not None or record.attribution is not None
        ):
            process = _process_lookup(self.processes, key, record)
        return rules.FlowMeta(
            network=key.network, src_ip=key.src_ip, src_port=key.src_port,
            dst_ip=None if fake else dst_ip, dst_port=key.dst_port, domain=record.domain,
            process=process, dscp=record.dscp,
        ), fake  # fmt: skip

    async def decide(self, key: FlowKey, record: FlowRecord) -> Decision:
        tcp = key.protocol == TCP
        meta, fake = self.meta(key, record)
        if fake and record.domain is None:
            # A fake address we did not hand out (stale after a restart): refuse, never leak.
            how = Refusal.RESET if tcp else Refusal.UNREACHABLE
            return Decision("REJECT", None, refusal=how, reason="unknown-fake-ip")
        dns = self.dns
        if fake and dns is not None and record.domain is not None and (
            self.ruleset.needs_resolve_for(meta)
        ):
            try:
                resolved = await dns.resolve(record.domain)
            except Exception:  # a failed lookup only means IP rules cannot match
                resolved = []
            meta.resolved_ips = lambda: resolved
        verdict = self.ruleset.match(meta)
        name = verdict.target
        route = self.route(name, tcp)
        if route.outbound is None:
            return Decision(name, verdict, refusal=route.refusal, reason=route.reason)
        target = Target(
            port=key.dst_port, address=None if fake else key.dst_ip, domain=record.domain
        )
        return Decision(name, verdict, outbound=route.outbound, target=target)

    # -- replacing ---------------------------------------------------------------------
    def retired_by(self, new: Policy) -> Retired:
        """What this policy holds that ``new`` does not: to be closed after the swap."""
        kept = {id(o) for o in new.outbounds.values()}
        return Retired(
            [o for o in self.outbounds.values() if id(o) not in kept],
            self.dns if self.dns is not new.dns else None,
            self.processes if self.processes is not new.processes else None,
        )


class Retired(NamedTuple):
    outbounds: list[Outbound]
    dns: DnsPolicy | None
    processes: ProcessLookup | None


def _process_lookup(
    processes: ProcessLookup | None, key: FlowKey, record: FlowRecord
) -> Callable[[], rules.ProcessInfo | None]:
    def lookup() -> rules.ProcessInfo | None:
        if processes is None or record.attribution not in (None, ATTRIBUTION_OFF):
            return record.process_info  # attributed when it opened; never guessed twice
        info = processes.lookup(key.network, key.src_ip, key.src_port, key.dst_ip,
                                key.dst_port)  # fmt: skip
        if info is not None:
            record.set_process(info)
        return info

    return lookup


# build_outbounds(config, resolve) -> {name: Outbound}; tunproxy.app.build_outbounds.
OutboundBuilder = Callable[["Config", Callable[[str], Awaitable[list[str]]] | None],
                           dict[str, Outbound]]  # fmt: skip
DnsBuilder = Callable[["Config"], DnsPolicy | None]
ProcessBuilder = Callable[[], ProcessLookup | None]


def _same_upstream(a: UpstreamConfig | None, b: UpstreamConfig | None) -> bool:
    """Upstream settings equal, whatever line of the file they moved to."""
    return a is not None and b is not None and (
        dataclasses.replace(a, line=0) == dataclasses.replace(b, line=0)
    )


def build_policy(
    config: Config,
    *,
    build_outbounds: OutboundBuilder,
    resolve: Callable[[str], Awaitable[list[str]]] | None,
    make_dns: DnsBuilder,
    make_processes: ProcessBuilder,
    previous: Policy | None = None,
) -> Policy:
    """A policy for ``config``, reusing what ``previous`` has that did not change.

    ``resolve`` is handed to DIRECT for domain-only targets (it should reach the current
    policy's DNS, whichever that is); ``make_dns`` builds a DNS service (or None) and
    ``make_processes`` a process resolver. Nothing here does I/O, so a failure leaves
    ``previous`` untouched.
    """
    fresh = build_outbounds(config, resolve)
    outbounds: dict[str, Outbound] = {}
    old_config = previous.config if previous is not None else None
    groups = config.groups
    for name, outbound in fresh.items():
        if name in groups:
            continue  # built again below, over the members this policy really uses
        old = previous.outbounds.get(name) if previous is not None else None
        if old is not None and old_config is not None:
            if name in ("DIRECT", "REJECT"):
                same = old_config.tun.fwmark == config.tun.fwmark
            else:
                same = _same_upstream(old_config.upstreams.get(name), config.upstreams.get(name))
            if same:
                outbound = old
        outbounds[name] = outbound
    if groups:
        from tunproxy.outbounds.group import build_groups

        build_groups(groups, outbounds)
        if previous is not None:
            _keep_selections(previous.outbounds, outbounds)
    # Made when a rule or the flow table's attribution first needs it, then kept across
    # reloads (even ones that drop the process rules): a resolver may be tied to where it
    # was made (``tunproxy run`` opens its sock_diag socket in the command's namespace),
    # so it is never rebuilt here.
    processes = previous.processes if previous is not None else None
    if processes is None and (config.ruleset.needs_process or config.log.attribution):
        processes = make_processes()
    dns: DnsPolicy | None
    if previous is not None and old_config is not None and old_config.dns == config.dns:
        dns = previous.dns
    else:
        dns = make_dns(config)
        if previous is not None and previous.dns is not None and dns is not None:
            _inherit_addresses(previous.dns, dns)
    return Policy(config.ruleset, outbounds, dns, processes, config)


def _keep_selections(old: dict[str, Outbound], new: dict[str, Outbound]) -> None:
    """A ``select`` group keeps the member chosen through the controller across a reload
    when the new file still has the group, still as ``select``, with that member (as
    mihomo keeps it); otherwise it starts on its first member again."""
    from tunproxy.outbounds.group import GroupOutbound

    for name, group in new.items():
        before = old.get(name)
        if (isinstance(group, GroupOutbound) and isinstance(before, GroupOutbound)
                and group.config.kind == before.config.kind == "select"
                and before.state.selected in group.state.alive):
            group.select(before.state.selected)
        elif (isinstance(group, GroupOutbound) and isinstance(before, GroupOutbound)
                and group.config.kind == before.config.kind
                and before.state.fixed in group.state.alive):
            group.state.fix(before.state.fixed)  # a url-test or fallback group's fixed member


def _inherit_addresses(old: DnsPolicy, new: DnsPolicy) -> None:
    """Keep the fake-ip table and real-ip memory across a DNS rebuild when their
    shape allows: an address handed out before the reload still names its domain."""
    from tunproxy.dns.service import DnsService  # loaded already: both are services

    if not isinstance(old, DnsService) or not isinstance(new, DnsService):
        return
    old_config, new_config = old.config, new.config
    if (old_config.mode, old_config.fake_ip_ranges, old_config.fake_ip_size) == (
        new_config.mode, new_config.fake_ip_ranges, new_config.fake_ip_size
    ):
        new.pool = old.pool
    if old_config.realip_size == new_config.realip_size:
        new.realip = old.realip
        for name, addresses in new_config.hosts.items():  # as DnsService.__init__ does
            if not name.startswith(("+.", "*.")):
                new.realip.remember(name, addresses)
