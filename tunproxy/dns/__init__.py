"""DNS interception: the hijack handler, fake-ip / real-ip mapping, upstream resolvers.

The relay hands hijacked queries to ``DnsService.handle_query`` and asks
``DnsService.domain_for`` which domain a flow's destination stands for.

Only the config parser is imported with the package: the service and its resolvers (and
dnslib) load when DNS is enabled, so a config with ``dns.enable: false`` never has them
resident.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tunproxy.dns.config import DnsConfig, parse_dns_config

if TYPE_CHECKING:
    from tunproxy.dns.service import DnsService

__all__ = ["DnsConfig", "DnsService", "parse_dns_config"]


def __getattr__(name: str) -> Any:
    if name == "DnsService":
        from tunproxy.dns.service import DnsService

        return DnsService
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
