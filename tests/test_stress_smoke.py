"""Keeps the stress suite (bench/stress.py) honest and alive: each scenario's smoke form
runs in CI through a real TUN in namespaces, and its checks must pass. The full sizes
(a million hostile packets, 10,000 flows, a 10-minute soak) are run by hand; their
figures are in the README's "Reliability" section.

Without root only the parts that need none run: the packet generator's well-formed
packets really are well-formed (so every drop the stack counts is a mutation's), and the
slope fit."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stress import SCENARIOS, Block, fit_slope, late_growth, tenths
from bench.stress_client import Hostile
from stack import Stack, StackConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.netns
@pytest.mark.timeout(420)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_smoke_scenario_passes(scenario: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces and a TUN")
    out = tmp_path / "stress.json"
    # The smoke flood is under a second long: a handful of legitimate connections sample
    # it, too few for the full run's 90 % to be more than noise on a busy machine.
    extra = ["--legit-percent", "50"] if scenario == "synflood" else []
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "stress.py"), "--smoke", "--only", scenario,
         "--json", str(out), *extra],
        capture_output=True, text=True, timeout=400, cwd=REPO, check=False,
    )
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    (block,) = json.loads(out.read_text())["blocks"]
    failed = [c for c in block["checks"] if not c["ok"]]
    assert block["checks"] and not failed, proc.stdout[-4000:]
    assert proc.returncode == 0, proc.stdout[-4000:]
    # The block printed figures, not only verdicts.
    assert block["figures"], proc.stdout[-4000:]


def test_generated_valid_packets_pass_the_stack_untouched() -> None:
    """The packets the injector mutates start well-formed: the stack drops none of them as
    malformed, so the drops it counts under attack are the mutations'."""
    dst4 = socket.inet_pton(socket.AF_INET, "10.232.0.1")
    dst6 = socket.inet_pton(socket.AF_INET6, "fd00:232::1")
    hostile = Hostile(random.Random(5), dst4, dst6, 7007)
    stack = Stack(StackConfig(seed=1))
    for index in range(400):
        stack.receive_packet(hostile.valid(index % 3 == 0), float(index))
    drops = {k: v for k, v in stack.counters.items() if k.startswith("drop.") and v}
    # Port-zero destinations are drawn at random and are the one well-formed drop.
    assert set(drops) <= {"drop.port-zero"}, drops
    assert stack.counters["packets.in"] == 400


def test_hostile_mix_is_dropped_by_many_reasons() -> None:
    dst4 = socket.inet_pton(socket.AF_INET, "10.232.0.1")
    dst6 = socket.inet_pton(socket.AF_INET6, "fd00:232::1")
    hostile = Hostile(random.Random(7), dst4, dst6, 7007)
    stack = Stack(StackConfig(seed=1))
    for index in range(3000):
        stack.receive_packet(hostile.next_stateless(), index / 1000)
    reasons = {k for k, v in stack.counters.items() if k.startswith("drop.") and v}
    assert len(reasons) >= 12, reasons
    assert len(hostile.kinds) >= 10, hostile.kinds


def test_fit_slope_and_block_verdicts() -> None:
    assert fit_slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    assert fit_slope([(0.0, 7.0)]) == 0.0
    block = Block("example")
    block.add("thrown", "3 packets")
    block.check("held", True)
    assert block.passed and "[PASS] held" in block.render()
    block.check("lost nothing", False, "1 lost")
    assert not block.passed and "[FAIL] lost nothing: 1 lost" in block.render()


def test_rss_series_helpers() -> None:
    rising = [(float(t), 1000 + 100 * t) for t in range(30)]
    flat = [(float(t), 1000 + min(100 * t, 1500)) for t in range(30)]
    assert late_growth(rising) == 1000  # samples 19..29
    assert late_growth(flat) == 0
    assert late_growth([(0.0, 5)]) == 0
    assert tenths(rising)[0] == 1000 and tenths(rising)[-1] == 3900
    assert len(tenths(rising)) == 11 and tenths([]) == []
