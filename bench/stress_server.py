"""A TCP source for ``bench/stress.py``'s slow readers: every connection is sent bytes as
fast as the connection takes them, until the client goes. Runs in the server namespace.

Standalone (stdlib only); prints nothing (the harness waits for the port with ``ss``).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
from typing import cast

CHUNK = bytes(range(256)) * 256  # 64 KiB


class Source(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.paused = False
        self.fill()

    def fill(self) -> None:
        # Write until the transport says stop (its high-water mark): as fast as it goes.
        while not self.paused and not self.transport.is_closing():
            self.transport.write(CHUNK)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.fill()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(Source, host, port, backlog=1024)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
