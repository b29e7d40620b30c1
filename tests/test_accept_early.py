"""relay.accept-early: the app's SYN is answered at once, its bytes wait while the upstream
connects, and an upstream that fails resets the app (instead of refusing its SYN)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import topology
from tests.test_relay_e2e import (
    CLOSED_PORT,
    Lab,
    config,
    echo_after_half_close,
    payload_chunks,
)
from tunproxy.config import parse_config
from tunproxy.errors import ConfigError

EARLY = "  accept-early: true\n"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


@pytest.mark.netns
@pytest.mark.parametrize("target", ["DIRECT", "socks"])
def test_bytes_and_fin_sent_before_the_upstream_connects_arrive(lab: Lab, target: str) -> None:
    tp = lab.topo.start_tunproxy(config(target, relay_extra=EARLY))
    # Small: the request and the FIN are in the stack before the upstream is connected.
    echo_after_half_close(lab, b"x" * 100)
    # Large: more than the window, so the client waits on the held bytes' closed window.
    echo_after_half_close(lab, b"".join(payload_chunks(3, 3 * 1024 * 1024)))
    tp.wait_for_log(rf"via {target}")


@pytest.mark.netns
def test_a_failed_upstream_resets_the_accepted_app(lab: Lab) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT", relay_extra=EARLY))
    start = time.monotonic()
    with lab.connect(port=CLOSED_PORT) as sock:  # accepted: the handshake completes
        sock.sendall(b"hello\n")
        with pytest.raises(ConnectionResetError):
            while sock.recv(100):
                pass
    assert time.monotonic() - start < 10.0  # the refusal, not the 30 s connect timeout
    tp.wait_for_log(r"via DIRECT: refused")


@pytest.mark.netns
def test_without_it_a_refused_destination_still_looks_refused(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", relay_extra="  accept-early: false\n"))
    with pytest.raises(ConnectionRefusedError):
        lab.connect(port=CLOSED_PORT)


def test_config_key_is_a_boolean_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    good = parse_config("relay:\n  accept-early: true\nrules:\n  - MATCH,DIRECT\n", path)
    assert good.relay.accept_early is True
    assert parse_config("rules:\n  - MATCH,DIRECT\n", path).relay.accept_early is False
    with pytest.raises(ConfigError, match=r"c\.yaml:2.*accept-early"):
        parse_config("relay:\n  accept-early: soon\nrules:\n  - MATCH,DIRECT\n", path)
