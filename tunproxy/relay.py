"""The relay: carries each flow the stack rebuilt through the outbound the rules chose.

TCP, connect before accept: the local application's SYN is answered only once
the outbound connected, so a refused upstream looks refused to the app. Then
bytes flow both ways on asyncio Protocols, with backpressure both ways:

    app -> stack -> DataReceived -> upstream transport.write
        upstream buffer above its high-water mark: pause_writing ->
        stack.pause_receiving (the app's TCP window closes)
    upstream read (into the relay's one read buffer) -> stack.send
        stack send buffer full: upstream.pause_reading, until FlowWritable

and half-close both ways (app FIN -> write_eof; upstream EOF -> FIN to app).

UDP: one outbound datagram session per local 5-tuple, opened on the first
datagram (a few datagrams are held while it opens). DNS to a hijacked address
is answered by the DNS service and never relayed.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import rules
from stack import (
    TCP,
    DatagramReceived,
    DataReceived,
    Event,
    FlowClosed,
    FlowHalfClosed,
    FlowKey,
    FlowOpened,
    FlowReset,
    FlowWritable,
    Refusal,
    Stack,
)
from tunproxy.config import RelayConfig
from tunproxy.errors import OutboundError, Unreachable
from tunproxy.flows import CLOSING, HALF_CLOSED, OPEN, FlowLog, FlowRecord
from tunproxy.flows import OFF as ATTRIBUTION_OFF
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamReceiver,
    Target,
)
from tunproxy.sniff import NEED_MORE, QuicSniffer, load_quic_crypto, sniff_stream

__all__ = ["Decision", "Relay", "Router"]

log = logging.getLogger("tunproxy.relay")

MAX_PENDING_DATAGRAMS = 64
DNS_TCP_MAX_BUFFER = 128 * 1024
MAX_SNIFF_BYTES = 16 * 1024
# Upstream TCP reads go into one buffer of this size (the bytes are copied out at
# once, so every flow can share it). uvloop's own reads are 256 KiB; a download
# through DIRECT measured +35 % with 1 MiB reads (fewer recv calls, each one
# also running the kernel's ACK and backlog work for the connection), no better
# beyond 2 MiB (bench/run.py, same machine, alternating runs).
UPSTREAM_READ_SIZE = 1 << 20
# Where the server talks first, a client's first bytes never come: don't wait for them.
SERVER_SPEAKS_FIRST = frozenset({21, 22, 25, 110, 143, 587, 3306, 5432, 5900})


@dataclass(slots=True)
class Decision:
    """What to do with a new flow: carry it (``outbound``), or refuse it (``refusal``)."""

    target_name: str
    rule: rules.Verdict | None  # None: decided before any rule (reason says why)
    outbound: Outbound | None = None
    target: Target | None = None
    refusal: str | None = None  # Refusal.RESET / UNREACHABLE / DROP
    reason: str | None = None


class Router:
    """Rules + outbounds + DNS knowledge -> a Decision for each new flow."""

    def __init__(
        self,
        ruleset: rules.RuleSet,
        outbounds: dict[str, Outbound],
        dns: Any | None = None,
        processes: Any | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.outbounds = outbounds
        self.dns = dns
        self.processes = processes

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
            process = self._process_lookup(key, record)
        return rules.FlowMeta(
            network=key.network, src_ip=key.src_ip, src_port=key.src_port,
            dst_ip=None if fake else dst_ip, dst_port=key.dst_port, domain=record.domain,
            process=process,
        ), fake

    def _process_lookup(
        self, key: FlowKey, record: FlowRecord
    ) -> Callable[[], rules.ProcessInfo | None]:
        processes = self.processes

        def lookup() -> rules.ProcessInfo | None:
            if processes is None or record.attribution not in (None, ATTRIBUTION_OFF):
                return record.process_info  # attributed when it opened; never guessed twice
            info: rules.ProcessInfo | None = processes.lookup(
                key.network, key.src_ip, key.src_port, key.dst_ip, key.dst_port
            )
            if info is not None:
                record.set_process(info)
            return info

        return lookup

    async def decide(self, key: FlowKey, record: FlowRecord) -> Decision:
        meta, fake = self.meta(key, record)
        if fake and record.domain is None:
            # A fake address we did not hand out (stale after a restart): refuse, never leak.
            how = Refusal.RESET if key.protocol == TCP else Refusal.UNREACHABLE
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
        upper = name.upper()
        if upper == "REJECT":
            how = Refusal.RESET if key.protocol == TCP else Refusal.UNREACHABLE
            return Decision(name, verdict, refusal=how, reason="rejected")
        if upper in ("DROP", "REJECT-DROP"):
            return Decision(name, verdict, refusal=Refusal.DROP, reason="dropped")
        outbound = self.outbounds["DIRECT" if upper == "DIRECT" else name]
        target = Target(
            port=key.dst_port, address=None if fake else key.dst_ip, domain=record.domain
        )
        return Decision(name, verdict, outbound=outbound, target=target)


class _Flow:
    __slots__ = ("closed", "id", "record", "task")

    def __init__(self, flow_id: int, record: FlowRecord) -> None:
        self.id = flow_id
        self.record = record
        self.task: asyncio.Task[None] | None = None
        self.closed = False


class TcpFlow(_Flow, StreamReceiver):
    """One TCP flow: the stack side is ``relay.stack``/``id``, the other an upstream transport."""

    __slots__ = (
        "accepted", "app_fin", "first_fin", "last_active", "relay", "sniff_timer", "sniffed",
        "transport", "upstream_eof",
    )

    def __init__(self, relay: Relay, flow_id: int, record: FlowRecord) -> None:
        super().__init__(flow_id, record)
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.accepted = False
        self.app_fin = False
        self.upstream_eof = False
        self.first_fin: str | None = None  # "client" or "server": who closed first
        # While sniffing: the client's first bytes, held until the upstream is connected.
        self.sniffed: bytearray | None = None
        self.sniff_timer: asyncio.TimerHandle | None = None
        self.last_active = relay.now()

    # -- upstream side (StreamReceiver) -----------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=self.relay.config.buffer_size)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.relay.read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.relay.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        stack = relay.stack
        self.record.bytes_down += len(data)
        self.last_active = relay.loop.time()
        stack.send(self.id, data, relay.now())
        if stack.send_buffer_free(self.id) <= 0 and self.transport is not None:
            self.transport.pause_reading()
        relay.flush_soon()

    def eof_received(self) -> bool:
        self.upstream_eof = True
        self.first_fin = self.first_fin or "server"
        self.record.state = CLOSING if self.app_fin else HALF_CLOSED
        self.relay.stack.shutdown_write(self.id, self.relay.now())
        self.relay.flush_soon()
        return True  # keep our write side open: the app may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.closed:
            return
        if exc is not None or not self.upstream_eof:
            # The upstream went away without an orderly close: reset the app's connection.
            self.relay.stack.abort(self.id, self.relay.now())
            self.relay.end(self, "upstream-reset" if exc is not None else "upstream-closed")
            self.relay.flush_soon()

    def pause_writing(self) -> None:
        self.relay.stack.pause_receiving(self.id)

    def resume_writing(self) -> None:
        self.relay.stack.resume_receiving(self.id, self.relay.now())
        self.relay.flush_soon()

    # -- stack side -----------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        self.record.bytes_up += len(data)
        self.last_active = self.relay.loop.time()
        if self.transport is not None:
            self.transport.write(data)
        elif self.sniffed is not None:
            self.sniffed += data
            self.relay.sniff_progress(self)
        # else: connecting after sniffing; nothing arrives (receiving is paused)

    def on_half_closed(self) -> None:
        self.app_fin = True
        self.first_fin = self.first_fin or "client"
        self.record.state = CLOSING if self.upstream_eof else HALF_CLOSED
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()
        elif self.sniffed is not None:
            self.relay.sniff_done(self)

    def upstream_ready(self) -> None:
        """Connected after sniffing: pass on what the client already sent."""
        assert self.transport is not None
        if self.sniffed:
            self.transport.write(bytes(self.sniffed))
        self.sniffed = None
        if self.app_fin and self.transport.can_write_eof():
            self.transport.write_eof()
        self.relay.stack.resume_receiving(self.id, self.relay.now())

    def on_writable(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def on_closed(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.close()
        if reason == "closed" and self.first_fin is not None:
            reason = f"closed-by-{self.first_fin}"
        self.relay.end(self, reason)

    def on_reset(self, reason: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.relay.end(self, "reset-by-client" if reason == "reset-by-peer" else reason)


class UdpFlow(_Flow, DatagramReceiver):
    __slots__ = ("pending", "relay", "session", "sniff_result", "sniffer")

    def __init__(self, relay: Relay, flow_id: int, record: FlowRecord) -> None:
        super().__init__(flow_id, record)
        self.relay = relay
        self.session: DatagramSession | None = None
        self.pending: list[bytes] | None = []
        self.sniffer: QuicSniffer | None = None
        self.sniff_result: asyncio.Future[str | None] | None = None

    def on_datagram(self, data: bytes) -> None:
        self.record.bytes_up += len(data)
        if self.session is not None:
            self.session.send(data)
        elif self.pending is not None and len(self.pending) < MAX_PENDING_DATAGRAMS:
            self.pending.append(data)
            if self.sniffer is not None and self.sniff_result is not None:
                result = self.sniffer.receive(data)
                if result is not NEED_MORE and not self.sniff_result.done():
                    self.sniff_result.set_result(result if isinstance(result, str) else None)

    def datagram_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.record.bytes_down += len(data)
        self.relay.stack.send_datagram(self.id, data, self.relay.now())
        self.relay.flush_soon()

    def session_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.session = None
        self.relay.stack.abort(self.id, self.relay.now())
        self.relay.end(self, "upstream-closed")
        self.relay.flush_soon()

    def on_closed(self, reason: str) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
        self.relay.end(self, reason)


class DnsUdpFlow(_Flow):
    """UDP to a hijacked DNS address: each datagram is a query answered locally."""

    __slots__ = ("idle", "last", "relay")

    def __init__(self, relay: Relay, flow_id: int, record: FlowRecord) -> None:
        super().__init__(flow_id, record)
        self.relay = relay
        self.last = relay.now()
        self.idle: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self.idle = self.relay.loop.call_at(
            self.last + self.relay.config.dns_idle_timeout, self._check_idle
        )

    def _check_idle(self) -> None:
        if self.closed:
            return
        if self.relay.now() - self.last >= self.relay.config.dns_idle_timeout:
            self.relay.stack.abort(self.id, self.relay.now())
            self.relay.end(self, "idle")
            self.relay.flush_soon()
        else:
            self._arm()

    def on_datagram(self, data: bytes) -> None:
        self.last = self.relay.now()
        self.record.bytes_up += len(data)
        self.relay.spawn(self._answer(data))

    async def _answer(self, query: bytes) -> None:
        answer = await self.relay.answer_dns(self, query, "udp")
        if answer is not None:
            self.relay.stack.send_datagram(self.id, answer, self.relay.now())
            self.relay.flush_soon()

    def on_closed(self, reason: str) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.relay.end(self, reason)


class DnsTcpFlow(_Flow):
    """TCP to a hijacked DNS address: 2-byte length-prefixed queries (RFC 1035 4.2.2)."""

    __slots__ = ("buffer", "relay")

    def __init__(self, relay: Relay, flow_id: int, record: FlowRecord) -> None:
        super().__init__(flow_id, record)
        self.relay = relay
        self.buffer = bytearray()

    def on_data(self, data: bytes) -> None:
        self.record.bytes_up += len(data)
        self.buffer += data
        if len(self.buffer) > DNS_TCP_MAX_BUFFER:
            self.relay.stack.abort(self.id, self.relay.now())
            self.relay.end(self, "dns-garbage")
            return
        while len(self.buffer) >= 2:
            (length,) = struct.unpack_from("!H", self.buffer)
            if len(self.buffer) < 2 + length:
                break
            query = bytes(self.buffer[2 : 2 + length])
            del self.buffer[: 2 + length]
            self.relay.spawn(self._answer(query))

    async def _answer(self, query: bytes) -> None:
        answer = await self.relay.answer_dns(self, query, "tcp")
        if answer is not None:
            self.relay.stack.send(self.id, struct.pack("!H", len(answer)) + answer,
                                  self.relay.now())
            self.relay.flush_soon()

    def on_half_closed(self) -> None:
        self.relay.stack.shutdown_write(self.id, self.relay.now())

    def on_closed(self, reason: str) -> None:
        self.relay.end(self, reason)


class Relay:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stack: Stack,
        router: Router,
        config: RelayConfig,
        flow_log: FlowLog,
        flush_soon: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.stack = stack
        self.router = router
        self.config = config
        self.flow_log = flow_log
        self.flush_soon = flush_soon
        self.flows: dict[int, Any] = {}
        flow_log.closer = self.close_flow
        # Anonymous memory: a page becomes resident only once a read reaches it.
        self.read_buffer = memoryview(mmap.mmap(-1, UPSTREAM_READ_SIZE))
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle_sweep: asyncio.TimerHandle | None = None
        if config.tcp_idle_timeout > 0:
            self._arm_idle_sweep()
        if config.sniff:
            load_quic_crypto()  # now, not as a stall of the loop at the first QUIC flow

    def _arm_idle_sweep(self) -> None:
        # One timer for all flows; a flow idles out between 1x and 1.25x the timeout.
        interval = self.config.tcp_idle_timeout / 4
        self._idle_sweep = self.loop.call_later(interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        deadline = self.now() - self.config.tcp_idle_timeout
        idle = [f for f in self.flows.values()
                if isinstance(f, TcpFlow) and f.transport is not None and f.last_active < deadline]
        for flow in idle:
            assert flow.transport is not None
            flow.transport.abort()
            self.stack.abort(flow.id, self.now())
            self.end(flow, "idle-timeout")
        if idle:
            self.flush_soon()
        self._arm_idle_sweep()

    @property
    def dns(self) -> Any:
        return self.router.dns

    def now(self) -> float:
        return self.loop.time()

    async def answer_dns(self, flow: _Flow, query: bytes, network: str) -> bytes | None:
        """The DNS service's answer to a hijacked query, or None (no answer, or flow gone)."""
        key = self.stack.flow_key(flow.id)
        client = (key.src_ip, key.src_port) if key else ("", 0)
        answer: bytes | None = await self.dns.handle_query(query, network=network,
                                                           client=client)
        if answer is None or flow.closed:
            return None
        flow.record.bytes_down += len(answer)
        return answer

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bug: relay task failed", exc_info=task.exception())

    # -- events from the stack -------------------------------------------------
    def handle_event(self, event: Event) -> None:
        if isinstance(event, DataReceived):
            flow = self.flows.get(event.flow)
            if flow is not None:
                flow.on_data(event.data)
        elif isinstance(event, DatagramReceived):
            flow = self.flows.get(event.flow)
            if flow is not None:
                flow.on_datagram(event.data)
        elif isinstance(event, FlowOpened):
            self._open(event.flow, event.key)
        elif isinstance(event, FlowHalfClosed):
            flow = self.flows.get(event.flow)
            if flow is not None:
                flow.on_half_closed()
        elif isinstance(event, FlowWritable):
            flow = self.flows.get(event.flow)
            if flow is not None and hasattr(flow, "on_writable"):
                flow.on_writable()
        elif isinstance(event, FlowClosed):
            flow = self.flows.get(event.flow)
            if flow is not None:
                flow.on_closed(event.reason)
        elif isinstance(event, FlowReset):
            flow = self.flows.get(event.flow)
            if flow is not None:
                if hasattr(flow, "on_reset"):
                    flow.on_reset(event.reason)
                else:
                    flow.on_closed(event.reason)

    def _open(self, flow_id: int, key: FlowKey) -> None:
        record = FlowRecord(
            id=flow_id, network=key.network, src=key.src_ip, src_port=key.src_port,
            dst=key.dst_ip, dst_port=key.dst_port,
        )
        self.flow_log.track(record)
        dns = self.dns
        if dns is not None and dns.hijacks(record.dst, key.dst_port, key.network):
            record.outbound = "dns"
            record.rule = "dns.hijack"
            record.state = OPEN
            if key.protocol == TCP:
                self.flows[flow_id] = DnsTcpFlow(self, flow_id, record)
                self.stack.accept(flow_id, self.now())
            else:
                self.flows[flow_id] = DnsUdpFlow(self, flow_id, record)
            self.flow_log.opened(record)
            return
        flow: TcpFlow | UdpFlow
        flow = TcpFlow(self, flow_id, record) if key.protocol == TCP else UdpFlow(
            self, flow_id, record)
        self.flows[flow_id] = flow
        if self._should_sniff(key, record):
            if isinstance(flow, TcpFlow):
                # Sniffing needs the client's first bytes: accept before choosing a route.
                flow.sniffed = bytearray()
                flow.accepted = True
                self.stack.accept(flow_id, self.now())
                flow.sniff_timer = self.loop.call_later(
                    self.config.sniff_timeout, self.sniff_done, flow)
                return
            if key.dst_port == 443:
                flow.sniffer = QuicSniffer()
                flow.sniff_result = self.loop.create_future()
        elif self.config.accept_early and isinstance(flow, TcpFlow):
            # The handshake overlaps the upstream connect; the app's bytes (and FIN) wait in
            # the stack, its window closing, until upstream_ready resumes receiving.
            flow.accepted = True
            self.stack.accept(flow_id, self.now())
            self.stack.pause_receiving(flow_id)
        flow.task = self.spawn(self._connect(flow, key))

    def _should_sniff(self, key: FlowKey, record: FlowRecord) -> bool:
        if not self.config.sniff or key.dst_port in SERVER_SPEAKS_FIRST:
            return False
        dns = self.dns
        return dns is None or (dns.domain_for(record.dst) is None and not dns.is_fake(record.dst))

    # -- sniffing -----------------------------------------------------------------
    def sniff_progress(self, flow: TcpFlow) -> None:
        assert flow.sniffed is not None
        result = sniff_stream(bytes(flow.sniffed))
        if result is NEED_MORE and len(flow.sniffed) < MAX_SNIFF_BYTES:
            return
        if isinstance(result, str):
            flow.record.domain = result
        self.sniff_done(flow)

    def sniff_done(self, flow: TcpFlow) -> None:
        """Sniffing ends (domain found, not sniffable, FIN, or time is up): connect upstream."""
        if flow.closed or flow.task is not None:
            return
        if flow.sniff_timer is not None:
            flow.sniff_timer.cancel()
            flow.sniff_timer = None
        # Hold further client bytes in the stack (its window closes) while we connect.
        self.stack.pause_receiving(flow.id)
        key = self.stack.flow_key(flow.id)
        if key is None:
            return
        flow.task = self.spawn(self._connect(flow, key))

    async def _connect(self, flow: TcpFlow | UdpFlow, key: FlowKey) -> None:
        record = flow.record
        if isinstance(flow, UdpFlow) and flow.sniff_result is not None:
            try:
                domain = await asyncio.wait_for(flow.sniff_result, self.config.sniff_timeout)
            except TimeoutError:
                domain = None
            record.domain = domain or record.domain
            flow.sniffer = flow.sniff_result = None
        try:
            decision = await self.router.decide(key, record)
        except Exception:
            log.exception("bug: deciding %s failed", record.describe())
            decision = Decision("REJECT", None, refusal=Refusal.RESET, reason="internal-error")
        if decision.rule is not None:
            record.set_verdict(decision.rule)
        else:
            record.rule = decision.reason
        record.outbound = decision.target_name
        self.flow_log.opened(record)
        if flow.closed:
            return
        already_accepted = isinstance(flow, TcpFlow) and flow.accepted
        if decision.refusal is not None:
            if already_accepted:
                # Accepted for sniffing: too late for silence; RST ends it cleanly.
                self.stack.abort(flow.id, self.now())
            else:
                self.stack.refuse(flow.id, decision.refusal, self.now())
            self.end(flow, decision.reason or "refused")
            self.flush_soon()
            return
        assert decision.outbound is not None and decision.target is not None
        timeout = self.config.connect_timeout
        try:
            if isinstance(flow, TcpFlow):
                await decision.outbound.open_stream(decision.target, flow, timeout=timeout)
            else:
                flow.session = await decision.outbound.open_datagram(
                    decision.target, flow, timeout=timeout
                )
        except OutboundError as exc:
            if flow.closed:
                return
            log.info("%s via %s failed: %s", record.describe(), record.outbound, exc)
            if already_accepted:
                self.stack.abort(flow.id, self.now())
            else:
                how = Refusal.UNREACHABLE
                if isinstance(flow, TcpFlow) and not isinstance(exc, Unreachable):
                    how = Refusal.RESET
                self.stack.refuse(flow.id, how, self.now())
            self.end(flow, exc.reason)
            self.flush_soon()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("bug: opening %s failed", record.describe())
            if not flow.closed:
                if already_accepted:
                    self.stack.abort(flow.id, self.now())
                else:
                    self.stack.refuse(flow.id, Refusal.RESET, self.now())
                self.end(flow, f"internal-error: {type(exc).__name__}")
                self.flush_soon()
            return
        if flow.closed:
            # The app gave up (RST, accept timeout) while we connected.
            if isinstance(flow, TcpFlow) and flow.transport is not None:
                flow.transport.abort()
            elif isinstance(flow, UdpFlow) and flow.session is not None:
                flow.session.close()
            return
        record.state = OPEN
        if isinstance(flow, TcpFlow):
            if already_accepted:
                flow.upstream_ready()
            else:
                flow.accepted = True
                self.stack.accept(flow.id, self.now())
        else:
            pending, flow.pending = flow.pending or [], None
            assert flow.session is not None
            for data in pending:
                flow.session.send(data)
        self.flush_soon()

    def end(self, flow: _Flow, reason: str) -> None:
        if flow.closed:
            return
        flow.closed = True
        if isinstance(flow, TcpFlow) and flow.sniff_timer is not None:
            flow.sniff_timer.cancel()
        self.flows.pop(flow.id, None)
        if flow.task is not None and not flow.task.done():
            flow.task.cancel()
        self.flow_log.ended(flow.record, reason)

    def close_flow(self, flow_id: int, reason: str) -> bool:
        """End a flow from outside (API, shutdown): RST to the app, upstream aborted."""
        flow = self.flows.get(flow_id)
        if flow is None:
            return False
        if isinstance(flow, TcpFlow) and flow.transport is not None:
            flow.transport.abort()
        elif isinstance(flow, UdpFlow) and flow.session is not None:
            flow.session.close()
            flow.session = None
        self.stack.abort(flow.id, self.now())
        self.end(flow, reason)
        self.flush_soon()
        return True

    async def aclose(self) -> None:
        """Abort every flow (shutdown)."""
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
        for flow_id in list(self.flows):
            self.close_flow(flow_id, "shutdown")
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
