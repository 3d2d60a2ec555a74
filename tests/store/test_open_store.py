"""`open_store(url)`: engine selection and URL options (nothing is connected here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pochta.errors import ConfigError
from pochta.store import open_store
from pochta.store._common import PostgresUrl, SqliteUrl, parse_store_url
from pochta.store.sqlite import SqliteStore


def test_sqlite_relative_and_absolute_paths() -> None:
    assert parse_store_url("sqlite:///var/mail.db") == SqliteUrl("var/mail.db")
    assert parse_store_url("sqlite:////srv/mail.db") == SqliteUrl("/srv/mail.db")
    store = open_store("sqlite:///var/mail.db")
    assert isinstance(store, SqliteStore) and store.path == "var/mail.db"


def test_postgres_options_are_split_from_the_dsn() -> None:
    parsed = parse_store_url("postgresql://u@h:5/db?schema=s1&pool_max=4&sslmode=disable")
    assert parsed == PostgresUrl(
        dsn="postgresql://u@h:5/db?sslmode=disable", schema="s1", pool_min=1, pool_max=4
    )


@pytest.mark.parametrize(
    "url",
    [
        "mysql://x/y",
        "mail.db",
        "sqlite://",
        "postgresql://h/db?schema=bad-name",
        "postgresql://h/db?pool_max=zero",
        "postgresql://h/db?pool_max=0",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        open_store(url)


def test_sqlite_does_not_import_asyncpg(tmp_path: Path) -> None:
    code = (
        "import sys; from pochta.store import open_store; "
        f"open_store('sqlite:///{tmp_path}/m.db'); "
        "assert 'asyncpg' not in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr
