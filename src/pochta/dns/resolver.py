"""`DnsResolver`: MX resolution with dnspython's async resolver. Imports stdlib, dnspython,
`errors` and `pochta.dns.base`; nothing of the servers or the SMTP core.

Order of decisions for `destinations(domain)`:
1. an address literal "[192.0.2.1]" / "[IPv6:...]" is its own single destination;
2. a static route (like Postfix's transport map) wins over DNS: exact domain, then ".parent"
   entries for subdomains, then "*";
3. MX lookup (RFC 5321 §5.1), with the null MX of RFC 7505 and the implicit MX when there is none;
4. the A and AAAA records of every MX host; hosts without addresses are skipped.
Within a host, IPv4 addresses come before IPv6 ones (deterministic, and loopback/test networks
are IPv4). Failures map to DnsError: NXDOMAIN -> 5.1.2 permanent; null MX -> 5.1.10 permanent;
a domain with neither MX nor address records -> 5.4.4 permanent; timeouts, SERVFAIL, no
reachable name server or MX hosts that resolve to nothing -> 4.4.3 transient.
"""

from __future__ import annotations

import asyncio
import random

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from pochta.dns.base import DnsError, Host, is_ip, mx_order, parse_domain_literal, parse_hostport

_ADDRESS_TYPES = ("A", "AAAA")


class DnsResolver:
    """The production `Resolver`.

    Args:
        nameservers: (ip, port) pairs queried over UDP; None uses the system configuration
            (/etc/resolv.conf).
        routes: static routes "domain" -> ["host:port", "ip:port", "[ipv6]:port", "host"]; a
            route's port overrides the delivery port. Keys may be ".example.org" (subdomains) or
            "*" (everything).
        timeout: seconds for one whole lookup (all retries and servers together).
        rng: randomness for shuffling equal-preference MX hosts (tests pass a seeded one).
    """

    def __init__(
        self,
        nameservers: list[tuple[str, int]] | None = None,
        routes: dict[str, list[str]] | None = None,
        timeout: float = 5.0,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._routes = {
            key.lower().rstrip("."): list(value) for key, value in (routes or {}).items()
        }
        self._rng = rng or random.Random()
        self._timeout = timeout
        self._resolver = _make_resolver(nameservers, timeout)

    async def destinations(self, domain: str) -> list[Host]:
        domain = domain.strip().rstrip(".").lower()
        literal = parse_domain_literal(domain)
        if literal is not None:
            return [Host(name=domain, addresses=(literal,), preference=0)]
        route = self._route_for(domain)
        if route is not None:
            return await self._route_hosts(domain, route)
        return await self._mx_hosts(domain)

    # -- static routes ------------------------------------------------------------------------
    def _route_for(self, domain: str) -> list[str] | None:
        if domain in self._routes:
            return self._routes[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self._routes:
                return self._routes[parent]
        return self._routes.get("*")

    async def _route_hosts(self, domain: str, entries: list[str]) -> list[Host]:
        hosts: list[Host] = []
        for preference, entry in enumerate(entries):
            try:
                name, port = parse_hostport(entry)
            except ValueError as exc:
                raise DnsError(
                    f"bad route for {domain}: {exc}", permanent=False, enhanced="4.3.5"
                ) from None
            if is_ip(name):
                addresses: tuple[str, ...] = (name,)
            else:
                addresses = await self._addresses(name)
            if addresses:
                hosts.append(Host(name, addresses, preference, port))
        if not hosts:
            raise DnsError(
                f"no route host for {domain} resolved", permanent=False, enhanced="4.4.3"
            )
        return hosts

    # -- MX -----------------------------------------------------------------------------------
    async def _mx_hosts(self, domain: str) -> list[Host]:
        qname = _qname(domain)
        try:
            answer = await self._query(qname, "MX")
        except dns.resolver.NoAnswer:
            return await self._implicit_mx(domain, qname)
        records = [
            (rdata.preference, rdata.exchange.to_text(omit_final_dot=True).lower())
            for rdata in answer
            if isinstance(rdata, MX)
        ]
        real = [(pref, name) for pref, name in records if name not in ("", ".")]
        if not real:
            # RFC 7505 §3: a null MX ("0 .") says the domain accepts no mail; no further lookups.
            raise DnsError(
                f"domain {domain} does not accept mail (null MX)",
                permanent=True,
                enhanced="5.1.10",
            )
        names = _unique(mx_order(real, self._rng))
        preference = {name: pref for pref, name in sorted(real, reverse=True)}
        resolved = await asyncio.gather(*(self._addresses(name) for name in names))
        hosts = [
            Host(name, addresses, preference[name])
            for name, addresses in zip(names, resolved, strict=True)
            if addresses
        ]
        if not hosts:
            # RFC 5321 §5.1: MX hosts that cannot be resolved are a temporary failure.
            raise DnsError(
                f"no MX host of {domain} has an address", permanent=False, enhanced="4.4.3"
            )
        return hosts

    async def _implicit_mx(self, domain: str, qname: dns.name.Name) -> list[Host]:
        # RFC 5321 §5.1: no MX records -> the domain itself is the implicit MX, preference 0.
        addresses = await self._addresses(domain, strict=True)
        if not addresses:
            raise DnsError(
                f"domain {domain} has no MX and no address records",
                permanent=True,
                enhanced="5.4.4",
            )
        return [Host(qname.to_text(omit_final_dot=True).lower(), addresses, 0)]

    async def _addresses(self, name: str, *, strict: bool = False) -> tuple[str, ...]:
        """A then AAAA addresses of `name`. Failures yield no addresses, except with `strict`,
        where NXDOMAIN and transient failures raise (used for the implicit MX)."""
        try:
            qname = _qname(name)
        except DnsError:
            if strict:
                raise
            return ()
        results = await asyncio.gather(
            *(self._query(qname, rdtype) for rdtype in _ADDRESS_TYPES), return_exceptions=True
        )
        addresses: list[str] = []
        for result in results:
            if isinstance(result, dns.resolver.Answer):
                addresses.extend(str(rdata) for rdata in result)
            elif isinstance(result, dns.resolver.NoAnswer):
                continue
            elif isinstance(result, DnsError):
                if strict:
                    raise result
            elif isinstance(result, BaseException):
                raise result
        return tuple(dict.fromkeys(addresses))

    async def _query(self, qname: dns.name.Name, rdtype: str) -> dns.resolver.Answer:
        """One lookup; NoAnswer passes through, everything else becomes a DnsError."""
        if self._resolver is None:
            raise DnsError("no name server configured", permanent=False, enhanced="4.4.3")
        try:
            return await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NoAnswer:
            raise
        except dns.resolver.NXDOMAIN:
            raise DnsError(
                f"{qname} does not exist (NXDOMAIN)", permanent=True, enhanced="5.1.2"
            ) from None
        except dns.exception.Timeout:
            raise DnsError(
                f"DNS lookup {qname}/{rdtype} timed out", permanent=False, enhanced="4.4.3"
            ) from None
        except dns.resolver.NoNameservers:
            raise DnsError(
                f"DNS lookup {qname}/{rdtype} failed: no name server answered (SERVFAIL)",
                permanent=False,
                enhanced="4.4.3",
            ) from None
        except dns.exception.DNSException as exc:
            raise DnsError(
                f"DNS lookup {qname}/{rdtype} failed: {exc}", permanent=False, enhanced="4.4.3"
            ) from None


def _make_resolver(
    nameservers: list[tuple[str, int]] | None, timeout: float
) -> dns.asyncresolver.Resolver | None:
    if nameservers is None:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            return None
    else:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in nameservers]
    resolver.timeout = timeout
    resolver.lifetime = timeout
    resolver.cache = None
    return resolver


def _qname(domain: str) -> dns.name.Name:
    """The absolute DNS name of `domain` (IDNA for U-labels); permanent 5.1.2 when invalid."""
    try:
        return dns.name.from_text(domain, origin=dns.name.root)
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise DnsError(
            f"invalid domain {domain!r}: {exc}", permanent=True, enhanced="5.1.2"
        ) from None


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))
