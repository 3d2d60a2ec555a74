"""Fixtures for the auth tests: users with real argon2id/SCRAM credentials and a lookup."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from pochta.auth.passwords import hash_password
from pochta.store.api import User

ALICE = "alice@example.org"  # the test modules repeat these two constants
ALICE_PASSWORD = "correct horse battery staple"


def make_user(address: str, password: str | None, user_id: int = 1) -> User:
    """A User as the store would return it; `password=None` gives a login-disabled account."""
    encoded, scram = hash_password(password) if password is not None else ("", None)
    return User(
        id=user_id,
        address=address,
        domain=address.rpartition("@")[2],
        password_hash=encoded,
        scram=scram,
        created_at=datetime.now(UTC),
    )


@pytest.fixture(scope="session", name="make_user")
def make_user_fixture() -> Callable[..., User]:
    return make_user


@pytest.fixture(scope="session")
def alice() -> User:
    return make_user(ALICE, ALICE_PASSWORD)


@pytest.fixture(scope="session")
def users(alice: User) -> dict[str, User]:
    """alice; disabled@ (empty hash, but alice's SCRAM verifiers); noscram@ (argon2 only)."""
    return {
        ALICE: alice,
        "disabled@example.org": replace(
            alice, id=2, address="disabled@example.org", password_hash=""
        ),
        "noscram@example.org": replace(alice, id=3, address="noscram@example.org", scram=None),
    }


@pytest.fixture
def lookup(users: dict[str, User]) -> Callable[[str], Awaitable[User | None]]:
    async def find(username: str) -> User | None:
        return users.get(username)

    return find
