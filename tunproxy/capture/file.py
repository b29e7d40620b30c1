"""``--capture FILE``: the TUN's packets, as pcapng, with each packet's flow written on it.

The I/O side of the capture. The driver's tap hands over whole batches (one call per
batch); they wait here, unparsed, and are written every ``FLUSH_INTERVAL`` seconds (or
sooner when many wait). Writing late is what lets every packet carry its flow's full
story: a SYN arrives before its flow has a rule or a process, but by the time it is
written both are known. Each packet's comment reads::

    flow #12 tcp curl(4242) example.com rule MATCH,DIRECT via DIRECT

and a Name Resolution Block names every fake (or remembered real) address with its
domain as soon as a flow to it is known, so Wireshark shows names.

A ``Selection`` (``tunproxy.capture.select``) keeps only some flows' packets: those of a
process, pid, uid, domain, rule or flow id; packets of no known flow (ICMP, neighbour
discovery) are then left out too.

The file stops growing at ``limit`` bytes: later packets are counted, not written, and
the log says so once. A capture cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tunproxy import __version__
from tunproxy.capture import pcapng
from tunproxy.capture.frames import FlowTuple, flow_tuple, frame, ip_view
from tunproxy.capture.select import Selection
from tunproxy.errors import SetupError
from tunproxy.flows import FlowRecord

if TYPE_CHECKING:
    from tunproxy.driver import TunDriver
    from tunproxy.relay import Relay

__all__ = ["CaptureFile", "Output", "packet_comment"]

log = logging.getLogger("tunproxy.capture")

FLUSH_INTERVAL = 0.5
MAX_PENDING_BYTES = 16 * 1024 * 1024
MAX_INDEX = 65536  # flows the index holds before ended ones are dropped
# A flow the selection left out once it is settled (routed: its rule is set, and with it
# everything a selection reads: process and uid at open, the sniffed domain before the
# decision; or, whatever the rule says, this many seconds old) has its packets dropped by
# the tap itself, not held until the flush: a bulk flow of another process then costs a
# lookup per packet, and no memory.
SETTLED = 2.0


class Output(Protocol):
    """Where the blocks go: a file, or the controller's stream (``capture.stream``)."""

    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def packet_comment(record: FlowRecord) -> str:
    who = f" {record.process}({record.pid})" if record.process else ""
    domain = f" {record.domain}" if record.domain else ""
    rule = f" rule {record.rule.rsplit(': ', 1)[-1]}" if record.rule else ""
    via = f" via {record.outbound}" if record.outbound else ""
    return f"flow #{record.id} {record.network}{who}{domain}{rule}{via}"


class CaptureFile:
    def __init__(self, path: Path, *, limit: int, interface: str = "tun",
                 selection: Selection | None = None, out: Output | None = None) -> None:
        self.path = path
        self.limit = limit
        # With a selection, only the selected flows' packets (and names) are written.
        self.selection = selection
        self._file: Output | None = out  # ``out``: a stream instead of a file (the API)
        if out is None:
            try:
                self._file = open(path, "wb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise SetupError(f"cannot write the capture {path}: {exc.strerror}") from None
            _give_to_invoking_user(path)
        self._opened: list[FlowRecord] = []  # flows opened since the last flush
        self._recent: collections.deque[FlowRecord] = collections.deque(maxlen=256)
        self._pending: list[tuple[int, bool, list[bytes]]] = []
        self._pending_bytes = 0
        self._vnet_hdr = False
        self._index: dict[FlowTuple, FlowRecord] = {}
        self._left_out: dict[FlowTuple, FlowRecord] = {}  # settled flows the selection skips
        self._named: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.written = 0  # bytes in the file
        self.packets = 0
        self.skipped = 0  # packets not written: the limit was reached
        self._write(pcapng.section_header(application=f"tunproxy {__version__}")
                    + pcapng.interface_description(name=interface, tsresol=9))

    # -- wiring --------------------------------------------------------------------------
    def attach(self, relay: Relay, driver: TunDriver) -> None:
        """Start tapping ``driver`` (called on the event loop once the data path runs)."""
        self._vnet_hdr = bool(relay.stack.config.vnet_hdr)
        self._loop = asyncio.get_running_loop()
        driver.tap = self.tap
        self._timer = self._loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def flow_opened(self, record: FlowRecord) -> None:
        """A new flow (from the flow log): its packets get its comment from now on."""
        self._opened.append(record)

    def tap(self, packets: list[bytes], from_app: bool) -> None:
        if self._left_out:
            packets = self._drop_left_out(packets, from_app)
            if not packets:
                return
        self._pending.append((time.time_ns(), from_app, packets))
        self._pending_bytes += sum(map(len, packets))
        if self._pending_bytes > MAX_PENDING_BYTES:
            self.flush()

    def _drop_left_out(self, packets: list[bytes], from_app: bool) -> list[bytes]:
        left_out, vnet_hdr = self._left_out, self._vnet_hdr
        kept = []
        for packet in packets:
            key = flow_tuple(ip_view(packet, vnet_hdr), from_app=from_app)
            if key is None or (record := left_out.get(key)) is None:
                kept.append(packet)
            elif record.ended is not None:
                # Its 5-tuple may come back as a new flow: judge it afresh.
                del left_out[key]
                kept.append(packet)
        return kept

    def _on_timer(self) -> None:
        self.flush()
        assert self._loop is not None
        self._timer = self._loop.call_later(FLUSH_INTERVAL, self._on_timer)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.skipped:
            log.warning("capture %s: %d packets not written (the %d-byte limit was reached)",
                        self.path, self.skipped, self.limit)

    # -- writing -------------------------------------------------------------------------
    def flush(self) -> None:
        if not self._pending or self._file is None:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        self._index_new_records()
        out: list[bytes] = []
        vnet_hdr = self._vnet_hdr
        selection = self.selection
        chosen: dict[int, bool] = {}  # flow id -> selected, once per flow per flush
        settled = time.time() - SETTLED
        for stamp, from_app, packets in pending:
            for packet in packets:
                # Whose packet it is, read in place: a packet the selection leaves out costs
                # this lookup only, never the copy and checksum that ``frame`` makes.
                key = flow_tuple(ip_view(packet, vnet_hdr), from_app=from_app)
                record = self._index.get(key) if key is not None else None
                if selection is not None:
                    if record is None:
                        continue
                    keep = chosen.get(record.id)
                    if keep is None:
                        keep = chosen[record.id] = selection.matches(record)
                        if not keep and record.ended is None and (
                                record.rule is not None or record.started < settled):
                            assert key is not None
                            self._left_out[key] = record
                    if not keep:
                        continue
                ip = frame(packet, vnet_hdr)
                out.append(pcapng.enhanced_packet(
                    0, stamp, ip, comment=packet_comment(record) if record else None,
                    direction=pcapng.OUTBOUND if from_app else pcapng.INBOUND,
                ))
        for block in out:
            if self.written + len(block) > self.limit:
                self.skipped += 1
                if self.skipped == 1:
                    log.warning("capture %s reached its limit (%d bytes): no more packets "
                                "are written", self.path, self.limit)
                continue
            self._write(block)
            self.packets += 1
        self._file.flush()

    def _index_new_records(self) -> None:
        opened, self._opened = self._opened, []
        for record in opened:
            key = (record.network, record.src, record.src_port, record.dst, record.dst_port)
            self._index[key] = record
            self._left_out.pop(key, None)  # a new flow on an old 5-tuple: judged afresh
        if len(self._index) > MAX_INDEX:
            # Keep open flows and the ones that ended lately (their last packets may still
            # be waiting here); a long run's index stays bounded.
            horizon = time.time() - 60
            self._index = {k: r for k, r in self._index.items()
                           if r.ended is None or r.ended > horizon}
            self._left_out = {k: r for k, r in self._left_out.items() if r.ended is None}
        # A domain can be learned after a flow opened (sniffing): the recent ones are
        # looked at again.
        self._recent.extend(opened)
        names: list[tuple[str, list[str]]] = []
        selection = self.selection
        for record in self._recent:
            if not record.domain or record.dst in self._named:
                continue
            if selection is not None and not selection.matches(record):
                continue
            self._named.add(record.dst)
            names.append((record.dst, [record.domain]))
        block = pcapng.name_resolution(names)
        if block and self.written + len(block) <= self.limit:
            self._write(block)

    def _write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self.written += len(data)


def _give_to_invoking_user(path: Path) -> None:
    """``sudo tunproxy run --capture f``: f belongs to the user, who opens it in Wireshark."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.getuid() == 0 and uid is not None and gid is not None:
        with contextlib.suppress(OSError):
            os.chown(path, int(uid), int(gid))
