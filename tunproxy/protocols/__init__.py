"""Sans-I/O proxy protocol codecs: objects fed bytes that hand back bytes and events.

They import no asyncio or socket; the dialers in ``tunproxy.outbounds`` drive them.
"""

from tunproxy.protocols.socks5 import (
    Connected,
    Event,
    Failed,
    Socks5Client,
    Socks5LocalError,
    Socks5RemoteError,
    UdpDatagram,
)

__all__ = [
    "Connected",
    "Event",
    "Failed",
    "Socks5Client",
    "Socks5LocalError",
    "Socks5RemoteError",
    "UdpDatagram",
]
