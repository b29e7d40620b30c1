"""MASQUE, sans-I/O: what goes on the wire between tunproxy's QUIC upstream and a
MASQUE proxy (``tunproxy server``, h2o), with no QUIC library and no I/O inside.

- ``capsule``: RFC 9297 capsules (varint type and length), the DATAGRAM capsule, HTTP
  Datagram payloads with their context ID (RFC 9298 section 4: context 0 is UDP payload).
- ``request``: HTTP/3 CONNECT (RFC 9114 section 4.4) and CONNECT-UDP (RFC 9298) requests
  and responses: building them, checking them, the URI template both ways.

Errors::

    MasqueError            the peer sent something this layer refuses (a remote error)
    └── RequestRefused     a request a proxy must answer with ``status`` (400, 407, ...)
"""

from __future__ import annotations

from tunproxy.masque.capsule import (
    CAPSULE_DATAGRAM,
    CapsuleParser,
    MasqueError,
    datagram_prefix,
    emit_capsule,
    emit_http_datagram,
    parse_http_datagram,
    parse_quarter_stream_id,
)
from tunproxy.masque.request import (
    DEFAULT_UDP_TEMPLATE,
    ConnectRequest,
    RequestRefused,
    connect_request,
    connect_udp_request,
    expand_udp_template,
    parse_request,
    parse_udp_path,
    response_headers,
    response_status,
)

__all__ = [
    "CAPSULE_DATAGRAM",
    "DEFAULT_UDP_TEMPLATE",
    "CapsuleParser",
    "ConnectRequest",
    "MasqueError",
    "RequestRefused",
    "connect_request",
    "connect_udp_request",
    "datagram_prefix",
    "emit_capsule",
    "emit_http_datagram",
    "expand_udp_template",
    "parse_http_datagram",
    "parse_quarter_stream_id",
    "parse_request",
    "parse_udp_path",
    "response_headers",
    "response_status",
]
