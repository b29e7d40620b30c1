"""The TCP engine: one ``TcpEndpoint`` per connection, driven by ``stack.Stack``."""

from stack.tcp.endpoint import TcpConfig, TcpEndpoint
from stack.tcp.state import TcpState

__all__ = ["TcpConfig", "TcpEndpoint", "TcpState"]
