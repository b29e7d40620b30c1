"""``tunproxy run [--rules FILE] [--capture FILE] [--summary] -- CMD [ARGS...]``.

One command's traffic, and nothing else's: CMD runs in a network namespace of its own
whose only route is a TUN held by this tunproxy; tunproxy itself stays in the namespace
it was started in, so its sockets to the world are ordinary sockets there, and the
host's links, routes and rules are never changed.

    tunproxy (host namespaces)                 child -> CMD (new net + mount namespaces)
    fork ------------------------------------> unshare; lo up; TUN, addresses, routes;
                                               resolv.conf bind-mounted (private)
    <------------------ TUN fd over a unix socket
    stack, relay, DNS on the TUN; "go" ------> fork: init (pid 1 of a new PID namespace)
                                                 fork: drop to SUDO_UID/SUDO_GID; exec CMD
    CMD exits -> init exits -> child exits (pidfd readable): stop, print the summary,
    exit with CMD's status

Signals: CMD stays in tunproxy's process group, so the terminal's Ctrl-C (and ^\\, and a
hangup) reach it directly; a signal sent to tunproxy with kill(1) is passed on to the init,
which passes it on to CMD. When CMD exits, its init exits, and the kernel ends whatever CMD
left running in its PID namespace. If tunproxy dies (even ``kill -9``), the child and the
init get SIGKILL (PR_SET_PDEATHSIG), the PID namespace goes with its init, the TUN closes
with tunproxy's last fd, and the kernel removes the namespaces once nothing uses them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import gc
import json
import logging
import os
import pwd
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tunproxy.app import Proxy, _data_loop_runner
from tunproxy.config import Config, parse_config
from tunproxy.driver import TunDriver
from tunproxy.errors import ConfigError, SetupError
from tunproxy.flows import FlowLog, FlowRecord
from tunproxy.relay import Relay
from tunproxy.summary import SummaryTable, format_rows
from tunproxy.tun import TunDevice

if TYPE_CHECKING:
    from tunproxy.capture.file import CaptureFile
    from tunproxy.procinfo import ProcessResolver

__all__ = ["RecordingFlowLog", "add_arguments", "can_make_namespaces", "default_config", "main",
           "run_command"]

log = logging.getLogger("tunproxy.run")

PR_SET_PDEATHSIG = 1
SI_KERNEL = 0x80
CLONE_NEWNET = 0x40000000
# Passed on to CMD when sent to tunproxy (not when the terminal sent them to both).
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
_libc = ctypes.CDLL(None, use_errno=True)


def can_make_namespaces() -> bool:
    """CAP_SYS_ADMIN (unshare) and CAP_NET_ADMIN (the TUN) in the effective set."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    caps = int(line.split()[1], 16)
                    return bool(caps & (1 << 21)) and bool(caps & (1 << 12))
    except OSError:
        pass
    return os.geteuid() == 0


def host_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    servers: list[str] = []
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append(fields[1])
    except OSError:
        pass
    return servers


def default_config(nameservers: Sequence[str]) -> Config:
    """No --rules: everything DIRECT, DNS answered with fake IPs and resolved by the host's
    own resolvers (tunproxy's sockets are host sockets)."""
    if not nameservers:
        raise SetupError("no nameserver in /etc/resolv.conf to resolve names with; give a "
                         "rules file with a dns section (--rules FILE)")
    servers = ", ".join(json.dumps(_udp_url(s)) for s in nameservers)
    text = f"rules: [MATCH,DIRECT]\ndns: {{mode: fake-ip, servers: [{servers}]}}\n"
    return parse_config(text, Path("<tunproxy run>"))


def _udp_url(address: str) -> str:
    address = address.split("%", 1)[0]
    return f"udp://[{address}]:53" if ":" in address else f"udp://{address}:53"


def adapt_config(config: Config) -> Config:
    """What a rules file means inside ``run``: DNS is always answered (the command's
    resolv.conf names tunproxy), and tunproxy's sockets carry no mark (they are host
    sockets; a system-wide tunproxy on the host should see them as any other)."""
    if config.dns is None or not config.dns.enable:
        config.dns = default_config(host_nameservers()).dns
    config.tun.fwmark = 0
    config.tun.auto_route = False
    return config


class RecordingFlowLog(FlowLog):
    """The flow log of a run: names the process of each flow as it opens, tells listeners
    (the capture) about it, and adds each ended flow to the summary. Ended records are
    kept only for a while (``KEEP_ENDED``), so a long run's memory stays bounded."""

    KEEP_ENDED = 4096

    def __init__(self, processes: ProcessResolver | None) -> None:
        super().__init__()
        self.records: dict[int, FlowRecord] = {}  # open flows and the latest ended ones
        self.summary = SummaryTable()
        self.processes = processes
        self.listeners: list[Callable[[FlowRecord], None]] = []
        self._ended: collections.deque[int] = collections.deque()

    def opened(self, record: FlowRecord) -> None:
        self.attribute_now(record)  # listeners select by process: it must be known now
        if record.process is None and self.processes is not None:
            info = self.processes.lookup(record.network, record.src, record.src_port,
                                         record.dst, record.dst_port)
            if info is not None:
                record.process, record.pid, record.uid = info.name, info.pid, info.uid
        if record.id not in self.records:
            self.records[record.id] = record
            for listener in self.listeners:
                listener(record)
        super().opened(record)

    def ended(self, record: FlowRecord, reason: str) -> None:
        if record.ended is not None:
            return
        super().ended(record, reason)
        self.records.setdefault(record.id, record)
        self.summary.add(record)
        self._ended.append(record.id)
        while len(self._ended) > self.KEEP_ENDED:
            self.records.pop(self._ended.popleft(), None)


class RunProxy(Proxy):
    def __init__(self, config: Config, child: Child,
                 processes: ProcessResolver | None) -> None:
        super().__init__(config)
        self.child = child
        self.processes = processes
        self.recording = RecordingFlowLog(processes)
        self.flow_log = self.recording
        self.on_started: list[Callable[[Relay, TunDriver], None]] = []

    def _processes(self) -> ProcessResolver | None:
        # PROCESS-NAME rules must look in the command's namespace, not tunproxy's.
        return self.processes

    def started(self, relay: Relay, driver: TunDriver) -> None:
        loop = asyncio.get_running_loop()
        for hook in self.on_started:
            hook(relay, driver)
        pidfd = self.child.pidfd
        loop.add_reader(pidfd, self._child_exited, loop, pidfd)
        self.child.go()

    def _child_exited(self, loop: asyncio.AbstractEventLoop, pidfd: int) -> None:
        loop.remove_reader(pidfd)
        self.child.reap()
        self.stopping.set()


class Child:
    """The forked child that becomes CMD, seen from tunproxy."""

    def __init__(self, pid: int, control: socket.socket) -> None:
        self.pid = pid
        self.control = control
        self.pidfd = os.pidfd_open(pid)
        self.status: int | None = None
        self.running = False  # CMD was told to start
        # Where signals sent to tunproxy go: this child, then the command's init.
        self.signal_target = [pid]

    def receive_tun(self) -> TunDevice:
        try:
            message, fds, _flags, _addr = socket.recv_fds(self.control, 65536, 1)
        except OSError as exc:
            raise SetupError(f"the command's namespace could not be set up: {exc}") from None
        if message.startswith(b"E"):
            raise SetupError(message[1:].decode(errors="replace"))
        if not message.startswith(b"T") or len(fds) != 1:
            raise SetupError("the command's namespace could not be set up (no TUN received)")
        info = json.loads(message[1:])
        return TunDevice(name=info["name"], fds=fds, vnet_hdr=info["vnet_hdr"],
                         offloads=frozenset(info["offloads"]))

    def go(self) -> None:
        """Start the command; from now on signals go to its init."""
        self.control.send(b"G")
        self.running = True
        message = self.control.recv(64)
        if message.startswith(b"P"):
            self.signal_target[0] = int(message[1:])

    def reap(self) -> int:
        if self.status is None:
            _pid, status = os.waitpid(self.pid, 0)
            self.status = _exit_code(status)
        return self.status

    def close(self) -> None:
        self.control.close()
        if self.status is None:
            # tunproxy stops before CMD did (an error of ours): CMD has no network left.
            # Before CMD started, the child waits for "go" and leaves when its control
            # socket closes.
            if self.running:
                os.kill(self.pid, signal.SIGKILL)
            self.reap()
        os.close(self.pidfd)


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)  # as shells report it
    return os.waitstatus_to_exitcode(status)


# -- the child -------------------------------------------------------------------------------


def _child_main(config: Config, argv: Sequence[str], control: socket.socket,
                parent: int) -> None:
    """In the forked child: namespaces, TUN to the parent, then the command's init. Never
    returns: this process waits for the init and exits with its status."""
    from tunproxy.netns import enter_private_namespace, nameserver_address, resolv_conf

    # Signals are for the command (the terminal's reach it directly; tunproxy passes the
    # rest to the init): this go-between only waits.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)
    try:
        tun = enter_private_namespace(config.tun, resolv_conf(nameserver_address(config.tun)))
        info = {"name": tun.name, "vnet_hdr": tun.vnet_hdr, "offloads": sorted(tun.offloads)}
        socket.send_fds(control, [b"T" + json.dumps(info).encode()], tun.fds)
        tun.close()
    except Exception as exc:
        message = str(exc) if isinstance(exc, SetupError) else f"{type(exc).__name__}: {exc}"
        control.send(b"E" + message.encode())
        os._exit(1)
    if control.recv(1) != b"G":
        os._exit(1)  # tunproxy could not start its side; it says why
    init = os.fork()  # pid 1 of the new PID namespace
    if init == 0:  # pragma: no cover - runs the command, exits with its status
        control.close()
        _init_main(argv)
    control.send(b"P%d" % init)
    control.close()
    _pid, status = os.waitpid(init, 0)
    os._exit(_exit_code(status))


def _init_main(argv: Sequence[str]) -> None:
    """pid 1 of the command's PID namespace: start the command, pass signals on, reap
    orphans, and exit with the command's status; the kernel then ends whatever the command
    left running, so the namespaces go with it."""
    from tunproxy.netns import mount_proc

    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    mount_proc()  # ps, /proc/PID in the command: its own PID namespace
    waited = set(FORWARDED) | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    cmd = os.fork()
    if cmd == 0:
        _exec_command(argv)
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    os._exit(1)
                if pid == 0:
                    break
                if pid == cmd:
                    os._exit(_exit_code(status))
            continue
        name = signal.Signals(info.si_signo).name
        if info.si_code == SI_KERNEL:
            log.debug("init: %s from the terminal: the command has it already", name)
            continue
        log.debug("init: %s from tunproxy: passed on to the command", name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(cmd, info.si_signo)


def _exec_command(argv: Sequence[str]) -> None:
    """The command itself: as the invoking user, with the signal state a shell would give."""
    try:
        _drop_privileges()
    except OSError as exc:
        print(f"tunproxy: cannot switch to the invoking user: {exc}", file=sys.stderr)
        os._exit(126)
    # Python ignores SIGPIPE and SIGXFSZ, and ignored signals survive exec: put them back.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    try:
        os.execvp(argv[0], list(argv))
    except FileNotFoundError:
        print(f"tunproxy: {argv[0]}: command not found", file=sys.stderr)
        os._exit(127)
    except OSError as exc:
        print(f"tunproxy: {argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(126)


def _drop_privileges() -> None:
    """Run CMD as the user who ran ``sudo tunproxy run``, not as root."""
    uid, gid = os.environ.get("SUDO_UID"), os.environ.get("SUDO_GID")
    if os.getuid() != 0 or uid is None or gid is None:
        return
    user, group = int(uid), int(gid)
    try:
        name = pwd.getpwuid(user).pw_name
        groups = os.getgrouplist(name, group)
    except KeyError:
        groups = [group]
    os.setgroups(groups)
    os.setgid(group)
    os.setuid(user)


# -- signals ---------------------------------------------------------------------------------


def _forward_signals(target: list[int]) -> None:
    """Pass signals sent to tunproxy on to CMD's init (one thread; the signals are blocked in
    all others). Terminal signals (si_code SI_KERNEL) reached CMD already: not sent twice."""
    wanted = set(FORWARDED)

    def loop() -> None:
        while True:
            info = signal.sigwaitinfo(wanted)
            name = signal.Signals(info.si_signo).name
            if info.si_code == SI_KERNEL:
                log.debug("%s from the terminal: the command has it already", name)
                continue
            log.debug("%s from pid %d: passed on to the command", name, info.si_pid)
            try:
                os.kill(target[0], info.si_signo)
            except ProcessLookupError:
                return

    threading.Thread(target=loop, name="signal-forwarder", daemon=True).start()


# -- the process resolver, in the command's namespace ---------------------------------------


def _processes_in(pid: int) -> ProcessResolver | None:
    """A ProcessResolver whose sock_diag socket lives in the command's namespace."""
    from tunproxy.procinfo import ProcessResolver

    # Every process here is the command's: a full scan is small, and must not be held back
    # by the rate limit meant for a whole busy machine (scan_budget 1: back to back).
    resolver = ProcessResolver(scan_budget=1.0)
    target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    failed: list[str] = []

    def make_socket() -> None:
        # A thread of its own: setns moves only it, and it ends right after.
        if _libc.setns(target, CLONE_NEWNET) != 0:
            failed.append(os.strerror(ctypes.get_errno()))
            return
        resolver.lookup("tcp", "127.0.0.1", 1, "127.0.0.1", 1)  # opens the socket here

    try:
        thread = threading.Thread(target=make_socket, name="netns-diag")
        thread.start()
        thread.join()
    finally:
        os.close(target)
    if failed:
        log.warning("processes will not be named: entering the namespace failed: %s",
                    failed[0])
        return None
    return resolver


# -- tunproxy run ----------------------------------------------------------------------------


def run_command(config: Config, argv: Sequence[str], *, summary: bool = False,
                capture: CaptureFile | None = None) -> int:
    """Run ``argv`` in a namespace of its own, through tunproxy; return its exit status."""
    config = adapt_config(config)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child execs or exits
        try:
            parent_sock.close()
            _child_main(config, argv, child_sock, parent)
        finally:
            os._exit(1)
    child_sock.close()
    # Block the forwarded signals before any thread starts: every thread inherits the mask,
    # and the forwarder's sigwaitinfo is the only place they arrive.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    child = Child(pid, parent_sock)
    _forward_signals(child.signal_target)
    tun: TunDevice | None = None
    proxy: RunProxy | None = None
    try:
        tun = child.receive_tun()
        proxy = RunProxy(config, child, _processes_in(pid))
        if capture is not None:
            proxy.recording.listeners.append(capture.flow_opened)
            proxy.on_started.append(capture.attach)
        gc.freeze()
        with _data_loop_runner() as runner:
            runner.run(proxy.serve(tun))
    finally:
        if tun is not None:
            tun.close()
        child.close()
        if capture is not None:
            capture.close()
    if summary and proxy is not None:
        print(format_rows(proxy.recording.summary.rows()), file=sys.stderr, end="")
    status = child.status
    return 1 if status is None else status


# -- the command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rules", metavar="FILE", dest="run_rules",
                        help="rules file (default: everything DIRECT, fake-ip DNS)")
    parser.add_argument("--capture", metavar="FILE", type=Path,
                        help="write CMD's packets to FILE (pcapng, one comment per packet)")
    parser.add_argument("--capture-limit", metavar="MB", type=float, default=256.0,
                        help="stop writing the capture at this size (default: 256)")
    parser.add_argument("--capture-select", metavar="KEY=VALUE", action="append", default=[],
                        help="capture only these flows (process=, pid=, uid=, domain=, rule=, "
                        "flow=; repeatable)")
    parser.add_argument("--summary", action="store_true",
                        help="when CMD exits, print what it talked to (per destination)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")


def main(args: argparse.Namespace) -> int:
    """``tunproxy run``: errors the user can fix raise ConfigError/SetupError (cli says them)."""
    from tunproxy.config import load_config

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError("give the command to run after --, e.g. tunproxy run -- curl URL")
    if args.capture_select and args.capture is None:
        raise ConfigError("--capture-select chooses what --capture FILE writes; give both")
    if args.capture_limit <= 0:
        raise ConfigError("--capture-limit takes a size in MB above 0")
    rules = args.run_rules or args.rules
    config = load_config(rules) if rules else default_config(host_nameservers())
    if not can_make_namespaces():
        raise SetupError("tunproxy run needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN) to "
                         "create the command's network namespace and TUN; run it with sudo")
    capture = None
    if args.capture is not None:
        from tunproxy.capture.file import CaptureFile
        from tunproxy.capture.select import parse_selection

        capture = CaptureFile(args.capture, limit=int(args.capture_limit * 1024 * 1024),
                              selection=parse_selection(args.capture_select))
    return run_command(config, cmd, summary=args.summary, capture=capture)
