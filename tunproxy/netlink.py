"""Netlink calls made in a short-lived helper process, so pyroute2 never stays resident.

tunproxy talks netlink only while it sets the host up and while it undoes that (a few
dozen rules, routes and addresses), but pyroute2's package import maps ~10 MiB that a
long-running process would carry for nothing (Python rarely returns freed memory to the
system). So the calls go to a child, ``python -m tunproxy.netlink``, which imports pyroute2,
answers one JSON request per line on stdin with one JSON answer per line on stdout, and
exits when its stdin closes, taking that memory with it.

``Netlink`` is the parent's side: the few AsyncIPRoute calls the journal and the routing
set-up make, with the same names and arguments, plus ``rules()`` and ``route_count()``
(dumps answered with the fields tunproxy reads, not whole netlink messages).

Errors: a failed netlink call raises ``NetlinkError`` (``code`` is the errno, ``args`` are
``(code, message)`` like pyroute2's); a helper that cannot start or dies raises ``OSError``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["Netlink", "NetlinkError"]

# The directory that holds the tunproxy package, for the child's import path: the helper
# runs the same code as its parent wherever that came from (installed, editable, a checkout).
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class NetlinkError(Exception):
    """The kernel refused a netlink request."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code


class Netlink:
    """The parent's side of the helper: ``await Netlink.start()``, calls, ``close()``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls) -> Netlink:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tunproxy.netlink", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env,
        )
        return cls(proc)

    async def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        async with self._lock:
            request = json.dumps({"op": op, "args": args, "kwargs": kwargs})
            try:
                proc.stdin.write(request.encode() + b"\n")
                await proc.stdin.drain()
                line = await proc.stdout.readline()
            except (BrokenPipeError, ConnectionResetError):
                line = b""
            if not line:
                raise OSError(f"the netlink helper exited (rc={await proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            if answer["error"] == "netlink":
                raise NetlinkError(int(answer["code"]), str(answer["message"]))
            raise OSError(f"netlink helper: {answer['message']}")
        return answer.get("result")

    # The AsyncIPRoute calls tunproxy makes (same names and arguments).
    async def link_lookup(self, **kwargs: Any) -> list[int]:
        return [int(i) for i in await self._call("link_lookup", **kwargs)]

    async def link(self, command: str, **kwargs: Any) -> None:
        await self._call("link", command, **kwargs)

    async def addr(self, command: str, **kwargs: Any) -> None:
        await self._call("addr", command, **kwargs)

    async def route(self, command: str, **kwargs: Any) -> None:
        await self._call("route", command, **kwargs)

    async def rule(self, command: str, **kwargs: Any) -> None:
        await self._call("rule", command, **kwargs)

    # Dumps, answered with what tunproxy reads of them.
    async def link_kind(self, index: int) -> str | None:
        """The link's IFLA_INFO_KIND ("tun", "veth", ...), None when it has none."""
        kind = await self._call("link_kind", index)
        return None if kind is None else str(kind)

    async def route_count(self, family: int, table: int) -> int:
        return int(await self._call("route_count", family, table))

    async def rules(self, family: int) -> list[dict[str, int | None]]:
        """Every ip rule of ``family``: its fwmark (None without one) and table."""
        return list(await self._call("rules", family))

    async def close(self) -> None:
        """End the helper (its stdin closes; it exits) and wait for it."""
        proc = self._proc
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout=10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# -- the helper process ------------------------------------------------------------------


async def _serve() -> None:
    from pyroute2 import AsyncIPRoute
    from pyroute2.netlink.exceptions import NetlinkError as PyrouteError

    ipr = AsyncIPRoute()

    async def messages(answer: Any) -> list[Any]:
        # pyroute2 answers some requests with a list, dumps with an async iterator.
        if hasattr(answer, "__aiter__"):
            return [m async for m in answer]
        return list(answer)

    async def link_kind(index: int) -> str | None:
        for link in await messages(await ipr.link("get", index=index)):
            info = link.get("IFLA_LINKINFO")
            if info is not None:
                return info.get("IFLA_INFO_KIND")  # type: ignore[no-any-return]
        return None

    async def route_count(family: int, table: int) -> int:
        return len([r async for r in await ipr.route("dump", family=family, table=table)])

    async def rules(family: int) -> list[dict[str, int | None]]:
        return [{"fwmark": rule.get("FRA_FWMARK"), "table": rule.get("FRA_TABLE") or rule["table"]}
                async for rule in await ipr.rule("dump", family=family)]

    async def link_lookup(**kwargs: Any) -> list[int]:
        return [int(i) for i in await ipr.link_lookup(**kwargs)]

    async def plain(method: str, command: str, **kwargs: Any) -> None:
        await getattr(ipr, method)(command, **kwargs)

    ops: dict[str, Any] = {
        "link_kind": link_kind, "route_count": route_count, "rules": rules,
        "link_lookup": link_lookup,
        **{m: (lambda *a, _m=m, **k: plain(_m, *a, **k)) for m in ("link", "addr", "route",
                                                                   "rule")},
    }
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.buffer.readline)
            if not line:
                return
            request = json.loads(line)
            try:
                result = await ops[request["op"]](*request["args"], **request["kwargs"])
                answer: dict[str, Any] = {"result": result}
            except PyrouteError as exc:
                message = exc.args[1] if len(exc.args) > 1 else str(exc)
                answer = {"error": "netlink", "code": exc.code, "message": str(message)}
            except Exception as exc:  # reported to the parent, which raises it there
                answer = {"error": "other", "message": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(answer) + "\n")
            sys.stdout.flush()
    finally:
        ipr.close()


if __name__ == "__main__":
    asyncio.run(_serve())
