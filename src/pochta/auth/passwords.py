"""Password hashing: argon2id for PLAIN/LOGIN, SCRAM-SHA-256 verifiers for SCRAM.

Imports stdlib, argon2-cffi, `pochta.store.api` (ScramCredentials) and `pochta.auth.saslprep`.

The password itself is never stored: `hash_password` returns an argon2id encoded hash and the
SCRAM verifiers (salt, iteration count, StoredKey, ServerKey) of RFC 5802 §3. Every password is
SASLprep'd first (RFC 4013), so PLAIN and SCRAM agree on what "the same password" is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pochta.auth.saslprep import saslprep
from pochta.store.api import ScramCredentials

SCRAM_SALT_BYTES = 16  # RFC 7677 §4 recommends a random salt; 16 bytes = 128 bits
SCRAM_ITERATIONS = 4096  # RFC 7677 §4: at least 4096

# argon2id with the RFC 9106 §4 "second recommended" (low-memory) profile:
# t=3 passes, m=64 MiB, p=4 lanes, 16-byte salt, 32-byte tag.
_HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)

_dummy_hash: str | None = None


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SaltedPassword := Hi(Normalize(password), salt, i), Hi being PBKDF2-HMAC-SHA-256
    (RFC 5802 §2.2, RFC 7677 §3)."""
    prepared = saslprep(password).encode("utf-8")
    return hashlib.pbkdf2_hmac("sha256", prepared, salt, iterations)


def client_key(salted: bytes) -> bytes:
    """ClientKey := HMAC(SaltedPassword, "Client Key") (RFC 5802 §3)."""
    return _hmac(salted, b"Client Key")


def server_key(salted: bytes) -> bytes:
    """ServerKey := HMAC(SaltedPassword, "Server Key") (RFC 5802 §3)."""
    return _hmac(salted, b"Server Key")


def stored_key(key: bytes) -> bytes:
    """StoredKey := H(ClientKey) (RFC 5802 §3)."""
    return _h(key)


def scram_credentials(
    password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
) -> ScramCredentials:
    """SCRAM-SHA-256 verifiers for `password` (RFC 5802 §3); a fresh random salt unless given."""
    if iterations < SCRAM_ITERATIONS:  # RFC 7677 §4
        raise ValueError(f"SCRAM iteration count must be at least {SCRAM_ITERATIONS}")
    if salt is None:
        salt = secrets.token_bytes(SCRAM_SALT_BYTES)
    salted = salted_password(password, salt, iterations)
    return ScramCredentials(
        salt=salt,
        iterations=iterations,
        stored_key=stored_key(client_key(salted)),
        server_key=server_key(salted),
    )


def hash_password(
    password: str, *, iterations: int = SCRAM_ITERATIONS
) -> tuple[str, ScramCredentials]:
    """The argon2id encoded hash and the SCRAM-SHA-256 verifiers of `password`.

    Raises ValueError for an empty password or one SASLprep prohibits (RFC 4013 §2.3, stored
    strings: unassigned code points are refused too, RFC 4013 §2.5).
    """
    prepared = saslprep(password, allow_unassigned=False)
    if not prepared:
        raise ValueError("empty password")
    encoded = _HASHER.hash(prepared)
    return encoded, scram_credentials(password, iterations=iterations)


def verify_password(encoded_hash: str, password: str) -> bool:
    """True when `password` matches the argon2id `encoded_hash`.

    False for the empty hash (an account that cannot log in), for a malformed hash and for a
    password SASLprep rejects. Blocks for tens of milliseconds: use `verify_password_async` in
    the event loop.
    """
    if not encoded_hash:
        burn_time(password)  # same cost as a real check: the caller's timing reveals nothing
        return False
    try:
        prepared = saslprep(password)
    except ValueError:
        return False
    try:
        return _HASHER.verify(encoded_hash, prepared)
    except (VerificationError, InvalidHashError):
        return False


async def verify_password_async(encoded_hash: str, password: str) -> bool:
    """`verify_password` in a worker thread, so the event loop never blocks on argon2."""
    return await asyncio.to_thread(verify_password, encoded_hash, password)


def needs_rehash(encoded_hash: str) -> bool:
    """True when `encoded_hash` was made with other parameters than the current ones."""
    if not encoded_hash:
        return False
    try:
        return _HASHER.check_needs_rehash(encoded_hash)
    except (InvalidHashError, ValueError):
        return True


def burn_time(password: str) -> None:
    """Run one argon2 verification that always fails, for unknown users (no timing oracle)."""
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = _HASHER.hash(secrets.token_hex(16))
    with contextlib.suppress(VerificationError, InvalidHashError):
        _HASHER.verify(_dummy_hash, password.encode("utf-8", "replace"))


async def burn_time_async(password: str) -> None:
    """`burn_time` in a worker thread."""
    await asyncio.to_thread(burn_time, password)
