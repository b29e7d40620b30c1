"""A minimal config keeps optional features' modules out of the long-running process (issue 17:
RSS at rest). Each optional module pulls in more: the DNS service dnslib, remote rule sets
urllib.request (with email and http.client), the controller aiohttp, QUIC qh3, ``top``
curses. Measured on a minimal DIRECT config: 35.0 MiB at rest with them, 30.2 MiB without.

The check runs in a fresh interpreter what ``tunproxy --rules FILE`` runs up to the event
loop (argument parsing, config load, outbounds, policy, the data-path modules), then lists
``sys.modules``. The same check on a config that uses DNS and a SOCKS5 upstream must find
their modules: the list is real, not an empty answer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.netns import REPO

# What a minimal config must not load (package prefixes).
HEAVY = (
    "aiohttp", "qh3", "aioquic", "cryptography", "pyroute2", "dnslib", "curses", "email",
    "http.client", "urllib.request", "hashlib",
    "tunproxy.controller", "tunproxy.dns.service", "tunproxy.dns.resolvers", "tunproxy.server",
    "tunproxy.top", "tunproxy.capturecli", "tunproxy.explain", "tunproxy.command",
    "tunproxy.masque", "tunproxy.h3link", "tunproxy.ruleremote", "tunproxy.outbounds.socks5",
    "tunproxy.outbounds.quic", "tunproxy.outbounds.group", "tunproxy.capture",
)

PROBE = """
import json, sys
from tunproxy.cli import _parser
_parser(sys.argv[2:]).parse_args(sys.argv[2:])
from tunproxy.app import Proxy
from tunproxy.config import load_config
import tunproxy.driver, tunproxy.relay
config = load_config(sys.argv[1])
Proxy(config).build_policy(config)
print(json.dumps(sorted(sys.modules)))
"""

MINIMAL = """\
tun:
  name: lean0
rules:
  - MATCH,DIRECT
"""

FULLER = """\
tun:
  name: lean0
upstreams:
  socks:
    type: socks5
    server: "127.0.0.1:1080"
dns:
  enable: true
  mode: fake-ip
  servers: ["udp://127.0.0.1:53"]
rules:
  - DOMAIN-SUFFIX,example.test,socks
  - MATCH,DIRECT
"""


def loaded(tmp_path: Path, config: str, *argv: str) -> set[str]:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), *argv], cwd=REPO, capture_output=True,
        text=True, timeout=120, check=True,
    )
    return set(json.loads(out.stdout))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY))


def test_minimal_config_loads_no_optional_module(tmp_path: Path) -> None:
    modules = loaded(tmp_path, MINIMAL, "--rules", "config.yaml")
    assert "tunproxy.relay" in modules and "tunproxy.outbounds.direct" in modules
    assert heavy(modules) == []


def test_features_in_use_do_load_their_modules(tmp_path: Path) -> None:
    modules = loaded(tmp_path, FULLER, "explain", "tcp", "192.0.2.1:80")
    assert {"dnslib", "tunproxy.dns.service", "tunproxy.outbounds.socks5",
            "tunproxy.explain"} <= set(heavy(modules))


def test_argument_parsing_does_not_load_shutil(tmp_path: Path) -> None:
    """argparse imports shutil (with bz2, lzma and their libraries: ~0.8 MiB resident) to read
    the terminal's width unless the formatter is given one. Modules the interpreter already
    loads on its own (a site hook may import shutil) do not count."""
    bare = set(json.loads(subprocess.run(
        [sys.executable, "-c", "import json, sys; print(json.dumps(sorted(sys.modules)))"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout))
    added = loaded(tmp_path, MINIMAL, "--rules", "config.yaml") - bare
    assert "tunproxy.cli" in added
    assert {"shutil", "bz2", "lzma"} & added == set()
