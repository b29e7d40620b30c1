"""Flow records: what tunproxy knows about each flow, for logs and debugging.

One ``FlowRecord`` per flow: who opened it (process, when attributed), where
to (address, domain), which rule sent it where, bytes each way, and why it
ended. The relay fills it in; ``FlowLog`` writes one line per ended flow.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

__all__ = ["FlowLog", "FlowRecord"]

log = logging.getLogger("tunproxy.flow")


@dataclass(slots=True)
class FlowRecord:
    id: int
    network: str
    src: str
    src_port: int
    dst: str
    dst_port: int
    started: float = field(default_factory=time.time)
    domain: str | None = None
    process: str | None = None
    pid: int | None = None
    uid: int | None = None
    rule: str | None = None  # "file:line: RULE TEXT"
    outbound: str | None = None
    bytes_up: int = 0  # from the local application towards the destination
    bytes_down: int = 0
    ended: float | None = None
    end_reason: str | None = None

    def describe(self) -> str:
        host = self.domain or self.dst
        dst = f"[{host}]" if ":" in host else host
        who = f" {self.process}({self.pid})" if self.process else ""
        return f"#{self.id} {self.network}{who} {self.src}:{self.src_port} -> {dst}:{self.dst_port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "network": self.network, "src": self.src, "src_port": self.src_port,
            "dst": self.dst, "dst_port": self.dst_port, "domain": self.domain,
            "process": self.process, "pid": self.pid, "uid": self.uid, "rule": self.rule,
            "outbound": self.outbound, "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down, "started": self.started, "ended": self.ended,
            "duration": (self.ended - self.started) if self.ended else None,
            "end_reason": self.end_reason,
        }


class FlowLog:
    """Ends flows: records the reason, logs one line, keeps totals by reason."""

    def __init__(self, json_file: TextIO | None = None) -> None:
        self.ended_by_reason: Counter[str] = Counter()
        self._json = json_file

    def opened(self, record: FlowRecord) -> None:
        log.debug("open %s via %s (%s)", record.describe(), record.outbound, record.rule)

    def ended(self, record: FlowRecord, reason: str) -> None:
        if record.ended is not None:
            return
        record.ended = time.time()
        record.end_reason = reason
        self.ended_by_reason[reason] += 1
        log.info(
            "end %s via %s: %s, up %d B, down %d B, %.1f s", record.describe(), record.outbound,
            reason, record.bytes_up, record.bytes_down, record.ended - record.started,
        )
        if self._json is not None:
            self._json.write(json.dumps(record.to_json()) + "\n")
            self._json.flush()
