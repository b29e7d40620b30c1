"""The one small interface every outbound implements.

An outbound carries flows somewhere: ``open_stream`` for a TCP flow,
``open_datagram`` for a UDP session, ``aclose`` at shutdown. Like httpx's
transport API, this is all the relay knows about DIRECT, SOCKS5 or QUIC.
"""

from __future__ import annotations

import abc
import asyncio
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = [
    "DatagramReceiver",
    "DatagramSession",
    "Outbound",
    "StreamProtocol",
    "StreamReceiver",
    "Target",
    "note_member",
    "trail",
]


# -- the groups a flow passed through (mihomo's chains) -----------------------------------

_TRAIL: ContextVar[list[str] | None] = ContextVar("tunproxy_group_trail", default=None)


def trail() -> list[str]:
    """Start noting, for what this task opens next, the member each group it passes
    through connected by: the list fills innermost first as the opens return (a flow
    through group ``Proxy`` and its member ``hk-1`` leaves ``["hk-1"]``), which with the
    outbound's own name is mihomo's ``chains``."""
    noted: list[str] = []
    _TRAIL.set(noted)
    return noted


def note_member(member: str) -> None:
    noted = _TRAIL.get()
    if noted is not None:
        noted.append(member)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a flow goes. ``address`` is an IP literal, or None when only the
    domain is known (a fake-ip flow: the outbound must not resolve it locally
    unless it is DIRECT)."""

    port: int
    address: str | None = None
    domain: str | None = None

    def __post_init__(self) -> None:
        if self.address is None and self.domain is None:
            raise ValueError("a Target needs an address or a domain")

    @property
    def host(self) -> str:
        """The name to hand a proxy: the domain when known (remote resolution), else the IP."""
        return self.domain if self.domain is not None else str(self.address)

    def __str__(self) -> str:
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


class DatagramReceiver(abc.ABC):
    """What a datagram session delivers to (implemented by the relay)."""

    @abc.abstractmethod
    def datagram_received(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def session_lost(self, exc: Exception | None) -> None:
        """The session ended on the outbound's side (proxy gone, error)."""


class DatagramSession(abc.ABC):
    """One local UDP 5-tuple's session through an outbound, to one ``Target``."""

    @abc.abstractmethod
    def send(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class StreamReceiver(asyncio.BufferedProtocol):
    """A protocol for ``open_stream`` that reads into a buffer it provides
    (``get_buffer``/``buffer_updated``), so the read size is its choice, not the event
    loop's; bytes an outbound read before handing over (the rest of a proxy's reply)
    arrive through ``data_received``."""

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError


# What open_stream connects: a plain Protocol, or a StreamReceiver.
StreamProtocol = asyncio.Protocol | StreamReceiver


class Outbound(abc.ABC):
    name: str

    @abc.abstractmethod
    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        """Connect to ``target``; return a transport whose protocol is ``protocol``.

        ``protocol.connection_made`` is called with the returned transport once
        the stream is ready for payload (after any proxy handshake); bytes that
        arrived with the handshake reply are delivered to it. Raises
        ``tunproxy.errors.OutboundError`` subclasses on failure.
        """

    @abc.abstractmethod
    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        """Open a UDP session to ``target``; replies go to ``receiver``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release shared resources (connection pools, QUIC connections)."""
