"""``GET /capture?process=curl&pid=&uid=&domain=&rule=&flow=&limit=BYTES``: pcapng, live.

Installs a tap on the running driver for the selected flows and streams the pcapng bytes
(section header, interface, name resolution blocks, packets with their flow's comment) as
a chunked response until the client goes or ``limit`` bytes are sent; then the tap is
removed and the driver pays nothing again. One capture at a time: the driver has one tap,
so a second one (or one beside ``tunproxy run --capture``) gets 409. A client that stops
reading loses whole chunks (the queue is bounded, ``capture.stream``); one that does not
read for ``STALL_TIMEOUT`` seconds is disconnected, which frees the tap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from tunproxy.capture.select import KEYS, parse_selection
from tunproxy.capture.stream import LiveCapture
from tunproxy.errors import ConfigError
from tunproxy.flows import FlowTable

__all__ = ["serve_capture"]

log = logging.getLogger("tunproxy.controller")

NO_LIMIT = 1 << 62
STALL_TIMEOUT = 60.0  # seconds one write may wait for the client to read
POLL = 0.5  # seconds: how often an idle capture looks whether its client is gone


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def serve_capture(request: web.Request, table: FlowTable,
                        data_path: Callable[[], tuple[Any, Any]] | None) -> web.StreamResponse:
    relay, driver = data_path() if data_path is not None else (None, None)
    if relay is None or driver is None:
        return _error(503, "the data path is not running")
    items = [f"{key}={value}" for key in KEYS for value in request.query.getall(key, [])
             if value != ""]
    unknown = sorted(set(request.query) - set(KEYS) - {"limit"})
    if unknown:
        return _error(400, f"unknown parameter {unknown[0]!r} (keys: {', '.join(KEYS)}, limit)")
    try:
        selection = parse_selection(items)
    except ConfigError as exc:
        return _error(400, str(exc))
    text = request.query.get("limit", "")
    if text and (not text.isdigit() or int(text) <= 0):
        return _error(400, f"limit: {text!r} is not a number of bytes above 0")
    limit = int(text) if text else NO_LIMIT
    if driver.tap is not None:
        return _error(409, "a capture is already running (one at a time)")
    capture = LiveCapture(table, limit=limit, selection=selection)
    capture.attach(relay, driver)
    sent = 0
    response = web.StreamResponse(headers={"Content-Type": "application/x-pcapng"})
    try:
        await response.prepare(request)
        chunks = capture.chunks
        while True:
            if not chunks.queue:
                if capture.full or _gone(request):
                    break
                try:
                    await asyncio.wait_for(chunks.ready.wait(), POLL)
                except TimeoutError:
                    continue
            data = chunks.take()
            if not data:
                continue
            try:
                await asyncio.wait_for(response.write(data), STALL_TIMEOUT)
            except TimeoutError:
                log.info("capture: dropped %s, it stopped reading", request.remote)
                if request.transport is not None:
                    request.transport.abort()
                break
            except (ConnectionError, RuntimeError):
                break  # gone
            sent += len(data)
        if not _gone(request):
            capture.detach()
            rest = capture.chunks.take()
            if rest:
                await response.write(rest)
            await response.write_eof()
        return response
    except (ConnectionError, RuntimeError):
        return response
    finally:
        capture.detach()
        log.info("capture for %s ended: %d packets, %d bytes sent, %d bytes dropped "
                 "(slow client), %d packets over the limit", request.remote,
                 capture.packets, sent, capture.chunks.dropped, capture.skipped)
