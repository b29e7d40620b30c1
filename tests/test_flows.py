"""The flow table: records, rates on a hand-set clock, history bound, close_flow, the rule
as a structure, the JSON flow log, and attribution against this test's own sockets."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

import rules
from tunproxy.attribution import Attributor, parse_cgroup
from tunproxy.flows import (
    CONNECTING,
    ENDED,
    REMOTE,
    FlowRecord,
    FlowTable,
    JsonFlowLog,
    RuleRef,
    rule_ref,
)
from tunproxy.procinfo import ProcessResolver


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def record(flow_id: int, **kw: object) -> FlowRecord:
    base: dict[str, object] = dict(network="tcp", src="10.0.0.1", src_port=40000 + flow_id,
                                   dst="192.0.2.1", dst_port=443)
    base.update(kw)
    return FlowRecord(id=flow_id, **base)  # type: ignore[arg-type]


def table(**kw: object) -> tuple[FlowTable, Clock]:
    clock = Clock()
    return FlowTable(clock=clock, wall_clock=clock, **kw), clock  # type: ignore[arg-type]


def test_track_makes_live_and_end_moves_to_history() -> None:
    t, clock = table()
    r = record(1)
    t.track(r)
    assert t.get(1) is r and r.state == CONNECTING and r.started == 100.0
    assert r.attribution == "off"  # no attributor configured
    clock.now = 102.5
    r.bytes_up, r.bytes_down = 10, 20
    t.ended(r, "closed-by-client")
    assert 1 not in t.live and t.get(1) is r
    assert r.state == ENDED and r.end_reason == "closed-by-client" and r.ended == 102.5
    assert r.to_json()["duration"] == 2.5
    t.ended(r, "again")  # a second end changes nothing
    assert r.end_reason == "closed-by-client" and t.ended_by_reason == {"closed-by-client": 1}
    assert t.totals() == (10, 20)


def test_deferred_attribution_runs_once_later_or_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """track(defer=True) leaves the lookup for attribute_deferred (the relay calls it once
    the upstream connects started); a flow that ends first is attributed before its end
    line; no flow is looked up twice."""
    looked: list[int] = []

    def attribute(r: FlowRecord) -> None:
        looked.append(r.id)
        r.attribution, r.process, r.pid = "process", f"app{r.id}", 4000 + r.id

    t, _ = table(attribute=attribute)
    a, b, c, d = record(1), record(2), record(3), record(4)
    t.track(a)  # not deferred: at once
    assert looked == [1] and a.process == "app1"
    t.track(b, defer=True)
    t.track(c, defer=True)
    assert looked == [1] and b.attribution is None and t.get(2) is b
    caplog.set_level("INFO", logger="tunproxy.flow")
    t.ended(c, "reset-by-client")  # ends before its deferred lookup ran
    assert looked == [1, 3] and c.process == "app3"
    assert "app3(4003)" in caplog.text  # the end line names the process
    t.attribute_deferred()
    assert looked == [1, 3, 2] and b.process == "app2"
    t.attribute_deferred()  # nothing left
    t.ended(b, "closed")
    t.track(d, defer=True)
    t.attribute_now(d)
    t.attribute_now(d)
    t.attribute_deferred()
    assert looked == [1, 3, 2, 4] and d.pid == 4004


def test_deferred_attribution_without_an_attributor_is_off() -> None:
    t, _ = table()
    r = record(1)
    t.track(r, defer=True)
    assert r.attribution == "off"
    t.attribute_deferred()
    t.ended(r, "closed")
    assert r.attribution == "off"


def test_rates_each_way_from_a_hand_set_clock() -> None:
    t, clock = table(rate_interval=1.0)
    a, b = record(1), record(2)
    t.track(a)
    t.track(b)
    t.sample()  # the first sample only sets the baseline
    assert (a.rate_up, a.rate_down) == (0.0, 0.0)
    a.bytes_up, a.bytes_down = 1000, 4000
    b.bytes_down = 500
    clock.now += 0.5
    t.sample()  # too soon: nothing moves, so two readers cannot shrink each other's window
    assert a.rate_down == 0.0
    clock.now += 1.5  # 2 s since the baseline
    t.sample()
    assert (a.rate_up, a.rate_down) == (500.0, 2000.0)
    assert (b.rate_up, b.rate_down) == (0.0, 250.0)
    assert t.rate_total == (500.0, 2250.0)
    clock.now += 1.0
    t.sample()  # idle for a second: rates fall to zero
    assert (a.rate_up, a.rate_down) == (0.0, 0.0)
    t.ended(b, "x")
    assert b.rate_down == 0.0 and t.totals() == (1000, 4500)


def test_history_is_bounded_and_keeps_the_newest() -> None:
    t, _ = table(history=3)
    for i in range(10):
        r = record(i)
        t.track(r)
        t.ended(r, f"reason-{i}")
    assert [r.id for r in t.history] == [7, 8, 9]
    assert t.get(2) is None and t.get(8) is not None
    assert sum(t.ended_by_reason.values()) == 10


def test_close_flow_asks_the_relay_and_unknown_ids_are_false() -> None:
    t, _ = table()
    closed: list[tuple[int, str]] = []

    def closer(flow_id: int, reason: str) -> bool:
        closed.append((flow_id, reason))
        t.ended(t.live[flow_id], reason)
        return True

    t.closer = closer
    for i in (1, 2, 3):
        t.track(record(i))
    assert t.close_flow(2) is True
    assert closed == [(2, "closed-by-api")]
    assert t.close_flow(2) is False  # no longer live
    assert t.close_flow(999) is False
    assert t.close_all() == 2 and not t.live
    assert t.get(1) is not None and t.get(1).end_reason == "closed-by-api"  # type: ignore[union-attr]


def test_lookups_by_process_and_domain() -> None:
    t, _ = table()
    t.track(record(1, process="curl", domain="a.example.com"))
    t.track(record(2, process="firefox", domain="example.org"))
    ended = record(3, process="curl", domain="example.com")
    t.track(ended)
    t.ended(ended, "x")
    assert [r.id for r in t.by_process("curl")] == [1]
    assert [r.id for r in t.by_process("curl", ended=True)] == [1, 3]
    assert [r.id for r in t.by_domain("Example.com.", ended=True)] == [1, 3]
    assert t.by_domain("ample.com") == []


def _ruleset(*lines: str) -> rules.RuleSet:
    src = [rules.RuleSource(text, "rules.yaml", n + 10) for n, text in enumerate(lines)]
    return rules.compile(src, {}, ["proxy"])


def test_the_rule_is_kept_structured() -> None:
    rs = _ruleset("DOMAIN-SUFFIX,example.com,proxy",
                  "AND,((NETWORK,tcp),(DST-PORT,22)),REJECT", "MATCH,DIRECT")
    meta = rules.FlowMeta("tcp", "10.0.0.1", 1, None, 443, domain="www.example.com")
    ref = rule_ref(rs.match(meta))
    assert ref == RuleRef("DOMAIN-SUFFIX", "example.com", "proxy", "rules.yaml", 10)
    assert ref.clash_type == "DomainSuffix" and ref.location == "rules.yaml:10"
    logic = rule_ref(rs.match(rules.FlowMeta("tcp", "10.0.0.1", 1, "192.0.2.1", 22)))
    assert (logic.type, logic.payload, logic.target, logic.line) == (
        "AND", "((NETWORK,tcp),(DST-PORT,22))", "REJECT", 11)
    match = rule_ref(rs.match(rules.FlowMeta("udp", "10.0.0.1", 1, "192.0.2.1", 53)))
    assert (match.type, match.clash_type, match.payload, match.line) == ("MATCH", "Match", "", 12)
    default = rule_ref(_ruleset("DOMAIN,x.org,proxy").match(meta))
    assert (default.type, default.target, default.file) == ("DEFAULT", "DIRECT", None)
    r = record(1, outbound="proxy")
    r.set_verdict(rs.match(meta))
    assert r.to_json()["rule"] == {"type": "DOMAIN-SUFFIX", "payload": "example.com",
                                   "target": "proxy", "file": "rules.yaml", "line": 10,
                                   "entry": None}
    hijack = record(2, rule="dns.hijack", outbound="dns")
    assert hijack.rule_ref is not None and hijack.rule_ref.type == "DNS-HIJACK"
    # Log lines say the rule as they always did.
    assert hijack.rule == "dns.hijack"
    assert r.rule == "proxy by rules.yaml:10: DOMAIN-SUFFIX,example.com,proxy"
    default_flow = record(3)
    default_flow.set_verdict(_ruleset("DOMAIN,x.org,proxy").match(meta))
    assert default_flow.rule == "default (no MATCH rule)"


def test_json_flow_log_one_line_per_flow_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    sink = JsonFlowLog(str(path))
    t, clock = table()
    t.add_sink(sink)
    first = record(1, domain="example.com")
    t.track(first)
    first.bytes_up = 7
    clock.now += 1
    t.ended(first, "closed-by-client")
    lines = path.read_text().splitlines()  # flushed at once: readable before any close
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["id"] == 1 and obj["bytes_up"] == 7 and obj["end_reason"] == "closed-by-client"
    assert obj["duration"] == 1.0 and obj["domain"] == "example.com"
    # logrotate: the file is moved away, SIGHUP reopens at the configured path
    path.rename(tmp_path / "flows.jsonl.1")
    t.reopen_sinks()
    second = record(2)
    t.track(second)
    t.ended(second, "reset-by-client")
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == [2]
    assert len((tmp_path / "flows.jsonl.1").read_text().splitlines()) == 1
    t.close_sinks()


def test_json_flow_log_unwritable_path_never_raises(tmp_path: Path) -> None:
    sink = JsonFlowLog(str(tmp_path / "missing-dir" / "flows.jsonl"))
    t, _ = table()
    t.add_sink(sink)
    r = record(1)
    t.track(r)
    t.ended(r, "x")  # logged as an error, the flow still ends
    assert r.state == ENDED


@pytest.mark.parametrize("text, unit, container", [
    ("0::/user.slice/user-1000.slice/session-2.scope\n", "session-2.scope", None),
    ("0::/system.slice/nginx.service\n", "nginx.service", None),
    ("0::/system.slice/docker-" + "ab" * 32 + ".scope\n", "docker-" + "ab" * 32 + ".scope",
     "docker:abababababab"),
    ("0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-" + "cd" * 32
     + ".scope/container\n", "libpod-" + "cd" * 32 + ".scope", "podman:cdcdcdcdcdcd"),
    ("12:cpu:/docker/0123456789abcdef\n1:name=systemd:/docker/0123456789abcdef\n", None,
     "docker:0123456789ab"),
    ("0::/lxc.payload.web1/system.slice/sshd.service\n", "sshd.service", "lxc:web1"),
    ("0::/machine.slice/machine-vm\\x2d1.scope\n", "machine-vm\\x2d1.scope", "machine:vm-1"),
    ("0::/\n", None, None),
    ("", None, None),
])
def test_parse_cgroup(text: str, unit: str | None, container: str | None) -> None:
    assert parse_cgroup(text) == (unit, container)


def test_small_proc_files_are_read_whole_or_not_at_all(tmp_path: Path) -> None:
    from tunproxy.attribution import _read_small

    big = "0::/" + "x/" * 40_000 + "app.service\n"  # more than one 64 KiB read
    (tmp_path / "cgroup").write_text(big)
    assert _read_small(str(tmp_path / "cgroup")) == big
    assert parse_cgroup(big)[0] == "app.service"
    assert _read_small(str(tmp_path / "gone")) is None
    with open("/proc/self/cgroup") as f:
        assert _read_small("/proc/self/cgroup") == f.read()


def test_attribution_of_this_process_and_of_a_remote_source() -> None:
    attributor = Attributor(ProcessResolver())
    try:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            try:
                src, sport = client.getsockname()
                r = record(1, src=src, src_port=sport, dst="127.0.0.1",
                           dst_port=listener.getsockname()[1])
                attributor(r)
            finally:
                client.close()
                server.close()
        assert r.attribution == "process"
        assert r.pid == os.getpid() and r.uid == os.geteuid()
        assert r.exe == os.readlink("/proc/self/exe")
        with open(f"/proc/{os.getpid()}/cgroup") as f:
            assert (r.unit, r.container) == parse_cgroup(f.read())
        # A local address with no such socket: failed, with the reason.
        gone = record(2, src="127.0.0.1", src_port=1, dst="127.0.0.1", dst_port=1)
        attributor(gone)
        assert gone.attribution == "failed: no-socket" and gone.process is None
        # A source that is not this host's: shown by its address.
        remote = record(3, src="192.0.2.77", src_port=5, dst="127.0.0.1", dst_port=1)
        attributor(remote)
        assert remote.attribution == REMOTE and remote.who == "192.0.2.77"
    finally:
        attributor.close()
