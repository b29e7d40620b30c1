"""The bench's handling of h2o dying under the QUIC h2o column (bench/services.py): h2o
2.3.0-DEV aborts on an assertion when a CONNECT target closes under a pending write (the
end of an iperf3 upload); the harness must name that, not blame tunproxy, and restart it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from bench.services import Services

ASSERTION = ("h2o: /tmp/build/lib/http3/server.c:1266: proceed_request_streaming: "
             "Assertion `stream->req_body != NULL' failed.")


def _services(workdir: Path) -> Services:
    return Services(cast(Any, SimpleNamespace(server=None)), workdir)


def test_h2o_gone_names_its_assertion(tmp_path: Path) -> None:
    services = _services(tmp_path)
    (tmp_path / "h2o.log").write_text(
        "h2o server (pid:1) is ready to serve requests with 2 threads\n"
        f"{ASSERTION}\nreceived fatal signal 6\n/lib/libc.so.6(abort+0xd3)[0x7f]\n")
    services._h2o = subprocess.Popen(["sh", "-c", "exit 134"])
    services._h2o.wait(timeout=30)
    assert services.h2o_gone() == f"h2o exited (rc=134): {ASSERTION}"


def test_h2o_gone_is_none_while_it_runs_and_without_a_reason_points_at_the_log(
        tmp_path: Path) -> None:
    services = _services(tmp_path)
    assert services.h2o_gone() is None  # never started
    (tmp_path / "h2o.log").write_text("h2o server (pid:1) is ready\n")
    services._h2o = subprocess.Popen(["sleep", "60"])
    try:
        assert services.h2o_gone() is None
    finally:
        services._h2o.kill()
        services._h2o.wait(timeout=30)
    assert services.h2o_gone() == "h2o exited (rc=-9): see h2o.log"
