"""Network namespaces for end-to-end tests and benchmarks.

A ``Topology`` is two namespaces joined by a veth pair::

    client ns (tunproxy runs here)              server ns
    +-------------------------------+          +------------------------------+
    | tunproxy0 (TUN)  <- default   |  veth    | 10.231.0.2/30  fd00:231::2   |
    | 10.231.0.1/30  fd00:231::1    |----------| "internet" on lo:            |
    | main table: default via .2    |          |   10.232.0.1, fd00:232::1    |
    +-------------------------------+          +------------------------------+

The server's service addresses (``SERVER4``/``SERVER6``) are not on the
connected veth subnet, so once tunproxy's policy routing is up, the client's
traffic to them enters the TUN, and tunproxy's own fwmarked sockets leave by
the main table's default route over the veth.

Everything a Topology creates is removed by ``close()``, which fixtures call
in a finally: processes it started (by pid), then the namespaces (deleting a
namespace destroys its veth end and everything inside it).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CLIENT4 = "10.231.0.1"
GATEWAY4 = "10.231.0.2"
CLIENT6 = "fd00:231::1"
GATEWAY6 = "fd00:231::2"
SERVER4 = "10.232.0.1"
SERVER6 = "fd00:232::1"
# A second address in the server namespace for proxies: upstream servers' own addresses
# bypass the tunnel, so they must not be the addresses the tests reach through it.
PROXY4 = "10.232.0.2"
PROXY6 = "fd00:232::2"

REPO = Path(__file__).resolve().parent.parent
LOG_TAIL_LINES = 200
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run(*args: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), check=check, timeout=timeout, capture_output=True, text=True
    )


class Netns:
    """One network namespace: run commands in it, open sockets in it.

    Waits here are long (a minute for a process to start or listen): the machine the suite
    runs on is shared and loaded, and a generous deadline costs time only when it fails."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._procs: list[subprocess.Popen[bytes]] = []

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(
        self, *args: str, check: bool = True, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.cmd(*args), check=check, timeout=timeout, capture_output=True, text=True,
            input=input,
        )

    def spawn(self, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace; it is killed by close()."""
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        kwargs.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(self.cmd(*args), **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with this thread inside the namespace (sockets made here stay in it)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {self.name} failed")
            try:
                yield
            finally:
                if _libc.setns(home, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test's namespace failed")
        finally:
            os.close(target)
            os.close(home)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        with self.entered():
            return socket.socket(family, type)

    def connect(self, host: str, port: int, timeout: float = 30.0) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = self.socket(family)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_tcp_listening(self, port: int, timeout: float = 60.0) -> None:
        """Wait until something listens on TCP ``port`` in this namespace (polls ``ss``)."""
        self._wait_bound("-Htln", f"tcp port {port}", port, timeout)

    def wait_udp_bound(self, port: int, timeout: float = 60.0) -> None:
        """Wait until something is bound to UDP ``port`` in this namespace."""
        self._wait_bound("-Huln", f"udp port {port}", port, timeout)

    def _wait_bound(self, ss_flags: str, what: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"[:\]]{port}\s")
        while time.monotonic() < deadline:
            if pattern.search(self.run("ss", ss_flags, check=False).stdout):
                return
            time.sleep(0.02)
        raise TimeoutError(f"nothing on {what} in {self.name}")

    def routing_snapshot(self) -> dict[str, str]:
        """What `ip rule`, routes (all tables) and links look like now."""
        views = {
            "rule4": ("ip", "-4", "rule"),
            "rule6": ("ip", "-6", "rule"),
            "route4": ("ip", "-4", "route", "show", "table", "all"),
            "route6": ("ip", "-6", "route", "show", "table", "all"),
            "link": ("ip", "-o", "link"),
            "addr": ("ip", "-o", "addr"),
        }
        return {key: self.run(*argv).stdout for key, argv in views.items()}

    def kill_spawned(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
        self._procs.clear()


class Tunproxy:
    """A tunproxy process running in a namespace, with its log captured."""

    def __init__(self, ns: Netns, config_path: Path, state_dir: Path, args: Sequence[str]) -> None:
        self.ns = ns
        self.config_path = config_path
        self.state_dir = state_dir
        argv = ns.cmd(
            sys.executable, "-m", "tunproxy", "--rules", str(config_path),
            "--state-dir", str(state_dir), *args,
        )
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=REPO,
        )
        self._lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._cond:
                self._lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._lines.append("<exited>")
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self._lines)

    def wait_for_log(self, pattern: str, timeout: float = 60.0, start: int = 0) -> str:
        """Block until a log line matches ``pattern`` (a regex); return the line."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = start
        with self._cond:
            while True:
                while index < len(self._lines):
                    line = self._lines[index]
                    index += 1
                    if regex.search(line):
                        return line
                    if line == "<exited>":
                        raise RuntimeError(
                            f"tunproxy exited (rc={self.proc.poll()}) before logging "
                            f"{pattern!r}:\n{self.log_unlocked()}"
                        )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no log line matching {pattern!r}:\n{self.log_unlocked()}")
                self._cond.wait(remaining)

    def wait_for_count(self, text: str, count: int, timeout: float = 60.0) -> None:
        """Block until ``text`` occurs ``count`` times in the log. A flow's end line comes
        when tunproxy has taken the client's last packet, which can be after the client
        is done: wait for them before stopping tunproxy, or the last flows end "shutdown"."""
        deadline = time.monotonic() + timeout
        seen = index = 0
        with self._cond:
            while True:
                while index < len(self._lines):
                    seen += self._lines[index].count(text)
                    index += 1
                if seen >= count:
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{text!r} {seen} times, not {count}:\n{self.log_unlocked()[-3000:]}")
                self._cond.wait(remaining)

    def log_unlocked(self) -> str:
        return "\n".join(self._lines)

    def line_count(self) -> int:
        with self._cond:
            return len(self._lines)

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for_log(r"tunproxy ready", timeout)

    def send_signal(self, sig: int) -> None:
        # `ip netns exec` execs the command, so this pid is tunproxy itself.
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        self.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise
        finally:
            self._reader.join(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._reader.join(timeout=30)


class Topology:
    def __init__(self, workdir: Path, *, mtu: int = 1500, echo_logs: bool = True) -> None:
        tag = secrets.token_hex(3)
        # Print each tunproxy's log (its tail) at close: pytest shows it when a test fails.
        self.echo_logs = echo_logs
        self.workdir = workdir
        self.client = Netns(f"tpc-{tag}")
        self.server = Netns(f"tps-{tag}")
        self.veth_client = f"tpa{tag}"
        self.veth_server = f"tpb{tag}"
        self.mtu = mtu
        self._tunproxies: list[Tunproxy] = []
        self._made: list[Netns] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in (self.client, self.server):
            run("ip", "netns", "add", ns.name)
            self._made.append(ns)
            ns.run("ip", "link", "set", "lo", "up")
            ns.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
            ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        run(
            "ip", "link", "add", self.veth_client, "netns", self.client.name, "mtu", str(self.mtu),
            "type", "veth", "peer", "name", self.veth_server, "netns", self.server.name,
            "mtu", str(self.mtu),
        )
        c, s = self.client, self.server
        c.run("ip", "addr", "add", f"{CLIENT4}/30", "dev", self.veth_client)
        c.run("ip", "addr", "add", f"{CLIENT6}/126", "dev", self.veth_client, "nodad")
        c.run("ip", "link", "set", self.veth_client, "up")
        c.run("ip", "route", "add", "default", "via", GATEWAY4)
        c.run("ip", "-6", "route", "add", "default", "via", GATEWAY6)
        s.run("ip", "addr", "add", f"{GATEWAY4}/30", "dev", self.veth_server)
        s.run("ip", "addr", "add", f"{GATEWAY6}/126", "dev", self.veth_server, "nodad")
        s.run("ip", "addr", "add", f"{SERVER4}/32", "dev", "lo")
        s.run("ip", "addr", "add", f"{SERVER6}/128", "dev", "lo")
        s.run("ip", "addr", "add", f"{PROXY4}/32", "dev", "lo")
        s.run("ip", "addr", "add", f"{PROXY6}/128", "dev", "lo", "nodad")
        s.run("ip", "link", "set", self.veth_server, "up")

    def start_tunproxy(
        self, config: str, *args: str, wait: bool = True, name: str = "tunproxy.yaml"
    ) -> Tunproxy:
        path = self.workdir / name
        path.write_text(config)
        state_dir = self.workdir / "state"
        state_dir.mkdir(exist_ok=True)
        tp = Tunproxy(self.client, path, state_dir, ["--log-level", "debug", *args])
        self._tunproxies.append(tp)
        if wait:
            tp.wait_ready()
        return tp

    def close(self) -> None:
        for tp in self._tunproxies:
            with contextlib.suppress(Exception):
                tp.kill()
            if self.echo_logs:
                tail = "\n".join(tp.log.splitlines()[-LOG_TAIL_LINES:])
                print(f"---- tunproxy log ({tp.config_path.name}), last lines ----\n{tail}")
        for ns in self._made:
            ns.kill_spawned()
            # Anything else still inside (a client a test forgot): end it so the namespace goes.
            pids = run("ip", "netns", "pids", ns.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", ns.name, check=False)
        self._made.clear()


@contextlib.contextmanager
def topology(workdir: Path, **kwargs: Any) -> Iterator[Topology]:
    topo = Topology(workdir, **kwargs)
    try:
        yield topo
    finally:
        topo.close()
