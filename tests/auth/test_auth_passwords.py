"""Password hashing, verification and SASLprep."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest

from pochta.auth.passwords import (
    SCRAM_ITERATIONS,
    hash_password,
    needs_rehash,
    scram_credentials,
    verify_password,
    verify_password_async,
)
from pochta.auth.saslprep import saslprep


def test_hash_password_gives_argon2id_and_scram_verifiers() -> None:
    encoded, scram = hash_password("s3cret pass")
    assert encoded.startswith("$argon2id$")
    assert "s3cret" not in encoded
    assert len(scram.salt) >= 16
    assert scram.iterations >= 4096
    # RFC 5802 §3: StoredKey = H(HMAC(SaltedPassword, "Client Key")), checked independently.
    salted = hashlib.pbkdf2_hmac("sha256", b"s3cret pass", scram.salt, scram.iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert scram.stored_key == hashlib.sha256(client_key).digest()
    assert scram.server_key == hmac.new(salted, b"Server Key", "sha256").digest()


def test_salts_are_random() -> None:
    a = hash_password("same")
    b = hash_password("same")
    assert a[0] != b[0]
    assert a[1].salt != b[1].salt
    assert a[1].stored_key != b[1].stored_key


def test_verify_password() -> None:
    encoded, _ = hash_password("pencil")
    assert verify_password(encoded, "pencil")
    assert not verify_password(encoded, "Pencil")
    assert not verify_password(encoded, "")
    assert not needs_rehash(encoded)


def test_empty_or_broken_hash_never_verifies() -> None:
    assert not verify_password("", "")
    assert not verify_password("", "anything")
    assert not verify_password("$argon2id$garbage", "pencil")
    assert not verify_password("not a hash", "pencil")


def test_passwords_are_saslprepped() -> None:
    encoded, scram = hash_password("I\u00adX")  # soft hyphen maps to nothing (RFC 4013 §3)
    assert verify_password(encoded, "IX")
    assert scram_credentials("IX", salt=scram.salt) == scram


@pytest.mark.parametrize("bad", ["", "\u0007bell", "\u0627\u0031"])
def test_hash_password_refuses_bad_passwords(bad: str) -> None:
    with pytest.raises(ValueError):
        hash_password(bad)


def test_scram_iterations_floor() -> None:
    with pytest.raises(ValueError):
        scram_credentials("pencil", iterations=SCRAM_ITERATIONS - 1)
    assert hash_password("pencil", iterations=5000)[1].iterations == 5000


async def test_verify_password_async_does_not_block_the_loop() -> None:
    encoded, _ = hash_password("pencil")
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    ok = await verify_password_async(encoded, "pencil")
    during = ticks - before
    stop.set()
    await task
    assert ok
    assert during > 1  # the loop kept running while argon2 worked in a thread
    assert not await verify_password_async(encoded, "wrong")
    assert not await verify_password_async("", "pencil")


# RFC 4013 §3 examples.
@pytest.mark.parametrize(
    ("raw", "prepared"),
    [
        ("I\u00adX", "IX"),
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),
        ("\u2168", "IX"),
        ("a\u00a0b", "a b"),  # non-ASCII space maps to SPACE
    ],
)
def test_saslprep_examples(raw: str, prepared: str) -> None:
    assert saslprep(raw) == prepared


@pytest.mark.parametrize("raw", ["\u0007", "\u0627\u0031", "a\ue000"])
def test_saslprep_prohibits(raw: str) -> None:
    with pytest.raises(ValueError):
        saslprep(raw)


def test_saslprep_unassigned_only_in_queries() -> None:
    unassigned = "\u0221"  # unassigned in Unicode 3.2 (stringprep's table A.1)
    assert saslprep(unassigned) == unassigned
    with pytest.raises(ValueError):
        saslprep(unassigned, allow_unassigned=False)
