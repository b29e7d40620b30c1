"""UDP sessions: one per 5-tuple the local application sent to.

A session opens on the first datagram (``FlowOpened`` then ``DatagramReceived``),
lives while datagrams flow either way, and closes after ``udp_idle_timeout``
seconds without any (``FlowClosed(reason="idle")``), or when the application
refuses or aborts it. Until the application accepts (or refuses) the session,
the start of its first packet is kept so that a refusal can quote it in an
ICMP destination-unreachable (RFC 792, RFC 4443 3.1).

The ``Stack`` owns the demultiplexing dict, the timer heap and the packet
output; this module holds the per-session state (kept small: ``__slots__``).
"""

from __future__ import annotations

from stack.flow import FlowKey

__all__ = ["UdpSession"]


class UdpSession:
    __slots__ = ("armed", "dst", "dst_port", "flow", "key", "last_active", "quote", "src",
                 "src_port")  # fmt: skip

    def __init__(self, flow: int, key: FlowKey, now: float, quote: bytes | None) -> None:
        self.flow = flow
        self.key = key
        # The application's side (src) and the destination it wanted (dst). Replies
        # go from dst to src: the original destination becomes the source.
        self.src = key.src
        self.src_port = key.src_port
        self.dst = key.dst
        self.dst_port = key.dst_port
        self.last_active = now
        self.armed: float | None = None  # deadline of this session's live timer-heap entry
        self.quote = quote  # leading bytes of the first packet, for an ICMP refusal

    def expires_at(self, idle_timeout: float) -> float:
        return self.last_active + idle_timeout

    @property
    def tuple_key(self) -> tuple[bytes, int, bytes, int]:
        return (self.src, self.src_port, self.dst, self.dst_port)
