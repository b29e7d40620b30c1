"""Command line: ``tunproxy --rules FILE`` and its subcommands.

    tunproxy --rules FILE          run the proxy in the foreground
    tunproxy check FILE            validate a rules file; touches nothing
    tunproxy explain --rules FILE tcp 1.2.3.4:443 [--domain ...]
                                   which rule a flow would match, and why
    tunproxy cleanup               undo what a crashed run left behind
    tunproxy run [--rules FILE] [--capture FILE] [--summary] -- CMD [ARGS...]
                                   one command, in a network namespace of its own
    tunproxy server --listen [::]:443 --cert FILE --key FILE --token SECRET
                                   a MASQUE proxy (HTTP/3 CONNECT, CONNECT-UDP)
    tunproxy top [--config FILE]   live view of the flows, over the controller API
    tunproxy capture --process NAME -w FILE|-   pcapng of a running tunproxy's flows

Every error the user can cause or fix is one sentence on stderr and a
non-zero exit; tracebacks are for our own bugs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import tunproxy_native
from tunproxy import __version__
from tunproxy.errors import ConfigError, TunproxyError
from tunproxy.journal import DEFAULT_STATE_DIR

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_SETUP = 1

_EPILOG = """\
examples:
  sudo tunproxy --rules examples/direct.yaml
  tunproxy check examples/socks5.yaml
  tunproxy explain --rules examples/socks5.yaml tcp 93.184.216.34:443 --domain example.com
  sudo tunproxy cleanup
  sudo tunproxy run --summary --capture curl.pcapng -- curl https://example.com
  tunproxy top --config examples/socks5.yaml
"""


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Logging HOWTO, "Optimization": the format uses neither the caller's file and line
    # nor the thread or process, and looking them up is a fifth of every record's cost
    # (one record per ended flow).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # pyroute2 narrates every netlink message at debug level; ours say what matters.
    logging.getLogger("pyroute2").setLevel(max(logging.WARNING, logging.root.level))


# (name, module, help, description)
_SUBCOMMANDS: tuple[tuple[str, str, str, str | None], ...] = (
    ("run", "tunproxy.command", "run one command with only its traffic through tunproxy",
     "Run CMD in a network namespace of its own whose only route is this tunproxy; the "
     "host's network is not changed."),
    ("explain", "tunproxy.explain", "show which rule a flow matches, and why", None),
    ("server", "tunproxy.server", "run a MASQUE proxy for quic upstreams", None),
    ("top", "tunproxy.top", "live view of the flows by process (controller API)", None),
    ("capture", "tunproxy.capturecli",
     "pcapng of some flows of a running tunproxy (controller API)", None),
)


def _width() -> int:
    """The help text's width, as argparse computes it, without its import of shutil.

    argparse imports shutil (and with it bz2, lzma and their libraries, ~0.8 MiB) to read the
    terminal's size; they would stay resident in the long-running process for nothing."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno() if sys.__stdout__ else 1).columns
        except (OSError, ValueError):
            columns = 80
    return max(columns - 2, 11)


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_width())


class _RawFormatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_width())


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    words = set(argv)
    parser = argparse.ArgumentParser(
        prog="tunproxy",
        description="A transparent proxy for Linux: all traffic enters a TUN device and is "
        "sent direct, through SOCKS5 or QUIC upstreams, or dropped, by rules.",
        epilog=_EPILOG,
        formatter_class=_RawFormatter,
    )
    parser.add_argument("--version", action="version",
                        version=f"tunproxy {__version__} ({tunproxy_native.describe()})")
    parser.add_argument("--rules", metavar="FILE", help="the rules file (YAML) to run with")
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error"],
                        help="default: info (warning for run, whose stderr is the command's)")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"where the undo record lives (default: {DEFAULT_STATE_DIR})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser("check", help="validate a rules file without touching the system",
                           formatter_class=_Formatter)
    check.add_argument("file", metavar="FILE")

    cleanup = sub.add_parser("cleanup", help="undo what a crashed tunproxy left behind",
                             formatter_class=_Formatter)
    cleanup.add_argument("--state-dir", type=Path, default=None, dest="cleanup_state_dir",
                         help=argparse.SUPPRESS)

    # Each subcommand's module adds its own arguments, and only the one named on the command
    # line is imported: a plain `tunproxy --rules` then never loads the server's, top's or
    # capture's modules (and what they import) into the long-running process.
    for name, module, text, description in _SUBCOMMANDS:
        subparser = sub.add_parser(name, help=text, description=description,
                                   formatter_class=_Formatter)
        if name in words:
            importlib.import_module(module).add_arguments(subparser)
    return parser


def _check(file: str) -> int:
    from tunproxy.config import load_config

    config = load_config(file)
    upstreams = ", ".join(
        f"{u.name} ({u.type} {u.host}:{u.port}{', pipelined' if u.pipeline else ''})"
        for u in config.upstreams.values()
    ) or "none"
    groups = "".join(f", group {g.name} ({g.kind}: {', '.join(g.members)})"
                     for g in config.groups.values())
    skipped = f", {len(config.warnings)} warnings (see above)" if config.warnings else ""
    print(f"{file}: ok: {config.rule_count} rules, upstreams: {upstreams}{groups}, "
          f"tun {config.tun.name} mtu {config.tun.mtu}{skipped}")
    return 0


def _cleanup(state_dir: Path) -> int:
    from tunproxy.journal import cleanup_state_dir
    from tunproxy.tun import has_net_admin

    if not has_net_admin():
        print("tunproxy: cleanup needs root or CAP_NET_ADMIN; run it with sudo", file=sys.stderr)
        return EXIT_SETUP
    report = asyncio.run(cleanup_state_dir(state_dir))
    for line in report:
        print(line)
    if not report:
        print("nothing to clean up")
    return 0


def _run(rules: str, state_dir: Path) -> int:
    from tunproxy.app import run
    from tunproxy.config import load_config
    from tunproxy.tun import has_net_admin

    config = load_config(rules)
    if not has_net_admin():
        print("tunproxy: tunproxy needs root or CAP_NET_ADMIN to create its TUN device and "
              "routes; run it with sudo", file=sys.stderr)
        return EXIT_SETUP
    return run(config, state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = _parser(argv)
    args = parser.parse_args(argv)
    _setup_logging(args.log_level or ("warning" if args.command == "run" else "info"))
    try:
        if args.command == "check":
            return _check(args.file)
        if args.command == "cleanup":
            return _cleanup(args.cleanup_state_dir or args.state_dir)
        if args.command == "run":
            from tunproxy import command as command_module

            return command_module.main(args)
        if args.command == "explain":
            from tunproxy import explain as explain_module

            return explain_module.run(args)
        if args.command == "server":
            from tunproxy import server as server_module

            return server_module.run(args)
        if args.command == "top":
            from tunproxy import top as top_module

            return top_module.main(args)
        if args.command == "capture":
            from tunproxy import capturecli

            return capturecli.main(args)
        if args.rules is None:
            parser.print_usage(sys.stderr)
            print("tunproxy: give a rules file with --rules FILE (or a command: check, explain, "
                  "cleanup, run, server)", file=sys.stderr)
            return EXIT_CONFIG
        return _run(args.rules, args.state_dir)
    except ConfigError as exc:
        print(f"tunproxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TunproxyError as exc:
        print(f"tunproxy: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
