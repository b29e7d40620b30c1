"""tunproxy's userspace TCP/IP stack. Sans-I/O: no asyncio, socket or os here.

Feed it raw IP packets read from a TUN device, drive its one timer, and pull
out packets to write back, and events describing the flows it rebuilt.
"""

import tunproxy_native  # noqa: F401  (first: compiled modules or their .py, before any loads)
from stack.events import (
    DatagramReceived,
    DataReceived,
    EchoRequest,
    Event,
    FlowClosed,
    FlowHalfClosed,
    FlowOpened,
    FlowReset,
    FlowWritable,
)
from stack.flow import TCP, UDP, FlowKey
from stack.stack import Refusal, Stack, StackConfig

__all__ = [
    "TCP",
    "UDP",
    "DataReceived",
    "DatagramReceived",
    "EchoRequest",
    "Event",
    "FlowClosed",
    "FlowHalfClosed",
    "FlowKey",
    "FlowOpened",
    "FlowReset",
    "FlowWritable",
    "Refusal",
    "Stack",
    "StackConfig",
]
