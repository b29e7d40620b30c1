"""``type: http`` rule providers: a downloaded file cached on disk beside the config.

The cache is ``path:`` when given (relative to the config's directory), else
``providers/NAME`` there. At load, a cached copy younger than ``interval`` seconds is used
as it is; otherwise the URL is fetched (directly: at start the TUN routes are not up, and
tunproxy's own sockets bypass them anyway) and written atomically over the cache. When the
download fails the cached copy is used, with a warning; without one it is a ConfigError.

Not done (yet): refreshing every ``interval`` while running, and downloading through the
rules (mihomo's ``proxy:``). A reload (SIGHUP) keeps a cached copy as it is (the download
would block the event loop, and its socket would be routed into tunproxy's own TUN); a
restart refreshes stale copies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunproxy.errors import ConfigError

__all__ = ["cached_path", "download"]

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
