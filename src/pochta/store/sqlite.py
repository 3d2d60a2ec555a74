"""`SqliteStore`: the embedded mail store engine on stdlib sqlite3.

Durability and concurrency:
- WAL journal, foreign keys on, busy timeout. Every commit is durable before its callers hear
  of it: the writer's COMMIT (`synchronous=NORMAL`) writes the WAL, then `WalSync` syncs it
  (Linux AIO; together what `synchronous=FULL` does); other connections use FULL.
- Every write goes through ONE writer connection doing group commit (`Writer`): it takes all
  queued write requests, runs them inside one `BEGIN IMMEDIATE ... COMMIT`, syncs the WAL and
  resolves the callers' futures only after that sync completed. When one request of a batch
  fails, the batch is rolled back and its requests run again one per transaction, so the
  failing one fails alone (a savepoint per request cost two statements per letter for a case
  that almost never happens). Batches run on the event loop thread (large letters' writes on
  the job thread), and so does the sync's completion; the WAL is checkpointed between batches
  on the job thread. `commits` counts the synced COMMITs.
- Reads run on a small pool of read-only connections in their own threads, one snapshot
  (BEGIN ... ROLLBACK) per call; the event loop never blocks on SQLite.
- Numbered migrations `migrations/sqlite/NNNN_*.sql` are applied in order at `open()` and
  recorded in `schema_version`.

Imports stdlib, `pochta.errors`, `pochta.store.api`, `pochta.store._common`,
`pochta.store._sqlite_writer` (the writer) and `pochta.store._sqlite_ops` (the SQL of each
operation).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from pochta.errors import NotFound, StoreUnavailable
from pochta.store import _common as cm
from pochta.store import _sqlite_ops as ops
from pochta.store._sqlite_writer import Conn, Request, Writer, connect, read_now, translate
from pochta.store.api import (
    Accepted,
    Alias,
    Claim,
    Domain,
    Letter,
    MailboxInfo,
    MessageInfo,
    Outcome,
    QueueEntry,
    RelayDomain,
    ScramCredentials,
    Stats,
    StoredMessage,
    User,
    body_parts,
    domain_of,
    normalize_address,
)

T = TypeVar("T")
BUSY_TIMEOUT_MS = 5000
INLINE_BUSY_MS = 50  # the event loop's own read connection never waits longer


# -- read connections ---------------------------------------------------------------------------


class _Readers:
    def __init__(self, path: str, size: int, busy_ms: int) -> None:
        self._path = path
        self._busy_ms = busy_ms
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="pochta-sqlite-read")
        self._local = threading.local()
        self._conns: list[Conn] = []
        self._lock = threading.Lock()

    def _conn(self) -> Conn:
        conn: Conn | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._path, self._busy_ms, readonly=True)
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def _run(self, fn: Callable[[Conn], T]) -> T:
        try:
            conn = self._conn()
            conn.execute("BEGIN")  # one snapshot per call
            try:
                return fn(conn)
            finally:
                conn.execute("ROLLBACK")
        except Exception as exc:
            raise translate(exc) from exc

    async def run(self, fn: Callable[[Conn], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, fn)

    def now(self, fn: Callable[[Conn], T]) -> tuple[bool, T | None]:
        """Run a small indexed lookup on the calling (event loop) thread: (True, result), or
        (False, None) when the database is busy (then the store asks the pool).

        A hop to the pool costs more than such a query (WAL readers do not wait for the
        writer). The loop's connection gives up after INLINE_BUSY_MS if the database is busy
        (e.g. WAL recovery), so the loop is never stalled.
        """
        return read_now(self._inline(), fn)

    def _inline(self) -> Conn:
        """This thread's (the event loop's) own read connection."""
        conn: Conn | None = getattr(self._local, "inline", None)
        if conn is None:
            conn = connect(self._path, INLINE_BUSY_MS, readonly=True)
            self._local.inline = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()


# -- migrations ---------------------------------------------------------------------------------


def _statements(script: str) -> Iterator[str]:
    """Split a script into statements (triggers included) with sqlite3.complete_statement."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    leftover = [ln for ln in buf.splitlines() if ln.strip() and not ln.strip().startswith("--")]
    if leftover:
        raise StoreUnavailable(f"incomplete SQL statement in migration: {buf!r}")


def _migrate(path: str, busy_ms: int) -> None:
    conn = connect(path, busy_ms)
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        for version, name, sql in cm.load_migrations("sqlite"):
            conn.execute("BEGIN IMMEDIATE")  # concurrent openers apply each migration once
            try:
                done = conn.execute("SELECT 1 FROM schema_version WHERE version = ?", (version,))
                if done.fetchone() is None:
                    for statement in _statements(sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_version VALUES (?, ?, ?)",
                        (version, name, cm.to_us(cm.utcnow())),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
    finally:
        conn.close()


# -- the engine ---------------------------------------------------------------------------------


def _rows(c: Conn, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
    return c.execute(sql, params).fetchall()


class SqliteStore:
    """The embedded engine (see the module docstring). Not opened until `await open()`."""

    def __init__(
        self, path: str | Path, *, readers: int = 2, busy_timeout_ms: int = BUSY_TIMEOUT_MS
    ) -> None:
        self.path = str(path)
        self._busy_ms = busy_timeout_ms
        self._reader_count = readers
        self._writer: Writer | None = None
        self._readers: _Readers | None = None

    @property
    def commits(self) -> int:
        """Group commits done by the writer thread since `open()`."""
        return 0 if self._writer is None else self._writer.commits

    # -- plumbing -------------------------------------------------------------------------------

    def _write(self, fn: Callable[[Conn], T], *, size: int = 0) -> asyncio.Future[T]:
        """Submit a write to the group commit; its future (no coroutine frame of its own)."""
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        future: asyncio.Future[T] = self._writer.loop.create_future()
        self._writer.submit(Request(fn=fn, future=future, size=size))
        return future

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        if self._readers is None:
            raise StoreUnavailable("the store is not open")
        return await self._readers.run(fn)

    def _now(self, fn: Callable[[Conn], T]) -> tuple[bool, T | None]:
        """A point lookup on one indexed row by ONE statement (the per-RCPT checks), on the loop:
        no thread hop and no BEGIN/ROLLBACK around it. The writer's connection when it is free
        (its cache is warm), else the loop's read connection; (False, None) when both are busy."""
        if self._writer is None or self._readers is None:
            raise StoreUnavailable("the store is not open")
        done, value = self._writer.read_now(fn)
        return (done, value) if done else self._readers.now(fn)

    async def _lookup(self, fn: Callable[[Conn], T]) -> T:
        """`_now`, or on the read pool when the database is busy."""
        done, value = self._now(fn)
        return cast(T, value) if done else await self._read(fn)

    # -- life cycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            return
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_migrate, self.path, self._busy_ms)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        try:
            self._writer = Writer(self.path, self._busy_ms)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._readers = _Readers(self.path, self._reader_count, self._busy_ms)

    async def close(self) -> None:
        writer, readers = self._writer, self._readers
        self._writer = self._readers = None
        if writer is not None:
            await writer.close()  # queued requests still commit
        if readers is not None:
            await asyncio.to_thread(readers.close)

    async def schema_version(self) -> int:
        return int(
            await self._read(
                lambda c: ops.scalar(c, "SELECT MAX(version) FROM schema_version") or 0
            )
        )

    # -- domains --------------------------------------------------------------------------------

    async def add_domain(self, name: str) -> Domain:
        name, now = name.strip().lower(), cm.utcnow()
        return await self._write(lambda c: ops.add_domain(c, name, now))

    async def remove_domain(self, name: str) -> None:
        name = name.strip().lower()
        await self._write(lambda c: ops.remove_domain(c, name))

    async def list_domains(self) -> list[Domain]:
        rows = await self._read(lambda c: _rows(c, "SELECT * FROM domains ORDER BY name"))
        return [cm.domain_from(r) for r in rows]

    async def hosts_domain(self, name: str) -> bool:
        name = name.strip().lower()
        sql = "SELECT 1 FROM domains WHERE name = ?"
        return await self._lookup(lambda c: ops.scalar(c, sql, (name,)) is not None)

    # -- users and aliases ----------------------------------------------------------------------

    async def add_user(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> User:
        address, now = normalize_address(address), cm.utcnow()

        def op(c: Conn) -> User:
            ops.require_hosted(c, domain_of(address))
            return ops.insert_user(c, address, password_hash, scram, now)

        return await self._write(op)

    async def set_password(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> None:
        address = normalize_address(address)
        await self._write(lambda c: ops.set_password(c, address, password_hash, scram))

    async def remove_user(self, address: str) -> None:
        address = normalize_address(address)
        await self._write(lambda c: ops.remove_user(c, address))

    async def list_users(self, domain: str | None = None) -> list[User]:
        if domain is None:
            params: tuple[Any, ...] = ()
            sql = "SELECT * FROM users ORDER BY address"
        else:
            sql, params = "SELECT * FROM users WHERE domain = ? ORDER BY address", (domain.lower(),)
        return [cm.user_from(r) for r in await self._read(lambda c: _rows(c, sql, params))]

    async def get_user(self, address: str) -> User | None:
        address = normalize_address(address)
        row = await self._read(
            lambda c: ops.one(c, "SELECT * FROM users WHERE address = ?", (address,))
        )
        return None if row is None else cm.user_from(row)

    async def add_alias(self, alias: str, address: str) -> Alias:
        alias, address = normalize_address(alias), normalize_address(address)
        return await self._write(lambda c: ops.add_alias(c, alias, address))

    async def remove_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        await self._write(lambda c: ops.remove_alias(c, alias))

    async def list_aliases(self, address: str | None = None) -> list[Alias]:
        if address is None:
            params: tuple[Any, ...] = ()
            sql = cm.ALIAS_SELECT + " ORDER BY a.alias"
        else:
            sql = cm.ALIAS_SELECT + " WHERE u.address = ? ORDER BY a.alias"
            params = (normalize_address(address),)
        return [cm.alias_from(r) for r in await self._read(lambda c: _rows(c, sql, params))]

    async def resolve(self, address: str) -> str | None:
        address = normalize_address(address)
        return await self._lookup(lambda c: ops.resolve(c, address))

    def resolve_now(self, address: str) -> tuple[bool, str | None]:
        if self._readers is None:
            return False, None
        address = normalize_address(address)
        return self._now(lambda c: ops.resolve(c, address))

    # -- mail -----------------------------------------------------------------------------------

    def deliver(self, letter: Letter) -> asyncio.Future[Accepted]:
        now = cm.utcnow()
        size = sum(map(len, body_parts(letter.body)))
        return self._write(lambda c: ops.deliver(c, letter, now), size=size)

    async def delete_message(self, message_id: int) -> None:
        """Expunge one message (its UID is never handed out again). Not in the api.py Protocol."""
        await self._write(lambda c: ops.delete_message(c, message_id))

    async def list_mailboxes(self, address: str) -> list[MailboxInfo]:
        address = normalize_address(address)
        return await self._read(lambda c: ops.list_mailboxes(c, address))

    async def list_messages(self, address: str, folder: str = "INBOX") -> list[MessageInfo]:
        address = normalize_address(address)
        return await self._read(lambda c: ops.list_messages(c, address, folder))

    async def get_message(self, message_id: int) -> StoredMessage:
        return await self._read(lambda c: ops.get_message(c, message_id))

    # -- the outbound queue ---------------------------------------------------------------------

    async def claim(
        self,
        owner: str,
        now: datetime,
        lease: timedelta,
        limit: int = 100,
        *,
        domains: Sequence[str] | None = None,
    ) -> list[Claim]:
        doms = None if domains is None else list(domains)
        return await self._write(lambda c: ops.claim(c, owner, now, lease, limit, doms))

    async def record_outcomes(
        self, owner: str, outcomes: Sequence[Outcome], notice: Letter | None = None
    ) -> None:
        items, now = list(outcomes), cm.utcnow()
        await self._write(lambda c: ops.record_outcomes(c, owner, items, notice, now))

    async def release(self, owner: str, rcpt_ids: Sequence[int]) -> None:
        ids = list(rcpt_ids)
        await self._write(lambda c: ops.release(c, owner, ids))

    async def count_queued(self, domains: Sequence[str] | None = None) -> int:
        sql = "SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued'"
        params: tuple[Any, ...] = ()
        if domains is not None:
            sql += " AND domain IN (SELECT value FROM json_each(?))"
            params = (json.dumps([d.lower() for d in domains]),)
        return int(await self._read(lambda c: ops.scalar(c, sql, params)))

    async def next_due(self) -> datetime | None:
        sql = cm.NEXT_DUE_SELECT.format(false="0")
        return cm.maybe_datetime(await self._read(lambda c: ops.scalar(c, sql)))

    async def list_queue(self) -> list[QueueEntry]:
        where = (
            "EXISTS (SELECT 1 FROM queue_rcpts r WHERE r.queue_id = q.id AND r.state = 'queued')"
        )
        return await self._read(lambda c: ops.entries(c, where, ()))

    async def get_queue_entry(self, queue_id: int) -> QueueEntry:
        found = await self._read(lambda c: ops.entries(c, "q.id = ?", (queue_id,)))
        if not found:
            raise NotFound(f"no such queue entry: {queue_id}")
        return found[0]

    async def get_queue_body(self, queue_id: int) -> bytes:
        sql = "SELECT b.raw FROM queue q JOIN bodies b ON b.id = q.body_id WHERE q.id = ?"
        raw = await self._read(lambda c: ops.scalar(c, sql, (queue_id,)))
        if raw is None:
            raise NotFound(f"no such queue entry: {queue_id}")
        return bytes(raw)

    async def flush(self, domain: str | None = None) -> int:
        now = cm.utcnow()
        return await self._write(lambda c: ops.flush(c, domain, now))

    async def retry(self, queue_id: int) -> int:
        now = cm.utcnow()
        return await self._write(lambda c: ops.retry(c, queue_id, now))

    async def delete_queue_entry(self, queue_id: int) -> None:
        await self._write(lambda c: ops.delete_entry(c, queue_id))

    async def bounce_queue_entry(self, queue_id: int) -> int:
        now = cm.utcnow()
        return await self._write(lambda c: ops.bounce_entry(c, queue_id, now))

    # -- relay customers ------------------------------------------------------------------------

    async def add_relay_domain(self, domain: str, owner: str) -> RelayDomain:
        domain, owner = domain.strip().lower(), normalize_address(owner)
        return await self._write(lambda c: ops.add_relay(c, domain, owner))

    async def remove_relay_domain(self, domain: str) -> None:
        domain = domain.strip().lower()
        await self._write(lambda c: ops.remove_relay(c, domain))

    async def list_relay_domains(self, owner: str | None = None) -> list[RelayDomain]:
        if owner is None:
            params: tuple[Any, ...] = ()
            sql = "SELECT * FROM relay_domains ORDER BY domain"
        else:
            sql = "SELECT * FROM relay_domains WHERE owner = ? ORDER BY domain"
            params = (normalize_address(owner),)
        return [cm.relay_from(r) for r in await self._read(lambda c: _rows(c, sql, params))]

    async def stats(self) -> Stats:
        return await self._read(ops.stats)
