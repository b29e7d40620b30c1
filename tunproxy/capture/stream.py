"""A capture streamed by the controller (``GET /capture``) instead of written to a file.

The same ``CaptureFile`` makes the blocks (it indexes flows, comments packets, writes name
resolution blocks, stops at ``limit``); its output here is ``Chunks``: each flush becomes
one chunk of whole pcapng blocks on a queue bounded in bytes. A client that reads slower
than packets come loses whole chunks (counted in ``dropped``), never the section header,
and tunproxy's memory stays bounded. The flows are learned from the flow table itself
(live ones and the recently ended), before each flush.
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path
from typing import TYPE_CHECKING

from tunproxy.capture.file import CaptureFile
from tunproxy.capture.select import Selection

if TYPE_CHECKING:
    from tunproxy.driver import TunDriver
    from tunproxy.flows import FlowTable
    from tunproxy.relay import Relay

__all__ = ["Chunks", "LiveCapture"]

MAX_QUEUED = 8 * 1024 * 1024  # bytes waiting for a slow client; more are dropped
MAX_SEEN = 65536


class Chunks:
    """An ``Output`` that turns every flush into one chunk on a bounded queue."""

    def __init__(self, max_bytes: int = MAX_QUEUED) -> None:
        self.max_bytes = max_bytes
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0  # bytes in the queue
        self.dropped = 0  # bytes dropped: the client was too slow
        self.closed = False
        self.ready = asyncio.Event()
        self._buf: list[bytes] = []

    def write(self, data: bytes, /) -> int:
        self._buf.append(data)
        return len(data)

    def flush(self) -> None:
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf = []
        if self.queue and self.queued + len(data) > self.max_bytes:
            self.dropped += len(data)
            return
        self.queue.append(data)
        self.queued += len(data)
        self.ready.set()

    def close(self) -> None:
        self.flush()
        self.closed = True
        self.ready.set()

    def take(self) -> bytes:
        """All queued bytes (b"" if none)."""
        data = b"".join(self.queue)
        self.queue.clear()
        self.queued = 0
        self.ready.clear()
        return data


class LiveCapture(CaptureFile):
    """A ``CaptureFile`` over ``Chunks``, tapping a running driver until ``close``."""

    def __init__(self, table: FlowTable, *, limit: int, selection: Selection | None,
                 interface: str = "tun", max_queued: int = MAX_QUEUED) -> None:
        self.chunks = Chunks(max_queued)
        super().__init__(Path("-"), limit=limit, interface=interface, selection=selection,
                         out=self.chunks)
        self.chunks.flush()  # the section header goes out at once
        self._table = table
        self._seen: set[int] = set()
        self._driver: TunDriver | None = None

    def attach(self, relay: Relay, driver: TunDriver) -> None:
        super().attach(relay, driver)
        self._driver = driver

    def detach(self) -> None:
        """Remove the tap (the driver is back to zero cost) and write what waits."""
        driver, self._driver = self._driver, None
        if driver is not None and driver.tap == self.tap:
            driver.tap = None
        self.close()

    @property
    def full(self) -> bool:
        """The limit is reached: no more packets will be written."""
        return self.skipped > 0

    def flush(self) -> None:
        if self._pending:
            self._learn_flows()
        super().flush()

    def _learn_flows(self) -> None:
        if len(self._seen) > MAX_SEEN:
            self._seen = {r.id for r in self._table.iter_records()}
        history = self._table.history
        recent = [history[i] for i in range(max(0, len(history) - 256), len(history))]
        for record in (*self._table.live.values(), *recent):
            if record.id not in self._seen:
                self._seen.add(record.id)
                self.flow_opened(record)
