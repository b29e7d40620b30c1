"""The controller's HTTP and WebSocket server (aiohttp), on tunproxy's own event loop.

It only reads the flow table and the running configuration; its two commands are closing
flows (through ``FlowTable.close_flow``) and switching a ``select`` group
(``GroupOutbound.select``: the next flow's choice, nothing running is touched). Every
failure stays with the client it concerns: a bad request gets a status and
``{"message": ...}`` (mihomo's error shape), a WebSocket client whose socket stops
draining for ``SEND_TIMEOUT`` is dropped, so nothing a client does can hold the loop or
the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from tunproxy.controller import views
from tunproxy.flows import FlowTable
from tunproxy.outbounds.group import GroupOutbound, Probe

__all__ = ["Controller", "LogHub"]

log = logging.getLogger("tunproxy.controller")

# The groups PUT /proxies/{group} switches (select) or fixes (the others); mihomo's SelectAble.
_SELECTABLE = ("select", "url-test", "fallback")

SEND_TIMEOUT = 5.0  # seconds a WebSocket/stream write may wait for the client to read
MIN_INTERVAL = 0.1  # seconds: the fastest /connections WebSocket push
LOG_QUEUE = 1024  # log lines held per /logs client; more are dropped for that client
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "silent": logging.CRITICAL + 1}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning",
                logging.ERROR: "error", logging.CRITICAL: "error"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"message": message}, status=status)


class LogHub(logging.Handler):
    """Log records to the /logs subscribers, each with its level and a bounded queue.

    With no subscriber its level is above CRITICAL, so logging pays one comparison."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(level=LEVELS["silent"])
        self._loop = loop
        self._thread = threading.get_ident()
        self._subscribers: dict[asyncio.Queue[dict[str, str]], int] = {}

    def subscribe(self, level: int) -> asyncio.Queue[dict[str, str]]:
        queue: asyncio.Queue[dict[str, str]] = asyncio.Queue(LOG_QUEUE)
        self._subscribers[queue] = level
        self.setLevel(min(self._subscribers.values()))
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, str]]) -> None:
        self._subscribers.pop(queue, None)
        self.setLevel(min(self._subscribers.values(), default=LEVELS["silent"]))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = {"type": _LEVEL_NAMES.get(record.levelno, "info"),
                    "payload": f"{record.name}: {record.getMessage()}"}
        except Exception:
            return
        if threading.get_ident() == self._thread:
            self._deliver(record.levelno, line)
        else:
            self._loop.call_soon_threadsafe(self._deliver, record.levelno, line)

    def _deliver(self, levelno: int, line: dict[str, str]) -> None:
        for queue, level in list(self._subscribers.items()):
            if levelno >= level and not queue.full():
                queue.put_nowait(line)


class Controller:
    """The API over one flow table. ``ruleset``/``outbounds``/``config`` are callables, so
    a reload (SIGHUP) is seen by the next request."""

    def __init__(
        self,
        table: FlowTable,
        *,
        secret: str | None = None,
        ui: str | None = None,
        ruleset: Callable[[], Any],
        outbounds: Callable[[], Mapping[str, Any]],
        config: Callable[[], Any],
        is_fake: Callable[[str], bool] | None = None,
        data_path: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        self.table = table
        self.secret = secret
        self.ui = Path(ui) if ui else None
        self._ruleset = ruleset
        self._outbounds = outbounds
        self._config = config
        self._is_fake = is_fake
        self._data_path = data_path  # () -> (relay, driver): what GET /capture taps
        self._loaded_at = time.time()
        self._runner: web.AppRunner | None = None
        self._hub: LogHub | None = None
        self.dropped_clients = 0
        self._encoder = views.SnapshotEncoder()
        self._delays: dict[str, list[dict[str, Any]]] = {}  # name -> /delay results, newest last
        self.app = self._make_app()

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> None:
        self._hub = LogHub(asyncio.get_running_loop())
        logging.getLogger().addHandler(self._hub)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()

    async def aclose(self) -> None:
        if self._hub is not None:
            logging.getLogger().removeHandler(self._hub)
            self._hub = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def reloaded(self) -> None:
        self._loaded_at = time.time()

    # -- the application --------------------------------------------------------------------
    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._cors, self._auth, self._errors],
                              client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self.hello)
        r.add_get("/version", self.version)
        r.add_get("/configs", self.configs)
        r.add_get("/connections", self.connections)
        r.add_delete("/connections", self.close_all)
        r.add_delete("/connections/{id}", self.close_one)
        r.add_get("/rules", self.rules)
        r.add_get("/proxies", self.proxies)
        r.add_get("/proxies/{name}", self.proxy)
        r.add_put("/proxies/{name}", self.select)
        r.add_delete("/proxies/{name}", self.unfix)
        r.add_get("/proxies/{name}/delay", self.delay)
        r.add_get("/providers/proxies", self.proxy_providers)
        r.add_get("/providers/rules", self.rule_providers)
        r.add_get("/traffic", self.traffic)
        r.add_get("/memory", self.memory)
        r.add_get("/logs", self.logs)
        r.add_get("/capture", self.capture)
        if self.ui is not None:
            r.add_get("/ui", self.ui_redirect)
            r.add_get("/ui/", self.ui_index)
            r.add_static("/ui/", self.ui, show_index=False, follow_symlinks=False)
        return app

    @web.middleware
    async def _cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Hosted dashboards (another origin) call the API from the browser, as with mihomo.
        if request.method == "OPTIONS":
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = "*"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE"
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        secret = self.secret
        if secret is None or request.path == "/ui" or request.path.startswith("/ui/"):
            return await handler(request)
        token = request.query.get("token") if _is_websocket(request) else None
        if token is None:
            kind, _, token = request.headers.get("Authorization", "").partition(" ")
            if kind != "Bearer":
                token = ""
        if not hmac.compare_digest(token.encode(), secret.encode()):
            return _error(401, "Unauthorized")
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason)

    # -- plain JSON ---------------------------------------------------------------------------
    async def hello(self, request: web.Request) -> web.Response:
        return web.json_response({"hello": "tunproxy"})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(views.version())

    async def configs(self, request: web.Request) -> web.Response:
        level = logging.getLevelName(logging.getLogger().level).lower()
        return web.json_response(views.configs(self._config(), level))

    async def rules(self, request: web.Request) -> web.Response:
        return web.json_response(views.rules_list(self._ruleset()))

    def _proxies(self) -> dict[str, Any]:
        return views.proxies(self._outbounds(), self._config().upstreams, self._delays)

    async def proxies(self, request: web.Request) -> web.Response:
        return web.json_response(self._proxies())

    async def proxy(self, request: web.Request) -> web.Response:
        item = self._proxies()["proxies"].get(request.match_info["name"])
        if item is None:
            return _error(404, "Resource not found")
        return web.json_response(item)

    async def select(self, request: web.Request) -> web.Response:
        """``PUT /proxies/{group}`` ``{"name": member}``: switch a select group, or fix a
        url-test or fallback group on a member (while it is alive), as mihomo. New flows
        take the member at once; running flows keep theirs."""
        name = request.match_info["name"]
        group = self._outbounds().get(name)
        if group is None and name != "GLOBAL":
            return _error(404, "Resource not found")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        member = body.get("name") if isinstance(body, dict) else None
        if not isinstance(member, str):
            return _error(400, "Body invalid")
        if not isinstance(group, GroupOutbound) or group.config.kind not in _SELECTABLE:
            return _error(400, "Must be a Selector")
        try:
            if group.config.kind == "select":
                group.select(member)
            else:
                group.state.fix(member)
        except ValueError as exc:
            return _error(400, f"Selector update error: {exc}")
        log.info("controller: group %s now uses %s", name, member)
        return web.Response(status=204)

    async def unfix(self, request: web.Request) -> web.Response:
        """``DELETE /proxies/{group}``: a url-test or fallback group chooses by itself
        again (mihomo's "unfix"); 400 for anything else, as mihomo."""
        name = request.match_info["name"]
        group = self._outbounds().get(name)
        if group is None and name != "GLOBAL":
            return _error(404, "Resource not found")
        if not isinstance(group, GroupOutbound) or group.config.kind not in _SELECTABLE[1:]:
            return _error(400, "Body invalid")
        if group.state.fixed is not None:
            log.info("controller: group %s is no longer fixed on %s", name, group.state.fixed)
        group.state.fix(None)
        return web.Response(status=204)

    async def delay(self, request: web.Request) -> web.Response:
        """``GET /proxies/{name}/delay?url=&timeout=ms``: one health check through it."""
        name = request.match_info["name"]
        outbound = self._outbounds().get(name)
        if outbound is None:
            return _error(404, "Resource not found")
        url = request.query.get("url", "")
        parts = urlsplit(url)
        try:
            timeout = int(request.query.get("timeout", "")) / 1000
        except ValueError:
            timeout = 0.0
        if parts.scheme not in ("http", "https") or not parts.hostname or not 0 < timeout <= 60:
            return _error(400, "Body invalid")
        started = time.monotonic()
        latency = await Probe(url).run(outbound, timeout)
        history = self._delays.setdefault(name, [])
        history.append({"time": views.rfc3339(time.time()),
                        "delay": 0 if latency is None else max(1, round(latency * 1000))})
        del history[:-10]
        if latency is None and time.monotonic() - started >= timeout * 0.95:
            return _error(504, "Timeout")
        if latency is None:
            return _error(503, "An error occurred in the delay test")
        return web.json_response({"delay": history[-1]["delay"]})

    async def proxy_providers(self, request: web.Request) -> web.Response:
        return web.json_response(
            views.proxy_providers(self._outbounds(), self._config().upstreams))

    async def rule_providers(self, request: web.Request) -> web.Response:
        return web.json_response(views.rule_providers(self._ruleset(), self._loaded_at))

    # -- connections --------------------------------------------------------------------------
    def _snapshot(self, closed: bool) -> str:
        return self._encoder.encode(self.table, closed=closed, is_fake=self._is_fake)

    async def connections(self, request: web.Request) -> web.StreamResponse:
        closed = request.query.get("closed", "") in ("1", "true")
        if not _is_websocket(request):
            return web.Response(text=self._snapshot(closed), content_type="application/json")
        text = request.query.get("interval", "1000")
        try:
            interval = max(MIN_INTERVAL, int(text) / 1000)
        except ValueError:
            return _error(400, f"interval: {text!r} is not a number of milliseconds")
        return await self._push(request, lambda: self._snapshot(closed), interval)

    async def close_all(self, request: web.Request) -> web.Response:
        self.table.close_all()
        return web.Response(status=204)

    async def close_one(self, request: web.Request) -> web.Response:
        text = request.match_info["id"]
        try:
            flow_id = int(text)
        except ValueError:
            return _error(400, f"{text!r} is not a connection id")
        if not self.table.close_flow(flow_id):
            return _error(404, "Resource not found")
        return web.Response(status=204)

    # -- once-a-second streams ----------------------------------------------------------------
    async def traffic(self, request: web.Request) -> web.StreamResponse:
        table = self.table
        table.sample()

        def produce() -> str:
            table.sample()
            up, down = table.rate_total
            return json.dumps({"up": round(up), "down": round(down)})

        return await self._push(request, produce, 1.0, first_delay=True)

    async def memory(self, request: web.Request) -> web.StreamResponse:
        first = [True]

        def produce() -> str:
            # mihomo sends 0 first, so a dashboard's chart starts at zero
            inuse = 0 if first[0] else views.rss()
            first[0] = False
            return json.dumps({"inuse": inuse, "oslimit": 0})

        return await self._push(request, produce, 1.0)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("level", "info")
        level = LEVELS.get(name)
        if level is None:
            return _error(400, f"level: {name!r} is not one of {', '.join(LEVELS)}")
        hub = self._hub
        if hub is None:
            return _error(503, "the controller is not running")
        queue = hub.subscribe(level)
        try:
            response, send = await self._open_stream(request)
            closed = self._closed_future(response)
            try:
                while not closed.done():
                    getter = asyncio.ensure_future(queue.get())
                    waiters: set[asyncio.Future[Any]] = {getter, closed}
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        break
                    if not await send(json.dumps(getter.result())):
                        break
            finally:
                closed.cancel()
            return response
        finally:
            hub.unsubscribe(queue)

    async def capture(self, request: web.Request) -> web.StreamResponse:
        from tunproxy.controller.capture import serve_capture

        return await serve_capture(request, self.table, self._data_path)

    # -- the plumbing of pushes ----------------------------------------------------------------
    async def _push(
        self, request: web.Request, produce: Callable[[], str], interval: float,
        *, first_delay: bool = False,
    ) -> web.StreamResponse:
        """Send ``produce()`` every ``interval`` seconds, over a WebSocket or as a plain
        streamed response (mihomo does both), until the client goes or stops reading."""
        response, send = await self._open_stream(request)
        closed = self._closed_future(response)
        try:
            if first_delay:
                await asyncio.wait({closed}, timeout=interval)
            while not closed.done():
                if not await send(produce()):
                    break
                await asyncio.wait({closed}, timeout=interval)
        finally:
            closed.cancel()
        return response

    async def _open_stream(
        self, request: web.Request
    ) -> tuple[web.StreamResponse, Callable[[str], Awaitable[bool]]]:
        if _is_websocket(request):
            ws = web.WebSocketResponse(heartbeat=30.0)
            await ws.prepare(request)

            async def send_ws(text: str) -> bool:
                return await self._guarded(request, ws.send_str(text))

            return ws, send_ws
        stream = web.StreamResponse(headers={"Content-Type": "application/json"})
        await stream.prepare(request)

        async def send_plain(text: str) -> bool:
            return await self._guarded(request, stream.write((text + "\n").encode()))

        return stream, send_plain

    async def _guarded(self, request: web.Request, write: Awaitable[None]) -> bool:
        """One write to a client; False (and the client dropped) when it fails or the
        client has not read for SEND_TIMEOUT seconds."""
        try:
            await asyncio.wait_for(write, SEND_TIMEOUT)
            return True
        except TimeoutError:
            self.dropped_clients += 1
            log.info("controller: dropped %s, it stopped reading", request.remote)
        except (ConnectionError, RuntimeError):
            pass  # gone already
        if request.transport is not None:
            request.transport.abort()
        return False

    def _closed_future(self, response: web.StreamResponse) -> asyncio.Future[None]:
        """Done when the client goes (a WebSocket close frame, or the connection lost)."""
        loop = asyncio.get_running_loop()
        if isinstance(response, web.WebSocketResponse):

            async def read() -> None:
                with contextlib.suppress(Exception):
                    async for _ in response:
                        pass  # dashboards send nothing; close frames end the loop

            return loop.create_task(read())
        fut: asyncio.Future[None] = loop.create_future()
        return fut  # a plain stream learns of a gone client from a failed write

    # -- static dashboard ---------------------------------------------------------------------
    async def ui_redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect("/ui/")

    async def ui_index(self, request: web.Request) -> web.StreamResponse:
        assert self.ui is not None
        index = self.ui / "index.html"
        if not index.is_file():
            return _error(404, "Resource not found")
        return web.FileResponse(index)


def _is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"
