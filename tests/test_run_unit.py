"""``tunproxy run`` pieces without namespaces: the summary table, the config it runs with,
and the one sentence without privileges."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import rules
from tests.netns import REPO
from tunproxy.command import adapt_config, default_config
from tunproxy.config import parse_config
from tunproxy.flows import FlowRecord
from tunproxy.summary import format_summary, summarize


def record(fid: int, dst: str, port: int, *, domain: str | None = None, up: int = 0,
           down: int = 0, reason: str = "closed-by-server", network: str = "tcp",
           rule: str = "rules.yaml:3: MATCH,DIRECT") -> FlowRecord:
    r = FlowRecord(id=fid, network=network, src="172.19.0.1", src_port=40000 + fid, dst=dst,
                   dst_port=port, domain=domain, rule=rule, outbound="DIRECT",
                   bytes_up=up, bytes_down=down)
    r.end_reason = reason
    return r


def test_summary_groups_by_destination_and_protocol() -> None:
    records = [
        record(1, "198.18.0.2", 443, domain="example.test", up=100, down=5000),
        record(2, "198.18.0.2", 443, domain="example.test", up=50, down=70,
               reason="upstream-reset"),
        record(3, "10.0.0.9", 80, reason="refused"),
        record(4, "10.0.0.9", 80, reason="refused"),
        record(5, "198.18.0.2", 80, domain="example.test", up=1, down=2, reason="shutdown"),
    ]
    rows = summarize(records)
    assert [(r.destination, r.protocol, r.flows, r.bytes_up, r.bytes_down) for r in rows] == [
        ("example.test", "tcp/443", 2, 150, 5070),
        ("example.test", "tcp/80", 1, 1, 2),
        ("10.0.0.9", "tcp/80", 2, 0, 0),
    ]
    assert dict(rows[0].errors) == {"upstream-reset": 1}
    assert dict(rows[2].errors) == {"refused": 2}
    assert not rows[1].errors  # the run ending under a flow is no error
    text = format_summary(records)
    lines = text.splitlines()
    assert lines[0].split() == ["destination", "proto", "flows", "sent", "received", "rule",
                                "errors"]
    assert lines[2].split() == ["example.test", "tcp/443", "2", "150", "5070", "MATCH,DIRECT",
                                "upstream-reset", "1"]
    assert lines[-1].split() == ["total", "5", "151", "5072"]


def test_default_config_is_direct_with_fake_ip_dns() -> None:
    config = default_config(["10.255.255.53", "fe80::1%eth0"])
    assert config.dns.enable and config.dns.mode == "fake-ip"
    assert [s.host for s in config.dns.servers] == ["10.255.255.53", "fe80::1"]
    verdict = config.ruleset.match(rules.FlowMeta(network="tcp", src_ip="172.19.0.1",
                                                  src_port=1, dst_ip="10.0.0.1", dst_port=80))
    assert verdict.target == "DIRECT"
    with pytest.raises(Exception, match="no nameserver"):
        default_config([])


def test_a_rules_file_without_dns_gets_dns_and_no_mark() -> None:
    config = parse_config("rules: [MATCH,DIRECT]\n", Path("r.yaml"))
    assert not config.dns.enable
    adapted = adapt_config(config)
    assert adapted.dns.enable and adapted.tun.fwmark == 0 and not adapted.tun.auto_route


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root (to drop its capabilities) and setpriv")
def test_without_privileges_one_sentence() -> None:
    done = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "tunproxy",
         "run", "--", "true"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "needs root" in done.stderr and "sudo" in done.stderr


def test_recording_flow_log_bounds_what_it_keeps() -> None:
    from tunproxy.command import RecordingFlowLog

    flow_log = RecordingFlowLog(None)
    flow_log.KEEP_ENDED = 10
    seen: list[int] = []
    flow_log.listeners.append(lambda r: seen.append(r.id))
    for fid in range(1, 101):
        r = record(fid, "10.0.0.9", 80, up=1, down=2)
        flow_log.opened(r)
        flow_log.opened(r)  # opened twice (a DNS flow, a sniffed one): told once
        flow_log.ended(r, "closed-by-server")
        flow_log.ended(r, "closed-by-server")  # ended once
    assert seen == list(range(1, 101))
    assert sorted(flow_log.records) == list(range(91, 101))
    (row,) = flow_log.summary.rows()
    assert (row.flows, row.bytes_up, row.bytes_down) == (100, 100, 200)
