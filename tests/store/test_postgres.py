"""PostgreSQL-engine specifics: schema isolation, pool size, connection errors."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pochta.errors import StoreUnavailable
from pochta.store import open_store
from pochta.store._common import load_migrations
from pochta.store.postgres import PostgresStore

PG_DSN = os.environ.get("POCHTA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def test_schema_is_created_and_migrated_once(pg_schema: tuple[str, str, Any]) -> None:
    url, schema, admin = pg_schema
    stores = [open_store(url + "&pool_max=3"), open_store(url)]
    try:
        for store in stores:  # the second open finds everything in place
            await store.open()
        migrations = [v for v, _, _ in load_migrations("postgres")]
        assert await stores[1].schema_version() == max(migrations)
        versions = await admin.fetch(f"SELECT version FROM {schema}.schema_version")
        assert [r["version"] for r in versions] == migrations
        await stores[0].add_domain("example.test")
        assert await stores[1].hosts_domain("example.test")  # both nodes share the data
        first = stores[0]
        assert isinstance(first, PostgresStore) and first._pool.get_max_size() == 3
    finally:
        for store in stores:
            await store.close()


async def test_unreachable_server_is_store_unavailable() -> None:
    store = open_store("postgresql://postgres@127.0.0.1:1/test")  # nothing listens on port 1
    with pytest.raises(StoreUnavailable):
        await store.open()


async def test_unopened_store_is_unavailable() -> None:
    store = open_store(PG_DSN)
    with pytest.raises(StoreUnavailable):
        await store.list_domains()
