"""DSCP rules in the running proxy: a client socket marked with IP_TOS / IPV6_TCLASS
(DSCP 46, Expedited Forwarding) matches ``DSCP,46,REJECT``; an unmarked one goes DIRECT.
The mark is read from the SYN (TCP) or the first datagram (UDP) in the TUN."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import SERVER4, SERVER6, topology
from tests.test_relay_e2e import TCP_PORT, UDP_PORT, Lab, config

pytestmark = pytest.mark.netns

EF = 46
RULES = f"  - DSCP,{EF},REJECT\n"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo)


def _tcp_echo(lab: Lab, host: str, tos: int) -> bool:
    """True when a flow to the echo server gets through, False when it is reset."""
    v6 = ":" in host
    sock = lab.topo.client.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    with sock:
        if v6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, tos)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
        sock.settimeout(20)
        try:
            sock.connect((host, TCP_PORT))
        except ConnectionRefusedError:
            return False
        sock.sendall(b"ECHO\nping")
        got = b""
        while len(got) < 4 and (chunk := sock.recv(4 - len(got))):
            got += chunk
        return got == b"ping"


@pytest.mark.parametrize("host", [SERVER4, SERVER6], ids=["v4", "v6"])
def test_dscp_rule_rejects_marked_tcp_flows_only(lab: Lab, host: str) -> None:
    tp = lab.topo.start_tunproxy(config("DIRECT", extra_rules=RULES))
    assert not _tcp_echo(lab, host, EF << 2)
    tp.wait_for_log(rf"end #\d+ tcp .*:{TCP_PORT} via REJECT")
    assert _tcp_echo(lab, host, 0)
    # The ECN bits are not part of the DSCP: ECT(0) alone is still unmarked.
    assert _tcp_echo(lab, host, 2)
    assert not _tcp_echo(lab, host, EF << 2 | 1)


def _udp_echo(sock: socket.socket, tries: int = 6) -> bytes:
    """Send until the echo comes back (UDP: a datagram may be lost under load)."""
    for _ in range(tries):
        sock.send(b"hello")
        try:
            return sock.recv(100)
        except TimeoutError:
            continue
    raise AssertionError("no echo from the UDP server")


def test_dscp_rule_on_the_first_udp_datagram(lab: Lab) -> None:
    lab.topo.start_tunproxy(config("DIRECT", extra_rules=RULES))
    plain = lab.topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    marked = lab.topo.client.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with plain, marked:
        marked.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, EF << 2)
        for sock in (plain, marked):
            sock.settimeout(5)
            sock.connect((SERVER4, UDP_PORT))
        assert _udp_echo(plain) == b"hello"
        marked.settimeout(20)
        marked.send(b"hello")
        # REJECT answers a UDP flow with ICMP port unreachable: a connected socket sees it.
        with pytest.raises(ConnectionRefusedError):
            marked.recv(100)
