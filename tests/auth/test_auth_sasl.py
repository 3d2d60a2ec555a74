"""PLAIN and LOGIN exchanges, mechanism selection and malformed input."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pochta.auth.sasl import (
    MECHANISMS,
    Challenge,
    Failure,
    LoginServer,
    PlainServer,
    ScramServer,
    Success,
    UnknownMechanism,
    start,
)
from pochta.store.api import User

ALICE = "alice@example.org"
ALICE_PASSWORD = "correct horse battery staple"
Lookup = Callable[[str], Awaitable[User | None]]
INVALID = Failure("invalid credentials")


def plain(authzid: str, authcid: str, password: str) -> bytes:
    return f"{authzid}\0{authcid}\0{password}".encode()


def test_start_picks_the_mechanism(lookup: Lookup) -> None:
    assert MECHANISMS == ("SCRAM-SHA-256", "PLAIN", "LOGIN")
    assert isinstance(start("PLAIN", lookup), PlainServer)
    assert isinstance(start("login", lookup), LoginServer)
    assert isinstance(start("Scram-Sha-256", lookup), ScramServer)
    for name in MECHANISMS:
        assert start(name, lookup).mechanism == name
    for name in ("CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "", "XOAUTH2"):
        with pytest.raises(UnknownMechanism):
            start(name, lookup)


async def test_plain_initial_response(lookup: Lookup, alice: User) -> None:
    server = start("PLAIN", lookup)
    assert await server.step(plain("", ALICE, ALICE_PASSWORD)) == Success(alice)
    assert server.username == ALICE


async def test_plain_after_empty_challenge(lookup: Lookup, alice: User) -> None:
    server = start("PLAIN", lookup)
    assert await server.step(None) == Challenge(b"")
    assert await server.step(plain("", "Alice@Example.ORG", ALICE_PASSWORD)) == Success(alice)


async def test_plain_authzid(lookup: Lookup, alice: User) -> None:
    server = start("PLAIN", lookup)
    assert await server.step(plain(ALICE, ALICE, ALICE_PASSWORD)) == Success(alice)
    server = start("PLAIN", lookup)
    result = await server.step(plain("bob@example.org", ALICE, ALICE_PASSWORD))
    assert isinstance(result, Failure) and not result.malformed


@pytest.mark.parametrize(
    ("authcid", "password"),
    [
        (ALICE, "wrong"),
        (ALICE, ALICE_PASSWORD.upper()),
        ("ghost@example.org", ALICE_PASSWORD),
        ("disabled@example.org", ALICE_PASSWORD),  # empty hash: cannot log in
    ],
)
async def test_plain_bad_credentials(lookup: Lookup, authcid: str, password: str) -> None:
    server = start("PLAIN", lookup)
    assert await server.step(plain("", authcid, password)) == INVALID  # one reason for all
    assert server.username == authcid


async def test_plain_user_without_scram_verifiers(lookup: Lookup, users: dict[str, User]) -> None:
    server = start("PLAIN", lookup)
    result = await server.step(plain("", "noscram@example.org", ALICE_PASSWORD))
    assert result == Success(users["noscram@example.org"])


@pytest.mark.parametrize(
    "message",
    [
        b"",  # "AUTH PLAIN =": an empty response
        b"no separators",
        b"\0only-one-nul",
        b"\0a@b\0c\0d",
        b"\0\0password",
        b"\0alice@example.org\0",
        b"\0\xff\xfe\0password",
        b"\0alice@example.org\0\xc3",
        b"\0" + b"a" * 256 + b"\0password",
        b"\0alice@example.org\0pass\r\nword",
    ],
)
async def test_plain_malformed(lookup: Lookup, message: bytes) -> None:
    server = start("PLAIN", lookup)
    result = await server.step(message)
    assert isinstance(result, Failure) and result.malformed, result


async def test_finished_exchange_stays_finished(lookup: Lookup) -> None:
    server = start("PLAIN", lookup)
    assert await server.step(plain("", ALICE, "wrong")) == INVALID
    result = await server.step(plain("", ALICE, ALICE_PASSWORD))
    assert isinstance(result, Failure) and result.malformed


async def test_login_exchange(lookup: Lookup, alice: User) -> None:
    server = start("LOGIN", lookup)
    assert await server.step(None) == Challenge(b"Username:")
    assert await server.step(ALICE.upper().encode()) == Challenge(b"Password:")
    assert await server.step(ALICE_PASSWORD.encode()) == Success(alice)


async def test_login_initial_response(lookup: Lookup, alice: User) -> None:
    server = start("LOGIN", lookup)
    assert await server.step(ALICE.encode()) == Challenge(b"Password:")
    assert server.username == ALICE
    assert await server.step(ALICE_PASSWORD.encode()) == Success(alice)


@pytest.mark.parametrize("username", [ALICE, "ghost@example.org"])
async def test_login_bad_password(lookup: Lookup, username: str) -> None:
    server = start("LOGIN", lookup)
    await server.step(None)
    await server.step(username.encode())
    assert await server.step(b"wrong") == INVALID


@pytest.mark.parametrize(
    "steps",
    [
        [None, b""],
        [None, b"\xff"],
        [None, b"a\0b"],
        [None, None],
        [b"alice@example.org", b""],
        [b"alice@example.org", None],
    ],
)
async def test_login_malformed(lookup: Lookup, steps: list[bytes | None]) -> None:
    server = start("LOGIN", lookup)
    results = [await server.step(step) for step in steps]
    assert all(isinstance(r, Challenge) for r in results[:-1])
    assert isinstance(results[-1], Failure) and results[-1].malformed, results


@settings(max_examples=60, deadline=None)
@given(
    mechanism=st.sampled_from(["PLAIN", "LOGIN"]),
    messages=st.lists(st.none() | st.binary(max_size=40), min_size=1, max_size=4),
)
def test_arbitrary_input_never_raises(
    users: dict[str, User], mechanism: str, messages: list[bytes | None]
) -> None:
    async def find(username: str) -> User | None:
        return users.get(username)

    async def scenario() -> None:
        server = start(mechanism, find)
        for message in messages:
            result = await server.step(message)
            assert isinstance(result, Challenge | Success | Failure)
            if isinstance(result, Success):
                assert result.user.address == ALICE  # only alice's password works

    asyncio.run(scenario())
