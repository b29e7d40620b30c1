"""Outbounds: where flows go (DIRECT, SOCKS5, QUIC), behind one interface."""

from tunproxy.outbounds.base import DatagramReceiver, DatagramSession, Outbound, Target

__all__ = ["DatagramReceiver", "DatagramSession", "Outbound", "Target"]
