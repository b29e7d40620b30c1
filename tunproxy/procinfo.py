"""Which local process owns a flow's socket (for PROCESS-NAME, PROCESS-PATH and UID rules).

A flow reaches tunproxy through the TUN, but the app's socket is still in this network
namespace: its local end is the flow's source, its remote end the flow's destination.

1. One netlink sock_diag request (``SOCK_DIAG_BY_FAMILY`` without ``NLM_F_DUMP``: an exact
   lookup, as ``ss`` does for one socket) finds that socket by its 4-tuple and gives its
   uid and inode. The request is packed by hand on a plain AF_NETLINK socket: about 5 us,
   where pyroute2's DiagSocket.nlm_request took about 160 us for the same message.
   TCP looks up (local, remote); UDP looks up as a reply datagram would be delivered
   (the kernel's ``udp_dump_one`` takes the remote end as "src"), which also
   finds unconnected sockets bound to the port.
2. The inode is mapped to a pid through ``/proc/PID/fd`` links (``socket:[INODE]``). The
   map is cached; on a miss, the pids that recently owned sockets are scanned first, then
   the processes started since the last scan (a new program's first connection), then
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
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from rules import ProcessInfo

__all__ = ["ProcessResolver"]

log = logging.getLogger(__name__)

# linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 0x01
_INET_DIAG_NOCOOKIE = 0xFFFFFFFFFFFFFFFF
_SS_ALL = (1 << 12) - 1
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
# struct inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid:
# sport, dport (big-endian), src[16], dst[16], if, cookie[2]
_REQ_HEAD = struct.Struct("=BBBxI")
_PORTS = struct.Struct(">HH")
_REQ_TAIL = struct.Struct("=IQ")
# struct inet_diag_msg: 4 bytes, sockid (48), expires, rqueue, wqueue, uid, inode
_UID_OFFSET = 4 + 48 + 12
_UID_INODE = struct.Struct("=II")
_DIAG_MSG_LEN = _UID_OFFSET + 8
_DIAG_TIMEOUT = 0.5
_HOT_PIDS = 64  # pids remembered as recent owners
_HOT_SCAN = 4  # of which the most recent are scanned first on a miss
_MAX_CACHE = 262144


def _words(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> tuple[int, int, int, int]:
    """inet_diag_sockid's ``__be32 idiag_src[4]``."""
    n = int(addr)
    if addr.version == 4:
        return (n, 0, 0, 0)
    return (n >> 96, (n >> 64) & 0xFFFFFFFF, (n >> 32) & 0xFFFFFFFF, n & 0xFFFFFFFF)


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO / SO_SNDTIMEO."""
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


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
        self._diag: socket.socket | None = None
        self._seq = 0
        self._inodes: dict[int, tuple[int, int]] = {}  # socket inode -> (pid, fd)
        self._hot: OrderedDict[int, None] = OrderedDict()  # recently matched pids
        self._fds: dict[int, set[str]] = {}  # pid -> fd names at its last scan
        self._next_scan: dict[int, float] = {}  # uid -> earliest time of the next full scan
        self._next_new_scan = float("-inf")  # earliest time of the next scan for new pids
        self.stats = {"lookups": 0, "found": 0, "no-socket": 0, "no-owner": 0, "scans": 0}
        #: Why the last ``lookup`` answered None: "no-socket", "no-owner" or "gone".
        self.last_failure: str | None = None

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
        """One SOCK_DIAG_BY_FAMILY request without NLM_F_DUMP: the kernel's exact lookup
        (inet_diag_find_one_icsk / udp_dump_one) answers one inet_diag_msg, or NLMSG_ERROR
        (-ENOENT) when there is no such socket."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        body = (
            _REQ_HEAD.pack(family, proto, 0, _SS_ALL)
            + _PORTS.pack(sport, dport)
            + src.packed.ljust(16, b"\0")
            + dst.packed.ljust(16, b"\0")
            + _REQ_TAIL.pack(0, _INET_DIAG_NOCOOKIE)
        )
        msg = (
            _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, seq, 0)
            + body
        )
        try:
            if self._diag is None:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG)
                # A blocking socket with the kernel's timeouts, not settimeout(): Python
                # then polls before every send and recv, two system calls per flow more.
                # The kernel answers within send(), so recv finds the answer waiting.
                timeout = _timeval(_DIAG_TIMEOUT)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
                sock.bind((0, 0))
                self._diag = sock
            self._diag.send(msg)
            while True:
                data = self._diag.recv(8192)
                if len(data) < _NLMSGHDR.size:
                    return None
                _len, kind, _flags, got_seq, _pid = _NLMSGHDR.unpack_from(data)
                if got_seq == seq:
                    break  # older answers (from a timed-out request) are skipped
        except OSError as exc:  # netlink trouble means "unknown", never a crash
            log.debug("sock_diag lookup failed: %s", exc)
            self.close()
            return None
        if kind != _SOCK_DIAG_BY_FAMILY or len(data) < _NLMSGHDR.size + _DIAG_MSG_LEN:
            return None  # NLMSG_ERROR: no such socket
        uid, inode = _UID_INODE.unpack_from(data, _NLMSGHDR.size + _UID_OFFSET)
        return (uid, inode) if inode else None  # TIME_WAIT sockets have no inode

    # --- 2. the owner: /proc/PID/fd ------------------------------------------------------

    def _list_fds(self, pid: int) -> list[str] | None:
        try:
            return os.listdir(f"{self._proc}/{pid}/fd")
        except OSError:
            self._fds.pop(pid, None)
            return None

    def _remember(
        self, pid: int, *, only_new: bool = False, names: list[str] | None = None
    ) -> None:
        """File every socket fd of ``pid`` into the inode map. ``only_new`` reads just the
        fds not seen at this pid's last scan (a busy browser holds hundreds of fds; a new
        socket is a new fd, or a reused number that validation then catches). ``names``:
        the pid's fd listing when the caller has it already."""
        base = f"{self._proc}/{pid}/fd"
        if names is None:
            names = self._list_fds(pid)
            if names is None:
                return
        seen = self._fds.get(pid) if only_new else None
        fds: set[str] = set()
        for name in names:
            if seen is not None and name in seen:
                fds.add(name)
                continue
            try:
                link = os.readlink(f"{base}/{name}")
            except OSError:
                continue  # closed meanwhile (listdir's own directory fd is one of these)
            fds.add(name)
            if link.startswith("socket:["):
                self._inodes[int(link[8:-1])] = (pid, int(name))
        self._fds[pid] = fds

    def _scan_hot(self, inode: int) -> tuple[int, int] | None:
        """Look for ``inode`` among the fds of the recent owners, most recent first: for
        each, first the fds it did not have at its last scan, then (a closed fd's number
        is reused by the next socket) all of them. One owner at a time: a process holding
        a thousand sockets that was the owner before last is not listed at all while the
        last owner keeps connecting (it cost ~1.7 ms per connection)."""
        recent = list(self._hot)[-_HOT_SCAN:]
        for pid in reversed(recent):
            names = self._list_fds(pid)  # one listing for both passes
            if names is None:
                continue
            for only_new in (True, False):
                self._remember(pid, only_new=only_new, names=names)
                hit = self._inodes.get(inode)
                if hit is not None:
                    return hit
        return None

    def _scan_uid(self, uid: int) -> bool:
        """Scan every process of ``uid``; False when the rate limit says not now."""
        now = self._clock()
        if now < self._next_scan.get(uid, float("-inf")):
            return False
        self.stats["scans"] += 1
        if len(self._inodes) > _MAX_CACHE:
            self._inodes.clear()
        self._fds.clear()  # forget dead pids; the full scan refills
        start = time.monotonic()
        pids = self._pids_of(uid)
        if pids is None:
            return False
        for pid in pids:
            self._remember(pid)
        took = time.monotonic() - start
        self._next_scan[uid] = now + took / self._scan_budget
        return True

    def _pids_of(self, uid: int) -> list[int] | None:
        """The pids in /proc owned by ``uid`` (None when /proc cannot be listed)."""
        try:
            entries = list(os.scandir(self._proc))
        except OSError:
            return None
        pids = []
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def _scan_new(self, uid: int) -> bool:
        """Scan the processes of ``uid`` not seen at any scan yet: a program started since
        (curl after curl) whose first socket this is. Listing /proc costs milliseconds on a
        busy host, so this is rate-limited by its own cost like the full scan."""
        now = self._clock()
        if now < self._next_new_scan:
            return False
        start = time.monotonic()
        pids = self._pids_of(uid)
        if pids is None:
            return False
        for pid in pids:
            if pid not in self._fds:
                self._remember(pid)
        self._next_new_scan = now + (time.monotonic() - start) / self._scan_budget
        return True

    def _owner(self, inode: int, uid: int) -> tuple[int, int] | None:
        hit = self._inodes.get(inode)
        if hit is not None and self._holds(hit[0], hit[1], inode):
            return hit
        self._inodes.pop(inode, None)
        hit = self._scan_hot(inode)
        if hit is None and self._scan_new(uid):
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
        self.last_failure = None
        sock = self.socket_of(network, src, sport, dst, dport)
        if sock is None:
            self.stats["no-socket"] += 1
            self.last_failure = "no-socket"
            return None
        uid, inode = sock
        owner = self._owner(inode, uid)
        if owner is None:
            self.stats["no-owner"] += 1
            self.last_failure = "no-owner"
            return None
        pid, fd = owner
        base = f"{self._proc}/{pid}"
        try:
            path = os.readlink(f"{base}/exe")
        except OSError:
            path = ""  # a kernel thread, or another user's process without privileges
        if path.endswith(" (deleted)"):
            path = path[: -len(" (deleted)")]
        comm = ""
        if not path:  # the name comes from the path; comm only when there is none (~8 us)
            try:
                with open(f"{base}/comm", encoding="utf-8", errors="replace") as f:
                    comm = f.read().rstrip("\n")
            except OSError:
                self.last_failure = "gone"
                return None
        # Validate last: if the pid still holds the socket now, name and path were read from
        # the process that owns it (a pid is not reused while its fds are open).
        if not self._holds(pid, fd, inode):
            self._inodes.pop(inode, None)
            self.last_failure = "gone"
            return None
        self._hot[pid] = None
        self._hot.move_to_end(pid)
        while len(self._hot) > _HOT_PIDS:
            self._hot.popitem(last=False)
        self.stats["found"] += 1
        name = os.path.basename(path) if path else comm
        return ProcessInfo(pid=pid, name=name, path=path, uid=uid)
