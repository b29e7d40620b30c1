"""The relay: carries each flow the stack rebuilt through the outbound the policy chose.

TCP, connect before accept: the local application's SYN is answered only once
the outbound connected, so a refused upstream looks refused to the app. Then
bytes flow both ways on asyncio Protocols, with backpressure both ways:

    app -> stack -> DataReceived -> upstream transport.write
        upstream buffer above its high-water mark: pause_writing ->
        stack.pause_receiving (the app's TCP window closes)
    upstream read (into the relay's one read buffer, no more than the stack's send
        buffer can take) -> stack.send
        stack send buffer full: upstream.pause_reading, until FlowWritable

and half-close both ways (app FIN -> write_eof; upstream EOF -> FIN to app).

UDP: one outbound datagram session per local 5-tuple, opened on the first
datagram (a few datagrams are held while it opens). DNS to a hijacked address
is answered by the DNS service and never relayed.

Every flow ends in one place, ``Relay.end(flow, reason, how)``: it tells the app
(``how``: a ``Refusal`` for a flow not yet accepted; an RST/close once accepted; nothing
when the stack itself ended the flow), lets go of the upstream side, takes the flow
out of ``Relay.flows`` and logs the reason, once. Each kind of flow is a ``Flow``
subclass that overrides the event handlers it needs (the base's are no-ops).

The policy (rules, outbounds, DNS, process lookup; ``tunproxy.policy``) is swapped
whole by ``set_policy``: new flows are decided by the new one, running flows keep
the outbound they have, and an outbound the new policy dropped is closed when its
last flow ends.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import struct
from collections.abc import Callable, Coroutine
from typing import Any, cast

from stack import (
    TCP,
    DatagramReceived,
    DataReceived,
    EchoRequest,
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
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamReceiver,
    Target,
    trail,
)
from tunproxy.policy import Decision, DnsPolicy, Policy
from tunproxy.sniff import NEED_MORE, QuicSniffer, load_quic_crypto, sniff_stream

__all__ = ["Decision", "Flow", "Relay", "Router"]

log = logging.getLogger("tunproxy.relay")

# The relay's policy was called the Router before policies were swapped whole.
Router = Policy

MAX_PENDING_DATAGRAMS = 64
DNS_TCP_MAX_BUFFER = 128 * 1024
MAX_SNIFF_BYTES = 16 * 1024
# Upstream TCP reads go into one buffer of this size (the bytes are copied out at
# once, so every flow can share it). uvloop's own reads are 256 KiB; a download
# through DIRECT measured +35 % with 1 MiB reads (fewer recv calls, each one
# also running the kernel's ACK and backlog work for the connection), no better
# beyond 2 MiB (bench/run.py, same machine, alternating runs).
UPSTREAM_READ_SIZE = 1 << 20
# Each read is also no bigger than the flow's free send-buffer space, so a flow whose app
# stops reading holds at most its send buffer plus one read of this floor (a read is never
# empty); the rest waits in the kernel's socket buffer, whose window then slows the sender.
# A 16 KiB floor cost downloads ~15 % (more, smaller recv calls once the buffer is partly
# full: 1,816 against 1,522 ms of CPU per GB); 256 KiB measured 1,611, for 240 KiB more
# held per stalled flow (bench/run.py, same machine, alternating runs).
MIN_UPSTREAM_READ = 256 * 1024
# Where the server talks first, a client's first bytes never come: don't wait for them.
SERVER_SPEAKS_FIRST = frozenset({21, 22, 25, 110, 143, 587, 3306, 5432, 5900})


class Flow:
    """One flow the relay carries. The stack's events arrive as ``on_*`` calls; the
    base class ignores them all, so each kind overrides only what it uses.

    ``accepted``: the app's side is established (TCP: SYN-ACK sent; UDP: the session
    is carried), so ending it is an abort (RST), no longer a refusal.
    """

    __slots__ = ("accepted", "closed", "id", "key", "outbound", "record", "relay", "task")

    def __init__(self, relay: Relay, flow_id: int, key: FlowKey, record: FlowRecord) -> None:
        self.relay = relay
        self.id = flow_id
        self.key = key
        self.record = record
        self.task: asyncio.Task[None] | None = None
        self.outbound: Outbound | None = None  # the one it uses, once chosen
        self.accepted = False
        self.closed = False

    # -- the stack's events ---------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        pass

    def on_datagram(self, data: bytes) -> None:
        pass

    def on_half_closed(self) -> None:
        pass

    def on_writable(self) -> None:
        pass

    def on_closed(self, reason: str) -> None:
        self.relay.end(self, reason, None)

    def on_reset(self, reason: str) -> None:
        self.relay.end(self, reason, None)

    # -- the upstream side ----------------------------------------------------------
    async def open(self, outbound: Outbound, target: Target, timeout: float) -> None:
        """Connect upstream (raises OutboundError)."""
        raise NotImplementedError

    def connected(self) -> None:
        """The upstream is ready: accept the app's side, pass on what waited."""

    def refusal_for(self, exc: OutboundError) -> str:
        """How the app learns that the upstream failed (before accept)."""
        return Refusal.UNREACHABLE

    def release(self) -> None:
        """Let go of the upstream side and timers (called once, by ``Relay.end``)."""


class TcpFlow(Flow, StreamReceiver):
    """One TCP flow: the stack side is ``relay.stack``/``id``, the other an upstream transport."""

    __slots__ = (
        "app_fin", "first_fin", "last_active", "sniff_timer", "sniffed", "transport",
        "upstream_eof",
    )  # fmt: skip

    def __init__(self, relay: Relay, flow_id: int, key: FlowKey, record: FlowRecord) -> None:
        super().__init__(relay, flow_id, key, record)
        self.transport: asyncio.Transport | None = None
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
        if self.closed:  # the app gave up while we connected
            transport.abort()
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=self.relay.config.buffer_size)

    def get_buffer(self, sizehint: int) -> memoryview:
        relay = self.relay
        return relay.read_buffer[: max(relay.stack.send_buffer_free(self.id), MIN_UPSTREAM_READ)]

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self.relay.read_buffer[:nbytes]))

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        stack = relay.stack
        self.record.bytes_down += len(data)
        now = relay.now()
        self.last_active = now
        stack.send(self.id, data, now)
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
        if exc is not None or not self.upstream_eof:
            # The upstream went away without an orderly close: reset the app's connection.
            reason = "upstream-reset" if exc is not None else "upstream-closed"
            self.relay.end(self, reason, Refusal.RESET)

    def pause_writing(self) -> None:
        self.relay.stack.pause_receiving(self.id)

    def resume_writing(self) -> None:
        self.relay.stack.resume_receiving(self.id, self.relay.now())
        self.relay.flush_soon()

    async def open(self, outbound: Outbound, target: Target, timeout: float) -> None:
        await outbound.open_stream(target, self, timeout=timeout)

    def refusal_for(self, exc: OutboundError) -> str:
        return Refusal.UNREACHABLE if isinstance(exc, Unreachable) else Refusal.RESET

    def connected(self) -> None:
        relay = self.relay
        if not self.accepted:
            self.accepted = True
            relay.stack.accept(self.id, relay.now())
            return
        # Accepted earlier for sniffing: pass on what the client already sent.
        assert self.transport is not None
        if self.sniffed:
            self.transport.write(bytes(self.sniffed))
        self.sniffed = None
        if self.app_fin and self.transport.can_write_eof():
            self.transport.write_eof()
        relay.stack.resume_receiving(self.id, relay.now())

    def release(self) -> None:
        if self.sniff_timer is not None:
            self.sniff_timer.cancel()
            self.sniff_timer = None
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.abort()

    # -- stack side -----------------------------------------------------------
    def on_data(self, data: bytes) -> None:
        self.record.bytes_up += len(data)
        self.last_active = self.relay.now()
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

    def on_writable(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def on_closed(self, reason: str) -> None:
        if self.transport is not None:
            transport, self.transport = self.transport, None
            transport.close()  # an orderly end: what we wrote still goes out
        if reason == "closed" and self.first_fin is not None:
            reason = f"closed-by-{self.first_fin}"
        self.relay.end(self, reason, None)

    def on_reset(self, reason: str) -> None:
        self.relay.end(self, "reset-by-client" if reason == "reset-by-peer" else reason, None)


class UdpFlow(Flow, DatagramReceiver):
    __slots__ = ("pending", "session", "sniff_result", "sniffer")

    def __init__(self, relay: Relay, flow_id: int, key: FlowKey, record: FlowRecord) -> None:
        super().__init__(relay, flow_id, key, record)
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

    async def sniffed_domain(self) -> str | None:
        """The QUIC Initial's SNI, when this flow is being sniffed (waits up to the timeout)."""
        if self.sniff_result is None:
            return None
        try:
            return await asyncio.wait_for(self.sniff_result, self.relay.config.sniff_timeout)
        except TimeoutError:
            return None
        finally:
            self.sniffer = self.sniff_result = None

    def datagram_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.record.bytes_down += len(data)
        self.relay.stack.send_datagram(self.id, data, self.relay.now())
        self.relay.flush_soon()

    def session_lost(self, exc: Exception | None) -> None:
        self.session = None
        self.relay.end(self, "upstream-closed", Refusal.UNREACHABLE)

    async def open(self, outbound: Outbound, target: Target, timeout: float) -> None:
        session = await outbound.open_datagram(target, self, timeout=timeout)
        if self.closed:
            session.close()
        else:
            self.session = session

    def connected(self) -> None:
        self.accepted = True
        self.relay.stack.accept(self.id, self.relay.now())  # releases the kept first packet
        pending, self.pending = self.pending or [], None
        assert self.session is not None
        for data in pending:
            self.session.send(data)

    def release(self) -> None:
        self.pending = None
        if self.session is not None:
            session, self.session = self.session, None
            session.close()


class DnsUdpFlow(Flow):
    """UDP to a hijacked DNS address: each datagram is a query answered locally."""

    __slots__ = ("idle", "last")

    def __init__(self, relay: Relay, flow_id: int, key: FlowKey, record: FlowRecord) -> None:
        super().__init__(relay, flow_id, key, record)
        self.accepted = True
        self.last = relay.now()
        self.idle: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self.idle = self.relay.loop.call_at(
            self.last + self.relay.config.dns_idle_timeout, self._check_idle
        )

    def _check_idle(self) -> None:
        if self.relay.now() - self.last >= self.relay.config.dns_idle_timeout:
            self.relay.end(self, "idle", Refusal.RESET)
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

    def release(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None


class DnsTcpFlow(Flow):
    """TCP to a hijacked DNS address: 2-byte length-prefixed queries (RFC 1035 4.2.2)."""

    __slots__ = ("buffer",)

    def __init__(self, relay: Relay, flow_id: int, key: FlowKey, record: FlowRecord) -> None:
        super().__init__(relay, flow_id, key, record)
        self.accepted = True
        self.buffer = bytearray()

    def on_data(self, data: bytes) -> None:
        self.record.bytes_up += len(data)
        self.buffer += data
        if len(self.buffer) > DNS_TCP_MAX_BUFFER:
            self.relay.end(self, "dns-garbage", Refusal.RESET)
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
                                  self.relay.now())  # fmt: skip
            self.relay.flush_soon()

    def on_half_closed(self) -> None:
        self.relay.stack.shutdown_write(self.id, self.relay.now())


class Relay:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        stack: Stack,
        policy: Policy,
        config: RelayConfig,
        flow_log: FlowLog,
        flush_soon: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.stack = stack
        self.policy = policy
        self.config = config
        self.flow_log = flow_log
        self.flush_soon = flush_soon
        self.flows: dict[int, Flow] = {}
        flow_log.closer = self.close_flow
        # Anonymous memory: a page becomes resident only once a read reaches it.
        self.read_buffer = memoryview(mmap.mmap(-1, UPSTREAM_READ_SIZE))
        self._tasks: set[asyncio.Task[None]] = set()
        self._attribution_scheduled = False
        self._idle_sweep: asyncio.TimerHandle | None = None
        # Outbounds in use by running flows (by id), and those a policy swap dropped,
        # to be closed when their last flow ends.
        self._users: dict[int, int] = {}
        self._retiring: dict[int, Outbound] = {}
        # Echo requests (StackConfig.echo_events) go here: tunproxy.icmp.Pinger.handle.
        self.on_echo: Callable[[EchoRequest], None] | None = None
        if config.tcp_idle_timeout > 0:
            self._arm_idle_sweep()
        if config.sniff:
            load_quic_crypto()  # now, not as a stall of the loop at the first QUIC flow

    @property
    def router(self) -> Policy:
        """The current policy (its older name)."""
        return self.policy

    @property
    def dns(self) -> DnsPolicy | None:
        return self.policy.dns

    def now(self) -> float:
        return self.loop.time()

    # -- the policy ---------------------------------------------------------------------
    def set_policy(self, policy: Policy) -> None:
        """Decide new flows by ``policy`` from now on. Running flows keep their outbound;
        one ``policy`` no longer has is closed once no flow uses it. The old policy's
        DNS service and process resolver, if ``policy`` has others, are closed now."""
        old, self.policy = self.policy, policy
        retired = old.retired_by(policy)
        for outbound in retired.outbounds:
            if self._users.get(id(outbound)):
                self._retiring[id(outbound)] = outbound
                log.info("outbound %s removed by the reload: closed when its %d flows end",
                         outbound.name, self._users[id(outbound)])  # fmt: skip
            else:
                self._close_outbound(outbound)
        if retired.dns is not None:
            self.spawn(_closing("the previous DNS service", retired.dns.aclose()))
        if retired.processes is not None:
            retired.processes.close()

    def _use(self, flow: Flow, outbound: Outbound) -> None:
        flow.outbound = outbound
        self._users[id(outbound)] = self._users.get(id(outbound), 0) + 1

    def _unuse(self, outbound: Outbound) -> None:
        key = id(outbound)
        left = self._users.get(key, 0) - 1
        if left > 0:
            self._users[key] = left
            return
        self._users.pop(key, None)
        retired = self._retiring.pop(key, None)
        if retired is not None:
            self._close_outbound(retired)

    def _close_outbound(self, outbound: Outbound) -> None:
        log.info("closing outbound %s (no longer in the policy)", outbound.name)
        self.spawn(_closing(f"outbound {outbound.name}", outbound.aclose()))

    # -- timers -------------------------------------------------------------------------
    def _arm_idle_sweep(self) -> None:
        # One timer for all flows; a flow idles out between 1x and 1.25x the timeout.
        interval = self.config.tcp_idle_timeout / 4
        self._idle_sweep = self.loop.call_later(interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        deadline = self.now() - self.config.tcp_idle_timeout
        idle = [f for f in self.flows.values()
                if isinstance(f, TcpFlow) and f.transport is not None and f.last_active < deadline]
        for flow in idle:
            self.end(flow, "idle-timeout", Refusal.RESET)
        self._arm_idle_sweep()

    # -- DNS ----------------------------------------------------------------------------
    async def answer_dns(self, flow: Flow, query: bytes, network: str) -> bytes | None:
        """The DNS service's answer to a hijacked query, or None (no answer, or flow gone)."""
        dns = self.dns
        if dns is None:  # DNS turned off while the flow lived; cannot happen by reload today
            return None
        key = flow.key
        answer = await dns.handle_query(query, network=network, client=(key.src_ip, key.src_port))
        if answer is None or flow.closed:
            return None
        flow.record.bytes_down += len(answer)
        return answer

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bug: relay task failed", exc_info=task.exception())

    # -- events from the stack -------------------------------------------------------------
    def handle_event(self, event: Event) -> None:
        if isinstance(event, FlowOpened):
            self._open(event.flow, event.key, event.dscp)
            return
        if isinstance(event, EchoRequest):
            if self.on_echo is not None:
                self.on_echo(event)
            return
        flow = self.flows.get(event.flow)
        if flow is None:
            return
        if isinstance(event, DataReceived):
            flow.on_data(event.data)
        elif isinstance(event, DatagramReceived):
            flow.on_datagram(event.data)
        elif isinstance(event, FlowHalfClosed):
            flow.on_half_closed()
        elif isinstance(event, FlowWritable):
            flow.on_writable()
        elif isinstance(event, FlowClosed):
            flow.on_closed(event.reason)
        elif isinstance(event, FlowReset):
            flow.on_reset(event.reason)

    def _open(self, flow_id: int, key: FlowKey, dscp: int | None = None) -> None:
        record = FlowRecord(
            id=flow_id, network=key.network, src=key.src_ip, src_port=key.src_port,
            dst=key.dst_ip, dst_port=key.dst_port, dscp=dscp,
        )  # fmt: skip
        # The process lookup waits until this turn's upstream connects are under way
        # (``_attribute_deferred``), unless the rules need the process to decide.
        defer = not self.policy.ruleset.needs_process
        self.flow_log.track(record, defer=defer)
        try:
            self._route(flow_id, key, record)
        finally:
            if defer and not self._attribution_scheduled:
                self._attribution_scheduled = True
                # Scheduled after the flow's connect task: it runs once the task took its
                # first step (decide, start the upstream connect, wait for it).
                self.loop.call_soon(self._attribute_deferred)

    def _route(self, flow_id: int, key: FlowKey, record: FlowRecord) -> None:
        dns = self.dns
        tcp = key.protocol == TCP
        if dns is not None and dns.hijacks(record.dst, key.dst_port, key.network):
            record.outbound = "dns"
            record.rule = "dns.hijack"
            record.state = OPEN
            hijacked = (DnsTcpFlow if tcp else DnsUdpFlow)(self, flow_id, key, record)
            self.flows[flow_id] = hijacked
            if tcp:
                self.flow_log.attribute_now(record)  # accepted now: see _accept_now
            self.stack.accept(flow_id, self.now())
            self.flow_log.opened(record)
            return
        flow: TcpFlow | UdpFlow = (TcpFlow if tcp else UdpFlow)(self, flow_id, key, record)
        self.flows[flow_id] = flow
        if self._should_sniff(key, record):
            if isinstance(flow, TcpFlow):
                # Sniffing needs the client's first bytes: accept before choosing a route.
                flow.sniffed = bytearray()
                self._accept_now(flow)
                flow.sniff_timer = self.loop.call_later(
                    self.config.sniff_timeout, self.sniff_done, flow)  # fmt: skip
                return
            if key.dst_port == 443:
                flow.sniffer = QuicSniffer()
                flow.sniff_result = self.loop.create_future()
        elif self.config.accept_early and isinstance(flow, TcpFlow):
            # The handshake overlaps the upstream connect; the app's bytes (and FIN) wait in
            # the stack, its window closing, until TcpFlow.connected resumes receiving.
            self._accept_now(flow)
            self.stack.pause_receiving(flow_id)
        flow.task = self.spawn(self._connect(flow))

    def _accept_now(self, flow: TcpFlow) -> None:
        """Answer the SYN in this turn. The process is looked up first, not deferred: once
        the SYN-ACK reaches the app it may close at once, and a closed socket has no owner
        left to find (today's order; only flows that wait for their upstream defer it)."""
        self.flow_log.attribute_now(flow.record)
        flow.accepted = True
        self.stack.accept(flow.id, self.now())

    def _attribute_deferred(self) -> None:
        self._attribution_scheduled = False
        self.flow_log.attribute_deferred()

    def _should_sniff(self, key: FlowKey, record: FlowRecord) -> bool:
        if not self.config.sniff or key.dst_port in SERVER_SPEAKS_FIRST:
            return False
        dns = self.dns
        return dns is None or (dns.domain_for(record.dst) is None and not dns.is_fake(record.dst))

    # -- sniffing -------------------------------------------------------------------------
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
        flow.task = self.spawn(self._connect(flow))

    # -- connecting -------------------------------------------------------------------------
    async def _connect(self, flow: TcpFlow | UdpFlow) -> None:
        try:
            await self._carry(flow)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("bug: carrying %s failed", flow.record.describe())
            self.end(flow, f"internal-error: {type(exc).__name__}", Refusal.RESET)

    async def _carry(self, flow: TcpFlow | UdpFlow) -> None:
        record = flow.record
        if isinstance(flow, UdpFlow):
            record.domain = await flow.sniffed_domain() or record.domain
        decision = await self.policy.decide(flow.key, record)
        if decision.rule is not None:
            record.set_verdict(decision.rule)
        else:
            record.rule = decision.reason
        record.outbound = decision.target_name
        self.flow_log.opened(record)
        if flow.closed:
            return
        if decision.refusal is not None:
            self.end(flow, decision.reason or "refused", decision.refusal)
            return
        assert decision.outbound is not None and decision.target is not None
        self._use(flow, decision.outbound)
        via = trail()
        try:
            await flow.open(decision.outbound, decision.target, self.config.connect_timeout)
            record.via = tuple(via)
        except OutboundError as exc:
            if not flow.closed:
                log.info("%s via %s failed: %s", record.describe(), record.outbound, exc)
            self.end(flow, exc.reason, flow.refusal_for(exc))
            return
        if flow.closed:
            # The app gave up (RST, accept timeout) while we connected, or the upstream
            # was lost during its handover: whatever opened is let go of.
            flow.release()
            return
        record.state = OPEN
        flow.connected()
        self.flush_soon()

    # -- the one exit ----------------------------------------------------------------------
    def end(self, flow: Flow, reason: str, how: str | None) -> None:
        """End ``flow`` once, for ``reason``; every failure and every close comes here.

        ``how`` tells the app: None when the stack ended the flow itself (its FlowClosed
        or FlowReset); otherwise a ``Refusal`` for a flow not yet accepted (RST, ICMP
        unreachable, or silence), and an abort (TCP RST) for one that was.
        """
        if flow.closed:
            return
        flow.closed = True
        self.flows.pop(flow.id, None)
        if how is not None:
            if flow.accepted:
                self.stack.abort(flow.id, self.now())
            else:
                self.stack.refuse(flow.id, how, self.now())
            self.flush_soon()
        flow.release()
        task = flow.task
        if task is not None and not task.done() and task is not asyncio.current_task(self.loop):
            task.cancel()
        if flow.outbound is not None:
            self._unuse(flow.outbound)
        self.flow_log.ended(flow.record, reason)

    def close_flow(self, flow_id: int, reason: str) -> bool:
        """End a flow from outside (API, top, dashboard): RST to the app, upstream aborted."""
        flow = self.flows.get(flow_id)
        if flow is None:
            return False
        self.end(flow, reason, Refusal.RESET)
        return True

    async def aclose(self) -> None:
        """Abort every flow (shutdown), and close the outbounds retired by a reload."""
        if self._idle_sweep is not None:
            self._idle_sweep.cancel()
        running = list(self._tasks)
        for flow in list(self.flows.values()):
            self.end(flow, "shutdown", Refusal.RESET)
        for task in running:
            task.cancel()
        for outbound in list(self._retiring.values()):
            self._close_outbound(outbound)
        self._retiring.clear()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def _closing(what: str, closing: Coroutine[Any, Any, None]) -> None:
    try:
        await closing
    except Exception:
        log.exception("error while closing %s", what)
