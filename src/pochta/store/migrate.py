"""Moving a whole store between engines (`pochta store migrate`): raw rows, not the MailStore API.

What lives here: the table spec of schema version 1 (`TABLES`: columns with their kinds, in
dependency order), engine-level readers/writers (`open_engine(url)` -> SQLite through stdlib
sqlite3, PostgreSQL through asyncpg, imported only for a PostgreSQL URL), `migrate()` and
`checksums()`. The MailStore Protocol cannot set ids, UIDs, flags or lease state, so the copy
goes below it: every table is read in primary-key order in one read snapshot of the source and
written in batches in ONE transaction on the target (all or nothing), keeping every id, so a body
shared by mailbox copies and a queue entry is copied once and still shared; the id sequences
(SQLite AUTOINCREMENT, PostgreSQL identity) continue after the source's high-water mark, so ids
of deleted rows are not handed out again.

Verification: per table the row count and a sha256 over the rows in key order, each value
encoded engine-independently (timestamps as integer microseconds UTC, booleans as booleans);
plus a sha256 over the bodies' bytes and the id high-water marks. Computed on the source while
copying and on the target after the commit; `Verification.ok` says whether they all agree.

Imports stdlib, `pochta.errors`, `pochta.store` (to create/upgrade schemas), `pochta.store._common`
and, lazily, asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pochta.errors import Conflict, NotFound, StoreUnavailable, UsageError
from pochta.store import _common as cm
from pochta.store import open_store

INT, TEXT, BLOB, TS, BOOL = "int", "text", "blob", "ts", "bool"
SCHEMA_VERSION = 1  # the schema the spec below describes; a new migration must extend it
DEFAULT_BATCH = 500
Row = tuple[Any, ...]
Progress = Callable[[int, int, str], None]  # (rows copied, rows in all, current table)


@dataclass(frozen=True)
class Table:
    name: str
    key: str  # the primary key: rows are copied and hashed in this order
    columns: tuple[tuple[str, str], ...]  # (name, kind)

    @property
    def has_sequence(self) -> bool:
        return self.key == "id"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)


def _t(name: str, key: str, spec: str) -> Table:
    """`spec` is "column:kind ..." (kind defaults to int)."""
    cols = tuple((c.partition(":")[0], c.partition(":")[2] or INT) for c in spec.split())
    return Table(name, key, cols)


# dependency order: every table after the tables its foreign keys point to
TABLES: tuple[Table, ...] = (
    _t("domains", "name", "name:text created_at:ts"),
    _t(
        "users",
        "id",
        "id address:text domain:text password_hash:text scram_salt:blob scram_iterations"
        " scram_stored_key:blob scram_server_key:blob created_at:ts",
    ),
    _t("aliases", "alias", "alias:text domain:text user_id"),
    _t("relay_domains", "domain", "domain:text owner:text"),
    # RFC 3501 §2.3.1.1: UIDVALIDITY and UIDNEXT move with the mailbox, so IMAP clients keep
    # their caches; RFC 7162 §3.1: so does HIGHESTMODSEQ
    _t("mailboxes", "id", "id user_id name:text uidvalidity uidnext highestmodseq"),
    _t("bodies", "id", "id raw:blob size"),
    _t(
        "messages",
        "id",
        "id mailbox_id uid body_id return_path:text flags:text modseq received_at:ts from_:text"
        " to_:text subject:text date:text message_id:text",
    ),
    _t("queue", "id", "id body_id sender:text created_at:ts"),
    _t(
        "queue_rcpts",
        "id",
        "id queue_id address:text domain:text state:text attempts next_attempt:ts"
        " last_reply:text held:bool warned:bool give_up:bool lease_owner:text lease_until:ts",
    ),
)


# -- engine-independent values and hashing ------------------------------------------------------


def _canonical(kind: str, value: Any) -> Any:
    """A stored value in the form both engines share (see the module docstring)."""
    if value is None:
        return None
    if kind == TS:
        return value if isinstance(value, int) else cm.to_us(value)
    if kind == BOOL:
        return bool(value)
    if kind == BLOB:
        return bytes(value)
    return value


def _encode(kind: str, value: Any) -> bytes:
    """An unambiguous byte form of one canonical value (length-prefixed where needed)."""
    if value is None:
        return b"N"
    if kind == BOOL:
        return b"T" if value else b"F"
    if kind in (INT, TS):
        return b"i" + str(int(value)).encode() + b";"
    data = value.encode("utf-8") if kind == TEXT else bytes(value)
    return b"s" + str(len(data)).encode() + b":" + data


@dataclass(frozen=True)
class Checksum:
    name: str  # a table, "bodies.raw" (the letters' bytes) or "<table>.next_id"
    rows: int
    sha256: str


class _Digest:
    """Counts and hashes one table as its rows stream by."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.rows = 0
        self.hash = hashlib.sha256()
        self.raw = hashlib.sha256() if table.name == "bodies" else None

    def update(self, rows: Sequence[Row]) -> None:
        kinds = [kind for _, kind in self.table.columns]
        for row in rows:
            self.hash.update(b"".join(_encode(k, v) for k, v in zip(kinds, row, strict=True)))
            self.hash.update(b"\n")
            if self.raw is not None:
                raw = row[self.table.names.index("raw")]
                self.raw.update(str(len(raw)).encode() + b":" + raw)
        self.rows += len(rows)

    def results(self) -> list[Checksum]:
        found = [Checksum(self.table.name, self.rows, self.hash.hexdigest())]
        if self.raw is not None:
            found.append(Checksum("bodies.raw", self.rows, self.raw.hexdigest()))
        return found


def _high_water_checksum(table: Table, value: int) -> Checksum:
    digest = hashlib.sha256(str(value).encode()).hexdigest()
    return Checksum(f"{table.name}.next_id", value, digest)


@dataclass(frozen=True)
class Verification:
    source: tuple[Checksum, ...]
    target: tuple[Checksum, ...]

    @property
    def ok(self) -> bool:
        return self.source == self.target

    def mismatches(self) -> list[str]:
        theirs = {c.name: c for c in self.target}
        return [c.name for c in self.source if theirs.get(c.name) != c]

    def format(self) -> str:
        """A table: per item the rows and sha256 on both sides and whether they agree."""
        theirs = {c.name: c for c in self.target}
        head = f"{'table':<22} {'source':>8} {'target':>8}  {'sha256 (source)':<20} "
        lines = [head + f"{'sha256 (target)':<20} ok"]
        for mine in self.source:
            other = theirs.get(mine.name, Checksum(mine.name, -1, "-"))
            mark = "ok" if other == mine else "MISMATCH"
            lines.append(
                f"{mine.name:<22} {mine.rows:>8} {other.rows:>8}  {mine.sha256[:16]:<20} "
                f"{other.sha256[:16]:<20} {mark}"
            )
        whole = hashlib.sha256("".join(c.sha256 for c in self.source).encode()).hexdigest()
        lines.append(f"all: {'verified' if self.ok else 'DIFFERENT'}, sha256 {whole}")
        return "\n".join(lines)


# -- engines ------------------------------------------------------------------------------------


class Engine(Protocol):
    """Raw access to one store's tables (below the MailStore Protocol)."""

    label: str

    async def close(self) -> None: ...

    async def schema_version(self) -> int: ...

    async def begin_read(self) -> None:
        """Start one read snapshot: every read until `end_read()` sees the same state."""

    async def end_read(self) -> None: ...

    async def count(self, table: Table) -> int: ...

    def rows(self, table: Table, batch: int) -> AsyncIterator[list[Row]]:
        """The table's rows (canonical values, spec column order) in key order, in batches."""

    async def high_water(self, table: Table) -> int:
        """The highest id handed out so far (sequence or max id, whichever is higher)."""

    async def begin_write(self, replace: bool) -> None:
        """Start the one import transaction; `replace` empties every table first."""

    async def insert(self, table: Table, rows: Sequence[Row]) -> None: ...

    async def set_high_water(self, table: Table, value: int) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class SqliteEngine:
    """One sqlite3 connection, used from worker threads one call at a time."""

    def __init__(self, path: str) -> None:
        self.label = f"sqlite:///{path}"
        self.path = path
        self._conn: sqlite3.Connection | None = None

    async def connect(self) -> None:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 10000")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            return conn

        self._conn = await asyncio.to_thread(connect)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailable(f"{self.label}: not connected")
        return self._conn

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return await asyncio.to_thread(fn, self.conn)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"sqlite: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite: {exc}") from exc

    async def _scalar(self, sql: str, *args: Any) -> Any:
        return await self._run(lambda c: c.execute(sql, args).fetchone()[0])

    async def _execute(self, sql: str, *args: Any) -> None:
        await self._run(lambda c: c.execute(sql, args))

    async def close(self) -> None:
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None

    async def schema_version(self) -> int:
        return int(await self._scalar("SELECT MAX(version) FROM schema_version") or 0)

    async def begin_read(self) -> None:
        await self._execute("BEGIN")
        await self._scalar("SELECT COUNT(*) FROM schema_version")  # WAL: the snapshot starts here

    async def end_read(self) -> None:
        await self._execute("ROLLBACK")

    async def count(self, table: Table) -> int:
        return int(await self._scalar(f"SELECT COUNT(*) FROM {table.name}"))

    async def rows(self, table: Table, batch: int) -> AsyncIterator[list[Row]]:
        sql = f"SELECT {', '.join(table.names)} FROM {table.name} ORDER BY {table.key}"
        cursor = await self._run(lambda c: c.execute(sql))
        kinds = [kind for _, kind in table.columns]
        while True:
            fetched = await self._run(lambda _: cursor.fetchmany(batch))
            if not fetched:
                return
            yield [tuple(_canonical(k, v) for k, v in zip(kinds, r, strict=True)) for r in fetched]

    async def high_water(self, table: Table) -> int:
        return int(
            await self._scalar(
                "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?), 0),"
                f" COALESCE((SELECT MAX(id) FROM {table.name}), 0))",
                table.name,
            )
        )

    async def begin_write(self, replace: bool) -> None:
        await self._execute("BEGIN IMMEDIATE")
        if replace:
            for table in reversed(TABLES):
                await self._execute(f"DELETE FROM {table.name}")
            await self._execute("DELETE FROM sqlite_sequence")

    async def insert(self, table: Table, rows: Sequence[Row]) -> None:
        marks = ", ".join("?" for _ in table.columns)
        sql = f"INSERT INTO {table.name} ({', '.join(table.names)}) VALUES ({marks})"
        kinds = [kind for _, kind in table.columns]
        values = [
            tuple(int(v) if k == BOOL else v for k, v in zip(kinds, row, strict=True))
            for row in rows
        ]
        await self._run(lambda c: c.executemany(sql, values))

    async def set_high_water(self, table: Table, value: int) -> None:
        # AUTOINCREMENT: the next id is seq + 1 (explicit inserts already raised seq to max id)
        await self._execute("DELETE FROM sqlite_sequence WHERE name = ?", table.name)
        if value > 0:
            sql = "INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)"
            await self._execute(sql, table.name, value)

    async def commit(self) -> None:
        await self._execute("COMMIT")  # synchronous=FULL: durable when this returns

    async def rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            await self._execute("ROLLBACK")


class PostgresEngine:
    """One asyncpg connection with search_path set to the store's schema."""

    def __init__(self, url: cm.PostgresUrl) -> None:
        self.url = url
        self.label = redact_url(url.dsn) + (f" schema {url.schema}" if url.schema else "")
        self._conn: Any = None
        self._tx: Any = None

    async def connect(self) -> None:
        import asyncpg

        settings = {} if self.url.schema is None else {"search_path": self.url.schema}
        try:
            self._conn = await asyncpg.connect(self.url.dsn, server_settings=settings, timeout=10)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            raise StoreUnavailable(f"postgres: {exc}") from exc

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def schema_version(self) -> int:
        return int(await self._conn.fetchval("SELECT MAX(version) FROM schema_version") or 0)

    async def begin_read(self) -> None:
        self._tx = self._conn.transaction(isolation="repeatable_read", readonly=True)
        await self._tx.start()

    async def end_read(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None:
            await tx.rollback()

    async def count(self, table: Table) -> int:
        return int(await self._conn.fetchval(f"SELECT COUNT(*) FROM {table.name}"))

    async def rows(self, table: Table, batch: int) -> AsyncIterator[list[Row]]:
        # COLLATE "C" orders text bytewise, like SQLite's BINARY: the same order on both sides
        order = table.key if table.key == "id" else f'{table.key} COLLATE "C"'
        sql = f"SELECT {', '.join(table.names)} FROM {table.name} ORDER BY {order}"
        cursor = await self._conn.cursor(sql)
        kinds = [kind for _, kind in table.columns]
        while True:
            fetched = await cursor.fetch(batch)
            if not fetched:
                return
            yield [
                tuple(_canonical(k, v) for k, v in zip(kinds, tuple(r), strict=True))
                for r in fetched
            ]

    async def high_water(self, table: Table) -> int:
        return int(
            await self._conn.fetchval(
                "SELECT GREATEST(COALESCE(pg_sequence_last_value("
                "pg_get_serial_sequence($1, 'id')::regclass), 0),"
                f" COALESCE((SELECT MAX(id) FROM {table.name}), 0))",
                table.name,
            )
        )

    async def begin_write(self, replace: bool) -> None:
        self._tx = self._conn.transaction()
        await self._tx.start()
        if replace:
            names = ", ".join(t.name for t in TABLES)
            await self._conn.execute(f"TRUNCATE {names} RESTART IDENTITY")

    async def insert(self, table: Table, rows: Sequence[Row]) -> None:
        kinds = [kind for _, kind in table.columns]
        records = [
            tuple(
                cm.as_datetime(v) if k == TS and v is not None else v
                for k, v in zip(kinds, row, strict=True)
            )
            for row in rows
        ]
        # COPY writes the given ids into identity columns (like OVERRIDING SYSTEM VALUE)
        await self._conn.copy_records_to_table(
            table.name, records=records, columns=list(table.names), schema_name=self.url.schema
        )

    async def set_high_water(self, table: Table, value: int) -> None:
        await self._conn.execute(
            "SELECT setval(pg_get_serial_sequence($1, 'id'), GREATEST($2::bigint, 1), $3)",
            table.name, value, value > 0,
        )  # fmt: skip

    async def commit(self) -> None:
        tx, self._tx = self._tx, None
        await tx.commit()

    async def rollback(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None and self._conn is not None and not self._conn.is_closed():
            await tx.rollback()


def redact_url(dsn: str) -> str:
    """The URL without a password."""
    scheme, sep, rest = dsn.partition("://")
    if sep and "@" in rest:
        user, _, host = rest.rpartition("@")
        return f"{scheme}://{user.split(':', 1)[0]}@{host}"
    return dsn


async def open_engine(url: str, *, create: bool) -> SqliteEngine | PostgresEngine:
    """Raw access to the store at `url`, its schema created or upgraded first (through the
    engine's own `open()`, so it is exactly what `pochta serve` would use). With `create=False`
    a missing SQLite file is NotFound instead of a new empty store."""
    parsed = cm.parse_store_url(url)
    if isinstance(parsed, cm.SqliteUrl) and not create and not os.path.exists(parsed.path):
        raise NotFound(f"no such SQLite store: {parsed.path}")
    store = open_store(url)
    await store.open()
    await store.close()
    engine = (
        SqliteEngine(parsed.path) if isinstance(parsed, cm.SqliteUrl) else PostgresEngine(parsed)
    )
    await engine.connect()
    return engine


# -- copying and verifying ----------------------------------------------------------------------


async def _scan(
    engine: Engine,
    batch: int,
    on_rows: Callable[[Table, list[Row]], Any] | None = None,
) -> list[Checksum]:
    """Read every table inside the current snapshot; hash it and hand each batch to `on_rows`."""
    found: list[Checksum] = []
    for table in TABLES:
        digest = _Digest(table)
        async for rows in engine.rows(table, batch):
            digest.update(rows)
            if on_rows is not None:
                await on_rows(table, rows)
        found += digest.results()
    for table in TABLES:
        if table.has_sequence:
            found.append(_high_water_checksum(table, await engine.high_water(table)))
    return found


async def checksums(engine: Engine, batch: int = DEFAULT_BATCH) -> list[Checksum]:
    """Counts and sha256 of every table of a store, read in one snapshot."""
    await engine.begin_read()
    try:
        return await _scan(engine, batch)
    finally:
        await engine.end_read()


async def _copy(
    source: Engine, target: Engine, replace: bool, batch: int, progress: Progress | None
) -> list[Checksum]:
    total = sum([await source.count(t) for t in TABLES])
    done = 0

    async def write(table: Table, rows: list[Row]) -> None:
        nonlocal done
        await target.insert(table, rows)
        done += len(rows)
        if progress is not None:
            progress(done, total, table.name)

    await target.begin_write(replace)
    try:
        found = await _scan(source, batch, write)
        for table in TABLES:
            if table.has_sequence:
                await target.set_high_water(table, await source.high_water(table))
        await target.commit()
    except BaseException:
        await target.rollback()
        raise
    if progress is not None:
        progress(done, total, "done")
    return found


async def _check_target(target: Engine, replace: bool) -> None:
    counts = {t.name: await target.count(t) for t in TABLES}
    used = {name: n for name, n in counts.items() if n}
    if used and not replace:
        listed = ", ".join(f"{name} {n}" for name, n in used.items())
        raise Conflict(f"the target {target.label} is not empty ({listed}); --yes replaces it")


async def migrate(
    source_url: str,
    target_url: str,
    *,
    replace: bool = False,
    batch: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> Verification:
    """Copy everything from one store to another (either engine), then verify both sides.

    The target's schema is created if needed; a target with any rows is refused (Conflict)
    unless `replace`, which empties it in the same transaction as the copy. Nothing is written
    to the target unless the whole copy commits."""
    if cm.parse_store_url(source_url) == cm.parse_store_url(target_url):
        raise UsageError("--from and --to name the same store")
    with _translated():
        source = await open_engine(source_url, create=False)
        try:
            target = await open_engine(target_url, create=True)
            try:
                return await _migrate(source, target, replace, batch, progress)
            finally:
                await target.close()
        finally:
            await source.close()


async def _migrate(
    source: Engine, target: Engine, replace: bool, batch: int, progress: Progress | None
) -> Verification:
    versions = (await source.schema_version(), await target.schema_version())
    if versions != (SCHEMA_VERSION, SCHEMA_VERSION):
        raise Conflict(f"schema versions {versions}: this migrate copies version {SCHEMA_VERSION}")
    await _check_target(target, replace)
    await source.begin_read()
    try:
        copied = await _copy(source, target, replace, batch, progress)
    finally:
        await source.end_read()
    return Verification(source=tuple(copied), target=tuple(await checksums(target, batch)))


async def store_checksums(url: str, batch: int = DEFAULT_BATCH) -> list[Checksum]:
    """`checksums()` of the store at `url` (which must exist)."""
    with _translated():
        engine = await open_engine(url, create=False)
        try:
            return await checksums(engine, batch)
        finally:
            await engine.close()


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Driver exceptions never leave the store package (see api.py): asyncpg's are translated
    like `PostgresStore` does (constraint violations -> Conflict, the rest -> StoreUnavailable)."""
    try:
        yield
    except (OSError, TimeoutError) as exc:
        raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if not type(exc).__module__.startswith("asyncpg"):
            raise
        from pochta.store.postgres import _translate

        raised = _translate(exc)
        if raised is exc:
            raise
        raise raised from exc
