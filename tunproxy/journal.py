"""The record of every change tunproxy makes to the host, and how to undo it.

Each change (link, address, route, rule, sysctl) is written to a state file
under ``/run/tunproxy/`` *before* it is applied, then applied. On exit the
changes are undone in reverse order. After a crash (``kill -9``), the state
file is still there: ``tunproxy cleanup``, or the next start, undoes it.
Undoing is idempotent: a change that is already gone is skipped.

One record per instance: the file is named by the TUN *and* the network
namespace, ``<tun>@netns-<cookie>.json``. The cookie (``SO_NETNS_COOKIE``,
Linux 5.14+) comes from a counter the kernel never winds back, so unlike the
namespace's inode, which a new namespace can get once the old one is gone, it
names one namespace for as long as the machine runs; the record also holds the
boot id, for state directories that outlive a reboot. So instances in different
namespaces never read each other's records, and a record left by a namespace
that is gone is never undone in a new one that happens to get its inode.
Before undoing, what is undone is checked to be what was made: the TUN by its
name, kind and interface index.

The netlink calls go through ``tunproxy.netlink``'s short-lived helper process (pyroute2
in a child that exits once set-up or teardown is done), so pyroute2 never stays resident.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunproxy.errors import SetupError
from tunproxy.netlink import Netlink, NetlinkError

__all__ = ["DEFAULT_STATE_DIR", "Change", "Journal", "cleanup_state_dir"]

log = logging.getLogger("tunproxy.host")

DEFAULT_STATE_DIR = Path("/run/tunproxy")

# Errors that mean "already undone" when deleting.
_GONE = {errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL}


@dataclass(slots=True)
class Change:
    """One change to the host. ``kind`` is link, addr, route, rule or sysctl."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    # For sysctl: the value to put back.
    old: str | None = None

    def describe(self) -> str:
        a = self.args
        if self.kind == "rule":
            fam = "-6 " if a.get("family") == socket.AF_INET6 else ""
            return f"ip {fam}rule priority {a.get('priority')} table {a.get('table')}"
        if self.kind == "route":
            fam = "-6 " if a.get("family") == socket.AF_INET6 else ""
            return f"ip {fam}route {a.get('dst', 'default')} table {a.get('table')}"
        if self.kind == "addr":
            return f"address {a.get('address')}/{a.get('prefixlen')} on {a.get('ifname')}"
        if self.kind == "link":
            return f"link {a.get('ifname')}"
        return f"sysctl {a.get('path')}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "args": self.args, "old": self.old}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Change:
        return cls(kind=str(data["kind"]), args=dict(data.get("args", {})), old=data.get("old"))


SO_NETNS_COOKIE = 71  # linux/socket.h, 5.14+


def netns_id() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def netns_cookie() -> int | None:
    """This thread's network namespace's cookie: never reused while the machine runs."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
    except OSError:  # before Linux 5.14: the inode (and the boot) must do
        return None
    return int(struct.unpack("=Q", raw)[0])


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class NetnsIdentity:
    """Which network namespace a record belongs to: inode, cookie and boot together."""

    inode: int
    cookie: int | None
    boot: str

    @classmethod
    def here(cls) -> NetnsIdentity:
        return cls(netns_id(), netns_cookie(), boot_id())

    def key(self) -> str:
        return f"netns-{self.cookie}" if self.cookie is not None else f"netns-ino-{self.inode}"

    def to_json(self) -> dict[str, Any]:
        return {"netns": self.inode, "netns_cookie": self.cookie, "boot_id": self.boot}

    def owns(self, record: dict[str, Any]) -> bool:
        """The record was made in this very namespace (not one that had its inode before)."""
        if "netns_cookie" not in record:  # written by an older tunproxy: the inode alone
            return bool(record.get("netns") == self.inode)
        return (record.get("netns") == self.inode and record.get("netns_cookie") == self.cookie
                and record.get("boot_id") == self.boot)

    def before_boot(self, record: dict[str, Any]) -> bool:
        """The record is from before the last reboot: nothing it made exists any more."""
        return bool(record.get("boot_id")) and record.get("boot_id") != self.boot


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Journal:
    """Applies changes through netlink, recording each first, and undoes them."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.state_dir = state_dir
        self.identity = NetnsIdentity.here()
        self.path = state_dir / f"{name}@{self.identity.key()}.json"
        self.changes: list[Change] = []
        self._ipr: Netlink | None = None

    # -- lifecycle ----------------------------------------------------------
    async def open(self) -> None:
        """Undo what a dead previous run left, then start a fresh record."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise SetupError(f"cannot create the state directory {self.state_dir}: "
                             f"{exc.strerror}") from None
        self._ipr = await _start_netlink()
        previous = _read_state(self.path)
        if previous is not None:
            pid = int(previous.get("pid", 0))
            if pid and pid != os.getpid() and _pid_alive(pid) and _is_tunproxy(pid):
                raise SetupError(
                    f"another tunproxy (pid {pid}) is running with this interface; stop it first"
                )
            if self.identity.owns(previous):
                log.warning("undoing what a previous run (pid %s) left behind", pid)
                await _undo(
                    [Change.from_json(c) for c in previous.get("changes", [])], self._ipr
                )
            else:
                log.info("ignoring %s: written before the last reboot or in a namespace that "
                         "is gone", self.path)
            self.path.unlink(missing_ok=True)
        self._write()

    async def release(self) -> None:
        """End the netlink helper (set-up is done); keep the record."""
        if self._ipr is not None:
            await self._ipr.close()
            self._ipr = None

    async def close(self) -> None:
        """Undo every change in reverse order and remove the state file."""
        ipr = self._ipr or await _start_netlink()
        try:
            await _undo(self.changes, ipr)
            self.changes.clear()
            self.path.unlink(missing_ok=True)
        finally:
            await ipr.close()
            self._ipr = None

    @property
    def ipr(self) -> Netlink:
        assert self._ipr is not None, "Journal.open() first"
        return self._ipr

    # -- changes ------------------------------------------------------------
    async def apply(self, change: Change) -> None:
        """Record, then apply, one change."""
        if change.kind == "sysctl":
            change.old = _read_sysctl(change.args["path"])
        self.changes.append(change)
        self._write()
        ipr = self.ipr
        args = change.args
        try:
            if change.kind == "rule":
                await ipr.rule("add", **args)
            elif change.kind == "route":
                await ipr.route("add", **args)
            elif change.kind == "addr":
                await ipr.addr("add", index=await self._index(args["ifname"]),
                               address=args["address"], prefixlen=args["prefixlen"])
            elif change.kind == "sysctl":
                _write_sysctl(args["path"], args["value"])
            elif change.kind == "link":
                pass  # the TUN device itself is created by opening /dev/net/tun
            else:
                raise ValueError(f"unknown change kind {change.kind}")
        except NetlinkError as exc:
            self.changes.pop()
            self._write()
            raise SetupError(f"could not add {change.describe()}: {exc.args[1]}") from None

    def record(self, change: Change) -> None:
        """Record a change made by other means (the TUN link)."""
        self.changes.append(change)
        self._write()

    async def _index(self, ifname: str) -> int:
        links = await self.ipr.link_lookup(ifname=ifname)
        if not links:
            raise SetupError(f"interface {ifname} disappeared")
        return int(links[0])

    def _write(self) -> None:
        data = {
            "pid": os.getpid(),
            **self.identity.to_json(),
            "started": time.time(),
            "changes": [c.to_json() for c in self.changes],
        }
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


async def _start_netlink() -> Netlink:
    try:
        return await Netlink.start()
    except OSError as exc:
        raise SetupError(f"cannot start the netlink helper: {exc}") from None


async def _undo(changes: list[Change], ipr: Netlink) -> None:
    """Undo ``changes`` in reverse order; what is already gone is skipped."""
    for change in reversed(changes):
        try:
            await _undo_one(change, ipr)
        except NetlinkError as exc:
            if exc.code not in _GONE:
                log.error("could not undo %s: %s", change.describe(), exc.args[1])
        except OSError as exc:
            if exc.errno not in _GONE:
                log.error("could not undo %s: %s", change.describe(), exc)
        else:
            log.debug("undid %s", change.describe())


async def _undo_one(change: Change, ipr: Netlink) -> None:
    args = change.args
    if change.kind == "rule":
        await ipr.rule("del", **args)
    elif change.kind == "route":
        await ipr.route("del", **args)
    elif change.kind == "addr":
        links = await ipr.link_lookup(ifname=args["ifname"])
        if links and args.get("index", links[0]) == links[0]:
            await ipr.addr("del", index=links[0], address=args["address"],
                           prefixlen=args["prefixlen"])
    elif change.kind == "link":
        links = await ipr.link_lookup(ifname=args["ifname"])
        # Only ever delete the TUN we made, never an interface that took its name later:
        # same name, same index (when recorded), and a TUN.
        if links and args.get("index", links[0]) == links[0]:
            kind = await ipr.link_kind(links[0])
            if kind == "tun":
                await ipr.link("del", index=links[0])
            else:
                log.info("not deleting %s: it is a %s now, not the TUN we made",
                         args["ifname"], kind)
    elif change.kind == "sysctl" and change.old is not None:
        with contextlib.suppress(FileNotFoundError):
            _write_sysctl(args["path"], change.old)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("ignoring unreadable state file %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _is_tunproxy(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"tunproxy" in f.read()
    except OSError:
        return False


def _read_sysctl(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


async def cleanup_state_dir(state_dir: Path) -> list[str]:
    """Undo every state file in ``state_dir`` left by a run that is no longer alive.

    Returns one line per state file saying what happened.
    """
    report: list[str] = []
    if not state_dir.is_dir():
        return report
    here = NetnsIdentity.here()
    for path in sorted(state_dir.glob("*.json")):
        data = _read_state(path)
        if data is None:
            continue
        pid = int(data.get("pid", 0))
        if pid and _pid_alive(pid) and _is_tunproxy(pid):
            report.append(f"{path.name}: tunproxy pid {pid} is still running; left alone")
            continue
        if here.before_boot(data):
            path.unlink(missing_ok=True)
            report.append(f"{path.name}: left before the last reboot, nothing of it remains; "
                          "removed")
            continue
        if not here.owns(data):
            report.append(f"{path.name}: made in another network namespace; left alone "
                          "(run cleanup there)")
            continue
        changes = [Change.from_json(c) for c in data.get("changes", [])]
        ipr = await _start_netlink()
        try:
            await _undo(changes, ipr)
        finally:
            await ipr.close()
        path.unlink(missing_ok=True)
        report.append(f"{path.name}: undid {len(changes)} changes left by pid {pid}")
    return report
