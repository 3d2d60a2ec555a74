"""SCRAM-SHA-256: the RFC 7677 test vector, scramp interop, unknown users, malformed input."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from pochta.auth.passwords import scram_credentials
from pochta.auth.sasl import (
    Challenge,
    Failure,
    ScramClient,
    ScramError,
    ScramServer,
    Success,
    start,
)
from pochta.store.api import User

Lookup = Callable[[str], Awaitable[User | None]]

ALICE = "alice@example.org"
ALICE_PASSWORD = "correct horse battery staple"
MakeUser = Callable[..., User]

# RFC 7677 §3
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


@pytest.fixture(scope="module")
def rfc_user(make_user: MakeUser) -> User:
    user = make_user("user", None)
    return replace(user, password_hash="x", scram=scram_credentials("pencil", salt=SALT))


def lookup_of(*users: User) -> Lookup:
    table = {u.address: u for u in users}

    async def find(username: str) -> User | None:
        return table.get(username)

    return find


async def test_rfc7677_vector_against_our_server(rfc_user: User) -> None:
    server = ScramServer(lookup_of(rfc_user), b"secret", nonce=SERVER_NONCE)
    assert await server.step(None) == Challenge(b"")
    assert await server.step(CLIENT_FIRST) == Challenge(SERVER_FIRST)
    assert await server.step(CLIENT_FINAL) == Success(rfc_user, SERVER_FINAL)
    assert server.username == "user"


async def test_rfc7677_vector_wrong_proof_fails(rfc_user: User) -> None:
    server = ScramServer(lookup_of(rfc_user), b"secret", nonce=SERVER_NONCE)
    await server.step(CLIENT_FIRST)
    bad = CLIENT_FINAL.replace(b"p=dHzb", b"p=dHzc")
    result = await server.step(bad)
    assert isinstance(result, Failure) and not result.malformed


def test_rfc7677_vector_with_our_client() -> None:
    client = ScramClient("user", "pencil", nonce=CLIENT_NONCE)
    assert client.first() == CLIENT_FIRST
    assert client.final(SERVER_FIRST) == CLIENT_FINAL
    client.verify(SERVER_FINAL)
    with pytest.raises(ScramError):
        client.verify(SERVER_FINAL.replace(b"v=6", b"v=7"))
    with pytest.raises(ScramError):
        client.verify(b"e=invalid-proof")


def test_client_rejects_bad_server_first() -> None:
    for server_first in (
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce does not extend ours
        b"r=" + CLIENT_NONCE.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # not extended
        SERVER_FIRST.replace(b"i=4096", b"i=1"),  # too few iterations (RFC 7677 §4)
        SERVER_FIRST.replace(b"i=4096", b"i=99999999"),  # hostile cost
        SERVER_FIRST.replace(b"s=W22", b"s=!!!"),
        b"garbage",
    ):
        client = ScramClient("user", "pencil", nonce=CLIENT_NONCE)
        client.first()
        with pytest.raises(ScramError):
            client.final(server_first)


def test_client_escapes_username() -> None:
    client = ScramClient("a,b=c", "pencil", nonce="abc")
    assert client.first() == b"n,,n=a=2Cb=3Dc,r=abc"


async def test_scramp_client_against_our_server(lookup: Lookup, alice: User) -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], ALICE, ALICE_PASSWORD)
    server = start("SCRAM-SHA-256", lookup)
    first = await server.step(client.get_client_first().encode())
    assert isinstance(first, Challenge)
    client.set_server_first(first.data.decode())
    final = await server.step(client.get_client_final().encode())
    assert isinstance(final, Success)
    assert final.user == alice
    assert final.data is not None
    client.set_server_final(final.data.decode())  # raises if our ServerSignature were wrong


async def test_scramp_client_wrong_password(lookup: Lookup) -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], ALICE, "wrong")
    server = start("SCRAM-SHA-256", lookup)
    first = await server.step(client.get_client_first().encode())
    assert isinstance(first, Challenge)
    client.set_server_first(first.data.decode())
    assert await server.step(client.get_client_final().encode()) == Failure("invalid credentials")


async def test_non_ascii_password_agrees_with_scramp(make_user: MakeUser) -> None:
    password = "pässwörd\u00a0\u2168"  # SASLprep maps NBSP to space and U+2168 to "IX"
    user = make_user("u@example.org", password)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "u@example.org", password)
    server = start("SCRAM-SHA-256", lookup_of(user))
    first = await server.step(client.get_client_first().encode())
    assert isinstance(first, Challenge)
    client.set_server_first(first.data.decode())
    assert isinstance(await server.step(client.get_client_final().encode()), Success)


def _scramp_server(password: str) -> scramp.core.ScramServer:
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    salt, stored, server_key, iterations = mech.make_auth_info(password)
    return mech.make_server(lambda _username: (salt, stored, server_key, iterations))


def test_our_client_against_scramp_server() -> None:
    server = _scramp_server("pencil")
    client = ScramClient("user@example.org", "pencil")
    server.set_client_first(client.first().decode())
    final = client.final(server.get_server_first().encode())
    server.set_client_final(final.decode())
    client.verify(server.get_server_final().encode())


def test_our_client_against_scramp_server_wrong_password() -> None:
    server = _scramp_server("pencil")
    client = ScramClient("user@example.org", "not pencil")
    server.set_client_first(client.first().decode())
    final = client.final(server.get_server_first().encode())
    with pytest.raises(scramp.ScramException):
        server.set_client_final(final.decode())
    with pytest.raises(ScramError):
        client.verify(server.get_server_final().encode())


def test_our_verifiers_work_in_scramp_server(alice: User) -> None:
    creds = alice.scram
    assert creds is not None
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    server = mech.make_server(
        lambda _u: (creds.salt, creds.stored_key, creds.server_key, creds.iterations)
    )
    client = ScramClient(ALICE, ALICE_PASSWORD)
    server.set_client_first(client.first().decode())
    server.set_client_final(client.final(server.get_server_first().encode()).decode())
    client.verify(server.get_server_final().encode())


async def _server_first(lookup: Lookup, username: str, secret: bytes = b"k") -> dict[str, str]:
    server = start("SCRAM-SHA-256", lookup, secret=secret)
    result = await server.step(ScramClient(username, "x", nonce="abc").first())
    assert isinstance(result, Challenge)
    return dict(part.split("=", 1) for part in result.data.decode().split(","))


async def test_unknown_user_looks_like_a_known_one(lookup: Lookup, alice: User) -> None:
    known = await _server_first(lookup, ALICE)
    ghost = await _server_first(lookup, "ghost@example.org")
    assert alice.scram is not None
    assert base64.b64decode(known["s"]) == alice.scram.salt
    assert len(base64.b64decode(ghost["s"])) == len(alice.scram.salt)
    assert ghost["i"] == known["i"]
    # stable per user and secret (several nodes agree), different between users and secrets
    assert (await _server_first(lookup, "ghost@example.org"))["s"] == ghost["s"]
    assert (await _server_first(lookup, "other@example.org"))["s"] != ghost["s"]
    assert (await _server_first(lookup, "ghost@example.org", b"k2"))["s"] != ghost["s"]


@pytest.mark.parametrize("username", ["ghost@example.org", "disabled@example.org"])
async def test_unknown_or_disabled_user_fails_at_the_proof(lookup: Lookup, username: str) -> None:
    client = ScramClient(username, ALICE_PASSWORD)  # disabled@ has alice's verifiers
    server = start("SCRAM-SHA-256", lookup)
    first = await server.step(client.first())
    assert isinstance(first, Challenge)
    assert await server.step(client.final(first.data)) == Failure("invalid credentials")
    assert server.username == username


async def _run(lookup: Lookup, first: bytes, final_of: Callable[[bytes], bytes]) -> object:
    server = start("SCRAM-SHA-256", lookup)
    challenge = await server.step(first)
    assert isinstance(challenge, Challenge)
    return await server.step(final_of(challenge.data))


def _manual_final(gs2: bytes, bare: bytes, server_first: bytes, password: bytes) -> bytes:
    """An independent RFC 5802 §3 client-final computation."""
    attrs = dict(part.split(b"=", 1) for part in server_first.split(b","))
    salted = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(attrs[b"s"]), 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    without_proof = b"c=" + base64.b64encode(gs2) + b",r=" + attrs[b"r"]
    auth_message = b",".join((bare, server_first, without_proof))
    signature = hmac.new(hashlib.sha256(client_key).digest(), auth_message, "sha256").digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return without_proof + b",p=" + base64.b64encode(proof)


async def test_y_flag_accepted_p_flag_rejected(lookup: Lookup, alice: User) -> None:
    bare = b"n=" + ALICE.encode() + b",r=abc"
    password = ALICE_PASSWORD.encode()
    result = await _run(lookup, b"y,," + bare, lambda sf: _manual_final(b"y,,", bare, sf, password))
    assert isinstance(result, Success) and result.user == alice
    server = start("SCRAM-SHA-256", lookup)
    result = await server.step(b"p=tls-unique,," + bare)
    assert isinstance(result, Failure) and not result.malformed


async def test_authzid(lookup: Lookup) -> None:
    bare = ScramClient(ALICE, ALICE_PASSWORD).first()[3:]
    server = start("SCRAM-SHA-256", lookup)
    assert isinstance(await server.step(b"n,a=Alice@Example.org," + bare), Challenge)
    server = start("SCRAM-SHA-256", lookup)
    result = await server.step(b"n,a=bob@example.org," + bare)
    assert result == Failure("SCRAM: authorization identity not permitted")


def _tamper_nonce(final: bytes) -> bytes:
    return final.replace(b",r=abc", b",r=abcX")


def _tamper_cbind(final: bytes) -> bytes:
    return final.replace(b"c=biws", b"c=eSws")  # base64("y,,") after a "n,," header


def _short_proof(final: bytes) -> bytes:
    return final[: final.index(b",p=")] + b",p=" + base64.b64encode(b"short")


@pytest.mark.parametrize("tamper", [_tamper_nonce, _tamper_cbind, _short_proof])
async def test_final_message_checks(lookup: Lookup, tamper: Callable[[bytes], bytes]) -> None:
    client = ScramClient(ALICE, ALICE_PASSWORD, nonce="abc")
    result = await _run(lookup, client.first(), lambda sf: tamper(client.final(sf)))
    assert isinstance(result, Failure) and not result.malformed, result


async def test_mandatory_extension_fails(lookup: Lookup) -> None:
    server = start("SCRAM-SHA-256", lookup)
    result = await server.step(b"n,,m=ext,n=alice@example.org,r=abc")
    assert isinstance(result, Failure) and not result.malformed


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"garbage",
        b"x,,n=user,r=abc",
        b"n,,",
        b"n,,r=abc,n=user",
        b"n,,n=us=ZZer,r=abc",
        b"n,,n=user",
        b"n,,n=user,r=",
        b"n,,n=,r=abc",
        b"n,,n=user,r=a\x01b",
        b"n,b=x,n=user,r=abc",
        b"n,,n=user,r=abc,=x",
        b"\xff\xfe",
    ],
)
async def test_malformed_client_first(lookup: Lookup, message: bytes) -> None:
    server = start("SCRAM-SHA-256", lookup)
    result = await server.step(message)
    assert isinstance(result, Failure) and result.malformed, result
    assert isinstance(await server.step(b"n,,n=user,r=abc"), Failure)  # finished for good


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"c=biws,r=abcdef",
        b"c=biws,r=abc,p=!!!",
        b"r=abc,c=biws,p=AAAA",
        b"c=%%%,r=abc,p=AAAA",
        b"\xff,p=AAAA",
    ],
)
async def test_malformed_client_final(lookup: Lookup, message: bytes) -> None:
    server = start("SCRAM-SHA-256", lookup)
    assert isinstance(await server.step(b"n,,n=alice@example.org,r=abc"), Challenge)
    result = await server.step(message)
    assert isinstance(result, Failure) and result.malformed, result


async def test_step_none_only_starts(lookup: Lookup) -> None:
    server = start("SCRAM-SHA-256", lookup)
    assert await server.step(None) == Challenge(b"")
    result = await server.step(None)
    assert isinstance(result, Failure) and result.malformed


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=80), final=st.binary(max_size=120))
def test_arbitrary_bytes_never_raise(users: dict[str, User], first: bytes, final: bytes) -> None:
    async def scenario() -> None:
        server = start("SCRAM-SHA-256", lookup_of(*users.values()))
        for message in (first, final):
            result = await server.step(message)
            assert isinstance(result, Challenge | Failure)
        server = start("SCRAM-SHA-256", lookup_of(*users.values()))
        await server.step(b"n,,n=alice@example.org,r=abc")
        assert isinstance(await server.step(final), Failure)

    asyncio.run(scenario())
