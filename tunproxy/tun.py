"""The TUN device: /dev/net/tun with a virtio-net header and offloads.

With ``IFF_VNET_HDR`` every packet read or written carries a 10-byte
virtio_net_hdr. Once ``TUNSETOFFLOAD`` says we accept checksum offload and
TSO/USO, the kernel hands us TCP super-packets of up to 64 KB with a partial
checksum, and takes super-packets back, segmenting them itself. That is what
lets a userspace stack in Python move gigabits.

``IFF_MULTI_QUEUE`` gives one file descriptor per queue; the driver reads all
of them (later, one worker process per queue).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import struct
from dataclasses import dataclass, field

from tunproxy.errors import SetupError

__all__ = ["VNET_HDR_LEN", "TunDevice", "open_tun"]

log = logging.getLogger("tunproxy.tun")

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

VNET_HDR_LEN = 10

# Most capable first; the kernel refuses flags it does not know (USO needs 6.2+).
_OFFLOAD_LADDER = (
    ("csum tso4 tso6 uso4 uso6", TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6),
    ("csum tso4 tso6", TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6),
    ("csum", TUN_F_CSUM),
)


@dataclass(slots=True)
class TunDevice:
    name: str
    fds: list[int]
    vnet_hdr: bool
    offloads: frozenset[str] = field(default_factory=frozenset)

    @property
    def tso(self) -> bool:
        return "tso4" in self.offloads

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (root without it, e.g. in a container, has not)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))  # CAP_NET_ADMIN
    except OSError:
        return os.geteuid() == 0
    return False


def _open_queue(name: str, flags: int) -> int:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SetupError(
            "/dev/net/tun does not exist: load the tun module (modprobe tun) or give the "
            "container the device"
        ) from None
    except PermissionError:
        raise SetupError(
            "tunproxy needs root or CAP_NET_ADMIN to open /dev/net/tun; run it with sudo"
        ) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            raise SetupError(
                "tunproxy needs root or CAP_NET_ADMIN to create a TUN device; run it with sudo"
            ) from None
        if exc.errno in (errno.EBUSY, errno.EINVAL):
            raise SetupError(
                f"the interface name {name} is taken by another device; set tun.name to "
                "another name"
            ) from None
        raise SetupError(f"could not create the TUN device {name}: {exc.strerror}") from None
    return fd


def open_tun(name: str, *, offload: bool, queues: int = 1) -> TunDevice:
    """Create the TUN device ``name`` with ``queues`` queues (fds, non-blocking)."""
    if not has_net_admin():
        raise SetupError("tunproxy needs root or CAP_NET_ADMIN; run it with sudo")
    flags = IFF_TUN | IFF_NO_PI
    if offload:
        flags |= IFF_VNET_HDR
    if queues > 1:
        flags |= IFF_MULTI_QUEUE
    fds: list[int] = []
    try:
        for _ in range(queues):
            fds.append(_open_queue(name, flags))
        enabled: frozenset[str] = frozenset()
        if offload:
            for fd in fds:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            for label, bits in _OFFLOAD_LADDER:
                try:
                    for fd in fds:
                        fcntl.ioctl(fd, TUNSETOFFLOAD, bits)
                except OSError as exc:
                    log.info("the kernel refused TUN offloads %s (%s); trying fewer", label,
                             exc.strerror)
                    continue
                enabled = frozenset(label.split())
                break
            else:
                log.warning("the kernel accepts no TUN offloads; running without TSO "
                            "(slower)")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return TunDevice(name=name, fds=fds, vnet_hdr=offload, offloads=enabled)
