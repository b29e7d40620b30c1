"""Capture selectors: parsing, and which flow records they keep."""

from __future__ import annotations

import pytest

from tunproxy.capture.select import parse_selection
from tunproxy.errors import ConfigError
from tunproxy.flows import FlowRecord


def rec(fid: int, process: str | None, domain: str | None, rule: str = "r.yaml:1: MATCH,DIRECT",
        pid: int = 10, uid: int = 1000) -> FlowRecord:
    return FlowRecord(id=fid, network="tcp", src="172.19.0.1", src_port=1, dst="198.18.0.1",
                      dst_port=443, domain=domain, process=process, pid=pid, uid=uid, rule=rule)


FLOWS = [
    rec(1, "curl", "example.com"),
    rec(2, "curl", "www.example.com", pid=11),
    rec(3, "wget", "example.com", rule="r.yaml:2: PROCESS-NAME,wget,proxy", uid=0),
    rec(4, None, "notexample.com"),
]


@pytest.mark.parametrize(("items", "expected"), [
    (["process=curl"], [1, 2]),
    (["process=curl", "process=wget"], [1, 2, 3]),
    (["domain=example.com"], [1, 2, 3]),  # subdomains, not look-alikes
    (["domain=EXAMPLE.com."], [1, 2, 3]),
    (["process=curl", "domain=www.example.com"], [2]),
    (["pid=11"], [2]),
    (["uid=0"], [3]),
    (["rule=PROCESS-NAME"], [3]),
    (["flow=4"], [4]),
])
def test_selection_keeps(items: list[str], expected: list[int]) -> None:
    selection = parse_selection(items)
    assert selection is not None
    assert [r.id for r in FLOWS if selection.matches(r)] == expected


def test_no_items_no_selection() -> None:
    assert parse_selection([]) is None


@pytest.mark.parametrize(("item", "message"), [
    ("curl", "expected KEY=VALUE"),
    ("process=", "expected KEY=VALUE"),
    ("name=curl", "unknown key 'name'"),
    ("pid=abc", "pid takes a number"),
])
def test_bad_selectors_say_why(item: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_selection([item])
