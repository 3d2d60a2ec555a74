"""DNS resolution for outbound delivery. Imports stdlib, dnspython and `errors` only.

`Resolver` is the Protocol the delivery code depends on; `DnsResolver` is the real one (MX,
implicit MX, null MX, static routes, address literals). See `pochta.testing.dnsserver` for the
authoritative test server to point `DnsResolver(nameservers=[...])` at.
"""

from pochta.dns.base import (
    DnsError,
    Host,
    Resolver,
    is_ip,
    mx_order,
    parse_domain_literal,
    parse_hostport,
)
from pochta.dns.resolver import DnsResolver

__all__ = [
    "DnsError",
    "DnsResolver",
    "Host",
    "Resolver",
    "is_ip",
    "mx_order",
    "parse_domain_literal",
    "parse_hostport",
]
