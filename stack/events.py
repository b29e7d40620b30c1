"""Events the stack hands to the application through ``Stack.next_event()``.

Small frozen dataclasses, one per thing that happened. A flow is named by an
integer ``flow`` handle that stays valid until its final event (``FlowClosed``
or ``FlowReset`` for TCP, ``FlowClosed`` for UDP); every command that takes a
``flow`` ignores handles that are no longer valid.
"""

from __future__ import annotations

from dataclasses import dataclass

from stack.flow import FlowKey

__all__ = [
    "DataReceived",
    "DatagramReceived",
    "EchoRequest",
    "Event",
    "FlowClosed",
    "FlowHalfClosed",
    "FlowOpened",
    "FlowReset",
    "FlowWritable",
]


@dataclass(frozen=True, slots=True)
class FlowOpened:
    """A new flow arrived: a TCP SYN, or the first datagram of a UDP 5-tuple.

    TCP: the handshake is held open (no SYN-ACK yet) until the application
    calls ``Stack.accept(flow)`` or ``Stack.refuse(flow, ...)``.
    UDP: the first datagram follows as a ``DatagramReceived``; the session can
    be refused with ``Stack.refuse`` (ICMP port unreachable) or closed.

    ``tos`` is the flow's first packet's IPv4 TOS / IPv6 Traffic Class byte (the SYN,
    or the first datagram): DSCP in its upper six bits, ECN in the lower two (RFC 2474,
    RFC 3168).
    """

    flow: int
    key: FlowKey
    tos: int = 0

    @property
    def dscp(self) -> int:
        """The Differentiated Services codepoint, 0-63 (RFC 2474 3)."""
        return self.tos >> 2


@dataclass(frozen=True, slots=True)
class DataReceived:
    """In-order TCP payload from the local application."""

    flow: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    """A UDP datagram from the local application, on session ``flow``."""

    flow: int
    data: bytes


@dataclass(frozen=True, slots=True)
class FlowHalfClosed:
    """The local application sent FIN: it will send nothing more (it may still receive)."""

    flow: int


@dataclass(frozen=True, slots=True)
class FlowWritable:
    """The flow's send buffer drained below its low-water mark after having been full.

    The relay pauses reading its upstream when ``Stack.send_buffer_free(flow)``
    reaches zero and resumes on this event.
    """

    flow: int


@dataclass(frozen=True, slots=True)
class FlowClosed:
    """The flow ended in order: both FINs exchanged and acknowledged (TCP), or the
    UDP session expired or was closed. ``reason`` is a short machine-readable word
    such as ``"closed"``, ``"idle"``, ``"time-wait"``."""

    flow: int
    reason: str


@dataclass(frozen=True, slots=True)
class FlowReset:
    """The flow ended abruptly: RST from the local application, retransmission
    give-up, keepalive/handshake timeout, or a limit. ``reason`` says which
    (``"reset-by-peer"``, ``"retransmit-timeout"``, ``"handshake-timeout"``, ...)."""

    flow: int
    reason: str


@dataclass(frozen=True, slots=True)
class EchoRequest:
    """An ICMP/ICMPv6 echo request to a unicast address (``StackConfig.echo_events``).

    ``src`` is the application's address, ``dst`` the address it pinged (packed bytes).
    The application answers with ``Stack.send_echo_reply`` or ``Stack.refuse_echo``,
    or not at all (the ping is lost). ``quote`` is the start of the request packet, for
    an ICMP error about it.
    """

    src: bytes
    dst: bytes
    ident: int
    seq: int
    data: bytes
    quote: bytes

    @property
    def version(self) -> int:
        return 4 if len(self.dst) == 4 else 6


Event = (
    FlowOpened
    | DataReceived
    | DatagramReceived
    | FlowHalfClosed
    | FlowWritable
    | FlowClosed
    | FlowReset
    | EchoRequest
)
