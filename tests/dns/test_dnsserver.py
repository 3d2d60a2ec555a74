"""The test DNS server, queried with raw dnspython messages over a real UDP socket."""

from __future__ import annotations

import socket

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from pochta.testing.dnsserver import DnsServer


def ask(server: DnsServer, name: str, rdtype: str, timeout: float = 1.0) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return dns.query.udp(query, server.host, port=server.port, timeout=timeout)


def test_answers_records_authoritatively() -> None:
    with DnsServer({("Mail.Test", "MX"): ["10 mx.mail.test."]}) as server:
        reply = ask(server, "mail.test", "MX")
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.flags & dns.flags.AA
        (rrset,) = reply.answer
        assert rrset.rdtype == dns.rdatatype.MX
        assert [r.to_text() for r in rrset] == ["10 mx.mail.test."]


def test_nodata_nxdomain_servfail_and_empty_non_terminal() -> None:
    records = {("a.b.test", "A"): ["127.0.0.1"]}
    with DnsServer(records, servfail=["bad.test"]) as server:
        nodata = ask(server, "a.b.test", "AAAA")
        assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
        ent = ask(server, "b.test", "A")
        assert (ent.rcode(), ent.answer) == (dns.rcode.NOERROR, [])
        assert ask(server, "c.test", "A").rcode() == dns.rcode.NXDOMAIN
        assert ask(server, "bad.test", "A").rcode() == dns.rcode.SERVFAIL


def test_dropped_names_get_no_reply() -> None:
    with DnsServer({("x.test", "A"): ["127.0.0.1"]}, drop=["x.test"]) as server:
        with pytest.raises(dns.exception.Timeout):
            ask(server, "x.test", "A", timeout=0.3)
        server.drop.clear()
        assert ask(server, "x.test", "A").answer


def test_garbage_is_ignored_and_server_keeps_running() -> None:
    with DnsServer({("x.test", "A"): ["127.0.0.1"]}) as server:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\x00\x01garbage", server.address)
        assert ask(server, "x.test", "A").answer


def test_bad_record_text_gives_servfail() -> None:
    with DnsServer({("x.test", "A"): ["not-an-ip"]}) as server:
        assert ask(server, "x.test", "A").rcode() == dns.rcode.SERVFAIL


def test_start_stop_and_port_release() -> None:
    server = DnsServer({("x.test", "A"): ["127.0.0.1"]}).start()
    assert server.port > 0
    assert ask(server, "x.test", "A").answer
    server.stop()
    again = DnsServer({}, port=server.port)  # the port is free again
    again.stop()
