"""Store fixtures: a fresh opened store per test (SQLite in tmp_path, PostgreSQL in its own schema).

PostgreSQL comes from env POCHTA_TEST_PG_DSN (default postgresql://postgres@127.0.0.1:5432/test);
when it is unreachable the PostgreSQL tests are skipped, unless env CI is set (then they fail).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pochta.store import open_store
from pochta.store.api import MailStore

PG_DSN = os.environ.get("POCHTA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
ENGINES = ["sqlite", "postgres"]


async def _pg_connect() -> object:
    try:
        import asyncpg
    except ImportError as exc:  # pragma: no cover - asyncpg is a test dependency
        _unavailable(f"asyncpg not installed: {exc}")
    try:
        return await asyncpg.connect(PG_DSN, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _unavailable(f"PostgreSQL unreachable at {PG_DSN}: {exc}")
    raise AssertionError("unreachable")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def _with_query(dsn: str, option: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + option


async def _sqlite_store(tmp_path: Path) -> AsyncIterator[MailStore]:
    store = open_store(f"sqlite:///{tmp_path}/mail.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _postgres_store() -> AsyncIterator[MailStore]:
    admin: Any = await _pg_connect()
    schema = f"t_{uuid.uuid4().hex}"
    store = open_store(_with_query(PG_DSN, f"schema={schema}"))
    try:
        await store.open()
        yield store
    finally:
        await store.close()
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@pytest.fixture
async def pg_schema() -> AsyncIterator[tuple[str, str, Any]]:
    """(store URL with a fresh ?schema=, schema name, admin connection); dropped afterwards."""
    admin: Any = await _pg_connect()
    schema = f"t_{uuid.uuid4().hex}"
    try:
        yield _with_query(PG_DSN, f"schema={schema}"), schema, admin
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@pytest.fixture(params=ENGINES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MailStore]:
    """A fresh, opened store of each engine."""
    engine = request.param
    source = _sqlite_store(tmp_path) if engine == "sqlite" else _postgres_store()
    async for opened in source:
        yield opened
