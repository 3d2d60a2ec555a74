"""A small authoritative DNS server over UDP for tests. Imports stdlib and dnspython only.

Built from dnspython's message and rdata classes (wire parsing and rendering only, no resolver).
It answers from a dict of records and can simulate failures:

    with DnsServer({("example.test", "MX"): ["10 mx.example.test."],
                    ("mx.example.test", "A"): ["127.0.0.3"]}) as dns_server:
        resolver = DnsResolver(nameservers=[("127.0.0.1", dns_server.port)])

- a name with records, but not of the asked type -> NOERROR with an empty answer (NoAnswer);
  names that only exist as parents of record names (empty non-terminals) behave the same;
- a name with a CNAME (and no records of the asked type) -> the CNAME plus the target's records;
- an unknown name -> NXDOMAIN (RFC 1035 §4.1.1 RCODE 3);
- a name in `servfail` -> SERVFAIL; a name in `drop` -> no reply at all (the client times out).
`records`, `servfail` and `drop` may be changed while the server runs (use `set_records` /
`remove` or mutate under `lock`). Runs in a daemon thread: `start()` / `stop()` or `with`.
"""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterable
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

_TTL = 60
_POLL_SECONDS = 0.05


def _norm(name: str) -> str:
    return name.strip().rstrip(".").lower()


class DnsServer:
    """An authoritative UDP DNS server on `host`:`port` (port 0: pick a free one, see `.port`)."""

    def __init__(
        self,
        records: dict[tuple[str, str], list[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        servfail: Iterable[str] = (),
        drop: Iterable[str] = (),
    ) -> None:
        self.lock = threading.Lock()
        self.records: dict[tuple[str, str], list[str]] = {}
        for (name, rdtype), values in (records or {}).items():
            self.records[(_norm(name), rdtype.upper())] = list(values)
        self.servfail: set[str] = {_norm(n) for n in servfail}
        self.drop: set[str] = {_norm(n) for n in drop}
        self.queries: list[tuple[str, str]] = []  # (name, type) of every query received
        self.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> DnsServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="dnsserver", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._sock.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port), ready for `DnsResolver(nameservers=[server.address])`."""
        return (self.host, self.port)

    # -- records ------------------------------------------------------------------------------
    def set_records(self, name: str, rdtype: str, values: list[str]) -> None:
        with self.lock:
            self.records[(_norm(name), rdtype.upper())] = list(values)

    def remove(self, name: str, rdtype: str | None = None) -> None:
        """Forget `name`'s records of `rdtype` (all types when None)."""
        name = _norm(name)
        with self.lock:
            for key in [k for k in self.records if k[0] == name]:
                if rdtype is None or key[1] == rdtype.upper():
                    del self.records[key]

    # -- serving ------------------------------------------------------------------------------
    def _serve(self) -> None:
        while not self._stop.is_set():
            readable, _, _ = select.select([self._sock], [], [], _POLL_SECONDS)
            if not readable:
                continue
            try:
                wire, peer = self._sock.recvfrom(65535)
            except OSError:
                return
            reply = self.handle(wire)
            if reply is not None:
                try:
                    self._sock.sendto(reply, peer)
                except OSError:
                    continue

    def handle(self, wire: bytes) -> bytes | None:
        """The reply to one query in wire format, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        question = query.question[0]
        name = _norm(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self.lock:
            self.queries.append((name, rdtype))
            if name in self.drop:
                return None
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            if name in self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            try:
                self._answer(response, question.name, name, rdtype)
                return response.to_wire(max_size=65535)
            except (dns.exception.DNSException, ValueError):
                # a record the test wrote does not parse: say so instead of dying silently
                response.answer.clear()
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()

    def _answer(
        self, response: dns.message.Message, qname: dns.name.Name, name: str, rdtype: str
    ) -> None:
        seen: set[str] = set()
        owner = qname
        while name not in seen:
            seen.add(name)
            values = self.records.get((name, rdtype))
            if values:
                response.answer.append(_rrset(owner, rdtype, values))
                return
            cname = self.records.get((name, "CNAME"))
            if not cname or rdtype == "CNAME":
                break
            response.answer.append(_rrset(owner, "CNAME", cname[:1]))
            owner = dns.name.from_text(cname[0], origin=dns.name.root)
            name = _norm(cname[0])
        if not response.answer and not self._exists(name):
            response.set_rcode(dns.rcode.NXDOMAIN)

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(key[0] == name or key[0].endswith(suffix) for key in self.records)


def _rrset(owner: dns.name.Name, rdtype: str, values: list[str]) -> dns.rrset.RRset:
    return dns.rrset.from_text_list(
        owner, _TTL, dns.rdataclass.IN, rdtype, values, origin=dns.name.root, relativize=False
    )
