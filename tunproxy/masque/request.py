"""HTTP/3 CONNECT (RFC 9114 section 4.4) and CONNECT-UDP (RFC 9298) requests, sans-I/O.

Headers are lists of (name, value) byte pairs, as HTTP/3 libraries hand them over.

Client side: ``connect_request`` for a TCP flow (``:authority`` = the target),
``connect_udp_request`` for a UDP flow (``:path`` from the URI template), then
``response_status`` on the answer. Server side: ``parse_request`` turns a request into a
``ConnectRequest`` or raises ``RequestRefused`` carrying the status to answer.

URI template (RFC 9298 section 2, RFC 6570 simple expansion): the default is
``/.well-known/masque/udp/{target_host}/{target_port}/``; the host is percent-encoded,
so an IPv6 address's colons travel as ``%3A``.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from tunproxy.masque.capsule import MasqueError

__all__ = [
    "DEFAULT_UDP_TEMPLATE",
    "H3_CONNECT_ERROR",
    "H3_DATAGRAM_ERROR",
    "H3_NO_ERROR",
    "H3_REQUEST_CANCELLED",
    "ConnectRequest",
    "Headers",
    "RequestRefused",
    "connect_request",
    "connect_udp_request",
    "expand_udp_template",
    "parse_authority",
    "parse_request",
    "parse_udp_path",
    "response_headers",
    "response_status",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9114 section 8.1: the error codes a MASQUE endpoint resets streams with.
H3_NO_ERROR = 0x100
H3_REQUEST_CANCELLED = 0x10C
H3_CONNECT_ERROR = 0x10F
# RFC 9297 section 2.1 (registered in 5.2): an HTTP/3 datagram that cannot be parsed.
H3_DATAGRAM_ERROR = 0x33

DEFAULT_UDP_TEMPLATE = "/.well-known/masque/udp/{target_host}/{target_port}/"
_VARIABLES = ("{target_host}", "{target_port}")
# A DNS name as a proxy accepts it: LDH labels (and '_'), 1..253 bytes.
_DOMAIN = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+")
_MAX_HEADER_VALUE = 8192


class RequestRefused(MasqueError):
    """A request the proxy refuses; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """What a client asked for: ``protocol`` is "tcp" (CONNECT) or "udp" (CONNECT-UDP)."""

    protocol: str
    host: str
    port: int


def format_authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _template_path(template: str) -> str:
    """The path (and query) of a template given as a full URI or as a path."""
    if "://" in template:
        parts = urlsplit(template.replace("{", "%7B").replace("}", "%7D"))
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return path.replace("%7B", "{").replace("%7D", "}")
    return template


def check_template(template: str) -> str | None:
    """Why ``template`` cannot be used, or None."""
    path = _template_path(template)
    if not path.startswith("/"):
        return "must be a path starting with / (or an https:// URI)"
    for variable in _VARIABLES:
        if path.count(variable) != 1:
            return f"must contain {variable} once"
    return None


def expand_udp_template(template: str, host: str, port: int) -> str:
    """The ``:path`` for a UDP target (RFC 6570 simple expansion: unreserved kept)."""
    path = _template_path(template)
    return path.replace("{target_host}", quote(host, safe="")).replace(
        "{target_port}", str(port)
    )


def _template_regex(template: str) -> re.Pattern[str]:
    path = _template_path(template)
    pattern = re.escape(path)
    pattern = pattern.replace(re.escape("{target_host}"), "(?P<host>[^/?&#]+)")
    pattern = pattern.replace(re.escape("{target_port}"), "(?P<port>[0-9]{1,5})")
    return re.compile(pattern)


def parse_udp_path(template: str, path: str) -> tuple[str, int]:
    """(host, port) from a CONNECT-UDP ``:path``; RequestRefused(400/404) when it does not fit."""
    match = _template_regex(template).fullmatch(path)
    if match is None:
        raise RequestRefused(404, f"path {path[:200]!r} does not match the CONNECT-UDP template")
    try:
        host = unquote(match["host"], errors="strict")
    except UnicodeDecodeError:
        raise RequestRefused(400, "percent-encoded host is not UTF-8") from None
    return _check_host(host), _check_port(match["port"])


def _check_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise RequestRefused(400, f"bad port {text[:20]!r}")
    return int(text)


def _check_host(host: str) -> str:
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    if not _DOMAIN.fullmatch(host):
        raise RequestRefused(400, f"bad host {host[:260]!r}")
    return host.rstrip(".").lower()


def parse_authority(authority: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` from a CONNECT ``:authority``."""
    if authority.startswith("["):
        host, sep, port = authority[1:].partition("]:")
        if not sep or ":" not in host:
            raise RequestRefused(400, f"bad authority {authority[:300]!r}")
    else:
        host, sep, port = authority.rpartition(":")
        if not sep or ":" in host:
            raise RequestRefused(400, f"bad authority {authority[:300]!r}")
    return _check_host(host), _check_port(port)


def connect_request(host: str, port: int, token: str | None) -> Headers:
    """A CONNECT for a TCP flow (RFC 9114 section 4.4: no :scheme, no :path)."""
    headers = [
        (b":method", b"CONNECT"),
        (b":authority", format_authority(_ascii_host(host), port).encode("ascii")),
    ]
    return _with_token(headers, token)


def connect_udp_request(
    proxy_authority: str, template: str, host: str, port: int, token: str | None
) -> Headers:
    """An extended CONNECT for a UDP flow (RFC 9298 section 3.4)."""
    headers = [
        (b":method", b"CONNECT"),
        (b":protocol", b"connect-udp"),
        (b":scheme", b"https"),
        (b":authority", proxy_authority.encode("ascii")),
        (b":path", expand_udp_template(template, _ascii_host(host), port).encode("ascii")),
        (b"capsule-protocol", b"?1"),
    ]
    return _with_token(headers, token)


def _ascii_host(host: str) -> str:
    """An internationalised domain as its A-labels (IDNA), since :authority is ASCII."""
    return host if host.isascii() else host.encode("idna").decode("ascii")


def _with_token(headers: Headers, token: str | None) -> Headers:
    if token is not None:
        headers.append((b"proxy-authorization", b"Bearer " + token.encode()))
    return headers


def response_status(headers: Headers) -> int:
    """The :status of a response; MasqueError when there is none or it is malformed."""
    for name, value in headers:
        if name == b":status":
            if len(value) == 3 and value.isdigit():
                return int(value)
            break
    raise MasqueError("response without a valid :status")


def response_headers(status: int, *, udp: bool = False) -> Headers:
    headers = [(b":status", str(status).encode())]
    if udp and 200 <= status < 300:
        headers.append((b"capsule-protocol", b"?1"))
    if status == 407:
        headers.append((b"proxy-authenticate", b"Bearer"))
    return headers


def parse_request(headers: Headers, template: str,
                  token: str | tuple[str, ...] | None) -> ConnectRequest:
    """Check a request a proxy received: the method, the token, the target.

    ``token``: the one accepted, or a tuple of them (None: no token needed). The token
    is checked first, so a client without it learns nothing else (407).
    """
    fields: dict[bytes, bytes] = {}
    for name, value in headers:
        if len(value) > _MAX_HEADER_VALUE:
            raise RequestRefused(431, f"header {name[:40]!r} is too long")
        if name.startswith(b":") and name in fields:
            raise RequestRefused(400, f"pseudo-header {name!r} repeated")
        fields.setdefault(name, value)
    if token is not None:
        given = fields.get(b"proxy-authorization", b"")
        scheme, _, secret = given.partition(b" ")
        secret = secret.strip()
        accepted = (token,) if isinstance(token, str) else token
        # Every token compared, so the time taken says nothing about which one matched.
        matches = [hmac.compare_digest(secret, t.encode()) for t in accepted]
        if scheme.lower() != b"bearer" or not any(matches):
            raise RequestRefused(407, "missing or wrong proxy token")
    if fields.get(b":method") != b"CONNECT":
        raise RequestRefused(405, f"method {fields.get(b':method', b'')[:20]!r} is not CONNECT")
    try:
        protocol = fields.get(b":protocol")
        if protocol is None:
            # RFC 9114 section 4.4: a plain CONNECT names the target in :authority only.
            if b":scheme" in fields or b":path" in fields:
                raise RequestRefused(400, "CONNECT with :scheme or :path")
            authority = fields.get(b":authority")
            if not authority:
                raise RequestRefused(400, "CONNECT without :authority")
            host, port = parse_authority(authority.decode("ascii"))
            return ConnectRequest("tcp", host, port)
        if protocol != b"connect-udp":
            raise RequestRefused(501, f"extended CONNECT protocol {protocol[:40]!r}")
        path = fields.get(b":path")
        if not path or b":authority" not in fields or b":scheme" not in fields:
            raise RequestRefused(400, "CONNECT-UDP without :path, :authority or :scheme")
        host, port = parse_udp_path(template, path.decode("ascii"))
        return ConnectRequest("udp", host, port)
    except UnicodeDecodeError:
        raise RequestRefused(400, "non-ASCII target") from None
