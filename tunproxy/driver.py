"""The asyncio adapter around the sans-I/O stack: a few dozen lines of I/O.

Read the TUN in batches until it would block, feed the stack, hand its events
to the relay, hand what it emits to the writer thread, re-arm the one timer.
No per-packet tasks. The writer thread writes each batch with one io_uring
system call where the kernel allows (tunproxy/uring.py), else one write(2)
per packet.
Commands the relay issues outside a read (upstream data arriving) schedule one
flush per loop iteration, so everything queued in that iteration leaves in one
pass.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from stack import Event, Stack
from tunproxy.tun import VNET_HDR_LEN, TunDevice
from tunproxy.uring import BatchWriter

__all__ = ["TunDriver"]

log = logging.getLogger("tunproxy.driver")

READ_BATCH = 128  # packets per readable callback before yielding to other callbacks
READ_SIZE = 65535 + VNET_HDR_LEN
# Batches up to this many bytes are written by the loop itself when the writer thread
# has nothing pending (ACKs, small replies: latency over overlap).
INLINE_WRITE_MAX = 4096


class TunDriver:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        tun: TunDevice,
        stack: Stack,
        on_event: Callable[[Event], None],
        *,
        faults: dict[str, Any] | None = None,
    ) -> None:
        self._loop = loop
        self._tun = tun
        self._stack = stack
        self._on_event = on_event
        self._write_fd = tun.fds[0]
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._flush_scheduled = False
        self.write_errors = 0
        # A packet capture's tap: called once per batch, (packets, from_app); checked once
        # per batch, never per packet, so no capture costs nothing.
        self.tap: Callable[[list[bytes], bool], None] | None = None
        # Batches of packets for the writer thread, in order; None ends it.
        self._writer: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._pending = 0  # batches queued or being written by the writer thread
        self._writer_thread = threading.Thread(
            target=self._write_loop, name="tun-writer", daemon=True)
        # The writer thread's batches go through io_uring when the kernel allows it.
        self._batch_writer: BatchWriter | None = None
        try:
            self._batch_writer = BatchWriter(self._write_fd)
        except OSError as exc:
            log.info("io_uring unavailable (%s): one write(2) per TUN packet", exc.strerror)
        self._faults_in = self._faults_out = None
        if faults:
            from stack.fault import FaultInjector

            self._faults_in = _make_injector(FaultInjector, faults, 0)
            self._faults_out = _make_injector(FaultInjector, faults, 1)
            log.warning("fault injection on at the TUN boundary: %s", faults)

    def start(self) -> None:
        self._writer_thread.start()
        for fd in self._tun.fds:
            self._loop.add_reader(fd, self._on_readable, fd)

    def stop(self) -> None:
        for fd in self._tun.fds:
            self._loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer_thread.is_alive():
            self._writer.put(None)  # after everything already queued
            self._writer_thread.join(timeout=5)
        if self._batch_writer is not None and not self._writer_thread.is_alive():
            self._batch_writer.close()
            self._batch_writer = None

    @property
    def write_method(self) -> str:
        """How batches reach the TUN: "io_uring" or "write"."""
        return "io_uring" if self._batch_writer is not None else "write"

    # -- input ----------------------------------------------------------------
    def _on_readable(self, fd: int) -> None:
        if self.tap is not None:
            self._on_readable_tapped(fd, self.tap)
            return
        now = self._loop.time()
        stack = self._stack
        read = os.read
        faults = self._faults_in
        for _ in range(READ_BATCH):
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("reading the TUN failed: %s", exc)
                break
            if faults is not None:
                faults.push(data, now)
            else:
                stack.receive_packet(data, now)
        if faults is not None:
            for data in faults.pop_due(now):
                stack.receive_packet(data, now)
        self._process()

    def _on_readable_tapped(self, fd: int, tap: Callable[[list[bytes], bool], None]) -> None:
        """``_on_readable`` while a capture runs: the batch also goes to the tap. Each packet
        is fed to the stack as it is read, as without a capture (while it is still in the
        CPU's cache); the tap gets the batch before anything the stack answers is written."""
        now = self._loop.time()
        stack = self._stack
        read = os.read
        faults = self._faults_in
        batch: list[bytes] = []
        for _ in range(READ_BATCH):
            try:
                data = read(fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                log.error("reading the TUN failed: %s", exc)
                break
            batch.append(data)
            if faults is not None:
                faults.push(data, now)
            else:
                stack.receive_packet(data, now)
        if batch:
            tap(batch, True)
        if faults is not None:
            for data in faults.pop_due(now):
                stack.receive_packet(data, now)
        self._process()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        now = self._loop.time()
        if self._faults_in is not None:
            for data in self._faults_in.pop_due(now):
                self._stack.receive_packet(data, now)
        self._stack.handle_timer(now)
        self.flush_faults_out()
        self._process()

    # -- output ---------------------------------------------------------------
    def flush_soon(self) -> None:
        """Called by the relay after it queued work into the stack outside a read."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_callback)

    def _flush_callback(self) -> None:
        self._flush_scheduled = False
        self._process()

    def _process(self) -> None:
        stack = self._stack
        on_event = self._on_event
        while (event := stack.next_event()) is not None:
            try:
                on_event(event)
            except Exception:
                log.exception("bug: the relay failed on %r", event)
        self._write(stack.packets_to_send())
        self._rearm()

    def _write(self, packets: list[bytes]) -> None:
        if not packets:
            return
        faults = self._faults_out
        if faults is not None:
            now = self._loop.time()
            for packet in packets:
                faults.push(packet, now)
            packets = faults.pop_due(now)
        if self.tap is not None and packets:
            self.tap(packets, False)
        if not self._pending and sum(map(len, packets)) <= INLINE_WRITE_MAX:
            # Small packets (ACKs) with nothing queued ahead of them: a handoff would
            # only delay them.
            self._write_packets(packets)
        else:
            self._queue(packets)

    def _queue(self, packets: list[bytes]) -> None:
        self._pending += 1
        self._writer.put(packets)

    def _write_loop(self) -> None:
        """The writer thread. A TUN write runs the kernel's side of the packet (GSO
        segmentation, checksums, its TCP receive) inside the syscall, with the GIL
        released: here it overlaps with the loop's Python work on another core.
        One thread keeps the packets in order."""
        get = self._writer.get
        while (packets := get()) is not None:
            batch_writer = self._batch_writer
            if batch_writer is None:
                self._write_packets(packets)
            else:
                try:
                    for err in batch_writer.write(packets):
                        self._write_failed(err)
                except OSError as exc:
                    # io_uring itself failed (not a packet): write(2) from now on. The
                    # batch is written again, whole; TCP takes duplicates in its stride.
                    log.warning("io_uring failed (%s): one write(2) per TUN packet from now on",
                                exc.strerror)
                    self._batch_writer = None
                    batch_writer.close()
                    self._write_packets(packets)
            self._pending -= 1  # only after the writes: inline writes never overtake

    def _write_packets(self, packets: list[bytes]) -> None:
        fd = self._write_fd
        write = os.write
        for packet in packets:
            try:
                write(fd, packet)
            except OSError as exc:
                self._write_failed(exc.errno or errno.EIO)

    def _write_failed(self, err: int) -> None:
        # The kernel drops here too when its queue is full; TCP retransmits.
        self.write_errors += 1
        if self.write_errors & (self.write_errors - 1) == 0:
            log.warning("writing to the TUN failed (%d times so far): %s",
                        self.write_errors, os.strerror(err))

    def _rearm(self) -> None:
        when = self._stack.get_timer()
        for faults in (self._faults_in, self._faults_out):
            if faults is not None:
                due = faults.get_timer()
                if due is not None and (when is None or due < when):
                    when = due
        at = self._timer_at
        if at is not None and (when is None or when >= at):
            # Armed for earlier: keep it. It fires, finds nothing due (or less than it
            # was armed for), and re-arms; far cheaper than a cancel + call_at on every
            # pass, since most passes only push a flow's deadline later.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._loop.call_at(when, self._on_timer)

    def flush_faults_out(self) -> None:
        """Timer path for delayed outbound packets."""
        if self._faults_out is not None:
            packets = self._faults_out.pop_due(self._loop.time())
            if packets:
                self._queue(packets)


def _make_injector(cls: Any, faults: dict[str, Any], direction: int) -> Any:
    delay = faults.get("delay", 0.0)
    return cls(
        seed=int(faults.get("seed", 1)) * 2 + direction,
        drop=faults.get("drop", 0.0),
        duplicate=faults.get("duplicate", 0.0),
        reorder=faults.get("reorder", 0.0),
        delay=(0.0, delay),
    )
