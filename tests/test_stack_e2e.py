"""The stack against the real Linux TCP stack, through a TUN, under loss.

Two ways to hurt the path, both directions each:
- tunproxy's own fault injector at the TUN boundary (``debug-faults``: seeded
  drop, duplicate, reorder, delay), and
- nftables in the client namespace dropping a random 2% of what crosses the TUN
  (``numgen random``; this kernel has no netem).

Every transfer is checked by sha256 at the other end.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e_peer import payload_chunks
from tests.netns import SERVER4, SERVER6, Netns, topology
from tests.test_relay_e2e import (
    BULK,
    Lab,
    config,
    download,
    echo_after_half_close,
    read_to_eof,
    upload,
)

pytestmark = pytest.mark.netns

FAULTS = """\
debug-faults:
  seed: 7
  drop: 0.02
  duplicate: 0.01
  reorder: 0.01
  delay: 0.002
"""


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


def _nft_random_loss(ns: Netns, ifname: str, one_in: int) -> None:
    """Drop one packet in ``one_in`` at random, each way across ``ifname``."""
    ruleset = f"""
table inet tunproxy_test_loss {{
    chain from_tun {{
        type filter hook prerouting priority -300; policy accept;
        iifname "{ifname}" numgen random mod {one_in} == 0 counter drop
    }}
    chain to_tun {{
        type filter hook postrouting priority 300; policy accept;
        oifname "{ifname}" numgen random mod {one_in} == 0 counter drop
    }}
}}
"""
    ns.run("nft", "-f", "-", input=ruleset)


def _nft_drops(ns: Netns) -> list[int]:
    out = ns.run("nft", "list", "table", "inet", "tunproxy_test_loss").stdout
    return [int(part.split()[0]) for part in out.split("counter packets ")[1:]]


# The full size on the main path; the variants move less so CI stays quick (the
# same code paths are crossed thousands of times either way).
@pytest.mark.parametrize(("host", "offload", "size"), [
    (SERVER4, True, BULK), (SERVER4, False, BULK // 4), (SERVER6, True, BULK // 2),
], ids=["ipv4-offload", "ipv4-plain", "ipv6-offload"])
def test_fault_injector_loss_reorder_duplication(
    lab: Lab, host: str, offload: bool, size: int
) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT", offload=offload, faults=FAULTS))
    upload(lab, host, size)
    download(lab, host, size)
    tp.stop()
    assert "fault injection on" in tp.log


@pytest.mark.parametrize(("offload", "size"), [(True, BULK // 2), (False, BULK // 4)],
                         ids=["offload", "plain"])
def test_kernel_side_random_loss(lab: Lab, offload: bool, size: int) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT", offload=offload))
    _nft_random_loss(lab.topo.client, "tp0", one_in=50)
    upload(lab, SERVER4, size)
    download(lab, SERVER4, size)
    drops = _nft_drops(lab.topo.client)
    assert all(d > 0 for d in drops), f"the loss rules dropped nothing: {drops}"
    tp.stop()


def test_half_close_both_orders_under_loss(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", faults=FAULTS))
    # Client first: it FINs while the echo is still flowing back.
    echo_after_half_close(lab, b"".join(bytes([i % 251]) * 1000 for i in range(2000)))
    # Server first: it FINs after its data while the client keeps sending.
    with lab.connect() as sock:
        sock.sendall(b"SOURCE 2000000 9\n")
        got = 0
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
        sock.sendall(b"after the server's FIN" * 1000)
    assert got == 2000000


def test_app_that_sends_without_reading_under_loss(lab: Lab) -> None:
    # The client writes 2 MB to the echo server before it reads anything: its receive
    # buffer (128 KiB until it reads) fills and its window shrinks to a few hundred bytes
    # while it keeps sending, and the path (tunproxy, the server's autotuned socket
    # buffers) holds the rest. Our ACKs then have to stay inside that tiny window and
    # our retransmissions must not overrun it: Linux drops such segments whole, ACK
    # field included, and the connection would stall with everything delivered.
    lab.topo.start_tunproxy(config("DIRECT", faults=FAULTS))
    data = b"".join(payload_chunks(5, 2_000_000))
    with lab.connect() as sock:
        sock.sendall(b"ECHO\n" + data)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == data
