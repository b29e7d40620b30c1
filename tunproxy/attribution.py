"""Who opened a flow: the local process (through ``procinfo``), its systemd unit or
container (from its cgroup), or, for a flow from another host, its source address.

Runs once per flow when it opens, whatever the rules need (``log.attribution: false``
turns it off): for a flow that waits for its upstream, just after the upstream connect
started (``FlowTable.track(defer=True)``), so the lookup overlaps the connect instead of
delaying it; at once when the rules need the process or the SYN is answered in the same
turn; before the end line at the latest. A lookup that fails is recorded as failed with
the reason, never guessed.
"""

from __future__ import annotations

import os
import re
import socket

from tunproxy.flows import REMOTE, FlowRecord
from tunproxy.procinfo import ProcessResolver

__all__ = ["Attributor", "parse_cgroup"]

_MAX_LOCAL_CACHE = 4096

# cgroup path components that name a container (cgroup v2 and v1 layouts).
_CONTAINER_SCOPES = (
    (re.compile(r"^docker-([0-9a-f]{12,64})\.scope$"), "docker"),
    (re.compile(r"^libpod-([0-9a-f]{12,64})\.scope$"), "podman"),
    (re.compile(r"^cri-containerd-([0-9a-f]{12,64})\.scope$"), "containerd"),
    (re.compile(r"^crio-([0-9a-f]{12,64})\.scope$"), "cri-o"),
)
_CONTAINER_DIRS = {"docker": "docker", "libpod": "podman", "lxc": "lxc"}
_MACHINE = re.compile(r"^machine-(.+)\.scope$")


def parse_cgroup(text: str) -> tuple[str | None, str | None]:
    """``/proc/PID/cgroup`` -> (systemd unit, container). cgroup v2's single ``0::PATH``
    line is used, else v1's ``name=systemd`` hierarchy, else the first line."""
    path = None
    lines = [line.split(":", 2) for line in text.splitlines() if line.count(":") >= 2]
    for hier, controllers, p in lines:
        if hier == "0" and controllers == "":
            path = p
            break
    if path is None:
        for _, controllers, p in lines:
            if controllers == "name=systemd":
                path = p
                break
    if path is None and lines:
        path = lines[0][2]
    if not path:
        return None, None
    parts = [p for p in path.split("/") if p]
    unit = None
    container = None
    for i, part in enumerate(parts):
        if part.endswith((".service", ".scope")):
            unit = part
        for pattern, kind in _CONTAINER_SCOPES:
            m = pattern.match(part)
            if m:
                container = f"{kind}:{m.group(1)[:12]}"
        m = _MACHINE.match(part)
        if m:
            container = f"machine:{m.group(1).replace(chr(92) + 'x2d', '-')}"
        if part.startswith("lxc.payload."):
            container = f"lxc:{part[len('lxc.payload.'):]}"
        runtime = _CONTAINER_DIRS.get(part)
        if runtime is not None and i + 1 < len(parts):
            name = parts[i + 1]
            container = f"{runtime}:{name[:12] if runtime != 'lxc' else name}"
    return unit, container


def _read_small(path: str) -> str | None:
    """A small /proc file's text, or None when it cannot be read. os.open/os.read: open()
    adds an fstat, an isatty ioctl and two lseeks (three system calls here, seven there)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, 65536)]
        while len(chunks[-1]) == 65536:
            chunks.append(os.read(fd, 65536))
    except OSError:
        return None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", errors="replace")


class Attributor:
    """``attributor(record)`` fills in the record's attribution fields."""

    def __init__(self, resolver: ProcessResolver, *, proc: str = "/proc") -> None:
        self.resolver = resolver
        self._proc = proc
        self._local: dict[str, bool] = {}

    def __call__(self, record: FlowRecord) -> None:
        info = self.resolver.lookup(record.network, record.src, record.src_port, record.dst,
                                    record.dst_port)
        if info is not None:
            record.set_process(info)
            text = _read_small(f"{self._proc}/{info.pid}/cgroup")
            if text is not None:  # None: exited since; the process is known, its cgroup not
                record.unit, record.container = parse_cgroup(text)
            return
        # Only now ask whether the source is ours: the resolver's sock_diag socket may live
        # in another namespace than this process (tunproxy run), where this check would
        # wrongly call every flow remote before looking.
        if not self.is_local(record.src):
            record.attribution = REMOTE  # a routed host's flow (a VM, the LAN)
        else:
            record.attribution = f"failed: {self.resolver.last_failure or 'unknown'}"

    def is_local(self, address: str) -> bool:
        """Is ``address`` one of this host's (this namespace's) own? Binding to it tells
        (EADDRNOTAVAIL otherwise); answers are cached, as addresses rarely change."""
        known = self._local.get(address)
        if known is not None:
            return known
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((address, 0))
            local = True
        except OSError:
            local = False
        if len(self._local) >= _MAX_LOCAL_CACHE:
            self._local.clear()
        self._local[address] = local
        return local

    def close(self) -> None:
        self.resolver.close()
