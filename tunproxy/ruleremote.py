"""``type: http`` rule providers: a downloaded file cached on disk beside the config.

The cache is ``path:`` when given (relative to the config's directory), else
``providers/NAME`` there. At load, a cached copy younger than ``interval`` seconds is used
as it is; otherwise the URL is fetched (directly: at start the TUN routes are not up, and
tunproxy's own sockets bypass them anyway) and written atomically over the cache. When the
download fails the cached copy is used, with a warning; without one it is a ConfigError.

While running, ``Refresher`` downloads each set again every ``interval`` through the
outbound the rules choose for the URL (as any flow; mihomo's ``proxy:`` key is not read),
checks it parses, replaces the cached copy and reloads the config. A reload (SIGHUP) itself
never downloads: it keeps the cached copy (a blocking download would stall the event loop,
and its socket would be routed into tunproxy's own TUN).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from tunproxy.errors import ConfigError, OutboundError
from tunproxy.outbounds.base import Outbound, Target

__all__ = ["Refresher", "RemoteRuleSet", "cached_path", "download", "fetch", "remote_rule_sets"]

log = logging.getLogger("tunproxy.rules")

MAX_BYTES = 256 * 1024 * 1024
TIMEOUT = 15.0


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def download(url: str, dest: Path, timeout: float = TIMEOUT, limit: int = MAX_BYTES) -> None:
    """Fetch ``url`` into ``dest`` (atomically: a temporary file renamed over it).
    Raises OSError (urllib's errors are OSErrors) or ValueError."""
    request = urllib.request.Request(url, headers={"User-Agent": "tunproxy (clash.meta)"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        data = response.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    if not data:
        raise ValueError("empty answer")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def cached_path(name: str, settings: Mapping[str, Any], base_dir: Path,
                now: float | None = None) -> Path:
    """The file to read for an http provider, refreshed when stale. Raises ConfigError."""
    cfg_file = settings.get("__file__")
    cfg_line = settings.get("__line__")
    url = settings.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f"rule-sets.{name}: type: http needs 'url:' (http:// or https://)",
                          cfg_file, cfg_line)
    path = settings.get("path")
    dest = base_dir / path if isinstance(path, str) and path else base_dir / "providers" / name
    interval = settings.get("interval")
    interval = interval if isinstance(interval, int | float) and interval > 0 else 0
    now = time.time() if now is None else now
    try:
        age = now - dest.stat().st_mtime
    except OSError:
        age = None
    if age is not None and interval and age < interval:
        return dest
    if age is not None and _in_event_loop():
        # A reload while running: a blocking download here would stall every flow, and its
        # socket (not fwmarked) would be routed into our own TUN. Keep the cached copy.
        log.warning("%s:%s: rule set %s: the cached copy (%.0f s old) is kept; it is "
                    "downloaded again at the next start", cfg_file, cfg_line, name, age)
        return dest
    try:
        download(url, dest)
    except (OSError, ValueError) as exc:
        if age is None:
            raise ConfigError(f"rule-sets.{name}: cannot download {url} ({exc}) and there is "
                              f"no cached copy at {dest}", cfg_file, cfg_line) from None
        log.warning("%s:%s: rule set %s: cannot refresh from %s (%s); using the cached copy "
                    "%s from %.0f s ago", cfg_file, cfg_line, name, url, exc, dest, age)
    return dest


# --- refreshing while running, downloaded through the rules -----------------------------------


@dataclass(frozen=True)
class RemoteRuleSet:
    name: str
    url: str
    path: Path
    interval: float
    behavior: str
    format: str | None


def remote_rule_sets(settings: Mapping[str, Mapping[str, Any]], base_dir: Path
                     ) -> list[RemoteRuleSet]:
    """The ``type: http`` rule sets with an ``interval``, as loaded (settings checked)."""
    out = []
    for name, s in settings.items():
        interval = s.get("interval")
        if s.get("type") != "http" or not isinstance(interval, int | float) or interval <= 0:
            continue
        path = s.get("path")
        dest = base_dir / path if isinstance(path, str) and path else base_dir / "providers" / name
        out.append(RemoteRuleSet(name, str(s.get("url")), dest, float(interval),
                                 str(s.get("behavior")), s.get("format")))
    return out


class _Collect(asyncio.Protocol):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.limit and not self.done.done():
            self.done.set_exception(ValueError(f"larger than {self.limit} bytes"))

    def eof_received(self) -> bool | None:
        return None  # close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(bytes(self.buf))


def parse_http_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-case headers, body, de-chunked). Raises ValueError."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("no complete HTTP header")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        pos = 0
        while True:
            end = body.index(b"\r\n", pos)
            size = int(body[pos:end].split(b";")[0], 16)
            if size == 0:
                break
            out += body[end + 2 : end + 2 + size]
            pos = end + 2 + size + 2
        body = bytes(out)
    elif "content-length" in headers:
        n = int(headers["content-length"])
        if len(body) < n:
            raise ValueError("the answer was cut short")
        body = body[:n]
    return int(parts[1]), headers, body


async def fetch(url: str, outbound_for: Callable[[str, Target], Outbound], *,
                timeout: float = TIMEOUT, limit: int = MAX_BYTES, redirects: int = 3,
                tls: Any = None) -> bytes:
    """GET ``url`` through the outbound the rules choose for it (certificates verified
    for https, against ``tls`` (an SSLContext) or the system's roots).
    Raises OSError, OutboundError, TimeoutError or ValueError."""
    import ipaddress
    import ssl

    for _ in range(redirects + 1):
        parts = urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        try:
            ipaddress.ip_address(host)
            target = Target(port, address=host)
        except ValueError:
            target = Target(port, domain=host)
        proto = _Collect(limit)
        async with asyncio.timeout(timeout):
            transport = await outbound_for("tcp", target).open_stream(target, proto,
                                                                      timeout=timeout)
            try:
                if https:
                    secured = await asyncio.get_running_loop().start_tls(
                        transport, proto, tls or ssl.create_default_context(),
                        server_hostname=host)
                    if secured is None:
                        raise ConnectionError("TLS handshake did not complete")
                    transport = secured
                path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
                transport.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                                "User-Agent: tunproxy (clash.meta)\r\nAccept-Encoding: identity"
                                "\r\nConnection: close\r\n\r\n".encode())
                raw = await proto.done
            finally:
                transport.close()
        status, headers, body = parse_http_response(raw)
        if status in (301, 302, 303, 307, 308) and "location" in headers:
            url = urljoin(url, headers["location"])
            continue
        if status != 200:
            raise ValueError(f"HTTP {status}")
        if not body:
            raise ValueError("empty answer")
        return body
    raise ValueError("too many redirects")


class Refresher:
    """Refreshes each remote rule set every ``interval`` (counted from the cached copy's
    age), downloaded through the rules; a good download replaces the cached copy and calls
    ``on_update`` (the config reload); a failed one keeps it and is retried sooner."""

    RETRY = 300.0

    def __init__(self, sets: list[RemoteRuleSet],
                 outbound_for: Callable[[str, Target], Outbound],
                 on_update: Callable[[], None]) -> None:
        self.sets = sets
        self.outbound_for = outbound_for
        self.on_update = on_update
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._run(s)) for s in self.sets]

    async def aclose(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.tasks = []

    async def _run(self, rs: RemoteRuleSet) -> None:
        import rules

        delay = self._due(rs)
        while True:
            await asyncio.sleep(delay)
            try:
                data = await fetch(rs.url, self.outbound_for)
                # Checked before it replaces the cached copy: a broken answer is not kept.
                rules.parse_rule_set(rs.name, data, behavior=rs.behavior, format=rs.format,
                                     file=rs.url)
            except (OSError, OutboundError, TimeoutError, ValueError, rules.RuleError) as exc:
                log.warning("rule set %s: refresh from %s failed (%s); keeping the cached "
                            "copy", rs.name, rs.url, exc)
                delay = min(rs.interval, self.RETRY)
                continue
            rs.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = rs.path.with_name(rs.path.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, rs.path)
            log.info("rule set %s: refreshed from %s (%d bytes)", rs.name, rs.url, len(data))
            self.on_update()
            delay = rs.interval

    @staticmethod
    def _due(rs: RemoteRuleSet) -> float:
        try:
            age = time.time() - rs.path.stat().st_mtime
        except OSError:
            return 0.0
        return max(0.0, rs.interval - age)
