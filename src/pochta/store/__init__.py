"""The mail store: `open_store(url)` picks an engine; the interface is in `store/api.py`.

Imports `pochta.errors`, `pochta.store.api`, `pochta.store._common` and, lazily, the engine
module named by the URL (so asyncpg is imported only when a PostgreSQL URL is used).
"""

from __future__ import annotations

from pochta.store._common import PostgresUrl, parse_store_url
from pochta.store.api import MailStore

__all__ = ["MailStore", "open_store"]


def open_store(url: str) -> MailStore:
    """An engine for `url`, not yet opened (await `.open()`).

    `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`,
    `postgresql://user@host:port/db?schema=NAME&pool_max=N`. Unknown schemes raise ConfigError.
    """
    parsed = parse_store_url(url)
    if isinstance(parsed, PostgresUrl):
        from pochta.store.postgres import PostgresStore

        return PostgresStore(parsed)
    from pochta.store.sqlite import SqliteStore

    return SqliteStore(parsed.path)
