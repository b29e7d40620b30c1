"""DNS over TCP framing (RFC 1035 4.2.2, RFC 7766 section 8): a 2-byte length
before each message. Sans-I/O, for the relay's hijacked TCP port-53 flows.

    framer = TcpFramer()
    for query in framer.receive(data):       # zero or more complete messages
        answer = await dns.handle_query(query, network="tcp", client=...)
        if answer is not None:
            send(TcpFramer.frame(answer))
"""

from __future__ import annotations

import struct

__all__ = ["TcpFramer"]

_U16 = struct.Struct("!H")


class TcpFramer:
    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held waiting for the rest of a message (at most 65537)."""
        return len(self._buffer)

    def receive(self, data: bytes) -> list[bytes]:
        self._buffer += data
        messages: list[bytes] = []
        while len(self._buffer) >= 2:
            (length,) = _U16.unpack_from(self._buffer, 0)
            if len(self._buffer) < 2 + length:
                break
            messages.append(bytes(self._buffer[2 : 2 + length]))
            del self._buffer[: 2 + length]
        return messages

    @staticmethod
    def frame(message: bytes) -> bytes:
        if len(message) > 0xFFFF:
            raise ValueError("a DNS message is at most 65535 bytes")
        return _U16.pack(len(message)) + message
