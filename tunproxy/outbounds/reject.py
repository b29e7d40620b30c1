"""REJECT as an outbound: for callers that need an Outbound where the rules said no
(e.g. a DNS resolver flow the rules reject). Flows from the TUN are refused by
the relay before any outbound is involved."""

from __future__ import annotations

import asyncio

from tunproxy.errors import ConnectRefused
from tunproxy.outbounds.base import (
    DatagramReceiver,
    DatagramSession,
    Outbound,
    StreamProtocol,
    Target,
)

__all__ = ["RejectOutbound"]


class RejectOutbound(Outbound):
    name = "REJECT"

    async def open_stream(
        self, target: Target, protocol: StreamProtocol, *, timeout: float
    ) -> asyncio.Transport:
        raise ConnectRefused(f"{target}: rejected by the rules")

    async def open_datagram(
        self, target: Target, receiver: DatagramReceiver, *, timeout: float
    ) -> DatagramSession:
        raise ConnectRefused(f"{target}: rejected by the rules")
