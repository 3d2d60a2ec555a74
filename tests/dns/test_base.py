"""Pure DNS helpers: MX ordering and host:port parsing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pochta.dns import DnsError, mx_order, parse_domain_literal, parse_hostport
from pochta.errors import DeliveryError


def test_mx_order_sorts_by_preference() -> None:
    records = [(30, "c"), (10, "a"), (20, "b")]
    assert mx_order(records, random.Random(0)) == ["a", "b", "c"]


@given(
    st.lists(st.tuples(st.integers(0, 5), st.text(min_size=1, max_size=5)), max_size=20),
    st.integers(),
)
def test_mx_order_is_a_preference_sorted_permutation(
    records: list[tuple[int, str]], seed: int
) -> None:
    ordered = mx_order(list(records), random.Random(seed))
    assert sorted(ordered) == sorted(name for _, name in records)
    prefs = {}
    for pref, name in records:
        prefs.setdefault(name, set()).add(pref)
    # a name that appears once has one preference; the output respects preference order
    singles = [name for name in ordered if len(prefs[name]) == 1]
    ranks = [next(iter(prefs[name])) for name in singles]
    assert ranks == sorted(ranks)


def test_mx_order_shuffles_equal_preferences() -> None:
    records = [(10, f"mx{i}") for i in range(8)] + [(5, "first")]
    seen = {tuple(mx_order(list(records), random.Random(seed))) for seed in range(20)}
    assert len(seen) > 1
    assert all(order[0] == "first" for order in seen)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.3:2525", ("127.0.0.3", 2525)),
        ("mx.example.test", ("mx.example.test", None)),
        ("mx.example.test:25", ("mx.example.test", 25)),
        ("[::1]:25", ("::1", 25)),
        ("[::1]", ("::1", None)),
        ("::1", ("::1", None)),
        ("2001:db8::1", ("2001:db8::1", None)),
        (" host:587 ", ("host", 587)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int | None]) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text", ["", ":25", "host:", "host:0", "host:70000", "host:x", "[::1"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_domain_literal() -> None:
    assert parse_domain_literal("example.test") is None
    assert parse_domain_literal("[192.0.2.1]") == "192.0.2.1"
    assert parse_domain_literal("[IPv6:2001:DB8::1]") == "2001:db8::1"
    with pytest.raises(DnsError):
        parse_domain_literal("[2001:db8::1]")


def test_dns_error_is_a_delivery_error() -> None:
    err = DnsError("x", permanent=True, enhanced="5.1.10")
    assert isinstance(err, DeliveryError)
    assert (err.permanent, err.enhanced, str(err)) == (True, "5.1.10", "x")
