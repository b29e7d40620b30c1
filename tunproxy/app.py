"""The running proxy: set up the host, run the loop, and put the host back.

    start: journal (undo a dead run's leftovers) -> clash checks -> TUN ->
           link + addresses -> policy routing -> stack, outbounds, DNS, relay ->
           driver -> "tunproxy ready"
    stop (SIGINT, SIGTERM, an error): flows aborted -> driver stopped ->
           outbounds and DNS closed -> TUN closed -> journal undone in reverse
    SIGHUP: reload the file: a new policy (rules, outbounds, process lookup, DNS) is
           built from it and replaces the old one whole (tunproxy.policy); a bad file
           is reported (file:line) and the old policy stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tunproxy_native
from stack import Stack, StackConfig
from tunproxy import __version__
from tunproxy.config import Config, UpstreamConfig, load_config
from tunproxy.driver import TunDriver
from tunproxy.errors import ConfigError, SetupError, TunproxyError
from tunproxy.flows import FlowTable, configure_flow_table
from tunproxy.journal import Journal
from tunproxy.memory import release_freed_memory
from tunproxy.outbounds.base import Outbound, Target
from tunproxy.policy import DnsPolicy, Policy, ProcessLookup, build_policy
from tunproxy.relay import Relay
from tunproxy.routing import check_clashes, setup_link, setup_routing
from tunproxy.tun import TunDevice, open_tun

__all__ = ["Host", "Proxy", "run"]

log = logging.getLogger("tunproxy")


def build_outbounds(config: Config, resolve: Any | None) -> dict[str, Outbound]:
    from tunproxy.outbounds.direct import DirectOutbound
    from tunproxy.outbounds.reject import RejectOutbound

    fwmark = config.tun.fwmark
    outbounds: dict[str, Outbound] = {
        "DIRECT": DirectOutbound(name="DIRECT", fwmark=fwmark, resolve=resolve),
        "REJECT": RejectOutbound(),
    }
    for name, up in config.upstreams.items():
        if up.type == "socks5":
            from tunproxy.outbounds.socks5 import Socks5Outbound

            outbounds[name] = Socks5Outbound(
                name, up.host, up.port, username=up.username, password=up.password,
                fwmark=fwmark, udp=up.udp, pipeline=up.pipeline,
            )
        elif up.type == "quic":
            from tunproxy.outbounds.quic import QuicOutbound

            outbounds[name] = QuicOutbound(
                name, up.host, up.port, udp=up.udp, fwmark=fwmark, **up.options)
        else:
            raise SetupError(f"upstream {name}: type {up.type} is not supported yet")
    if config.groups:
        from tunproxy.outbounds.group import build_groups

        build_groups(config.groups, outbounds)
    return outbounds


async def _upstream_addresses(upstreams: dict[str, UpstreamConfig]) -> list[str]:
    """The upstream servers' own addresses: they must never be routed into the TUN."""
    loop = asyncio.get_running_loop()
    addresses: set[str] = set()
    for up in upstreams.values():
        try:
            addresses.add(str(ipaddress.ip_address(up.host)))
            continue
        except ValueError:
            pass
        try:
            infos = await loop.getaddrinfo(up.host, up.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SetupError(f"cannot resolve upstream {up.name} server {up.host}: {exc}") from None
        addresses.update(str(info[4][0]) for info in infos)
    return sorted(addresses)


def _stack_config(config: Config, vnet_hdr: bool, gso: bool) -> StackConfig:
    return StackConfig(
        mtu=config.tun.mtu,
        vnet_hdr=vnet_hdr,
        gso=gso,
        udp_idle_timeout=config.relay.udp_idle_timeout,
        answer_ping=config.relay.ping == "local",
        echo_events=config.relay.ping == "forward",
        tcp_receive_window=max(config.relay.buffer_size, 64 * 1024),
        # Towards the app: what a flow whose app stops reading holds (README "Reliability").
        tcp_send_buffer=2 * config.relay.buffer_size,
        tcp_delayed_ack=config.tun.delayed_ack,
    )


class Host:
    """The host side: TUN device and policy routing, through the journal.

    Runs on a plain asyncio loop; ``setup`` and ``teardown`` each get their own short-lived
    loop, and their netlink calls go to a helper process that exits when they are done.
    """

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.journal = Journal(state_dir, config.tun.name)
        self.tun: TunDevice | None = None

    async def setup(self, hijack_dns: bool) -> TunDevice:
        config = self.config
        journal = self.journal
        await journal.open()
        try:
            if config.tun.auto_route:
                await check_clashes(journal, config.tun)
            excluded = await _upstream_addresses(config.upstreams)
            if await journal.ipr.link_lookup(ifname=config.tun.name):
                raise SetupError(
                    f"an interface named {config.tun.name} already exists; set tun.name to "
                    "another name"
                )
            self.tun = open_tun(config.tun.name, offload=config.tun.offload,
                                queues=config.tun.queues)
            index = await setup_link(journal, config.tun)
            if config.tun.auto_route:
                await setup_routing(journal, config.tun, index, excluded_addresses=excluded,
                                    hijack_dns=hijack_dns)
        finally:
            await journal.release()
        return self.tun

    async def teardown(self) -> None:
        if self.tun is not None:
            self.tun.close()
        await self.journal.close()
        log.info("host configuration restored")


class Proxy:
    """The data path: stack, relay, outbounds and DNS around one TUN device."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.stopping = asyncio.Event()
        self.flow_log: FlowTable = FlowTable()
        self.policy: Policy | None = None
        self.relay: Relay | None = None
        self.driver: TunDriver | None = None  # the controller's captures tap it

    def build_policy(self, config: Config, previous: Policy | None = None) -> Policy:
        return build_policy(
            config, build_outbounds=build_outbounds,
            resolve=self._resolve if self.dns_enabled() else None,
            make_dns=self._make_dns, make_processes=self._processes, previous=previous,
        )  # fmt: skip

    def reload(self) -> None:
        """SIGHUP: a new policy for new flows; existing flows keep their verdict and outbound."""
        try:
            fresh = load_config(self.config.path)
            if _dns_enabled(fresh) != self.dns_enabled():
                raise ConfigError(
                    "turning DNS interception on or off needs a restart (the routing for "
                    "port 53 is set up at start)", str(fresh.path),
                )  # fmt: skip
            policy = self.build_policy(fresh, previous=self.policy)
        except TunproxyError as exc:
            log.error("reload failed, keeping the old policy: %s", exc)
            return
        for section, old, new in (("tun", self.config.tun, fresh.tun),
                                  ("relay", self.config.relay, fresh.relay)):  # fmt: skip
            if old != new:
                log.warning("reload: changes to the %s section take effect at the next start",
                            section)  # fmt: skip
        self.policy = policy
        if self.relay is not None:
            self.relay.set_policy(policy)
        self.flow_log.reopen_sinks()  # the flow log, for logrotate
        gc.freeze()
        log.info("reloaded %s: %d rules, outbounds %s", fresh.path, fresh.rule_count,
                 " ".join(sorted(policy.outbounds)))  # fmt: skip

    async def serve(self, tun: TunDevice) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        driver = relay = refresher = pinger = controller = None
        try:
            stack = Stack(_stack_config(config, tun.vnet_hdr, tun.tso))
            self.policy = self.build_policy(config)
            refresher = _start_refresher(config, self._resolver_outbound, self.reload)
            configure_flow_table(self.flow_log, config.log, self.policy.processes)
            driver_ref: list[TunDriver] = []
            relay = self.relay = Relay(loop, stack, self.policy, config.relay, self.flow_log,
                                       lambda: driver_ref[0].flush_soon())  # fmt: skip
            if config.relay.ping == "forward":
                from tunproxy.icmp import Pinger

                pinger = Pinger(loop, stack, lambda: relay.policy, relay.flush_soon,
                                config.tun.fwmark)  # fmt: skip
                relay.on_echo = pinger.handle
            driver = TunDriver(loop, tun, stack, relay.handle_event,
                               faults=config.fault_injection)  # fmt: skip
            driver_ref.append(driver)
            self.driver = driver
            driver.start()
            self.started(relay, driver)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._stop, sig)
            loop.add_signal_handler(signal.SIGHUP, self.reload)
            # SIGUSR1: the exit summary, now (bench/stress.py reads it under load).
            loop.add_signal_handler(signal.SIGUSR1, lambda: _log_live(
                relay, driver, self.policy.dns if self.policy is not None else None))
            if config.controller is not None:
                from tunproxy.controller import start_controller

                controller = await start_controller(config.controller, self)
            log.info(
                "tunproxy ready: %s mtu %d, offloads %s, writes %s, %d rules, dns %s",
                tun.name, config.tun.mtu, " ".join(sorted(tun.offloads)) or "off",
                driver.write_method, config.rule_count, "on" if self.dns_enabled() else "off",
            )
            release_freed_memory()  # what setting up freed: the process's size at rest
            await self.stopping.wait()
            log.info("stopping: %d flows open", len(relay.flows))
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            if controller is not None:
                with _logged("closing the controller"):
                    await controller.aclose()
            if relay is not None:
                with _logged("closing flows"):
                    await relay.aclose()
            if pinger is not None:
                await pinger.aclose()
            if driver is not None:
                driver.stop()
                if relay is not None:
                    _log_counters(relay.stack.counters, relay.flow_log.ended_by_reason,
                                  driver.write_errors)
            if refresher is not None:
                await refresher.aclose()
            if self.policy is not None:
                await _close_policy(self.policy)
            self.flow_log.close_sinks()

    def started(self, relay: Relay, driver: TunDriver) -> None:
        """Called once the data path runs (``tunproxy run`` starts its command here)."""

    def _stop(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self.stopping.set()

    def dns_enabled(self) -> bool:
        return _dns_enabled(self.config)

    def _make_dns(self, config: Config) -> DnsPolicy | None:
        if not _dns_enabled(config):
            return None
        from tunproxy.dns.service import DnsService

        return DnsService(config.dns, self._resolver_outbound)

    async def _resolve(self, domain: str) -> list[str]:
        """DIRECT's resolver for domain-only targets: the current policy's DNS."""
        dns = self.policy.dns if self.policy is not None else None
        return await dns.resolve(domain) if dns is not None else []

    def _resolver_outbound(self, network: str, target: Target) -> Outbound:
        """Resolver flows are decided by the current policy like any other flow."""
        assert self.policy is not None
        return self.policy.resolver_outbound(network, target)

    def _processes(self) -> ProcessLookup | None:
        from tunproxy.procinfo import ProcessResolver

        return ProcessResolver()


def _start_refresher(config: Config, outbound_for: Any, reload: Any) -> Any | None:
    """Refresh ``type: http`` rule sets every ``interval``, through the rules."""
    if not any(s.get("type") == "http" for s in config.rule_set_settings.values()):
        return None  # and urllib.request (with email and http.client) is never imported
    from tunproxy.ruleremote import Refresher, remote_rule_sets

    sets = remote_rule_sets(config.rule_set_settings, config.path.parent)
    if not sets:
        return None
    refresher = Refresher(sets, outbound_for, reload)
    refresher.start()
    return refresher


def _dns_enabled(config: Config) -> bool:
    return config.dns is not None and bool(getattr(config.dns, "enable", True))


async def _close_policy(policy: Policy) -> None:
    for outbound in policy.outbounds.values():
        with _logged(f"closing outbound {outbound.name}"):
            await outbound.aclose()
    if policy.dns is not None:
        with _logged("closing DNS"):
            await policy.dns.aclose()
    if policy.processes is not None:
        policy.processes.close()


def _log_counters(
    counters: Mapping[str, int], ended: Mapping[str, int], write_errors: int
) -> None:
    """One summary line each: what the stack saw, and how flows ended."""
    stack_part = ", ".join(f"{k} {v}" for k, v in sorted(counters.items()) if v)
    log.info("stack counters: %s; tun write errors %d", stack_part or "none", write_errors)
    ends = ", ".join(f"{k} {v}" for k, v in sorted(ended.items()))
    log.info("flows ended: %s", ends or "none")


def _log_live(relay: Relay, driver: TunDriver, dns: Any | None) -> None:
    _log_counters(relay.stack.counters, relay.flow_log.ended_by_reason, driver.write_errors)
    pending = f", dns pending {len(dns.coalescer)}" if dns is not None else ""
    log.info("relay flows %d%s", len(relay.flows), pending)


@contextlib.contextmanager
def _logged(what: str) -> Any:
    try:
        yield
    except Exception:
        log.exception("error while %s", what)


def _data_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run(config: Config, state_dir: Path) -> int:
    """Set up the host, serve until SIGINT/SIGTERM, and always put the host back."""
    log.debug("tunproxy %s: %s", __version__, tunproxy_native.describe())
    host = Host(config, state_dir)
    proxy = Proxy(config)
    # The compiled rules and config live as long as the process: keep the cyclic GC from
    # walking them on every collection (a multi-millisecond pause with 100k rules).
    gc.freeze()
    try:
        tun = asyncio.run(host.setup(hijack_dns=proxy.dns_enabled()))
        with _data_loop_runner() as runner:
            runner.run(proxy.serve(tun))
    finally:
        asyncio.run(host.teardown())
    return 0
