"""``tunproxy explain``: which rule a flow would match, and why.

    tunproxy explain --rules FILE tcp 93.184.216.34:443 [--domain example.com]
        [--process curl] [--process-path /usr/bin/curl] [--uid 1000] [--src 10.0.0.2:5555]
        [--resolved 93.184.216.34]

The destination may be a domain (``example.com:443``): the flow is then matched as a fake-ip
flow is, known only by its domain; ``--resolved`` supplies the addresses IP rules without
``no-resolve`` would see. Prints the verdict and the rule with file:line (and for a RULE-SET,
the entry); a bad rules file prints one ``file:line: problem`` line and exits 1.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

import rules
from tunproxy.errors import ConfigError

__all__ = ["add_arguments", "run"]


def _endpoint(text: str) -> tuple[str, int]:
    """``1.2.3.4:443``, ``[2001:db8::1]:443`` or ``example.com:443``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise argparse.ArgumentTypeError(f"{text!r}: write IPv6 addresses as [ADDR]:PORT")
    try:
        port = int(port_text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {port_text!r} is not a port") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: port out of range")
    return host, port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ip(text: str) -> str:
    if not _is_ip(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: ``tunproxy --rules FILE explain ...`` keeps the main parser's value.
    parser.add_argument(
        "--rules", metavar="FILE", default=argparse.SUPPRESS, help="the rules file (YAML)"
    )
    parser.add_argument("network", choices=("tcp", "udp"), help="tcp or udp")
    parser.add_argument(
        "destination",
        type=_endpoint,
        metavar="HOST:PORT",
        help="where the flow goes: an IP ([v6]:port) or a domain",
    )
    parser.add_argument(
        "--domain", help="the domain known for the destination (sniffed or from DNS)"
    )
    parser.add_argument(
        "--src",
        type=_endpoint,
        metavar="IP:PORT",
        help="the app's address and port (default: unspecified)",
    )
    parser.add_argument("--process", metavar="NAME", help="the program's name, e.g. curl")
    parser.add_argument("--process-path", metavar="PATH", help="the program's full path")
    parser.add_argument("--uid", type=int, help="the user id owning the socket")
    parser.add_argument(
        "--resolved",
        type=_ip,
        action="append",
        default=[],
        metavar="IP",
        help="an address the domain resolves to (repeatable), for IP rules "
        "on a flow known only by its domain",
    )


def _flow(args: argparse.Namespace, asked: dict[str, bool]) -> rules.FlowMeta:
    host, port = args.destination
    domain = args.domain
    dst_ip: str | None = host
    if not _is_ip(host):
        if domain is not None and domain.rstrip(".").lower() != host.rstrip(".").lower():
            raise argparse.ArgumentTypeError(f"destination {host} and --domain {domain} differ")
        domain, dst_ip = host, None
    if args.src is not None:
        src_ip, src_port = args.src
        if not _is_ip(src_ip):
            raise argparse.ArgumentTypeError(f"--src {src_ip!r} is not an IP address")
    else:
        src_ip = "::" if dst_ip is not None and ":" in dst_ip else "0.0.0.0"
        src_port = 0
    info: rules.ProcessInfo | None = None
    if args.process or args.process_path or args.uid is not None:
        path = args.process_path or ""
        info = rules.ProcessInfo(
            pid=0,
            name=args.process or os.path.basename(path),
            path=path,
            uid=args.uid if args.uid is not None else -1,
        )

    def process() -> rules.ProcessInfo | None:
        asked["process"] = True
        return info

    def resolved() -> list[str]:
        asked["resolve"] = True
        return list(args.resolved)

    return rules.FlowMeta(
        network=args.network,
        src_ip=src_ip,
        src_port=src_port,
        dst_ip=dst_ip,
        dst_port=port,
        domain=domain,
        process=process,
        resolved_ips=resolved,
    )


def _describe(flow: rules.FlowMeta) -> str:
    def hostport(host: str, port: int) -> str:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    dst = hostport(flow.dst_ip or str(flow.domain), flow.dst_port)
    if flow.dst_ip is not None and flow.domain:
        dst += f" ({flow.domain})"
    return f"{flow.network} {hostport(flow.src_ip, flow.src_port)} -> {dst}"


# Like every tunproxy command: 2 for a bad file or bad arguments.
EXIT_USAGE = 2


def run(args: argparse.Namespace) -> int:
    path = getattr(args, "rules", None)
    if not path:
        print("tunproxy explain: give the rules file with --rules FILE", file=sys.stderr)
        return EXIT_USAGE
    try:
        from tunproxy.config import load_config

        # With every entry's text and line, which a running proxy does not keep for large sets.
        ruleset: rules.RuleSet = load_config(path, keep_entries=True).ruleset
    except ConfigError as exc:
        print(f"tunproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    asked = {"process": False, "resolve": False}
    try:
        flow = _flow(args, asked)
    except argparse.ArgumentTypeError as exc:
        print(f"tunproxy explain: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verdict = ruleset.match(flow)
    print(f"flow:    {_describe(flow)}")
    print(f"verdict: {verdict.target}")
    if verdict.rule is None:
        print("rule:    none matched; the default is DIRECT (there is no MATCH rule)")
    else:
        print(f"rule:    {verdict.rule.file}:{verdict.rule.line}: {verdict.rule.text}")
    if verdict.rule_set_entry is not None:
        print(f"entry:   {verdict.rule_set_entry}")
    if asked["process"] and not (args.process or args.process_path or args.uid is not None):
        print(
            "note:    process rules were reached; without --process/--process-path/--uid "
            "they did not match"
        )
    if asked["resolve"]:
        if args.resolved:
            print(f"note:    the domain was resolved (to {', '.join(args.resolved)}) for IP rules")
        else:
            print("note:    IP rules would resolve the domain; give --resolved IP to try them")
    return 0
