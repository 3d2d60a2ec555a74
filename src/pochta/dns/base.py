"""DNS result types, the `Resolver` Protocol and pure helpers. Imports stdlib and `errors` only.

- `Host`: one place to deliver to (an MX host, an implicit MX, a static route or a domain literal).
- `DnsError`: a resolution failure carrying an RFC 3463 enhanced status code and whether it is
  permanent (bounce) or transient (retry). It is a `DeliveryError`, so callers may treat it as one.
- `mx_order`: RFC 5321 §5.1 ordering of MX records.
- `parse_hostport`, `parse_domain_literal`: the small parsers shared by routes and addresses.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Protocol

from pochta.errors import DeliveryError


@dataclass(frozen=True)
class Host:
    """A delivery destination: try `addresses` in order, on `port` (None: the delivery port)."""

    name: str
    addresses: tuple[str, ...]
    preference: int
    port: int | None = None


class DnsError(DeliveryError):
    """Resolving a destination failed.

    Attributes:
        permanent: True when retrying cannot help (bounce now), False for a transient failure.
        enhanced: the RFC 3463 status code to report, e.g. "5.1.10", "5.1.2", "4.4.3".
    """

    def __init__(self, message: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(message, permanent=permanent)
        self.enhanced = enhanced


class Resolver(Protocol):
    """Finds where mail for a domain goes."""

    async def destinations(self, domain: str) -> list[Host]:
        """Hosts in the order to try them; raises DnsError when there are none."""
        ...


def mx_order(records: list[tuple[int, str]], rng: random.Random) -> list[str]:
    """MX host names sorted by ascending preference, equal preferences in random order.

    RFC 5321 §5.1: "the sender-SMTP MUST randomize them to spread the load across multiple mail
    exchangers for a specific organization" when several MX records share a preference.
    """
    groups: dict[int, list[str]] = {}
    for preference, name in records:
        groups.setdefault(preference, []).append(name)
    ordered: list[str] = []
    for preference in sorted(groups):
        names = groups[preference]
        rng.shuffle(names)
        ordered.extend(names)
    return ordered


def parse_hostport(text: str) -> tuple[str, int | None]:
    """Split "host:port", "1.2.3.4:25", "[::1]:25", "[::1]", "::1" or "host" into (host, port).

    Brackets around an IPv6 address are removed; a bare IPv6 address (several colons) has no port.
    Raises ValueError on an empty host or a port that is not 1..65535.
    """
    text = text.strip()
    port_text: str | None = None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad host:port {text!r}")
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host = text
    if not host:
        raise ValueError(f"empty host in {text!r}")
    if port_text is None:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_domain_literal(domain: str) -> str | None:
    """The IP address of an address literal "[192.0.2.1]" or "[IPv6:2001:db8::1]", else None.

    RFC 5321 §4.1.3 address-literal. Raises DnsError (permanent 5.1.2) for a malformed literal.
    """
    if not domain.startswith("["):
        return None
    if not domain.endswith("]"):
        raise DnsError(f"malformed address literal {domain!r}", permanent=True, enhanced="5.1.2")
    inner = domain[1:-1]
    want_v6 = inner[:5].lower() == "ipv6:"
    if want_v6:
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        raise DnsError(
            f"malformed address literal {domain!r}", permanent=True, enhanced="5.1.2"
        ) from None
    if (ip.version == 6) != want_v6:
        # RFC 5321 §4.1.3: IPv6 literals carry the "IPv6:" tag, IPv4 ones do not.
        raise DnsError(f"malformed address literal {domain!r}", permanent=True, enhanced="5.1.2")
    return str(ip)


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 address in textual form."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
