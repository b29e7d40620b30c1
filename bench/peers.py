"""The peers tunproxy is measured against, run in the same topology as tunproxy (issue 17).

* **hev-socks5-tunnel** (C, lwIP; the fastest tun2socks): a TUN device of its own in the client
  namespace, a host route for the benchmark server (``SERVER4/32``) into it, every flow to
  the SOCKS5 server (dante). Built from the source in ``/work/shared/peers/hev/`` into a cache
  outside the repository (``build.sh``: ``/var/cache/tunproxy-peers/hev``); the binary can
  also be named with ``$HEV_SOCKS5_TUNNEL``.
* **redsocks** (Debian package): the classic transparent SOCKS proxy; an iptables ``nat
  OUTPUT`` rule REDIRECTs the client's TCP to the benchmark server into it, and it relays over
  SOCKS5 to dante. TCP only here (its UDP side needs TPROXY).

Each peer is a process in the client namespace (``Netns.spawn``, so ``Topology.close()`` ends
it by pid), started fresh per column and round like tunproxy. ``carried()`` is the evidence
that a figure went through the peer at all (TUN bytes, or connections the nat rule
redirected); a figure without it would be a baseline figure under the peer's name.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.measure import tun_bytes
from tests.netns import SERVER4, Netns

HEV_DEVICE = "hevbench0"
HEV_CACHE = Path("/var/cache/tunproxy-peers/hev/bin/hev-socks5-tunnel")
HEV_BUILD = Path("/work/shared/peers/hev/build.sh")
REDSOCKS_PORT = 12345
PEERS = ("hev", "redsocks")
# The tests each peer can carry: redsocks has no UDP without TPROXY.
PEER_TESTS = {"hev": ("mem", "tcp", "cps", "latency", "udp", "dgram"),
              "redsocks": ("mem", "tcp", "cps", "latency")}


class PeerError(Exception):
    """A peer could not be found or started; ``str(exc)`` is the reason shown in the report."""


def hev_binary() -> Path | None:
    named = os.environ.get("HEV_SOCKS5_TUNNEL")
    for candidate in (Path(named) if named else None, HEV_CACHE):
        if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("hev-socks5-tunnel")
    return Path(found) if found else None


def build_hev() -> Path | None:
    """Build hev into its cache with the bundled script (about a minute, once); None when the
    script is not there or the build fails."""
    if hev_binary() is None and HEV_BUILD.exists():
        subprocess.run(["bash", str(HEV_BUILD)], check=False, capture_output=True, timeout=900)
    return hev_binary()


def available(name: str) -> str | None:
    """None when peer ``name`` can run here, else why not."""
    if name == "hev":
        return None if hev_binary() else (
            f"hev-socks5-tunnel not built (bash {HEV_BUILD}, or bench/run.py --build-peers)")
    if name == "redsocks":
        if shutil.which("redsocks") is None:
            return "redsocks not installed (apt install redsocks)"
        if shutil.which("iptables") is None:
            return "iptables not installed (redsocks needs its REDIRECT)"
        return None
    raise ValueError(name)


@dataclass
class Peer:
    name: str
    ns: Netns
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def label(self) -> str:
        return "hev-socks5-tunnel" if self.name == "hev" else self.name

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln]
            if lines:
                return lines[-1][:300]
        return "(empty log)"

    def gone(self) -> str | None:
        rc = self.proc.poll()
        return None if rc is None else f"{self.label} exited (rc={rc}): {self.log_tail()}"

    def carried(self) -> int:
        """hev: bytes through its TUN; redsocks: connections its nat rule redirected."""
        if self.name == "hev":
            return tun_bytes(self.ns, HEV_DEVICE) or 0
        out = self.ns.run("iptables", "-w", "-t", "nat", "-L", "OUTPUT", "-v", "-x", "-n",
                          check=False).stdout
        return sum(int(line.split()[0]) for line in out.splitlines()
                   if "redir ports" in line and line.split()[0].isdigit())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.name == "redsocks":
            self.ns.run("iptables", "-w", "-t", "nat", "-F", "OUTPUT", check=False)
        else:
            self.ns.run("ip", "route", "del", f"{SERVER4}/32", "dev", HEV_DEVICE, check=False)


def _wait(condition: str, ok: Callable[[], object], proc: subprocess.Popen[bytes],
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        if proc.poll() is not None:
            raise PeerError(f"exited (rc={proc.returncode}) before {condition}")
        time.sleep(0.02)
    raise PeerError(f"no {condition} within {timeout:g} s")


def start(name: str, ns: Netns, workdir: Path, mtu: int, socks_host: str, socks_port: int,
          tag: str) -> Peer:
    """Start peer ``name`` in ``ns`` relaying the benchmark server's traffic to the SOCKS5
    server; PeerError (with the peer's last log line) when it does not come up."""
    why = available(name)
    if why is not None:
        raise PeerError(why)
    log_path = workdir / f"{tag}.log"
    log = log_path.open("wb")
    try:
        if name == "hev":
            binary = hev_binary()
            assert binary is not None
            conf = workdir / f"{tag}.yaml"
            conf.write_text(
                f"tunnel:\n  name: {HEV_DEVICE}\n  mtu: {mtu}\n  ipv4: 198.18.0.1\n"
                f"socks5:\n  address: {socks_host}\n  port: {socks_port}\n  udp: 'udp'\n"
                "misc:\n  log-level: warn\n"
            )
            proc = ns.spawn(str(binary), str(conf), stdout=log, stderr=subprocess.STDOUT)
            peer = Peer(name, ns, proc, log_path)
            try:
                _wait(f"device {HEV_DEVICE}", lambda: ns.run(
                    "ip", "link", "show", HEV_DEVICE, check=False).returncode == 0, proc, 10)
                ns.run("ip", "link", "set", HEV_DEVICE, "up")
                # More specific than the default route over the veth, which still carries the
                # SOCKS5 server's own address.
                ns.run("ip", "route", "replace", f"{SERVER4}/32", "dev", HEV_DEVICE)
            except (PeerError, subprocess.CalledProcessError) as exc:
                peer.stop()
                raise PeerError(f"{peer.label}: {exc}; {peer.log_tail()}") from None
            return peer
        conf = workdir / f"{tag}.conf"
        conf.write_text(
            "base {\n  log_debug = off;\n  log_info = off;\n  log = stderr;\n  daemon = off;\n"
            "  redirector = iptables;\n}\n"
            f"redsocks {{\n  local_ip = 127.0.0.1;\n  local_port = {REDSOCKS_PORT};\n"
            f"  ip = {socks_host};\n  port = {socks_port};\n  type = socks5;\n}}\n"
        )
        proc = ns.spawn("redsocks", "-c", str(conf), stdout=log, stderr=subprocess.STDOUT)
        peer = Peer(name, ns, proc, log_path)
        try:
            _wait(f"listener on {REDSOCKS_PORT}", lambda: re.search(
                rf":{REDSOCKS_PORT}\s", ns.run("ss", "-Htln", check=False).stdout), proc, 10)
            ns.run("iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", SERVER4,
                   "-j", "REDIRECT", "--to-ports", str(REDSOCKS_PORT))
        except (PeerError, subprocess.CalledProcessError) as exc:
            peer.stop()
            raise PeerError(f"redsocks: {exc}; {peer.log_tail()}") from None
        return peer
    finally:
        log.close()
