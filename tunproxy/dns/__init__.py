"""DNS interception: the hijack handler, fake-ip / real-ip mapping, upstream resolvers.

The relay hands hijacked queries to ``DnsService.handle_query`` and asks
``DnsService.domain_for`` which domain a flow's destination stands for.
"""

from tunproxy.dns.config import DnsConfig, parse_dns_config
from tunproxy.dns.service import DnsService

__all__ = ["DnsConfig", "DnsService", "parse_dns_config"]
