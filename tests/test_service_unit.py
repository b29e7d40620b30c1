"""The systemd unit in examples/ is valid, and keeps the promises the README makes for it."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "examples" / "tunproxy.service"
INSTALLED = "/usr/local/sbin/tunproxy"


def _service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return dict(parser["Service"])


def test_unit_restores_the_host_and_reloads() -> None:
    service = _service_section()
    assert service["Restart"] == "on-failure"
    assert service["ExecStopPost"] == f"{INSTALLED} cleanup"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["RuntimeDirectoryPreserve"] == "yes"  # the journal outlives a crash
    assert service["ExecStart"].startswith(f"{INSTALLED} --rules ")


def test_unit_bounds_capabilities_to_what_the_readme_explains() -> None:
    caps = set(_service_section()["CapabilityBoundingSet"].split())
    assert caps == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_PTRACE"}
    readme = (REPO / "README.md").read_text()
    for cap in caps:
        assert cap in readme, f"{cap} is in the unit but the README does not say why"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # systemd-analyze verify checks that ExecStart's binary exists: point the unit at this
    # interpreter's tunproxy (or a stand-in executable) instead of /usr/local/sbin.
    command = Path(sys.executable).parent / "tunproxy"
    if not command.exists():
        command = tmp_path / "tunproxy"
        command.write_text("#!/bin/sh\nexit 0\n")
        command.chmod(0o755)
    unit = tmp_path / "tunproxy.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED, str(command)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 even for unknown keys; it reports them on stderr.
    problems = [line for line in result.stderr.splitlines() if str(unit) in line]
    assert result.returncode == 0 and not problems, result.stderr
