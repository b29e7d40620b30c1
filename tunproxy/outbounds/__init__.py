"""Outbounds: where flows go (DIRECT, SOCKS5, QUIC), behind one interface.

The package imports only the interface; each outbound's module loads when a config uses
it (``app.build_outbounds``), so a DIRECT-only process never holds the SOCKS5 codec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunproxy.outbounds.base import DatagramReceiver, DatagramSession, Outbound, Target

if TYPE_CHECKING:
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

_LAZY = {
    "DirectOutbound": "tunproxy.outbounds.direct",
    "Socks5Outbound": "tunproxy.outbounds.socks5",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
