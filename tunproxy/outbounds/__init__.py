"""Outbounds: where flows go (DIRECT, SOCKS5, QUIC), behind one interface."""

from tunproxy.outbounds.base import DatagramReceiver, DatagramSession, Outbound, Target
from tunproxy.outbounds.direct import DirectOutbound
from tunproxy.outbounds.socks5 import Socks5Outbound

__all__ = [
    "DatagramReceiver",
    "DatagramSession",
    "DirectOutbound",
    "Outbound",
    "Socks5Outbound",
    "Target",
]
