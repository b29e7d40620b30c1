"""``tunproxy run -- CMD``: one command's traffic through tunproxy, nothing else touched.

The whole ``tunproxy run`` runs inside the Topology's client namespace (``ip netns exec``),
so the "host" whose routing must stay untouched is that namespace, and DIRECT leaves by its
veth to the server namespace. Each test checks what the command sees (output, exit
status), what tunproxy reports (summary, capture), and what is left behind (nothing).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO

import pytest

from tests.netns import REPO, SERVER4, SERVER6, Netns, Topology, topology

pytestmark = pytest.mark.netns

HTTP_PORT = 8080
HTTP_PORT_B = 8082
CLOSED_PORT = 8081  # nothing listens: refused
NAME = "web.run.test"


class Lab:
    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.webroot = tmp / "www"
        self.webroot.mkdir()
        self.payload = secrets.token_bytes(200_000)
        (self.webroot / "data.bin").write_bytes(self.payload)
        (self.webroot / "b.bin").write_bytes(b"the other run\n")
        for port in (HTTP_PORT, HTTP_PORT_B):
            topo.server.spawn(sys.executable, "-m", "http.server", "--bind", SERVER4,
                              "--directory", str(self.webroot), str(port))
            topo.server.wait_tcp_listening(port)
        self.dnsmasq_log = tmp / "dnsmasq.log"
        self.dnsmasq_log.write_text("")
        topo.server.spawn(
            "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--user=root", "--pid-file",
            f"--listen-address={SERVER4}", "--bind-interfaces", "--port=53",
            f"--address=/{NAME}/{SERVER4}", "--log-queries", f"--log-facility={self.dnsmasq_log}",
        )  # fmt: skip
        topo.server.wait_udp_bound(53)
        self.rules = tmp / "rules.yaml"
        self.rules.write_text(
            "rules:\n  - MATCH,DIRECT\n"
            f"dns:\n  mode: fake-ip\n  servers: [udp://{SERVER4}:53]\n"
        )

    def argv(self, *args: str, cmd: Sequence[str]) -> list[str]:
        return self.topo.client.cmd(sys.executable, "-m", "tunproxy", "run", *args, "--", *cmd)

    def run(self, *args: str, cmd: Sequence[str], timeout: float = 90,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(*args, cmd=cmd), capture_output=True, timeout=timeout,
                              cwd=REPO, env=env)

    def url(self, host: str = SERVER4, port: int = HTTP_PORT, path: str = "data.bin") -> str:
        return f"http://{host}:{port}/{path}"


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with topology(tmp_path) as topo:
        yield Lab(topo, tmp_path)


def _session_of(pid: str) -> int | None:
    """The session id of ``pid`` (field 6 of /proc/PID/stat), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[3])


# A namespace is named here by its inode, and the kernel gives a freed namespace's inode
# number to the next namespace made (the lowest free one): on a machine where other tests
# make namespaces all the time, an inode seen after ours went may well be someone else's
# new namespace. So only processes of the run's own session count: the tests start
# tunproxy as a session leader (start_new_session), and everything the command leaves
# running stays in that session.


def _netns_users(inode: int, session: int) -> list[str]:
    """Every process of ``session``, and every open fd of one, that still holds network
    namespace ``inode``."""
    users = []
    link = f"net:[{inode}]"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if _session_of(pid) != session:
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/net") == link:
                users.append(f"pid {pid}")
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == link:
                    users.append(f"pid {pid} fd {fd}")
        except OSError:
            continue
    return users


def _wait_for(condition: object, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(what)


# -- output, status, host untouched ------------------------------------------------------------


def test_curl_output_and_exit_status_pass_through(lab: Lab) -> None:
    before = lab.topo.client.routing_snapshot()
    done = lab.run(cmd=["curl", "-sS", lab.url()])
    assert done.returncode == 0, done.stderr
    assert done.stdout == lab.payload
    assert lab.topo.client.routing_snapshot() == before

    done = lab.run(cmd=["sh", "-c", "echo to-stderr >&2; exit 42"])
    assert done.returncode == 42
    assert done.stderr == b"to-stderr\n"  # and nothing of tunproxy's at the default level


def test_ipv6_goes_through_too(lab: Lab) -> None:
    lab.topo.server.spawn(sys.executable, "-m", "http.server", "--bind", SERVER6,
                          "--directory", str(lab.webroot), str(HTTP_PORT))
    lab.topo.server.wait_tcp_listening(HTTP_PORT)
    done = lab.run("--summary", cmd=["curl", "-sS", "-g", f"http://[{SERVER6}]:{HTTP_PORT}/b.bin"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"the other run\n"
    assert (SERVER6, f"tcp/{HTTP_PORT}") in _summary_rows(done.stderr.decode())


def test_refused_target_gives_curl_exit_7(lab: Lab) -> None:
    done = lab.run(cmd=["curl", "-sS", lab.url(port=CLOSED_PORT)])
    assert done.returncode == 7, done.stderr
    assert b"Could not connect" in done.stderr or b"Failed to connect" in done.stderr


def _holders(link: str, session: int) -> list[int]:
    """Pids of ``session`` whose namespace link (e.g. ``net:[4026532]``) is ``link``."""
    kind = link.split(":", 1)[0]
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if _session_of(pid) != session:
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/{kind}") == link:
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def _read_lines(stream: IO[bytes], count: int, timeout: float = 60.0) -> list[bytes]:
    """``count`` lines from a pipe, never blocking past ``timeout``."""
    buffer = bytearray()
    _read_while(stream.fileno(), buffer, lambda: buffer.count(b"\n") < count,
                f"{count} lines", timeout)
    return bytes(buffer).splitlines(keepends=True)[:count]


def _read_while(fd: int, buffer: bytearray, wanted: Callable[[], bool], what: str,
                timeout: float) -> None:  # fmt: skip
    """Read ``fd`` into ``buffer`` while ``wanted()``; fails, never blocks, past ``timeout``."""
    deadline = time.monotonic() + timeout
    while wanted():
        left = deadline - time.monotonic()
        assert left > 0, f"{what} not seen in {bytes(buffer)!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"{what} not seen before the end: {bytes(buffer)!r}"
            buffer += chunk


NS_REPORT = "readlink /proc/self/ns/net /proc/self/ns/mnt /proc/self/ns/pid"


def test_host_untouched_during_run_and_nothing_left_after_kill_9(lab: Lab) -> None:
    client: Netns = lab.topo.client
    before = client.routing_snapshot()
    state_dir = lab.tmp / "state"
    proc = subprocess.Popen(
        client.cmd(sys.executable, "-m", "tunproxy", "--state-dir", str(state_dir), "run",
                   "--", "sh", "-c", f"{NS_REPORT}; sleep 600 & sleep 600"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True)
    session = proc.pid  # ip netns exec exec'd: tunproxy leads the new session
    try:
        assert proc.stdout is not None
        net, mnt, pidns = (line.decode().strip() for line in _read_lines(proc.stdout, 3))
        assert net != os.readlink(f"/proc/{proc.pid}/ns/net")  # not tunproxy's namespace
        inside_pid = _holders(net, session)[0]
        # Inside: its own TUN and routes, DNS pointed at tunproxy.
        inside = subprocess.run(["nsenter", "-t", str(inside_pid), "-n", "-m", "sh", "-c",
                                 "ip route; cat /etc/resolv.conf"],
                                capture_output=True, text=True, check=True,
                                timeout=60).stdout
        assert "default dev tunproxy0" in inside and "nameserver 172.19.0.2" in inside
        assert client.routing_snapshot() == before  # during
        # init, sh and its two sleeps (sh starts them after it printed the lines above)
        _wait_for(lambda: len(_holders(pidns, session)) == 4, what="4 processes in the command")
        proc.kill()  # kill -9 of tunproxy (ip netns exec exec'd it: this pid is tunproxy)
        proc.wait(timeout=30)
        # Every process of the command's is gone (the background sleep too), and with them
        # the namespaces: nothing holds them, no fd, no mount.
        _wait_for(lambda: not _holders(pidns, session), what="the command's processes to end")
        _wait_for(lambda: not _netns_users(int(net[5:-1]), session), what="its netns to go")
        assert not _holders(mnt, session)
        assert client.routing_snapshot() == before  # after
        assert not state_dir.exists() or not list(state_dir.iterdir())
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGKILL)
            proc.wait(timeout=30)


def test_what_the_command_leaves_running_ends_with_it(lab: Lab) -> None:
    proc = subprocess.Popen(lab.argv(cmd=["sh", "-c", f"{NS_REPORT}; (sleep 600 &); exit 4"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            start_new_session=True)
    session = proc.pid  # ip netns exec exec'd: tunproxy leads the new session
    try:
        # The orphaned sleep holds the pipes too: they end when it does.
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == 4, err
    net, mnt, pidns = out.decode().split()
    _wait_for(lambda: not _holders(pidns, session), what="the orphaned sleep to end")
    _wait_for(lambda: not _netns_users(int(net[5:-1]), session), what="its netns to go")
    assert not _holders(mnt, session)


def test_command_runs_as_the_invoking_user(lab: Lab) -> None:
    env = dict(os.environ, SUDO_UID="65534", SUDO_GID="65534")
    done = lab.run(cmd=["sh", "-c", "id -u; id -g"], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"65534", b"65534"]


def test_signals_sent_to_tunproxy_reach_the_command(lab: Lab) -> None:
    proc = subprocess.Popen(
        lab.argv(cmd=["sh", "-c", "trap 'echo got-term; exit 5' TERM; echo ready; "
                      "while :; do sleep 0.05; done"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert _read_lines(proc.stdout, 1) == [b"ready\n"]
        proc.send_signal(signal.SIGTERM)
        out, _err = proc.communicate(timeout=60)
        assert out == b"got-term\n"
        assert proc.returncode == 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# CMD for the ^C test: takes its signals one by one and says where each came from.
SIGNAL_REPORTER = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGUSR1})
report = open(sys.argv[1], "w", buffering=1)
print("ready", file=report)
while True:
    info = signal.sigwaitinfo({signal.SIGINT, signal.SIGUSR1})
    print(signal.Signals(info.si_signo).name, info.si_code, file=report)
    if info.si_signo == signal.SIGUSR1:
        sys.exit(0)
"""


def _read_until(fd: int, buffer: bytearray, token: bytes, timeout: float = 30.0) -> None:
    """Read ``fd`` into ``buffer`` until ``token`` is in it; never blocks past ``timeout``."""
    _read_while(fd, buffer, lambda: token not in buffer, repr(token), timeout)


def _drain(fd: int, into: bytearray) -> threading.Thread:
    """Read a terminal's output until its last user is gone (EIO), in a thread: a terminal
    nobody reads stops its writers once its buffer is full."""

    def loop() -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(fd, 65536):
                into.extend(chunk)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_reaches_the_command_once(lab: Lab) -> None:
    """The terminal's ^C goes to tunproxy's process group, CMD included: tunproxy must not
    send it a second time. A SIGUSR1 sent to tunproxy with kill is passed on. (Two SIGINTs
    pending at once merge into one, so a wrong second one can hide from CMD: tunproxy's debug
    log says what it did with each.) CMD reports what it received on a FIFO of its own, so
    its lines cannot mix with tunproxy's log on the terminal."""
    fifo = lab.tmp / "signals"
    os.mkfifo(fifo)
    report = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["setsid", "--ctty", *lab.topo.client.cmd(
            sys.executable, "-m", "tunproxy", "--log-level", "debug", "run", "--",
            sys.executable, "-c", SIGNAL_REPORTER, str(fifo))],
        stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    terminal = bytearray()
    reader = _drain(master, terminal)
    reported = bytearray()
    try:
        _read_until(report, reported, b"ready\n")
        os.write(master, b"\x03")
        _read_until(report, reported, b"SIGINT ")
        # ip netns exec and setsid exec'd: this pid is tunproxy.
        os.kill(proc.pid, signal.SIGUSR1)
        _read_until(report, reported, b"SIGUSR1 ")
        assert proc.wait(timeout=20) == 0
        reader.join(timeout=20)
        # SI_KERNEL (128): from the terminal; SI_USER (0): from kill(2), i.e. tunproxy.
        assert reported.decode().splitlines() == ["ready", "SIGINT 128", "SIGUSR1 0"]
        # And from tunproxy's side (where a merged duplicate cannot hide):
        text = terminal.decode()
        assert "SIGINT from the terminal: the command has it already" in text
        assert "SIGINT from pid" not in text
        assert re.search(r"SIGUSR1 from pid \d+: passed on to the command", text)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # tunproxy leads the session's one group
            proc.wait(timeout=10)
        reader.join(timeout=10)
        os.close(master)
        os.close(report)


def test_stdin_cwd_and_environment_pass_through(lab: Lab) -> None:
    workdir = lab.tmp / "here"
    workdir.mkdir()
    done = subprocess.run(lab.argv(cmd=["sh", "-c", "pwd; echo $RUN_TEST_VAR; cat"]),
                          input=b"from stdin\n", capture_output=True, timeout=60, cwd=workdir,
                          env=dict(os.environ, RUN_TEST_VAR="kept",
                                   PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [str(workdir), "kept", "from stdin"]


def test_command_gets_default_signal_dispositions(lab: Lab) -> None:
    # Python ignores SIGPIPE; a command must not inherit that (yes would complain of EPIPE).
    report = "grep -E '^Sig(Ign|Blk)' /proc/self/status"
    done = lab.run(cmd=["sh", "-c", f"yes | head -n 1; {report}"])
    assert done.returncode == 0
    assert done.stderr == b""
    lines = done.stdout.decode().splitlines()
    assert lines[0] == "y"
    # What the same command gets started without tunproxy: a run from a background job or
    # under nohup ignores SIGINT, SIGQUIT or SIGHUP, and so must CMD then (tunproxy passes
    # on what it was given; only Python's own changes are undone).
    plain = lab.topo.client.run("sh", "-c", report).stdout.splitlines()
    assert sorted(lines[1:]) == sorted(plain)  # SigBlk too: tunproxy blocks signals itself


def test_missing_command_is_127(lab: Lab) -> None:
    done = lab.run(cmd=["no-such-command-tunproxy"])
    assert done.returncode == 127
    assert b"no-such-command-tunproxy: command not found" in done.stderr


# -- summary -----------------------------------------------------------------------------------


def _summary_rows(stderr: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in stderr.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 6 and cells[2].isdigit():
            rows[(cells[0], cells[1])] = cells
    return rows


def test_summary_names_domain_bytes_and_refusals(lab: Lab) -> None:
    script = (f"curl -sS -o /dev/null -w '%{{size_download}} %{{size_header}} %{{size_request}}' "
              f"{lab.url(host=NAME)}; curl -sS {lab.url(port=CLOSED_PORT)}; exit 0")
    done = lab.run("--rules", str(lab.rules), "--summary", cmd=["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    size_download, size_header, size_request = map(int, done.stdout.split())
    assert size_download == len(lab.payload)
    rows = _summary_rows(done.stderr.decode())
    web = rows[(NAME, f"tcp/{HTTP_PORT}")]
    assert web[2] == "1"  # flows
    assert int(web[3]) == size_request
    assert int(web[4]) == size_header + size_download
    assert "MATCH,DIRECT" in web[5]
    refused = rows[(SERVER4, f"tcp/{CLOSED_PORT}")]
    assert refused[-1] == "refused 1"
    dns = [cells for (dest, proto), cells in rows.items() if proto == "udp/53"]
    assert dns and all(cells[5] == "dns.hijack" for cells in dns)


def test_two_concurrent_runs_carry_only_their_own_traffic(lab: Lab) -> None:
    flags = lab.tmp
    def script(me: str, other: str, port: int) -> list[str]:
        return ["sh", "-c", f"touch {flags}/{me}; while [ ! -e {flags}/{other} ]; do "
                f"sleep 0.05; done; curl -sS -o /dev/null {lab.url(port=port, path='b.bin')}; "
                f"curl -sS -o /dev/null {lab.url(port=port, path='b.bin')}"]
    a = subprocess.Popen(lab.argv("--summary", cmd=script("a", "b", HTTP_PORT)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    b = subprocess.Popen(lab.argv("--summary", cmd=script("b", "a", HTTP_PORT_B)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    out_a = a.communicate(timeout=90)
    out_b = b.communicate(timeout=90)
    assert a.returncode == 0 and b.returncode == 0, (out_a, out_b)
    rows_a = _summary_rows(out_a[1].decode())
    rows_b = _summary_rows(out_b[1].decode())
    assert set(rows_a) == {(SERVER4, f"tcp/{HTTP_PORT}")}
    assert set(rows_b) == {(SERVER4, f"tcp/{HTTP_PORT_B}")}
    assert rows_a[(SERVER4, f"tcp/{HTTP_PORT}")][2] == "2"
    assert rows_b[(SERVER4, f"tcp/{HTTP_PORT_B}")][2] == "2"


# -- capture -----------------------------------------------------------------------------------


def _tshark(path: Path, *fields: str, display: str | None = None) -> list[list[str]]:
    argv = ["tshark", "-r", str(path), "-N", "n", "-o", "tcp.check_checksum:TRUE",
            "-o", "ip.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
            "-T", "fields", "-E", "separator=|", "-E", "occurrence=f"]
    if display:
        argv += ["-Y", display]
    for name in fields:
        argv += ["-e", name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split("|") for line in done.stdout.splitlines()]


def test_capture_of_curl_and_dig_reads_back_in_tshark(lab: Lab) -> None:
    capture = lab.tmp / "run.pcapng"
    script = (f"dig +short {NAME}; curl -4 -sS -o /dev/null "
              f"-w '%{{size_download}} %{{size_header}}\\n' {lab.url(host=NAME)}")
    done = lab.run("--rules", str(lab.rules), "--capture", str(capture), cmd=["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    fake, sizes = done.stdout.decode().split("\n")[:2]
    size_download, size_header = map(int, sizes.split())
    assert fake.startswith("198.18.")  # dig got a fake address from tunproxy

    # The TCP handshake of curl's flow, in order, named by the NRB and commented.
    tcp = _tshark(capture, "tcp.flags.str", "ip.src_host", "ip.dst_host", "frame.comment",
                  "tcp.checksum.status", "ip.checksum.status",
                  display=f"tcp.port == {HTTP_PORT}")
    flags = [row[0].replace("·", "") for row in tcp]
    assert flags[:3] == ["S", "AS", "A"], flags[:5]
    assert tcp[0][1] == "172.19.0.1" and tcp[0][2] == NAME  # the fake IP, named
    assert tcp[1][1] == NAME
    assert all(re.match(rf"flow #\d+ tcp curl\(\d+\) {re.escape(NAME)} rule MATCH,DIRECT "
                        r"via DIRECT$", row[3]) for row in tcp), tcp[0][3]
    # Checksums: the partial ones the offloads leave are finished in the file.
    assert {row[4] for row in tcp} == {"1"}, "bad or unverified TCP checksums"
    assert {row[5] for row in tcp} == {"1"}, "bad or unverified IPv4 header checksums"

    # Payload: every byte curl received, once (retransmissions aside).
    down = _tshark(capture, "tcp.len", display=f"tcp.srcport == {HTTP_PORT} && "
                   "!tcp.analysis.retransmission")
    assert sum(int(row[0]) for row in down) == size_header + size_download

    # dig's query and answer, commented with dig.
    dns = _tshark(capture, "dns.qry.name", "dns.flags.response", "frame.comment",
                  display=f"dns.qry.name == \"{NAME}\" && dns.qry.type == 1")
    assert {row[1] for row in dns} == {"False", "True"} or {row[1] for row in dns} == {"0", "1"}
    assert any(re.match(r"flow #\d+ udp dig\(\d+\) rule dns\.hijack via dns$", row[2])
               for row in dns), dns


def test_capture_select_keeps_one_process(lab: Lab) -> None:
    capture = lab.tmp / "curl-only.pcapng"
    script = f"dig +short {NAME}; curl -4 -sS -o /dev/null {lab.url(host=NAME)}"
    done = lab.run("--rules", str(lab.rules), "--capture", str(capture),
                   "--capture-select", "process=curl", cmd=["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    rows = _tshark(capture, "frame.comment", "udp.dstport", "tcp.dstport")
    assert len(rows) > 5
    comments = {row[0] for row in rows}
    assert all(re.match(r"flow #\d+ (tcp|udp) curl\(\d+\) ", c) for c in comments), comments
    # curl's own name lookup is there, dig's is not.
    assert any(row[1] == "53" for row in rows) and any(row[2] == str(HTTP_PORT) for row in rows)
    assert not any("dig(" in c for c in comments)


def test_capture_select_needs_capture(lab: Lab) -> None:
    done = lab.run("--capture-select", "process=curl", cmd=["true"])
    assert done.returncode == 2
    assert b"give both" in done.stderr


def test_capture_streams_into_a_fifo(lab: Lab) -> None:
    """``mkfifo f; wireshark -k -i f & tunproxy run --capture f -- CMD``: live packets."""
    fifo = lab.tmp / "live"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["tshark", "-r", str(fifo), "-T", "fields", "-e",
                               "frame.comment"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        done = lab.run("--capture", str(fifo), cmd=["curl", "-sS", "-o", "/dev/null", lab.url()])
        assert done.returncode == 0, done.stderr
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait(timeout=10)
    assert reader.returncode == 0, err
    assert any(re.match(r"flow #\d+ tcp curl\(\d+\) ", line) for line in out.splitlines())


def test_capture_stops_at_its_limit(lab: Lab) -> None:
    capture = lab.tmp / "small.pcapng"
    limit = 64 * 1024
    done = lab.run("--capture", str(capture), "--capture-limit", str(limit / 1024 / 1024),
                   cmd=["curl", "-sS", "-o", "/dev/null", lab.url()])
    assert done.returncode == 0, done.stderr
    assert 0 < capture.stat().st_size <= limit
    assert b"reached its limit" in done.stderr
    rows = _tshark(capture, "frame.number")
    assert rows  # still a valid file


def test_run_beside_a_system_wide_instance(lab: Lab) -> None:
    """A system-wide tunproxy in the same namespace, with the same TUN name: the run's
    command is carried by the run (its summary); the run's own upstream socket is an
    ordinary socket there, carried by the system-wide instance like any other; traffic
    outside the run never appears in the run's summary."""
    system = lab.topo.start_tunproxy(
        "tun:\n  name: tunproxy0\n  mtu: 1500\nrules:\n  - MATCH,DIRECT\n")
    outside = lab.topo.client.run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                  lab.url(port=HTTP_PORT_B, path="b.bin"))
    assert outside.stdout == "200"
    done = lab.run("--summary", cmd=["curl", "-sS", lab.url()])
    assert done.returncode == 0, done.stderr
    assert done.stdout == lab.payload
    rows = _summary_rows(done.stderr.decode())
    assert set(rows) == {(SERVER4, f"tcp/{HTTP_PORT}")}
    # The system-wide instance carried the curl outside the run, and the run's upstream
    # connection (an ordinary socket of the run's tunproxy), every byte of it.
    # (The system-wide instance names each flow's process when it knows it.)
    who = r"(?:\S+\(\d+\) )?"
    system.wait_for_log(rf"end #\d+ tcp {who}[\d.:]+ -> {SERVER4}:{HTTP_PORT_B} via DIRECT")
    received = rows[(SERVER4, f"tcp/{HTTP_PORT}")][4]
    system.wait_for_log(rf"end #\d+ tcp {who}[\d.:]+ -> {SERVER4}:{HTTP_PORT} via DIRECT: "
                        rf"closed-by-\w+, up \d+ B, down {received} B")
    assert system.stop() == 0


def test_process_rules_see_the_commands_processes(lab: Lab) -> None:
    """PROCESS-NAME rules look up sockets in the command's namespace, not tunproxy's."""
    rules = lab.tmp / "process.yaml"
    rules.write_text("rules:\n  - PROCESS-NAME,curl,REJECT\n  - MATCH,DIRECT\n"
                     f"dns:\n  servers: [udp://{SERVER4}:53]\n")
    fetch = f"import urllib.request; print(len(urllib.request.urlopen('{lab.url()}').read()))"
    script = (f"curl -sS -o /dev/null {lab.url()}; echo curl=$?; "
              f"{sys.executable} -c \"{fetch}\"")
    done = lab.run("--rules", str(rules), "--summary", cmd=["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == ["curl=7", str(len(lab.payload))]
    row = _summary_rows(done.stderr.decode())[(SERVER4, f"tcp/{HTTP_PORT}")]
    assert row[2] == "2" and "rejected 1" in row[-1]
    assert "PROCESS-NAME,curl,REJECT" in row[5] and "MATCH,DIRECT" in row[5]
