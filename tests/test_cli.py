"""The command line: check, bad files with file:line, missing privileges in one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_root

REPO = Path(__file__).resolve().parent.parent


def tunproxy(
    *args: str, prefix: tuple[str, ...] = (), cwd: Path = REPO
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "tunproxy", *args], capture_output=True, text=True,
        timeout=60, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


# A real unprivileged user (nobody) that may still read the interpreter wherever it is
# installed (e.g. under /root), and has no other capability: no CAP_NET_ADMIN.
AS_NOBODY = (
    "setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
    "--inh-caps", "-all,+dac_read_search", "--ambient-caps", "+dac_read_search",
)
# Root, but with CAP_NET_ADMIN gone from the bounding set (a container without it).
AS_ROOT_WITHOUT_NET_ADMIN = ("setpriv", "--bounding-set", "-net_admin")


def test_check_accepts_the_examples() -> None:
    for name in ("direct.yaml", "socks5.yaml"):
        result = tunproxy("check", str(REPO / "examples" / name))
        assert result.returncode == 0, result.stderr
        assert ": ok:" in result.stdout


def test_check_names_a_pipelined_upstream(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("upstreams:\n  p: {type: socks5, server: 192.0.2.1:1080, pipeline: true}\n"
                    "  q: {type: socks5, server: 192.0.2.2:1080}\nrules: [MATCH,p]\n")
    result = tunproxy("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "p (socks5 192.0.2.1:1080, pipelined), q (socks5 192.0.2.2:1080)," in result.stdout


def test_minimal_file_is_enough(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("rules: [MATCH,DIRECT]\n")
    result = tunproxy("check", str(path))
    assert result.returncode == 0, result.stderr
    assert "1 rules" in result.stdout
    assert "tun tunproxy0 mtu 9000" in result.stdout


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("rules:\n  - MATCH,DIRECT\ntun:\n  mtu: 12\n", 4, "tun.mtu"),
        ("rules:\n  - MATCH,DIRECT\ntun:\n  nmae: x\n", 4, "unknown key 'nmae'"),
        ("rules:\n  - DOMAIN-SUFFIX,example.com,nowhere\n", 2, "nowhere"),
        ("rules:\n  - MATCH,DIRECT\n  - BOGUS-TYPE,x,DIRECT\n", 3, "BOGUS-TYPE"),
        ("rules:\n  - MATCH,DIRECT\nupstreams:\n  p:\n    type: socks5\n    server: nope\n",
         6, "host:port"),
        ("rules:\n  - MATCH,DIRECT\nupstreams:\n  p:\n    type: socks5\n    server: a:1\n"
         "    pipeline: yes please\n", 7, "upstreams.p.pipeline: expected true or false"),
        ("rules:\n  - MATCH,DIRECT\nupstreams:\n  q:\n    type: quic\n    server: a:1\n"
         "    pipeline: true\n", 7, "is a socks5 setting"),
        ("rules: [MATCH,DIRECT\n", 2, "YAML"),
        ("rules:\n  - MATCH,DIRECT\nbogus: 1\n", 3, "unknown section"),
        ("tun:\n  name: x\n", 1, "'rules' is required"),
    ],
)
def test_bad_file_names_file_and_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = tunproxy("check", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"tunproxy: {path}:{line}: "), result.stderr
    assert words in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_missing_file_is_one_sentence(tmp_path: Path) -> None:
    result = tunproxy("check", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert result.stderr == f"tunproxy: {tmp_path / 'absent.yaml'}: no such file\n"


def test_no_arguments_explains_itself() -> None:
    result = tunproxy()
    assert result.returncode == 2
    assert "--rules FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help() -> None:
    assert tunproxy("--version").stdout.startswith("tunproxy ")
    help_text = tunproxy("--help").stdout
    for word in ("--rules", "check", "cleanup", "explain"):
        assert word in help_text


@needs_root
@pytest.mark.parametrize("who", [AS_NOBODY, AS_ROOT_WITHOUT_NET_ADMIN], ids=["nobody", "no-cap"])
def test_without_privileges_is_one_sentence(tmp_path: Path, who: tuple[str, ...]) -> None:
    config = tmp_path / "r.yaml"
    config.write_text("rules: [MATCH,DIRECT]\n")
    config.chmod(0o644)
    tmp_path.chmod(0o755)
    result = tunproxy("--rules", str(config), prefix=who, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "needs root or CAP_NET_ADMIN" in result.stderr
    cleanup = tunproxy("cleanup", prefix=who, cwd=tmp_path)
    assert cleanup.returncode == 1
    assert "needs root or CAP_NET_ADMIN" in cleanup.stderr
