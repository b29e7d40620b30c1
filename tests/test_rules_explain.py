"""``tunproxy explain`` on the fixture config (tests/data/rules/config.yaml)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tunproxy import explain

DATA = Path(__file__).parent / "data" / "rules"
CONFIG = str(DATA / "config.yaml")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    explain.add_arguments(parser)
    rc = explain.run(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def line_of(text: str, file: Path = DATA / "config.yaml") -> int:
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip() == f"- {text}":
            return n
    raise AssertionError(text)


def test_domain_rule(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(
        ["--rules", CONFIG, "tcp", "93.184.216.34:443", "--domain", "example.com"], capsys
    )
    assert rc == 0
    assert "verdict: proxy\n" in out
    n = line_of("DOMAIN-SUFFIX,example.com,proxy")
    assert f"rule:    {CONFIG}:{n}: DOMAIN-SUFFIX,example.com,proxy\n" in out


def test_rule_set_entry(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--rules", CONFIG, "tcp", "x.doubleclick.net:443"], capsys)
    assert rc == 0
    assert "verdict: REJECT\n" in out
    assert f"entry:   +.doubleclick.net ({DATA / 'reject.yaml'}:3)\n" in out


def test_process_and_uid(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--rules", CONFIG, "tcp", "8.8.8.8:443", "--process", "qbittorrent"], capsys)
    assert rc == 0
    assert "verdict: DIRECT\n" in out
    assert f"entry:   PROCESS-NAME,qbittorrent ({DATA / 'apps.list'}:3)\n" in out
    rc, out, _ = run(
        ["--rules", CONFIG, "udp", "[2001:db8::1]:53", "--uid", "0", "--src", "[fd00::2]:5353"],
        capsys,
    )
    assert f"{CONFIG}:{line_of('UID,0,DIRECT')}: UID,0,DIRECT" in out
    assert "udp [fd00::2]:5353 -> [2001:db8::1]:53" in out


def test_default_and_notes(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--rules", CONFIG, "tcp", "8.8.8.8:443"], capsys)
    assert rc == 0
    assert "verdict: proxy\n" in out
    assert "MATCH,proxy" in out
    assert "process rules were reached" in out
    rc, out, _ = run(["--rules", CONFIG, "tcp", "a.cn:443", "--resolved", "1.0.1.9"], capsys)
    assert "verdict: DIRECT\n" in out
    assert f"entry:   1.0.1.0/24 ({DATA / 'cn.txt'}:2)\n" in out
    assert "resolved (to 1.0.1.9)" in out


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ("bad_config.yaml", f"{DATA / 'bad_config.yaml'}:7: unknown target 'nowhere'"),
        (
            "bad_set_config.yaml",
            f"{DATA / 'no_usable_entry.yaml'}:3: rule set 'cidrs': no usable ipcidr entry "
            "(2 bad; first: 10.0.0.0/33: '10.0.0.0/33' is not an IP CIDR)",
        ),
    ],
)
def test_bad_file_is_one_line(config: str, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["--rules", str(DATA / config), "tcp", "1.1.1.1:443"], capsys)
    assert rc == 2
    assert out == ""
    assert err.startswith(f"tunproxy: {where}")
    assert err.count("\n") == 1


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(["--rules", CONFIG, "tcp", "a.com:443", "--domain", "b.com"], capsys)
    assert rc == 2
    assert "differ" in err
    parser = argparse.ArgumentParser()
    explain.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["tcp", "1.2.3.4"])
    with pytest.raises(SystemExit):
        parser.parse_args(["icmp", "1.2.3.4:1"])
    rc, _, err = run(["tcp", "1.2.3.4:1"], capsys)  # no --rules
    assert rc == 2
