"""Which local process owns a flow's socket (for PROCESS-NAME, PROCESS-PATH and UID rules).

A flow reaches tunproxy through the TUN, but the app's socket is still in this network
namespace: its local end is the flow's source, its remote end the flow's destination.

1. One netlink sock_diag request (``SOCK_DIAG_BY_FAMILY`` without ``NLM_F_DUMP``: an exact
   lookup, as ``ss`` does for one socket) finds that socket by its 4-tuple and gives its
   uid and inode. TCP looks up (local, remote); UDP looks up as a reply datagram would be
   delivered (the kernel's ``udp_dump_one`` takes the remote end as "src"), which also
   finds unconnected sockets bound to the port.
2. The inode is mapped to a pid through ``/proc/PID/fd`` links (``socket:[INODE]``). The
   map is cached; on a miss, the pids that recently owned sockets are scanned first, then
   every process of the socket's uid. Full scans are rate-limited by their own cost, so a
   burst of short-lived processes cannot make lookups eat the event loop.
3. The answer is validated after reading the process's name and path: the pid's fd must
   still link to that socket. A wrong process is worse than none, so any doubt is None.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rules import ProcessInfo

__all__ = ["ProcessResolver"]

log = logging.getLogger(__name__)

_INET_DIAG_NOCOOKIE = 0xFFFFFFFFFFFFFFFF
_SS_ALL = (1 << 12) - 1
_HOT_PIDS = 64
_MAX_CACHE = 262144


def _words(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int, int, int]:
    """inet_diag_sockid's ``__be32 idiag_src[4]``."""
    n = int(addr)
    if addr.version == 4:
        return (n, 0, 0, 0)
    return (n >> 96, (n >> 64) & 0xFFFFFFFF, (n >> 32) & 0xFFFFFFFF, n & 0xFFFFFFFF)


def _plain(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    a = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped
    return a


class ProcessResolver:
    """``lookup(network, src, sport, dst, dport)`` -> ProcessInfo or None. Synchronous and
    cheap on a hit (one netlink round trip and three /proc reads); not thread-safe."""

    def __init__(
        self,
        *,
        proc: str = "/proc",
        scan_budget: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proc = proc
        # A full scan that took t seconds is not repeated within t / scan_budget.
        self._scan_budget = scan_budget
        self._clock = clock
        self._diag: Any = None
        self._inodes: dict[int, tuple[int, int]] = {}  # socket inode -> (pid, fd)
        self._hot: OrderedDict[int, None] = OrderedDict()  # recently matched pids
        self._next_scan: dict[int, float] = {}  # uid -> earliest time of the next full scan
        self.stats = {"lookups": 0, "found": 0, "no-socket": 0, "no-owner": 0, "scans": 0}

    def close(self) -> None:
        if self._diag is not None:
            self._diag.close()
            self._diag = None

    # --- 1. the socket: sock_diag -------------------------------------------------------------

    def socket_of(
        self, network: str, src: str, sport: int, dst: str, dport: int
    ) -> tuple[int, int] | None:
        """(uid, inode) of the local socket with local end src:sport and remote dst:dport."""
        try:
            local, remote = _plain(src), _plain(dst)
        except ValueError:
            return None
        if local.version != remote.version:
            return None
        proto = socket.IPPROTO_TCP if network == "tcp" else socket.IPPROTO_UDP
        family = socket.AF_INET if local.version == 4 else socket.AF_INET6
        if proto == socket.IPPROTO_TCP:
            found = self._diag_lookup(family, proto, local, sport, remote, dport)
        else:
            found = self._diag_lookup(family, proto, remote, dport, local, sport)
        if found is None and family == socket.AF_INET:
            # A dual-stack AF_INET6 socket talking IPv4 through mapped addresses.
            m_local = ipaddress.IPv6Address("::ffff:" + str(local))
            m_remote = ipaddress.IPv6Address("::ffff:" + str(remote))
            if proto == socket.IPPROTO_TCP:
                found = self._diag_lookup(socket.AF_INET6, proto, m_local, sport, m_remote, dport)
            else:
                found = self._diag_lookup(socket.AF_INET6, proto, m_remote, dport, m_local, sport)
        return found

    def _diag_lookup(
        self, family: int, proto: int, src: Any, sport: int, dst: Any, dport: int
    ) -> tuple[int, int] | None:
        from pyroute2 import DiagSocket
        from pyroute2.netlink import NLM_F_REQUEST
        from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req

        req = inet_diag_req()
        req["sdiag_family"] = family
        req["sdiag_protocol"] = proto
        req["idiag_states"] = _SS_ALL
        req["idiag_sport"] = sport
        req["idiag_dport"] = dport
        req["idiag_src"] = _words(src)
        req["idiag_dst"] = _words(dst)
        req["idiag_cookie"] = _INET_DIAG_NOCOOKIE
        try:
            if self._diag is None:
                self._diag = DiagSocket()
                self._diag.bind()
            # No NLM_F_DUMP: the kernel's exact lookup (inet_diag_find_one_icsk / udp_dump_one)
            # answers one inet_diag_msg, or NLMSG_ERROR (-ENOENT) when there is no such socket.
            replies = list(self._diag.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST))
        except Exception as exc:  # netlink trouble means "unknown", never a crash
            log.debug("sock_diag lookup failed: %s", exc)
            self.close()
            return None
        for msg in replies:
            if msg.get("event") == "NLMSG_ERROR":
                continue
            inode = msg.get("idiag_inode")
            uid = msg.get("idiag_uid")
            if inode and uid is not None:
                return int(uid), int(inode)
        return None

    # --- 2. the owner: /proc/PID/fd ------------------------------------------------------

    def _fd_links(self, pid: int) -> list[tuple[int, int]]:
        """(inode, fd) of every socket fd of ``pid``."""
        out: list[tuple[int, int]] = []
        base = f"{self._proc}/{pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            return out
        for name in names:
            try:
                link = os.readlink(f"{base}/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.append((int(link[8:-1]), int(name)))
        return out

    def _remember(self, pid: int) -> None:
        for inode, fd in self._fd_links(pid):
            self._inodes[inode] = (pid, fd)

    def _scan_hot(self) -> None:
        for pid in list(self._hot)[-8:]:
            self._remember(pid)

    def _scan_uid(self, uid: int) -> bool:
        """Scan every process of ``uid``; False when the rate limit says not now."""
        now = self._clock()
        if now < self._next_scan.get(uid, float("-inf")):
            return False
        self.stats["scans"] += 1
        if len(self._inodes) > _MAX_CACHE:
            self._inodes.clear()
        start = time.monotonic()
        try:
            entries = list(os.scandir(self._proc))
        except OSError:
            return False
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid:
                    continue
            except OSError:
                continue
            self._remember(int(entry.name))
        took = time.monotonic() - start
        self._next_scan[uid] = now + took / self._scan_budget
        return True

    def _owner(self, inode: int, uid: int) -> tuple[int, int] | None:
        hit = self._inodes.get(inode)
        if hit is not None and self._holds(hit[0], hit[1], inode):
            return hit
        self._inodes.pop(inode, None)
        self._scan_hot()
        hit = self._inodes.get(inode)
        if hit is None and self._scan_uid(uid):
            hit = self._inodes.get(inode)
        return hit

    def _holds(self, pid: int, fd: int, inode: int) -> bool:
        try:
            return os.readlink(f"{self._proc}/{pid}/fd/{fd}") == f"socket:[{inode}]"
        except OSError:
            return False

    # --- 3. the answer -------------------------------------------------------------------------

    def lookup(
        self, network: str, src: str, sport: int, dst: str, dport: int
    ) -> ProcessInfo | None:
        """The process owning the local socket of this flow, or None (no such socket, its
        owner cannot be found or changed while we looked)."""
        self.stats["lookups"] += 1
        sock = self.socket_of(network, src, sport, dst, dport)
        if sock is None:
            self.stats["no-socket"] += 1
            return None
        uid, inode = sock
        owner = self._owner(inode, uid)
        if owner is None:
            self.stats["no-owner"] += 1
            return None
        pid, fd = owner
        base = f"{self._proc}/{pid}"
        try:
            with open(f"{base}/comm", encoding="utf-8", errors="replace") as f:
                comm = f.read().rstrip("\n")
        except OSError:
            return None
        try:
            path = os.readlink(f"{base}/exe")
        except OSError:
            path = ""  # a kernel thread, or another user's process without privileges
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        # Validate last: if the pid still holds the socket now, name and path were read from
        # the process that owns it (a pid is not reused while its fds are open).
        if not self._holds(pid, fd, inode):
            self._inodes.pop(inode, None)
            return None
        self._hot[pid] = None
        self._hot.move_to_end(pid)
        while len(self._hot) > _HOT_PIDS:
            self._hot.popitem(last=False)
        self.stats["found"] += 1
        name = os.path.basename(path) if path else comm
        return ProcessInfo(pid=pid, name=name, path=path, uid=uid)
