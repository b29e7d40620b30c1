"""The relay in memory, without root: a real ``Stack``, a real ``Relay``, an
outbound whose every move the test decides, and an event loop whose clock only
moves when the test says so.

- ``ManualClockLoop``: an asyncio selector loop whose ``time()`` is a number the
  test sets; timers (connect timeouts, sniff and idle timers, the stack's own) fire
  when ``Lab.advance`` moves past them, never by waiting.
- ``ScriptedOutbound``: each ``open_stream``/``open_datagram`` takes the next
  behaviour from its script: ``accept``, ``refuse``, ``unreachable``, ``timeout``
  (honours the relay's timeout, then ConnectTimeout), ``stall`` (never answers,
  until cancelled), ``bug`` (a RuntimeError: our own bug). Accepted streams get a
  ``MemoryTransport`` the test drives as the far side: ``feed``, ``feed_eof``,
  ``die``.
- ``Lab``: wires them together with the driver's loop (events -> relay, packets
  out collected and parsed by ``tests.ippeer.parse_out``).
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stack import Stack, StackConfig
from tests.ippeer import Out, drain
from tunproxy.config import Config, parse_config
from tunproxy.errors import ConnectRefused, ConnectTimeout, Unreachable
from tunproxy.flows import FlowLog
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamProtocol,
    Target,
)
from tunproxy.policy import Policy
from tunproxy.relay import Relay

T = TypeVar("T")


class ManualClockLoop(asyncio.SelectorEventLoop):
    """``time()`` is ``self.clock``: it moves only when the test moves it."""

    def __init__(self) -> None:
        super().__init__(selectors.DefaultSelector())
        self.clock = 1000.0

    def time(self) -> float:
        return self.clock


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    loop = ManualClockLoop()
    try:
        return loop.run_until_complete(coro_fn())
    finally:
        loop.close()


class MemoryTransport(asyncio.Transport):
    """The upstream connection as the relay sees it; the test plays the far side."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: StreamProtocol) -> None:
        super().__init__()
        self.loop = loop
        self.protocol = protocol
        self.written = bytearray()
        self.eof_written = False
        self.closed = False
        self.aborted = False
        self.reading = True
        self.high_water: int | None = None
        self._lost = False

    # -- the relay's side -----------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        assert not self.eof_written, "write after write_eof"
        self.written += data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    # -- the far side ------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        protocol = self.protocol
        if isinstance(protocol, asyncio.BufferedProtocol):
            while data:
                buf = protocol.get_buffer(len(data))
                n = min(len(buf), len(data))
                buf[:n] = data[:n]
                protocol.buffer_updated(n)
                data = data[n:]
        else:
            protocol.data_received(data)

    def feed_eof(self) -> None:
        if not self.protocol.eof_received():
            self.close()

    def die(self, exc: Exception | None = None) -> None:
        """The connection is gone (reset by the far side, or the proxy died)."""
        self.closed = True
        self._lose(exc if exc is not None else ConnectionResetError("reset by peer"))

    def _lose(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self.protocol.connection_lost(exc)


class MemorySession(DatagramSession):
    def __init__(self, receiver: DatagramReceiver) -> None:
        self.receiver = receiver
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        assert not self.closed
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def reply(self, data: bytes) -> None:
        self.receiver.datagram_received(data)

    def die(self) -> None:
        self.closed = True
        self.receiver.session_lost(ConnectionResetError("the proxy went away"))


@dataclass
class Attempt:
    """One open_* call the outbound saw."""

    target: Target
    behaviour: str
    transport: MemoryTransport | None = None
    session: MemorySession | None = None
    cancelled: bool = False


class ScriptedOutbound(Outbound):
    def __init__(self, name: str = "DIRECT", script: list[str] | None = None) -> None:
        self.name = name
        self.script = list(script or [])
        self.default = "accept"
        self.attempts: list[Attempt] = []
        self.closed = 0

    def _next(self, target: Target) -> Attempt:
        behaviour = self.script.pop(0) if self.script else self.default
        attempt = Attempt(target, behaviour)
        self.attempts.append(attempt)
        return attempt

    async def _fail_or_wait(self, attempt: Attempt, timeout: float) -> None:
        behaviour = attempt.behaviour
        if behaviour == "refuse":
            raise ConnectRefused(f"{attempt.target}: refused")
        if behaviour == "unreachable":
            raise Unreachable(f"{attempt.target}: no route")
        if behaviour == "bug":
            raise RuntimeError("a bug in the outbound")
        try:
            if behaviour == "timeout":
                await asyncio.sleep(timeout)
                raise ConnectTimeout(f"{attempt.target}: no answer within {timeout:g} s")
            if behaviour == "stall":
                await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            attempt.cancelled = True
            raise

    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        attempt = self._next(target)
        await self._fail_or_wait(attempt, timeout)
        transport = MemoryTransport(asyncio.get_running_loop(), protocol)
        attempt.transport = transport
        protocol.connection_made(transport)
        if attempt.behaviour == "die-in-handover":
            transport.die()
        return transport

    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        attempt = self._next(target)
        await self._fail_or_wait(attempt, timeout)
        session = MemorySession(receiver)
        attempt.session = session
        return session

    async def aclose(self) -> None:
        self.closed += 1


def config(text: str = "rules: [MATCH,DIRECT]\n") -> Config:
    return parse_config(text, Path("lab.yaml"))


@dataclass
class Lab:
    """A Stack + Relay on a ManualClockLoop; ``out`` collects the packets sent to the app."""

    loop: ManualClockLoop
    stack: Stack
    relay: Relay
    flow_log: FlowLog
    out: list[Out] = field(default_factory=list)
    _flush_scheduled: bool = False

    @classmethod
    def make(
        cls, policy: Policy, cfg: Config | None = None, **stack_changes: Any
    ) -> Lab:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, ManualClockLoop)
        cfg = cfg or config()
        stack = Stack(StackConfig(seed=1, **stack_changes))
        flow_log = FlowLog()
        holder: list[Lab] = []
        relay = Relay(loop, stack, policy, cfg.relay, flow_log, lambda: holder[0].flush_soon())
        lab = cls(loop, stack, relay, flow_log)
        holder.append(lab)
        return lab

    @property
    def now(self) -> float:
        return self.loop.clock

    def flush_soon(self) -> None:
        """As the driver's: process on a later loop iteration, once."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.process)

    def process(self) -> None:
        """What the driver does after every read, timer or flush_soon."""
        self._flush_scheduled = False
        stack = self.stack
        while (event := stack.next_event()) is not None:
            self.relay.handle_event(event)
        self.out.extend(drain(stack))

    def receive(self, packet: bytes) -> None:
        self.stack.receive_packet(packet, self.now)
        self.process()

    async def settle(self, rounds: int = 30) -> None:
        """Let every task and callback that is ready run (the clock stands still)."""
        for _ in range(rounds):
            await asyncio.sleep(0)
            self.process()

    async def advance(self, seconds: float, step: float = 0.5) -> None:
        """Move the clock forward in steps, firing the loop's and the stack's timers."""
        end = self.loop.clock + seconds
        while self.loop.clock < end:
            self.loop.clock = min(end, self.loop.clock + step)
            await self.settle(5)
            timer = self.stack.get_timer()
            if timer is not None and timer <= self.now:
                self.stack.handle_timer(self.now)
                self.process()
            await self.settle(5)

    def take(self) -> list[Out]:
        out, self.out = self.out, []
        return out

    def ended(self) -> dict[str, int]:
        return dict(self.flow_log.ended_by_reason)
