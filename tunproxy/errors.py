"""tunproxy's exceptions.

    TunproxyError                 anything tunproxy reports to the user as one sentence
    ├── ConfigError               the rules file is wrong: file, line, problem
    ├── SetupError                the host cannot be set up (no root, no /dev/net/tun,
    │                             name taken, table/mark clash, ...)
    └── OutboundError             an upstream could not carry a flow
        ├── ConnectRefused        the destination (or the proxy's CONNECT) refused: RST
        ├── Unreachable           no route / host unreachable: ICMP unreachable or RST
        ├── ConnectTimeout        no answer in time: RST
        └── ProxyError            the proxy itself failed or broke its protocol

Packet-level problems never raise: the stack drops and counts them.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectRefused",
    "ConnectTimeout",
    "OutboundError",
    "ProxyError",
    "SetupError",
    "TunproxyError",
    "Unreachable",
]


class TunproxyError(Exception):
    """Base of every error tunproxy reports as one sentence."""


class ConfigError(TunproxyError):
    def __init__(self, message: str, file: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.file is not None and self.line is not None:
            return f"{self.file}:{self.line}: {self.message}"
        if self.file is not None:
            return f"{self.file}: {self.message}"
        return self.message


class SetupError(TunproxyError):
    pass


class OutboundError(TunproxyError):
    """``reason`` is the short word recorded as the flow's end reason."""

    reason = "upstream-failed"


class ConnectRefused(OutboundError):
    reason = "refused"


class Unreachable(OutboundError):
    reason = "unreachable"


class ConnectTimeout(OutboundError):
    reason = "connect-timeout"


class ProxyError(OutboundError):
    reason = "proxy-error"
