"""DnsResolver against the real test DNS server on loopback UDP."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from pochta.dns import DnsError, DnsResolver, Host
from pochta.testing.dnsserver import DnsServer

RECORDS = {
    ("yandex.test", "MX"): ["10 mx.yandex.test.", "20 mx2.yandex.test."],
    ("mx.yandex.test", "A"): ["127.0.0.3"],
    ("mx.yandex.test", "AAAA"): ["::1"],
    ("mx2.yandex.test", "A"): ["127.0.0.4", "127.0.0.5"],
    ("implicit.test", "A"): ["127.0.0.6"],
    ("implicit.test", "TXT"): ['"v=spf1 -all"'],
    ("nomail.test", "MX"): ["0 ."],
    ("bare.test", "TXT"): ['"nothing here"'],
    ("ghosts.test", "MX"): ["10 gone.ghosts.test.", "20 nodata.ghosts.test."],
    ("nodata.ghosts.test", "TXT"): ['"x"'],
    ("half.test", "MX"): ["10 gone.half.test.", "20 ok.half.test."],
    ("ok.half.test", "A"): ["127.0.0.7"],
    ("slowmx.test", "MX"): ["10 slow.slowmx.test.", "20 fine.slowmx.test."],
    ("slow.slowmx.test", "A"): ["127.0.0.8"],
    ("fine.slowmx.test", "A"): ["127.0.0.9"],
    ("alias.test", "MX"): ["5 www.alias.test."],
    ("www.alias.test", "CNAME"): ["real.alias.test."],
    ("real.alias.test", "A"): ["127.0.0.10"],
    ("route-target.test", "A"): ["127.0.0.11"],
}


@pytest.fixture(scope="module")
def server() -> Iterator[DnsServer]:
    with DnsServer(
        RECORDS, servfail=["broken.test"], drop=["blackhole.test", "slow.slowmx.test"]
    ) as srv:
        yield srv


def resolver(server: DnsServer, **kwargs: object) -> DnsResolver:
    return DnsResolver(nameservers=[server.address], timeout=0.5, rng=random.Random(1), **kwargs)  # type: ignore[arg-type]


async def test_mx_hosts_in_preference_order_with_all_addresses(server: DnsServer) -> None:
    hosts = await resolver(server).destinations("yandex.test")
    # IPv4 first, then IPv6; the order inside one RRset is the server's (an RRset is a set)
    assert hosts[0] == Host("mx.yandex.test", ("127.0.0.3", "::1"), 10)
    assert (hosts[1].name, hosts[1].preference, hosts[1].port) == ("mx2.yandex.test", 20, None)
    assert sorted(hosts[1].addresses) == ["127.0.0.4", "127.0.0.5"]
    assert len(hosts) == 2


async def test_domain_is_case_and_dot_insensitive(server: DnsServer) -> None:
    hosts = await resolver(server).destinations("YANDEX.Test.")
    assert [h.name for h in hosts] == ["mx.yandex.test", "mx2.yandex.test"]


async def test_no_mx_uses_domain_itself_as_implicit_mx(server: DnsServer) -> None:
    assert await resolver(server).destinations("implicit.test") == [
        Host("implicit.test", ("127.0.0.6",), 0)
    ]


async def test_null_mx_is_permanent_5_1_10_without_address_lookups(server: DnsServer) -> None:
    server.queries.clear()
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("nomail.test")
    assert info.value.permanent is True
    assert info.value.enhanced == "5.1.10"
    assert server.queries == [("nomail.test", "MX")]


async def test_nxdomain_is_permanent_5_1_2(server: DnsServer) -> None:
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("no-such-domain.test")
    assert (info.value.permanent, info.value.enhanced) == (True, "5.1.2")


async def test_neither_mx_nor_address_is_permanent(server: DnsServer) -> None:
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("bare.test")
    assert info.value.permanent is True
    assert info.value.enhanced.startswith("5.")


async def test_servfail_is_transient_4_4_3(server: DnsServer) -> None:
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("broken.test")
    assert (info.value.permanent, info.value.enhanced) == (False, "4.4.3")


async def test_timeout_is_transient_4_4_3(server: DnsServer) -> None:
    started = time.monotonic()
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("blackhole.test")
    assert (info.value.permanent, info.value.enhanced) == (False, "4.4.3")
    assert time.monotonic() - started < 3


async def test_unreachable_nameserver_is_transient() -> None:
    # A UDP port on loopback where nothing listens: ICMP refused or a timeout.
    with DnsServer({}) as gone:
        address = gone.address
    res = DnsResolver(nameservers=[address], timeout=0.5)
    with pytest.raises(DnsError) as info:
        await res.destinations("yandex.test")
    assert (info.value.permanent, info.value.enhanced) == (False, "4.4.3")


async def test_mx_hosts_without_addresses_are_transient(server: DnsServer) -> None:
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("ghosts.test")
    assert (info.value.permanent, info.value.enhanced) == (False, "4.4.3")


async def test_unresolvable_mx_host_is_skipped(server: DnsServer) -> None:
    assert await resolver(server).destinations("half.test") == [
        Host("ok.half.test", ("127.0.0.7",), 20)
    ]


async def test_timed_out_mx_host_is_skipped(server: DnsServer) -> None:
    assert await resolver(server).destinations("slowmx.test") == [
        Host("fine.slowmx.test", ("127.0.0.9",), 20)
    ]


async def test_mx_target_behind_cname_resolves(server: DnsServer) -> None:
    assert await resolver(server).destinations("alias.test") == [
        Host("www.alias.test", ("127.0.0.10",), 5)
    ]


async def test_equal_preferences_are_shuffled(server: DnsServer) -> None:
    server.set_records("spread.test", "MX", [f"10 m{i}.spread.test." for i in range(6)])
    for i in range(6):
        server.set_records(f"m{i}.spread.test", "A", [f"127.0.1.{i}"])
    try:
        orders = set()
        for seed in range(8):
            res = DnsResolver(nameservers=[server.address], timeout=0.5, rng=random.Random(seed))
            hosts = await res.destinations("spread.test")
            assert sorted(h.name for h in hosts) == [f"m{i}.spread.test" for i in range(6)]
            orders.add(tuple(h.name for h in hosts))
        assert len(orders) > 1
    finally:
        server.remove("spread.test")
        for i in range(6):
            server.remove(f"m{i}.spread.test")


async def test_records_changed_at_runtime_are_seen(server: DnsServer) -> None:
    res = resolver(server)
    with pytest.raises(DnsError):
        await res.destinations("later.test")
    server.set_records("later.test", "A", ["127.0.0.12"])
    try:
        assert await res.destinations("later.test") == [Host("later.test", ("127.0.0.12",), 0)]
    finally:
        server.remove("later.test")


async def test_domain_literals_resolve_to_themselves(server: DnsServer) -> None:
    res = resolver(server)
    assert await res.destinations("[127.0.0.3]") == [Host("[127.0.0.3]", ("127.0.0.3",), 0)]
    assert await res.destinations("[IPv6:::1]") == [Host("[ipv6:::1]", ("::1",), 0)]
    for bad in ("[127.0.0.300]", "[::1]", "[IPv6:127.0.0.1]", "[127.0.0.1"):
        with pytest.raises(DnsError) as info:
            await res.destinations(bad)
        assert info.value.permanent is True


async def test_static_routes_win_over_dns_and_keep_their_ports(server: DnsServer) -> None:
    res = resolver(
        server,
        routes={
            "yandex.test": ["127.0.0.20:2525", "route-target.test", "[::1]:26"],
            ".corp.test": ["route-target.test:587"],
            "*": ["127.0.0.21"],
        },
    )
    assert await res.destinations("yandex.test") == [
        Host("127.0.0.20", ("127.0.0.20",), 0, 2525),
        Host("route-target.test", ("127.0.0.11",), 1, None),
        Host("::1", ("::1",), 2, 26),
    ]
    assert await res.destinations("mail.corp.test") == [
        Host("route-target.test", ("127.0.0.11",), 0, 587)
    ]
    assert await res.destinations("anything.test") == [Host("127.0.0.21", ("127.0.0.21",), 0)]


async def test_route_to_unresolvable_host_is_transient(server: DnsServer) -> None:
    res = resolver(server, routes={"x.test": ["nowhere.test:25"]})
    with pytest.raises(DnsError) as info:
        await res.destinations("x.test")
    assert info.value.permanent is False


async def test_invalid_domain_is_permanent(server: DnsServer) -> None:
    with pytest.raises(DnsError) as info:
        await resolver(server).destinations("a" * 70 + ".test")
    assert (info.value.permanent, info.value.enhanced) == (True, "5.1.2")
