"""The flow table: what tunproxy knows about each flow, live and recently ended.

One ``FlowRecord`` per flow: who opened it (process, pid, uid, executable, systemd unit or
container, or the remote source address), where to (address, domain), which rule sent it
where (the rule engine's structured ``Verdict``, not a flattened string), its state, bytes
and current rate each way, and why it ended.

``FlowTable`` holds the live records by flow id and a bounded history of ended ones. The
relay is its only writer (``track`` at open, ``opened`` once routed, ``ended`` at the end,
byte counters on the record); the controller API, the JSON flow log and ``tunproxy top``
only read it, and ask the relay to end a flow through ``close_flow``.

Rates are sampled by readers, never by the data path: ``sample(now)`` turns the bytes seen
since the previous sample (at least ``rate_interval`` ago) into bytes per second, so a
table nobody reads costs nothing per second, and two readers polling at once do not halve
each other's windows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

from rules import ProcessInfo, RuleSource, Verdict

__all__ = [
    "CLOSING",
    "CONNECTING",
    "ENDED",
    "HALF_CLOSED",
    "OPEN",
    "FlowLog",
    "FlowRecord",
    "FlowSink",
    "FlowTable",
    "JsonFlowLog",
    "RuleRef",
    "configure_flow_table",
    "rule_ref",
    "source_ref",
    "verdict_text",
]

log = logging.getLogger("tunproxy.flow")

# Flow states, as the table shows them.
CONNECTING = "connecting"  # routed or being routed; the upstream is not connected yet
OPEN = "open"  # carrying data both ways
HALF_CLOSED = "half-closed"  # one side sent FIN; the other may still send
CLOSING = "closing"  # both sides sent FIN; waiting for the last ACK
ENDED = "ended"

# Attribution outcomes (``FlowRecord.attribution``).
ATTRIBUTED = "process"  # a local process owns the flow's socket
REMOTE = "remote"  # the source is not an address of this host: a VM's or a LAN's flow
OFF = "off"  # attribution is turned off (``log.attribution: false``)
# anything else starts with "failed: " and says why (no-socket, no-owner)

DEFAULT_HISTORY = 1000
DEFAULT_RATE_INTERVAL = 1.0

# mihomo's RuleType.String() for each Clash rule keyword (constant/rule.go).
_CLASH_TYPES = {
    "DOMAIN": "Domain", "DOMAIN-SUFFIX": "DomainSuffix", "DOMAIN-KEYWORD": "DomainKeyword",
    "DOMAIN-REGEX": "DomainRegex", "IP-CIDR": "IPCIDR", "IP-CIDR6": "IPCIDR",
    "SRC-IP-CIDR": "SrcIPCIDR", "DST-PORT": "DstPort", "SRC-PORT": "SrcPort",
    "NETWORK": "Network", "PROCESS-NAME": "ProcessName", "PROCESS-PATH": "ProcessPath",
    "UID": "Uid", "AND": "AND", "OR": "OR", "NOT": "NOT", "RULE-SET": "RuleSet",
    "MATCH": "Match",
}
_LOGIC = ("AND", "OR", "NOT")


@dataclass(frozen=True, slots=True)
class RuleRef:
    """The rule that decided a flow, structured: ``type`` as written (``DOMAIN-SUFFIX``),
    its ``payload`` (``example.com``), the ``target``, where it is written (``file``,
    ``line``) and, for a RULE-SET, the entry that matched. Rules that are not rule lines
    (DNS hijack, the default without MATCH, a refusal before matching) have ``file`` None
    and a type of their own (``DNS-HIJACK``, ``DEFAULT``, ``NONE``)."""

    type: str
    payload: str
    target: str
    file: str | None = None
    line: int | None = None
    entry: str | None = None

    @property
    def clash_type(self) -> str:
        """mihomo's name for the type (``DomainSuffix``), as dashboards expect it."""
        return _CLASH_TYPES.get(self.type, self.type.title().replace("-", ""))

    @property
    def location(self) -> str | None:
        return f"{self.file}:{self.line}" if self.file is not None else None

    def __str__(self) -> str:
        text = f"{self.type},{self.payload}" if self.payload else self.type
        where = f" ({self.location})" if self.file is not None else ""
        entry = f", entry {self.entry}" if self.entry else ""
        return f"{text} -> {self.target}{where}{entry}"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "payload": self.payload, "target": self.target,
                "file": self.file, "line": self.line, "entry": self.entry}


_rule_refs: dict[Verdict, RuleRef] = {}


def source_ref(src: RuleSource, target: str | None = None, entry: str | None = None) -> RuleRef:
    """A rule line as type, payload and target (``IP-CIDR,10.0.0.0/8,proxy,no-resolve``:
    IP-CIDR, 10.0.0.0/8, proxy)."""
    kind, _, rest = src.text.strip().partition(",")
    kind = kind.strip().upper()
    if kind == "MATCH":
        payload, written = "", rest.strip()
    elif kind in _LOGIC or kind == "DOMAIN-REGEX":
        # AND,((DOMAIN,a),(NETWORK,tcp)),TARGET: the payload is everything but the target.
        payload, _, written = rest.rpartition(",")
        payload, written = payload.strip(), written.strip()
    else:
        fields = [f.strip() for f in rest.split(",")]
        payload = fields[0]
        written = fields[1] if len(fields) > 1 else ""
    return RuleRef(kind, payload, target if target is not None else written, src.file,
                   src.line, entry)


_verdict_texts: dict[Verdict, str] = {}


def verdict_text(verdict: Verdict) -> str:
    """The one-line form of a verdict the log has always printed (cached per rule)."""
    text = _verdict_texts.get(verdict)
    if text is None:
        text = "default (no MATCH rule)" if verdict.rule is None else verdict.explain()
        if len(_verdict_texts) < 65536:
            _verdict_texts[verdict] = text
    return text


def rule_ref(verdict: Verdict) -> RuleRef:
    """The structured form of a verdict (cached: the engine hands out one Verdict per rule)."""
    ref = _rule_refs.get(verdict)
    if ref is not None:
        return ref
    if verdict.rule is None:
        ref = RuleRef("DEFAULT", "", verdict.target)
    else:
        ref = source_ref(verdict.rule, verdict.target, verdict.rule_set_entry)
    if len(_rule_refs) < 65536:
        _rule_refs[verdict] = ref
    return ref


@dataclass(slots=True)
class FlowRecord:
    id: int
    network: str
    src: str
    src_port: int
    dst: str
    dst_port: int
    started: float = field(default_factory=time.time)  # wall clock, seconds
    domain: str | None = None
    dscp: int | None = None  # the first packet's DSCP (IP TOS >> 2), for DSCP rules
    # Attribution: who owns the flow's socket on this host (see ATTRIBUTED/REMOTE/OFF).
    attribution: str | None = None
    process: str | None = None
    pid: int | None = None
    uid: int | None = None
    exe: str | None = None
    unit: str | None = None  # systemd unit (nginx.service, session-2.scope)
    container: str | None = None  # docker:0123456789ab, podman:..., lxc:name
    verdict: Verdict | None = None
    # The rule as one line, as logs and ``tunproxy run`` read it ("proxy by file:line: RULE"),
    # or what decided when no rule did (dns.hijack, unknown-fake-ip); ``rule_ref`` is the
    # structured form.
    rule: str | None = None
    outbound: str | None = None
    # The members the groups on the way chose, innermost first (``outbound`` is the
    # outermost group): mihomo's ``chains`` is ``[*via, outbound]``.
    via: tuple[str, ...] = ()
    state: str = CONNECTING
    bytes_up: int = 0  # from the local application towards the destination
    bytes_down: int = 0
    rate_up: float = 0.0  # bytes per second, over the last sample interval
    rate_down: float = 0.0
    ended: float | None = None
    end_reason: str | None = None
    _sample: tuple[float, int, int] | None = None  # (time, bytes_up, bytes_down)

    @property
    def rule_ref(self) -> RuleRef | None:
        """The rule that decided, structured (type, payload, target, file, line)."""
        if self.verdict is not None:
            return rule_ref(self.verdict)
        if self.rule is not None:
            return RuleRef(self.rule.upper().replace(".", "-"), "", self.outbound or "")
        return None

    def set_verdict(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.rule = verdict_text(verdict)

    @property
    def process_info(self) -> ProcessInfo | None:
        if self.attribution != ATTRIBUTED or self.pid is None:
            return None
        return ProcessInfo(pid=self.pid, name=self.process or "", path=self.exe or "",
                           uid=self.uid if self.uid is not None else -1)

    def set_process(self, info: ProcessInfo) -> None:
        self.attribution = ATTRIBUTED
        self.process, self.pid, self.uid = info.name, info.pid, info.uid
        self.exe = info.path or None

    @property
    def who(self) -> str:
        """The process name, or for a remote source its address, or why not known."""
        if self.process:
            return self.process
        if self.attribution == REMOTE:
            return self.src
        return "?"

    def describe(self) -> str:
        host = self.domain or self.dst
        dst = f"[{host}]" if ":" in host else host
        who = f" {self.process}({self.pid})" if self.process else ""
        return f"#{self.id} {self.network}{who} {self.src}:{self.src_port} -> {dst}:{self.dst_port}"

    def to_json(self) -> dict[str, Any]:
        """The flow log's line (README, "Flow log"): one flat object, stable keys."""
        rule = self.rule_ref
        return {
            "id": self.id, "network": self.network, "src": self.src, "src_port": self.src_port,
            "dst": self.dst, "dst_port": self.dst_port, "domain": self.domain,
            "attribution": self.attribution, "process": self.process, "pid": self.pid,
            "uid": self.uid, "exe": self.exe, "unit": self.unit, "container": self.container,
            "rule": rule.to_json() if rule is not None else None,
            "outbound": self.outbound, "state": self.state, "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down, "started": self.started, "ended": self.ended,
            "duration": (self.ended - self.started) if self.ended is not None else None,
            "end_reason": self.end_reason,
        }


class FlowSink(Protocol):
    """Something told of every ended flow (the JSON flow log)."""

    def flow_ended(self, record: FlowRecord) -> None: ...


class FlowTable:
    """Live flows by id, the last ``history`` ended ones, and totals.

    The relay calls ``track`` when a flow opens (the record is live from then on),
    ``opened`` once it is routed, and ``ended`` once, whatever ended it. ``closer`` is set
    by the relay: ``close_flow(id)`` calls it to reset the app side and close the upstream.
    """

    def __init__(
        self,
        *,
        history: int = DEFAULT_HISTORY,
        rate_interval: float = DEFAULT_RATE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        attribute: Callable[[FlowRecord], None] | None = None,
        json_file: TextIO | None = None,
    ) -> None:
        self.live: dict[int, FlowRecord] = {}
        self.history: deque[FlowRecord] = deque(maxlen=history)
        self.ended_by_reason: Counter[str] = Counter()
        self.sinks: list[FlowSink] = []
        if json_file is not None:
            self.sinks.append(_StreamSink(json_file))
        self.closer: Callable[[int, str], bool] | None = None
        self.attribute = attribute
        self._deferred: dict[int, FlowRecord] = {}  # live flows not attributed yet
        self.rate_interval = rate_interval
        self._clock = clock
        self._wall = wall_clock
        self.opened_count = 0
        # Bytes of ended flows; live flows' bytes are on their records.
        self._ended_up = 0
        self._ended_down = 0
        self._total_sample: tuple[float, int, int] | None = None
        self.rate_total = (0.0, 0.0)

    # -- the relay's side ---------------------------------------------------------------
    def track(self, record: FlowRecord, *, defer: bool = False) -> None:
        """A flow opened: attribute it (unless turned off) and make it live.

        With ``defer`` the process lookup waits, off the flow's critical path, for
        ``attribute_deferred()`` (the relay calls it once the upstream connects it started
        are under way) or ``attribute_now(record)``; a flow that ends first is attributed
        by ``ended``, before its end line is written."""
        record.started = self._wall()
        record.state = CONNECTING
        if self.attribute is not None:
            if defer:
                self._deferred[record.id] = record
            else:
                self._attribute(record, self.attribute)
        elif record.attribution is None:
            record.attribution = OFF
        self.live[record.id] = record
        self.opened_count += 1

    def _attribute(self, record: FlowRecord, attribute: Callable[[FlowRecord], None]) -> None:
        try:
            attribute(record)
        except Exception:  # attribution is information; it never stops a flow
            log.exception("bug: attributing %s failed", record.describe())
            record.attribution = "failed: internal error"

    def attribute_deferred(self) -> None:
        """Attribute every flow whose lookup ``track`` deferred."""
        deferred, self._deferred = self._deferred, {}
        if self.attribute is not None:
            for record in deferred.values():
                self._attribute(record, self.attribute)

    def attribute_now(self, record: FlowRecord) -> None:
        """Attribute ``record`` now if its lookup was deferred (else nothing to do)."""
        if self._deferred.pop(record.id, None) is not None and self.attribute is not None:
            self._attribute(record, self.attribute)

    def opened(self, record: FlowRecord) -> None:
        """The flow is routed (its verdict and outbound are set)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("open %s via %s (%s)", record.describe(), record.outbound, record.rule)

    def ended(self, record: FlowRecord, reason: str) -> None:
        if record.ended is not None:
            return
        if self._deferred:
            self.attribute_now(record)  # it ended before its deferred lookup ran
        record.ended = self._wall()
        record.end_reason = reason
        record.state = ENDED
        record.rate_up = record.rate_down = 0.0
        self.live.pop(record.id, None)
        self.history.append(record)
        self._ended_up += record.bytes_up
        self._ended_down += record.bytes_down
        self.ended_by_reason[reason] += 1
        log.info(
            "end %s via %s: %s, up %d B, down %d B, %.1f s", record.describe(), record.outbound,
            reason, record.bytes_up, record.bytes_down, record.ended - record.started,
        )
        for sink in self.sinks:
            try:
                sink.flow_ended(record)
            except Exception:
                log.exception("bug: flow sink %r failed", sink)

    # -- readers ----------------------------------------------------------------------------
    def get(self, flow_id: int) -> FlowRecord | None:
        """A live flow, or else a recently ended one, by id."""
        record = self.live.get(flow_id)
        if record is not None:
            return record
        for old in reversed(self.history):
            if old.id == flow_id:
                return old
        return None

    def iter_records(self, *, ended: bool = False) -> Iterator[FlowRecord]:
        """Live records (then, with ``ended``, the history, newest last)."""
        yield from list(self.live.values())
        if ended:
            yield from list(self.history)

    def by_process(self, name: str, *, ended: bool = False) -> list[FlowRecord]:
        return [r for r in self.iter_records(ended=ended) if r.process == name]

    def by_domain(self, domain: str, *, ended: bool = False) -> list[FlowRecord]:
        """Flows to ``domain`` or to a subdomain of it."""
        domain = domain.lower().rstrip(".")
        suffix = "." + domain
        return [r for r in self.iter_records(ended=ended)
                if r.domain is not None and (r.domain == domain or r.domain.endswith(suffix))]

    def totals(self) -> tuple[int, int]:
        """Bytes up and down, all flows since start."""
        up, down = self._ended_up, self._ended_down
        for r in self.live.values():
            up += r.bytes_up
            down += r.bytes_down
        return up, down

    def sample(self, now: float | None = None) -> None:
        """Update every live record's rate (and the total rate) if at least
        ``rate_interval`` passed since the previous sample."""
        now = self._clock() if now is None else now
        last = self._total_sample
        if last is not None and now - last[0] < self.rate_interval:
            return
        up, down = self.totals()
        if last is not None:
            span = now - last[0]
            self.rate_total = ((up - last[1]) / span, (down - last[2]) / span)
        self._total_sample = (now, up, down)
        for r in self.live.values():
            prev = r._sample
            if prev is not None and now > prev[0]:
                span = now - prev[0]
                r.rate_up = (r.bytes_up - prev[1]) / span
                r.rate_down = (r.bytes_down - prev[2]) / span
            r._sample = (now, r.bytes_up, r.bytes_down)

    # -- commands ---------------------------------------------------------------------------
    def close_flow(self, flow_id: int, reason: str = "closed-by-api") -> bool:
        """Reset the app side and close the upstream of a live flow; False if not live."""
        if flow_id not in self.live or self.closer is None:
            return False
        return self.closer(flow_id, reason)

    def close_all(self, reason: str = "closed-by-api") -> int:
        return sum(1 for flow_id in list(self.live) if self.close_flow(flow_id, reason))

    # -- sinks --------------------------------------------------------------------------------
    def add_sink(self, sink: FlowSink) -> None:
        self.sinks.append(sink)

    def reopen_sinks(self) -> None:
        for sink in self.sinks:
            reopen = getattr(sink, "reopen", None)
            if reopen is not None:
                reopen()

    def close_sinks(self) -> None:
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


FlowLog = FlowTable  # the name the relay knew it by


class _StreamSink:
    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def flow_ended(self, record: FlowRecord) -> None:
        self._stream.write(json.dumps(record.to_json()) + "\n")
        self._stream.flush()


class JsonFlowLog:
    """``log: {flows: PATH}``: one JSON object a line per ended flow, flushed at once;
    ``reopen()`` (SIGHUP) starts writing to a new file at PATH, so logrotate can move the
    old one away. A write error is logged once and the log pauses until the next reopen;
    the data path never waits for or fails on it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: TextIO | None = None
        self._failed = False
        self.reopen()

    def reopen(self) -> None:
        self.close()
        try:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._failed = False
        except OSError as exc:
            log.error("cannot open the flow log %s: %s", self.path, exc)
            self._file = None

    def flow_ended(self, record: FlowRecord) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:
            if not self._failed:
                log.error("flow log %s: %s; paused until the next SIGHUP", self.path, exc)
            self._failed = True
            self.close()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None



def configure_flow_table(table: FlowTable, config: Any, processes: Any | None) -> None:
    """Set ``table`` up for a ``log:`` section (``tunproxy.config.LogConfig``): attribution
    on when asked for and a process resolver exists, the history's length, and the JSON flow
    log when a path is set. (The table itself may be a subclass made earlier, as
    ``tunproxy run``'s is.)"""
    if config.attribution and processes is not None:
        from tunproxy.attribution import Attributor

        table.attribute = Attributor(processes)
    table.history = deque(table.history, maxlen=config.history)
    if config.flows is not None:
        table.add_sink(JsonFlowLog(config.flows))
