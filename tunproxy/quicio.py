"""The QUIC packet I/O path: how QUIC packets leave for, and how big they are on, the UDP socket.

``h3link`` owns the HTTP/3 connection; this module owns what the profile of a bulk transfer
showed to matter, and nothing else:

* ``flush(protocol)`` replaces qh3's ``QuicConnectionProtocol.transmit``. qh3's version
  calls ``datagrams_to_send``, which parses every outgoing packet's header again to log it
  (``_log_packets``) even when no QUIC logger is set: ~10 % of the client's CPU in a bulk
  upload. ``flush`` polls the connection's core directly when nothing logs, and hands the
  datagrams of one flush to the transport's ``sendto_many`` at once (one ``sendmsg`` with
  ``UDP_SEGMENT`` per run of equal-sized packets: the transport does GSO, and GRO plus
  ``recvmmsg`` on receive). Flushes are already one per event-loop turn (``_transmit_soon``).
* Datagram sizes. Per-packet work (encryption, framing, system calls) dominates, so a
  bigger packet is the strongest lever: a client sending 8,952-byte packets on a 9000-byte
  MTU path used a third of the CPU per GB of 1,200-byte ones. qh3 sends what
  ``max_datagram_size`` allows from the handshake on (the client probes up to ~1,452 on
  its own; the server does not probe), so the size is configured where the path is known
  (``max-datagram-size``, ``--max-datagram-size``); ``datagram_size(mtu, ipv6)`` is the
  largest that one link of that MTU carries. A qh3 client announces a fixed
  max_udp_payload_size of 1,472 (``h3link._ClientQuic`` announces ``max_datagram_size``
  instead when larger); ``sendable_size`` applies what the peer announced when ``h3link``
  asks whether an HTTP datagram fits.

``datagram_size`` is pure; ``flush`` and ``sendable_size`` read qh3's connection state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "MAX_DATAGRAM_SIZE",
    "MIN_DATAGRAM_SIZE",
    "datagram_size",
    "flush",
    "sendable_size",
]

# RFC 9000 section 14: every QUIC path carries 1,200-byte UDP payloads.
MIN_DATAGRAM_SIZE = 1200
# The largest UDP payload (RFC 9000 section 18.2, max_udp_payload_size's limit).
MAX_DATAGRAM_SIZE = 65527

_IPV4_UDP_HEADERS = 20 + 8
_IPV6_UDP_HEADERS = 40 + 8


def datagram_size(mtu: int, ipv6: bool, cap: int = MAX_DATAGRAM_SIZE) -> int:
    """The largest UDP payload (a QUIC packet) that one IP packet of ``mtu`` bytes carries,
    within [1200, cap]: never below what every QUIC path must carry."""
    payload = mtu - (_IPV6_UDP_HEADERS if ipv6 else _IPV4_UDP_HEADERS)
    return max(MIN_DATAGRAM_SIZE, min(payload, cap, MAX_DATAGRAM_SIZE))


def sendable_size(quic: Any, own: int) -> int:
    """The largest packet ``quic`` sends: its own limit, within what the peer announced it
    receives (max_udp_payload_size, RFC 9000 section 18.2) once the handshake told us."""
    parameters = quic._applied_transport_parameters
    announced = getattr(parameters, "max_udp_payload_size", None)
    return min(own, announced) if announced else own


def flush(protocol: Any) -> None:
    """qh3's ``QuicConnectionProtocol.transmit``, without per-packet logging work: send
    what the connection has due, in one batch per destination, and re-arm its timer."""
    protocol._transmit_task = None
    quic = protocol._quic
    now = protocol._loop_time()
    core = quic._core
    sendto_many = protocol._sendto_many
    if core is None or quic._quic_logger is not None or sendto_many is None:
        # Nothing to poll yet, or someone logs packets: the library's own way.
        batch = quic.datagrams_to_send(now=now)
        if sendto_many is not None:
            _send_batches(sendto_many, batch)
        else:
            for data, addr in batch:
                protocol._transport.sendto(data, addr)
    else:
        _send_batches(sendto_many, _polled(core, now))
    timer_at = quic.get_timer()
    if protocol._timer is not None and protocol._timer_at != timer_at:
        protocol._timer.cancel()
        protocol._timer = None
    if protocol._timer is None and timer_at is not None:
        protocol._timer = protocol._loop.call_at(timer_at, protocol._handle_timer)
    protocol._timer_at = timer_at


def _polled(core: Any, now: float) -> Iterator[tuple[bytes, Any]]:
    """The datagrams due from qh3's core, as ``datagrams_to_send`` returns them."""
    poll = core.poll_transmit
    try:
        while (transmit := poll(now)) is not None:
            yield transmit[0], transmit[1]
    except RuntimeError as exc:  # what qh3's _call_core turns into a connection error
        from qh3.quic.connection import QuicConnectionError
        from qh3.quic.packet import QuicErrorCode

        raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc


def _send_batches(sendto_many: Any, batch: Iterable[tuple[bytes, Any]]) -> None:
    """One ``sendto_many`` per run of datagrams to the same address."""
    datagrams: list[bytes] = []
    send_addr: Any = None
    for data, addr in batch:
        if datagrams and addr != send_addr:
            sendto_many(datagrams, send_addr)
            datagrams = []
        datagrams.append(data)
        send_addr = addr
    if datagrams:
        sendto_many(datagrams, send_addr)
