"""``tunproxy server --config FILE``: the ``server:`` section, its errors (file:line,
exit non-zero) and the flags that override it; a good file serves on loopback."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from tests.masque_peer import MasqueServer, free_udp_port, make_cert
from tests.netns import REPO
from tests.test_quic_outbound import Collector
from tunproxy.errors import ConfigError, ProxyError
from tunproxy.outbounds.base import Target
from tunproxy.outbounds.quic import QuicOutbound
from tunproxy.server import add_arguments, config_from_args


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _good(tmp_path: Path, port: int = 4443) -> Path:
    make_cert(tmp_path, "proxy.test", ["127.0.0.1"])
    path = tmp_path / "server.yaml"
    path.write_text(f"""\
# a comment first, so lines are not all 1
server:
  listen: "127.0.0.1:{port}"
  cert: proxy.test.crt      # relative to this file
  key: proxy.test.key
  tokens: [first-token, second-token]
  allow: [127.0.0.0/8]
  deny: [192.0.2.0/24]
  max-datagram-size: 1452
  idle-timeout: 20
  congestion: cubic
rules:                      # a client's section in the same file: left to tunproxy --rules
  - MATCH,DIRECT
""")
    return path


def test_good_file(tmp_path: Path) -> None:
    config = config_from_args(_args("--config", str(_good(tmp_path))))
    assert (config.host, config.port) == ("127.0.0.1", 4443)
    assert config.certfile == str(tmp_path / "proxy.test.crt")
    assert config.keyfile == str(tmp_path / "proxy.test.key")
    assert config.token == ("first-token", "second-token")
    assert config.allow == [ipaddress.ip_network("127.0.0.0/8")]
    assert config.deny == [ipaddress.ip_network("192.0.2.0/24")]
    assert config.max_datagram_size == 1452
    assert config.idle_timeout == 20.0
    assert config.congestion == "cubic"


def test_congestion_flag(tmp_path: Path) -> None:
    path = _good(tmp_path)
    assert config_from_args(_args("--config", str(path), "--congestion", "cubic")
                            ).congestion == "cubic"
    with pytest.raises(ConfigError, match="--congestion 'bbr' is not available"):
        config_from_args(_args("--config", str(path), "--congestion", "bbr"))


def test_flags_override_the_file(tmp_path: Path) -> None:
    config = config_from_args(_args(
        "--config", str(_good(tmp_path)), "--listen", "[::1]:8443", "--token", "cli-token",
        "--allow", "10.0.0.0/8", "--max-datagram-size", "1300"))
    assert (config.host, config.port) == ("::1", 8443)
    assert config.token == "cli-token"
    assert config.allow == [ipaddress.ip_network("10.0.0.0/8")]
    assert config.deny == [ipaddress.ip_network("192.0.2.0/24")]  # not given: the file's
    assert config.max_datagram_size == 1300
    assert config_from_args(_args("--config", str(_good(tmp_path)), "--no-token")).token is None


@pytest.mark.parametrize(("body", "line", "message"), [
    ("server:\n  listen: nowhere\n  cert: c\n  key: k\n", 2, "server.listen: 'nowhere' is not"),
    ("server:\n  listen: '[::]:443'\n  cert: missing.crt\n  key: k\n", 3,
     "server.cert: cannot read"),
    ("server:\n  cert: proxy.test.crt\n", 2, "server.key: is required"),
    ("server:\n  cert: proxy.test.crt\n  key: proxy.test.key\n  allow:\n    - 10.0.0.0/8\n"
     "    - not-a-cidr\n", 6, "server.allow: 'not-a-cidr' is not a CIDR"),
    ("server:\n  cert: proxy.test.crt\n  key: proxy.test.key\n  tokn: x\n", 4,
     "unknown key 'tokn' in 'server'"),
    ("server:\n  cert: proxy.test.crt\n  key: proxy.test.key\n  max-datagram-size: 9\n", 4,
     "server.max-datagram-size: 9 is out of range"),
    ("rules: [MATCH,DIRECT]\n", 1, "no 'server:' section"),
    ("server:\n  cert: proxy.test.crt\n  key: [\n", 4, "not valid YAML"),
    ("servr:\n  cert: x\n", 1, "no 'server:' section"),
    ("server:\n  cert: proxy.test.crt\n  key: proxy.test.key\n  congestion: reno\n", 4,
     "server.congestion: 'reno' is not available (the QUIC library, qh3, implements cubic"),
])
def test_bad_file_names_file_and_line(tmp_path: Path, body: str, line: int,
                                      message: str) -> None:
    make_cert(tmp_path, "proxy.test")
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as info:
        config_from_args(_args("--config", str(path), "--token", "t"))
    assert str(info.value).startswith(f"{path}:{line}: "), str(info.value)
    assert message in str(info.value)


def test_bad_file_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    make_cert(tmp_path, "proxy.test")
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  cert: proxy.test.crt\n  key: proxy.test.key\n"
                    "  deny: [10.1.2.3/40]\n")
    done = subprocess.run(
        [sys.executable, "-m", "tunproxy", "server", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert f"{path}:4: server.deny: '10.1.2.3/40' is not a CIDR" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_good_file_serves_with_either_token(tmp_path: Path) -> None:
    port = free_udp_port()
    path = _good(tmp_path, port)
    ca = tmp_path / "proxy.test-ca.crt"
    proc = MasqueServer(["--config", str(path)])
    try:
        proc.wait_ready()

        async def main() -> None:
            echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
            target = Target(echo.sockets[0].getsockname()[1], "127.0.0.1")
            try:
                for token in ("first-token", "second-token"):
                    outbound = QuicOutbound("q", "127.0.0.1", port, token=token,
                                            sni="proxy.test", ca=str(ca))
                    got = Collector()
                    stream = await outbound.open_stream(target, got, timeout=10)
                    stream.write(b"hello")
                    stream.write_eof()
                    await asyncio.wait_for(got.eof, 10)
                    assert bytes(got.data) == b"hello"
                    await outbound.aclose()
                outbound = QuicOutbound("q", "127.0.0.1", port, token="third",
                                        sni="proxy.test", ca=str(ca))
                with pytest.raises(ProxyError, match="407"):
                    await outbound.open_stream(target, Collector(), timeout=10)
                await outbound.aclose()
            finally:
                echo.close()

        asyncio.run(main())
        proc.wait_for_log(r"refused \(407\)")
    finally:
        if proc.proc.poll() is None:
            assert proc.stop() == 0, proc.log
        else:
            proc.kill()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read())
    writer.write_eof()
    await writer.drain()
    writer.close()
