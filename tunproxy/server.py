"""``tunproxy server``: a MASQUE proxy over HTTP/3 (CONNECT for TCP, CONNECT-UDP for UDP).

    tunproxy server --listen [::]:443 --cert FILE --key FILE --token SECRET
                    [--allow CIDR ...] [--deny CIDR ...]
    tunproxy server --config FILE        # its 'server:' section; flags override it

It dials the targets itself, resolving names, so a tunproxy client with a ``quic``
upstream (or any MASQUE client: h2o-httpclient, ...) can send every flow through it.

Not an open proxy: a request without the right token gets 407 and a log line; the
destinations it refuses by default are loopback, link-local, unspecified and multicast
addresses and the server's own addresses (so a client cannot reach services that
listen only locally). ``--deny`` adds CIDRs, ``--allow`` makes exceptions to all of
them. A refused destination gets 403 with a Proxy-Status (RFC 9209).

Hostile input (malformed HTTP/3, bad capsules, oversized headers) gets an error
response or a connection error from the HTTP/3 layer; nothing it sends reaches the
event loop as an exception. SIGTERM/SIGINT close every connection (H3_NO_ERROR) and
exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from tunproxy.config import split_host_port
from tunproxy.errors import ConfigError
from tunproxy.masque import (
    DEFAULT_UDP_TEMPLATE,
    CapsuleParser,
    ConnectRequest,
    MasqueError,
    RequestRefused,
    datagram_prefix,
    parse_http_datagram,
    parse_request,
    response_headers,
)
from tunproxy.masque.request import H3_CONNECT_ERROR, Headers, check_template

if TYPE_CHECKING:  # the QUIC library loads when the server starts, not for every command
    from tunproxy.h3link import H3Link, H3Server

__all__ = ["ServerConfig", "add_arguments", "run", "serve"]

log = logging.getLogger("tunproxy.server")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_DENY = (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "fe80::/10", "ff00::/8", "::ffff:0:0/96",
)
# Bytes held for a target that does not take them (its socket's buffer above this)
# before the server stops reading its QUIC socket (h3link's "Flow control").
HOLD_LIMIT = 1024 * 1024
SEND_LIMIT = 1024 * 1024
CONNECT_TIMEOUT = 10.0


@dataclass(slots=True)
class ServerConfig:
    host: str
    port: int
    certfile: str
    keyfile: str
    token: str | tuple[str, ...] | None  # the one accepted, or several
    allow: list[IPNetwork] = field(default_factory=list)
    deny: list[IPNetwork] = field(default_factory=list)
    deny_own: bool = True
    udp_template: str = DEFAULT_UDP_TEMPLATE
    idle_timeout: float = 60.0
    max_datagram_size: int = 1200
    congestion: str = "cubic"


class Policy:
    """Which destination addresses the server dials."""

    def __init__(self, config: ServerConfig, own: Iterable[str]) -> None:
        self.allow = config.allow
        self.deny = [ipaddress.ip_network(n) for n in DEFAULT_DENY] + config.deny
        self.own = {ipaddress.ip_address(a) for a in own} if config.deny_own else set()

    def permits(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        if any(ip in net for net in self.allow):
            return True
        if ip in self.own:
            return False
        return not any(ip in net for net in self.deny)


def own_addresses() -> list[str]:
    """Every address on this host's interfaces (this network namespace)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr()
                if msg.get_attr("IFA_ADDRESS")]


class _Refusal(Exception):
    def __init__(self, status: int, proxy_status: str, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.proxy_status = proxy_status


class MasqueServer:
    def __init__(self, config: ServerConfig, policy: Policy) -> None:
        self.config = config
        self.policy = policy
        self.server: H3Server | None = None
        self.flows = 0

    async def start(self) -> None:
        from tunproxy.h3link import LinkSettings, listen

        self.server = await listen(
            self.config.host, self.config.port, self.config.certfile, self.config.keyfile,
            LinkSettings(idle_timeout=self.config.idle_timeout,
                         max_datagram_size=self.config.max_datagram_size,
                         congestion=self.config.congestion),
            lambda link: _Connection(self, link), SEND_LIMIT,
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def resolve(self, request: ConnectRequest) -> str:
        """The first permitted address of the target (raises _Refusal)."""
        try:
            ipaddress.ip_address(request.host)
            addresses = [request.host]
        except ValueError:
            loop = asyncio.get_running_loop()
            kind = socket.SOCK_STREAM if request.protocol == "tcp" else socket.SOCK_DGRAM
            try:
                infos = await loop.getaddrinfo(request.host, request.port, type=kind)
            except OSError as exc:
                raise _Refusal(502, f"dns_error; details=\"{exc.strerror}\"",
                               f"cannot resolve {request.host}: {exc.strerror}") from None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        for address in addresses:
            if self.policy.permits(address):
                return address
        raise _Refusal(403, "destination_ip_prohibited",
                       f"{', '.join(addresses)} is not a permitted destination")


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Connection:
    """The H3Handler of one client connection."""

    def __init__(self, server: MasqueServer, link: H3Link) -> None:
        self.server = server
        self.link = link
        self.flows: dict[int, _TcpFlow | _UdpFlow] = {}
        self.refused: set[int] = set()

    def h3_headers(self, stream_id: int, headers: Headers, ended: bool) -> None:
        if stream_id in self.flows or stream_id in self.refused:
            return  # trailers: nothing to do
        config = self.server.config
        try:
            request = parse_request(headers, config.udp_template, config.token)
        except RequestRefused as exc:
            if len(self.refused) >= 4096:
                # Only there to ignore trailers: a client refused this often forgets nothing
                # it needs, and a hostile one cannot grow the set.
                self.refused.clear()
            self.refused.add(stream_id)
            level = logging.WARNING if exc.status == 407 else logging.INFO
            log.log(level, "%s: refused (%d): %s", self.link.peer, exc.status, exc.reason)
            self.link.send_headers(stream_id, response_headers(exc.status), end=True)
            return
        flow: _TcpFlow | _UdpFlow
        flow = _TcpFlow(self, stream_id, request) if request.protocol == "tcp" else (
            _UdpFlow(self, stream_id, request))
        self.flows[stream_id] = flow
        self.server.flows += 1
        flow.task = asyncio.ensure_future(flow.open())
        if ended:
            flow.client_data(b"", True)

    def h3_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        flow = self.flows.get(stream_id)
        if flow is not None:
            flow.client_data(data, ended)

    def h3_datagram(self, stream_id: int, data: bytes) -> None:
        flow = self.flows.get(stream_id)
        if isinstance(flow, _UdpFlow):
            flow.http_datagram(data)

    def h3_reset(self, stream_id: int) -> None:
        flow = self.flows.get(stream_id)
        if flow is not None:
            flow.end("reset-by-client", reset=False)

    def h3_stop_sending(self, stream_id: int) -> None:
        self.h3_reset(stream_id)  # a client that stops reading is done with the flow

    def h3_writable(self, stream_id: int) -> None:
        flow = self.flows.get(stream_id)
        if isinstance(flow, _TcpFlow) and flow.transport is not None:
            flow.transport.resume_reading()

    def h3_closed(self, reason: str) -> None:
        for flow in list(self.flows.values()):
            flow.end(f"connection-lost ({reason})", reset=False)
        self.flows.clear()


class _Flow:
    kind = "?"

    def __init__(self, connection: _Connection, stream_id: int, request: ConnectRequest) -> None:
        self.connection = connection
        self.link = connection.link
        self.stream_id = stream_id
        self.request = request
        self.address: str | None = None
        self.task: asyncio.Future[None] | None = None
        self.ended = False
        self.up = 0
        self.down = 0

    def __str__(self) -> str:
        target = _authority(self.request.host, self.request.port)
        via = f" ({self.address})" if self.address and self.address != self.request.host else ""
        return f"{self.kind} {self.link.peer} -> {target}{via}"

    async def open(self) -> None:
        try:
            self.address = await self.connection.server.resolve(self.request)
            await self.dial(self.address)
        except _Refusal as refusal:
            self.refuse(refusal.status, refusal.proxy_status, str(refusal))
            return
        except TimeoutError:
            self.refuse(504, "connection_timeout", "no answer")
            return
        except OSError as exc:
            status = 502
            error = "connection_refused" if isinstance(exc, ConnectionRefusedError) else (
                "destination_unavailable")
            self.refuse(status, error, exc.strerror or str(exc))
            return
        if self.ended:
            return
        log.info("%s: open", self)
        headers = response_headers(200, udp=self.kind == "udp")
        self.link.send_headers(self.stream_id, headers)
        self.opened()

    def refuse(self, status: int, proxy_status: str, text: str) -> None:
        log.info("%s: refused (%d): %s", self, status, text)
        self.ended = True
        self.connection.flows.pop(self.stream_id, None)
        if self.link.alive:
            headers = response_headers(status)
            headers.append((b"proxy-status", f"tunproxy; error={proxy_status}".encode()))
            self.link.send_headers(self.stream_id, headers, end=True)

    async def dial(self, address: str) -> None:
        raise NotImplementedError

    def opened(self) -> None:
        pass

    def client_data(self, data: bytes, ended: bool) -> None:
        raise NotImplementedError

    def end(self, reason: str, *, reset: bool) -> None:
        if self.ended:
            return
        self.ended = True
        self.connection.flows.pop(self.stream_id, None)
        self.link.release(self.stream_id)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if reset and self.link.alive:
            self.link.reset(self.stream_id, H3_CONNECT_ERROR)
        self.close_target()
        log.info("%s: %s, up %d B, down %d B", self, reason, self.up, self.down)

    def close_target(self) -> None:
        pass


class _TcpFlow(_Flow, asyncio.Protocol):
    kind = "tcp"

    def __init__(self, connection: _Connection, stream_id: int, request: ConnectRequest) -> None:
        super().__init__(connection, stream_id, request)
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.client_fin = False
        self.target_fin = False

    async def dial(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await loop.create_connection(lambda: self, address, self.request.port)

    def opened(self) -> None:
        assert self.transport is not None
        for data in self.pending:
            self.transport.write(data)
        self.pending.clear()
        self.pending_bytes = 0
        self.link.release(self.stream_id)
        if self.client_fin:
            self.transport.write_eof()

    # from the client
    def client_data(self, data: bytes, ended: bool) -> None:
        if self.ended:
            return
        self.up += len(data)
        if self.transport is None or self.task is None or not self.task.done():
            if data:
                self.pending.append(data)
                self.pending_bytes += len(data)
                if self.pending_bytes > HOLD_LIMIT:
                    self.link.hold(self.stream_id, self._taken)
            self.client_fin = self.client_fin or ended
            return
        if data:
            self.transport.write(data)
        if ended:
            self.client_fin = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self._maybe_done()

    # asyncio.Protocol, the target's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HOLD_LIMIT)

    def data_received(self, data: bytes) -> None:
        if self.ended:
            return
        self.down += len(data)
        if not self.link.send_data(self.stream_id, data) and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.target_fin = True
        if not self.ended:
            self.link.send_data(self.stream_id, b"", end=True)
            self._maybe_done()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.ended:
            self.end("reset-by-target" if exc is not None or not self.target_fin
                     else "closed", reset=exc is not None or not self.target_fin)

    def pause_writing(self) -> None:
        self.link.hold(self.stream_id, self._taken)

    def _taken(self) -> int:
        """Bytes the target has taken (the client's progress)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.up - self.pending_bytes - buffered

    def resume_writing(self) -> None:
        self.link.release(self.stream_id)

    def _maybe_done(self) -> None:
        if self.client_fin and self.target_fin:
            self.end("closed", reset=False)

    def close_target(self) -> None:
        if self.transport is not None:
            if self.client_fin and self.target_fin:
                self.transport.close()
            else:
                self.transport.abort()


class _UdpFlow(_Flow, asyncio.DatagramProtocol):
    kind = "udp"

    def __init__(self, connection: _Connection, stream_id: int, request: ConnectRequest) -> None:
        super().__init__(connection, stream_id, request)
        self.transport: asyncio.DatagramTransport | None = None
        self.capsules = CapsuleParser()
        # Quarter stream ID and context ID 0: what each HTTP/3 datagram starts with.
        self.prefix = datagram_prefix(stream_id)
        self.pending: list[bytes] = []

    async def dial(self, address: str) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, remote_addr=(address, self.request.port))

    def opened(self) -> None:
        for payload in self.pending:
            self._to_target(payload)
        self.pending.clear()

    def _to_target(self, payload: bytes) -> None:
        if self.transport is None or self.task is None or not self.task.done():
            if len(self.pending) < 64:
                self.pending.append(payload)
            return
        self.up += len(payload)
        self.transport.sendto(payload)

    def http_datagram(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            context_id, payload = parse_http_datagram(data)
        except MasqueError:
            return
        if context_id == 0:  # RFC 9298 section 4: other contexts are dropped
            self._to_target(payload)

    def client_data(self, data: bytes, ended: bool) -> None:
        if self.ended:
            return
        try:
            for value in self.capsules.feed(data):
                self.http_datagram(value)
        except MasqueError as exc:
            log.info("%s: bad capsule: %s", self, exc)
            self.end("bad-capsule", reset=True)
            return
        if ended:
            self.end("closed", reset=False)
            if self.link.alive:
                self.link.send_data(self.stream_id, b"", end=True)

    # asyncio.DatagramProtocol, the target's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.ended or not self.link.alive:
            return
        self.down += len(data)
        self.link.send_udp_payload(self.stream_id, self.prefix, data)

    def error_received(self, exc: Exception) -> None:
        log.debug("%s: %s", self, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def close_target(self) -> None:
        if self.transport is not None:
            self.transport.close()


# -- command line and config file -----------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="read the 'server:' section of FILE (the flags below override it)")
    parser.add_argument("--listen", metavar="HOST:PORT",
                        help="UDP address to serve HTTP/3 on (default: [::]:443)")
    parser.add_argument("--cert", metavar="FILE", help="TLS certificate chain (PEM)")
    parser.add_argument("--key", metavar="FILE", help="TLS private key (PEM)")
    parser.add_argument("--token", metavar="SECRET",
                        help="clients must send 'Proxy-Authorization: Bearer SECRET'")
    parser.add_argument("--no-token", action="store_true",
                        help="serve anyone who reaches the port (an open proxy: tests only)")
    parser.add_argument("--allow", action="append", metavar="CIDR",
                        help="destinations to dial even if denied (repeatable)")
    parser.add_argument("--deny", action="append", metavar="CIDR",
                        help="more destinations to refuse (repeatable)")
    parser.add_argument("--max-datagram-size", type=int, metavar="BYTES",
                        help="largest QUIC packet to send (default 1200, which every path "
                        "carries; 1452 on a 1500-byte MTU path lets 1400-byte UDP payloads "
                        "go as QUIC datagrams instead of capsules on the stream)")
    parser.add_argument("--congestion", metavar="ALGORITHM",
                        help="congestion control (default and only choice: cubic)")
    parser.add_argument("--udp-template", metavar="TEMPLATE",
                        help=f"CONNECT-UDP URI template (default: {DEFAULT_UDP_TEMPLATE})")


def _networks(texts: list[str], option: str) -> list[IPNetwork]:
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{option} {text!r} is not a CIDR") from None
    return networks


SERVER_KEYS = ("listen", "cert", "key", "token", "tokens", "allow", "deny",
               "max-datagram-size", "udp-template", "idle-timeout", "congestion")


def load_server_section(path: str) -> ServerConfig:
    """The ``server:`` section of a config file, checked; errors name file and line.
    Paths in it are relative to the file's directory. The file's other sections (a
    client's ``rules:``, ``upstreams:``...) are left to ``tunproxy --rules``."""
    from pathlib import Path

    from tunproxy.config import TOP_LEVEL, _compose, _Section, quic_congestion

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read it: {exc}", path) from None
    root = _compose(text, path)
    if not isinstance(root.value, dict) or "server" not in root.value:
        raise ConfigError("no 'server:' section (listen, cert, key, token...)", path, root.line)
    for key, value in root.value.items():
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown section '{key}' (known: {', '.join(TOP_LEVEL)})",
                              path, value.line)
    s = _Section(root.value["server"], path, "server", SERVER_KEYS)
    base = Path(path).parent

    def address(key: str, default: str) -> tuple[str, int]:
        text = s.string(key, default) or default
        try:
            return split_host_port(text)
        except ValueError:
            raise s.error(key, f"{text!r} is not host:port") from None

    def readable(key: str) -> str:
        name = s.string(key, None)
        if name is None:
            raise s.error(key, "is required (a PEM file)")
        full = base / name
        try:
            with open(full, "rb"):
                pass
        except OSError as exc:
            raise s.error(key, f"cannot read {full}: {exc.strerror}") from None
        return str(full)

    def networks(key: str) -> list[IPNetwork]:
        out = []
        for text, line in s.string_list(key):
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ConfigError(f"server.{key}: {text!r} is not a CIDR", path, line) from None
        return out

    host, port = address("listen", "[::]:443")
    tokens = [t for t, _ in s.string_list("tokens")]
    single = s.string("token", None)
    if single is not None:
        tokens.insert(0, single)
    if any(not t for t in tokens):
        raise s.error("tokens" if "tokens" in s.items else "token", "a token cannot be empty")
    template = s.string("udp-template", DEFAULT_UDP_TEMPLATE) or DEFAULT_UDP_TEMPLATE
    problem = check_template(template)
    if problem is not None:
        raise s.error("udp-template", problem)
    return ServerConfig(
        host=host, port=port, certfile=readable("cert"), keyfile=readable("key"),
        token=tuple(tokens) if tokens else None,
        allow=networks("allow"), deny=networks("deny"), udp_template=template,
        idle_timeout=s.number("idle-timeout", 60.0, 1, 3600),
        max_datagram_size=s.integer("max-datagram-size", 1200, 1200, 65527),
        congestion=quic_congestion(s),
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config file's ``server:`` section (if any) with the flags given on top."""
    base = load_server_section(args.config) if args.config else None
    if base is not None:
        host, port = base.host, base.port
    else:
        host, port = "::", 443
    if args.listen is not None:
        try:
            host, port = split_host_port(args.listen)
        except ValueError:
            raise ConfigError(f"--listen {args.listen!r} is not host:port") from None
    token: str | tuple[str, ...] | None = base.token if base is not None else None
    if args.no_token:
        token = None
    elif args.token is not None:
        token = args.token
    elif token is None:
        raise ConfigError("give --token SECRET (or --no-token for an open proxy)"
                          + (f"; {args.config} has no server.token" if args.config else ""))
    template = args.udp_template or (base.udp_template if base else DEFAULT_UDP_TEMPLATE)
    problem = check_template(template)
    if problem is not None:
        raise ConfigError(f"--udp-template {problem}")
    max_datagram_size = args.max_datagram_size or (base.max_datagram_size if base else 1200)
    if not 1200 <= max_datagram_size <= 65527:
        raise ConfigError(f"--max-datagram-size {max_datagram_size} is out of range "
                          "1200..65527")
    certfile = args.cert or (base.certfile if base else None)
    keyfile = args.key or (base.keyfile if base else None)
    if certfile is None or keyfile is None:
        raise ConfigError("give --cert FILE and --key FILE (or --config FILE with server.cert "
                          "and server.key)")
    for path in (args.cert, args.key):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return ServerConfig(
        host=host, port=port, certfile=certfile, keyfile=keyfile, token=token,
        allow=_networks(args.allow, "--allow") if args.allow is not None else (
            base.allow if base else []),
        deny=_networks(args.deny, "--deny") if args.deny is not None else (
            base.deny if base else []),
        udp_template=template, max_datagram_size=max_datagram_size,
        idle_timeout=base.idle_timeout if base else 60.0,
        congestion=_congestion(args.congestion) if args.congestion else (
            base.congestion if base else "cubic"),
    )


def _congestion(name: str) -> str:
    from tunproxy.config import QUIC_CONGESTION

    if name.lower() not in QUIC_CONGESTION:
        raise ConfigError(f"--congestion {name!r} is not available (the QUIC library, qh3, "
                          f"implements {', '.join(QUIC_CONGESTION)} only)")
    return name.lower()


async def serve(config: ServerConfig, own: list[str]) -> None:
    """Run until SIGTERM or SIGINT; ``own`` are this host's addresses."""
    policy = Policy(config, own)
    server = MasqueServer(config, policy)
    try:
        await server.start()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {_authority(config.host, config.port)}: "
                          f"{exc.strerror or exc}") from None
    except Exception as exc:  # the QUIC library's refusal (most likely of the certificate or key)
        raise ConfigError(f"cannot start serving (certificate {config.certfile}, key "
                          f"{config.keyfile}): {exc}") from None
    assert server.server is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = server.server.address
    log.info("serving MASQUE (HTTP/3 CONNECT, CONNECT-UDP) on %s, %s", _authority(host, port),
             "token required" if config.token else "NO TOKEN: an open proxy")
    await stop.wait()
    log.info("stopping: closing %d connection(s)", len(server.server.links()))
    server.close()
    # Let the CONNECTION_CLOSE frames leave before the loop goes.
    await asyncio.sleep(0.05)
    log.info("stopped after %d flows", server.flows)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    # pyroute2 runs its own event loop: ask it before ours starts.
    own = own_addresses()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, own))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config, own))
    return 0
