"""A private network namespace for one command (``tunproxy run``): made by the child.

The child of ``tunproxy run`` calls ``enter_private_namespace``: it leaves the host's
network and mount namespaces (unshare), and inside its own it brings ``lo`` up, creates
the TUN, gives it its addresses and makes it the only route, and points
``/etc/resolv.conf`` at tunproxy's DNS with a bind mount that only its own mount
namespace sees. The TUN's file descriptor goes back to the parent, which stays in the
host's namespaces, so every socket tunproxy opens to the world is a host socket: the
host's links, addresses, routes and rules are never touched.

Nothing here needs undoing. The namespaces live as long as something uses them (the
command and its children, or the TUN's file descriptor); once both are gone the kernel
removes the namespace with its TUN, and the mount namespace with its bind mount.
"""

from __future__ import annotations

import ctypes
import os
import socket

from tunproxy.config import TunConfig
from tunproxy.errors import SetupError
from tunproxy.tun import TunDevice, open_tun

__all__ = ["enter_private_namespace", "mount_proc", "nameserver_address", "resolv_conf"]

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
IFA_F_NODAD = 0x02

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what} failed: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(_libc.mount(source and source.encode(), target.encode(),
                       fstype and fstype.encode(), flags, None), f"mount {target}")


def nameserver_address(tun: TunConfig) -> str:
    """The address the command's resolv.conf names: the TUN network's other IPv4 host (or
    IPv6, without IPv4). Every packet to it enters the TUN, where DNS is answered."""
    for family in (4, 6):
        for interface in tun.addresses:
            if interface.version == family:
                for host in interface.network.hosts():
                    if host != interface.ip:
                        return str(host)
                return str(interface.ip + 1)
    raise SetupError("the TUN has no address to answer DNS on")


def resolv_conf(nameserver: str) -> str:
    return (f"# written by tunproxy run: DNS inside this namespace is answered by tunproxy\n"
            f"nameserver {nameserver}\n")


def enter_private_namespace(tun: TunConfig, resolv: str | None) -> TunDevice:
    """Move this process into new network and mount namespaces, set them up, return the TUN.

    Only for the child of ``tunproxy run`` (it changes the whole process's namespaces).
    """
    # CLONE_NEWPID: this process's next child is pid 1 of a new PID namespace.
    _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID),
           "creating a network namespace (unshare)")
    # Mounts made from here on stay in this mount namespace: no propagation to the host.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    device = open_tun(tun.name, offload=tun.offload, queues=1)
    try:
        _set_up_links(tun)
        if resolv is not None:
            _bind_resolv_conf(resolv)
    except BaseException:
        device.close()
        raise
    return device


def mount_proc() -> None:
    """A /proc of the new PID namespace (called by its pid 1), in the private mount ns."""
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _set_up_links(tun: TunConfig) -> None:
    from pyroute2 import IPRoute

    with open("/proc/sys/net/ipv6/conf/all/accept_dad", "w") as f:
        f.write("0")  # the TUN's IPv6 address is usable at once
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        index = ipr.link_lookup(ifname=tun.name)[0]
        ipr.link("set", index=index, mtu=tun.mtu, txqlen=tun.txqueuelen)
        families: list[int] = []
        family: int
        for interface in tun.addresses:
            family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
            ipr.addr("add", index=index, address=str(interface.ip),
                     prefixlen=interface.network.prefixlen,
                     flags=IFA_F_NODAD if family == socket.AF_INET6 else 0)
            if family not in families:
                families.append(family)
        ipr.link("set", index=index, state="up")
        for family in families:
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
            ipr.route("add", family=family, dst=dst, oif=index)


def _bind_resolv_conf(content: str) -> None:
    """Bind a file holding ``content`` over /etc/resolv.conf, in this mount namespace only.

    The file lives on a tmpfs mounted for a moment over /tmp (in this namespace) and
    detached again: the bind mount keeps it, and nothing is ever written to the host's disk.
    """
    target = os.path.realpath("/etc/resolv.conf")
    if not os.path.exists(target):
        raise SetupError("/etc/resolv.conf does not exist (or is a dangling link); the command "
                         "could not be pointed at tunproxy's DNS")
    _mount("tunproxy", "/tmp", "tmpfs", 0)
    try:
        path = "/tmp/resolv.conf"
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, 0o644)
        _mount(path, target, None, MS_BIND)
    finally:
        _check(_libc.umount2(b"/tmp", MNT_DETACH), "unmounting the temporary /tmp")

