"""Rules in the running proxy: hot reload on SIGHUP, and rules on the process that opened a flow."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import SERVER4, topology
from tests.test_relay_e2e import TCP_PORT, Lab, config

pytestmark = pytest.mark.netns

HTTP_PORT = 8080


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


def _echo(lab: Lab) -> bool:
    """True when a new flow to the echo server gets through."""
    try:
        with lab.connect(timeout=30) as sock:
            sock.sendall(b"ECHO\nping")
            return sock.recv(4) == b"ping"
    except ConnectionRefusedError:
        return False


def test_sighup_reloads_rules_for_new_flows_only(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT"))
    assert _echo(lab)
    existing = lab.connect()
    existing.sendall(b"ECHO\nbefore")
    assert existing.recv(6) == b"before"

    tp.config_path.write_text(config("DIRECT", extra_rules=f"  - DST-PORT,{TCP_PORT},REJECT\n"))
    mark = tp.line_count()
    tp.send_signal(signal.SIGHUP)
    tp.wait_for_log(r"reloaded .*: 2 rules", start=mark)
    assert not _echo(lab)  # new flows: the new rules
    existing.sendall(b"after")  # the flow opened before keeps its verdict
    assert existing.recv(5) == b"after"
    existing.close()


def test_bad_reload_keeps_the_old_rules(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT"))
    tp.config_path.write_text("rules:\n  - MATCH,DIRECT\n  - NOT-A-RULE,x,DIRECT\n")
    mark = tp.line_count()
    tp.send_signal(signal.SIGHUP)
    line = tp.wait_for_log(r"reload failed", start=mark)
    assert re.search(rf"{re.escape(str(tp.config_path))}:3: .*NOT-A-RULE", line), line
    assert _echo(lab)
    assert tp.proc.poll() is None


@pytest.mark.parametrize("attribution", ["true", "false"])
def test_process_name_rule_matches_the_app(lab: Lab, attribution: str) -> None:
    """With every flow attributed at open (log.attribution, the default) and without."""
    topo = lab.topo
    topo.server.spawn(sys.executable, "-m", "http.server", "--bind", SERVER4, str(HTTP_PORT),
                      cwd=str(topo.workdir))
    topo.server.wait_tcp_listening(HTTP_PORT)
    tp = topo.start_tunproxy(config("DIRECT", extra_rules="  - PROCESS-NAME,curl,REJECT\n",
                                    relay_extra=f"log:\n  attribution: {attribution}\n"))
    url = f"http://{SERVER4}:{HTTP_PORT}/"
    result = topo.client.run("curl", "-sS", "-o", "/dev/null", "--max-time", "5", url,
                             check=False)
    assert result.returncode == 7, result.stderr  # curl: could not connect (refused)
    line = tp.wait_for_log(rf"end #\d+ tcp curl\(\d+\) .*:{HTTP_PORT} via REJECT")
    assert "rejected" in line
    # Another program to the same place is not curl, so it goes through.
    with lab.connect(SERVER4, HTTP_PORT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.0 200")
