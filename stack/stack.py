"""The stack: IP packets in, IP packets + events + one timer out. Sans-I/O.

This file fixes the public surface that ``tunproxy`` drives; the bodies are
filled in by the stack work (issue 3). Nothing here reads a clock or a socket:
every call that needs the time takes ``now`` (seconds, monotonic, float).

Driving loop (see ``tunproxy/driver.py``)::

    for data in packets_read_from_tun:
        stack.receive_packet(data, now)
    while (event := stack.next_event()) is not None:
        handle(event)            # may call stack.accept/send/... which queue packets
    write_all(stack.packets_to_send())
    rearm(stack.get_timer())     # at that time: stack.handle_timer(now), then as above
"""

from __future__ import annotations

from dataclasses import dataclass

from stack.events import Event
from stack.flow import FlowKey

__all__ = ["Refusal", "Stack", "StackConfig"]


class Refusal:
    """How to refuse a flow (``Stack.refuse``)."""

    RESET = "reset"  # TCP RST; for UDP the same as UNREACHABLE
    UNREACHABLE = "unreachable"  # ICMP/ICMPv6 destination unreachable (port for UDP, host/admin for TCP)
    DROP = "drop"  # forget the flow silently; the application times out


@dataclass(slots=True)
class StackConfig:
    mtu: int = 1500
    # Packets in and out carry a 10-byte virtio-net header (TUN opened with IFF_VNET_HDR).
    vnet_hdr: bool = False
    # Emit TCP data as GSO super-packets (needs vnet_hdr and TSO offloads on the TUN).
    gso: bool = False
    # Largest super-packet emitted with gso (IP header included).
    gso_max_size: int = 65535
    # Answer ICMP/ICMPv6 echo requests to any address locally.
    answer_ping: bool = True
    max_flows: int = 65536
    max_half_open: int = 4096  # TCP flows in SYN_RECEIVED / awaiting accept
    reassembly_limit: int = 4 * 1024 * 1024  # bytes held for IPv4 fragments, all datagrams together
    reassembly_timeout: float = 30.0
    udp_idle_timeout: float = 60.0
    tcp_send_buffer: int = 512 * 1024  # per flow, bytes queued towards the application
    tcp_receive_window: int = 1024 * 1024  # per flow, bytes the application may send ahead
    tcp_time_wait: float = 2.0  # a short TIME_WAIT (we are never the server that is reused)
    accept_timeout: float = 30.0  # a SYN not accepted/refused by then is refused with RST


class Stack:
    """A catch-all TCP/IP endpoint for every address that enters the TUN."""

    def __init__(self, config: StackConfig | None = None) -> None:
        raise NotImplementedError

    # -- input ---------------------------------------------------------------
    def receive_packet(self, data: bytes | bytearray | memoryview, now: float) -> None:
        """One packet read from the TUN (with its virtio-net header when ``vnet_hdr``).

        Never raises for bad input: a malformed packet is dropped and counted
        in ``counters`` by reason.
        """
        raise NotImplementedError

    def handle_timer(self, now: float) -> None:
        raise NotImplementedError

    # -- output --------------------------------------------------------------
    def packets_to_send(self) -> list[bytes]:
        """Packets to write to the TUN (each with a virtio-net header when ``vnet_hdr``)."""
        raise NotImplementedError

    def next_event(self) -> Event | None:
        raise NotImplementedError

    def get_timer(self) -> float | None:
        """The earliest time ``handle_timer`` must be called, or None."""
        raise NotImplementedError

    # -- commands ------------------------------------------------------------
    def accept(self, flow: int, now: float) -> None:
        """TCP: send the SYN-ACK. UDP: no-op (sessions are open once seen)."""
        raise NotImplementedError

    def refuse(self, flow: int, how: str, now: float) -> None:
        """Refuse a pending flow (``Refusal.*``) and forget it."""
        raise NotImplementedError

    def send(self, flow: int, data: bytes, now: float) -> None:
        """Queue TCP payload towards the application (never refused; see send_buffer_free)."""
        raise NotImplementedError

    def send_buffer_free(self, flow: int) -> int:
        """Bytes that can still be queued before the flow's send buffer is full (0 when full)."""
        raise NotImplementedError

    def shutdown_write(self, flow: int, now: float) -> None:
        """Send FIN after the queued data (half-close towards the application)."""
        raise NotImplementedError

    def abort(self, flow: int, now: float) -> None:
        """TCP: send RST and forget the flow. UDP: close the session."""
        raise NotImplementedError

    def pause_receiving(self, flow: int) -> None:
        """Stop delivering DataReceived for this flow; buffered data shrinks the
        advertised window, so the local sender slows down (backpressure)."""
        raise NotImplementedError

    def resume_receiving(self, flow: int, now: float) -> None:
        raise NotImplementedError

    def send_datagram(self, flow: int, data: bytes, now: float) -> None:
        """UDP reply on session ``flow``: source is the session's original destination."""
        raise NotImplementedError

    def flow_key(self, flow: int) -> FlowKey | None:
        raise NotImplementedError

    @property
    def counters(self) -> dict[str, int]:
        """Packets in/out, drops by reason (``drop.<reason>``), retransmissions, flows."""
        raise NotImplementedError
