"""`SqliteStore`: the embedded mail store engine on stdlib sqlite3.

Durability and concurrency:
- WAL journal, foreign keys on, busy timeout. Every commit is durable before its callers hear
  of it: the writer's COMMIT (`synchronous=NORMAL`) writes the WAL, then `WalSync` syncs it
  (Linux AIO; together what `synchronous=FULL` does); other connections use FULL.
- Every write goes through ONE writer connection doing group commit (`_Writer`): it takes all
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
`pochta.store._walsync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pochta.errors import Conflict, NotFound, StoreError, StoreUnavailable
from pochta.store import _common as cm
from pochta.store._walsync import WalSync
from pochta.store.api import (
    DEFAULT_FOLDERS,
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
    Target,
    User,
    body_parts,
    domain_of,
    normalize_address,
)

T = TypeVar("T")
Conn = sqlite3.Connection
BUSY_TIMEOUT_MS = 5000
MAX_BATCH = 500  # write requests per group commit
CHECKPOINT_EVERY = 100  # group commits between two checkpoints of the WAL (about 1000 pages)...
CHECKPOINT_BYTES = 4 * 1024 * 1024  # ...or fewer, once this much letter went into the WAL
HEAVY_BODY = 256 * 1024  # letters larger than this are written off the event loop
LOOP_COMMIT = 32 * 1024  # batches with more letter than this COMMIT (write the WAL) off the loop
JOIN_BODY = 64 * 1024  # smaller bodies are joined and inserted whole, larger ones in place
INLINE_BUSY_MS = 50  # the event loop's own read connection never waits longer


def _connect(path: str, busy_ms: int, *, readonly: bool = False) -> Conn:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_ms / 1000
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
    return conn


def _translate(exc: BaseException) -> BaseException:
    """Driver exceptions never leave the engine (see api.py)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"sqlite: {exc}")
    return exc


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


# -- the writer (group commit) ------------------------------------------------------------------


class _Request:
    def __init__(
        self, fn: Callable[[Conn], Any], future: asyncio.Future[Any], size: int = 0
    ) -> None:
        self.fn = fn
        self.future = future
        self.size = size  # octets of letter it writes: large ones are written off the loop


_Result = tuple[_Request, Any, BaseException | None]
_Job = tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]


class _Writer:
    """Group commit on ONE connection, driven from the event loop.

    Write requests queue up while a batch is being committed and synced; then the next batch
    takes them all. A batch's statements and its COMMIT run on the event loop thread (small
    indexed writes take microseconds; with `synchronous=NORMAL` the COMMIT only writes the WAL);
    then `WalSync` syncs the WAL while the loop serves connections, and the callers' futures
    are resolved when the sync completed. The next batch starts before they are, so its sync
    overlaps with writing their replies. Earlier designs, measured: statements on a writer
    thread (a GIL hand-off per statement, milliseconds per letter under load); COMMIT with
    `synchronous=FULL` on a commit thread (waking it and taking the GIL back after each fsync
    cost the loop about a tenth of its time). A batch with more than LOOP_COMMIT octets of
    letter COMMITs (writes its WAL frames) on the job thread, one with a letter over HEAVY_BODY
    runs there whole, and so does the WAL checkpoint every CHECKPOINT_EVERY commits (sooner
    after CHECKPOINT_BYTES of letters)
    (between batches: SQLite's automatic one would run inside COMMIT on the loop). Several
    processes sharing the database (`workers`) take the write lock in turn: BEGIN IMMEDIATE is
    retried every few hundred microseconds, never blocking the loop.
    """

    def __init__(self, path: str, busy_ms: int) -> None:
        # Setting up the connection may wait for another process (its first statements read
        # the schema); after that BEGIN IMMEDIATE is retried from the loop, never blocking it.
        self._conn = _connect(path, busy_ms)
        self._conn.execute("PRAGMA busy_timeout = 0")
        self.loop = asyncio.get_running_loop()  # made on the loop that uses it (store.open)
        self._sync: WalSync | None = None
        if path != ":memory:":
            # COMMIT writes the WAL, WalSync makes it durable before anyone hears of it; the
            # checkpoints run between batches off the loop (`_checkpoint`), not inside COMMIT.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._conn.execute("PRAGMA schema_version").fetchone()  # opens (makes) the WAL file
            self._sync = WalSync(self.loop, path + "-wal")
        self._since_checkpoint = 0  # commits since the last checkpoint
        self._wal_letters = 0  # octets of letter committed since the last checkpoint
        self._broken: StoreUnavailable | None = None  # set for good when a WAL sync failed
        self._busy_ms = busy_ms
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # (not `_thread`: mypyc would name the C field `__thread`, a C keyword)
        self._committer = threading.Thread(
            target=self._run_jobs, name="pochta-sqlite-jobs", daemon=True
        )
        self._pending: list[_Request] = []
        self._alone = 0  # requests to run one per transaction (after a failed batch)
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock_since = 0.0
        self.commits = 0
        self._committer.start()

    def submit(self, request: _Request) -> None:
        if self._broken is not None:
            _settle(request.future, None, self._broken)
            return
        self._pending.append(request)
        if not self._busy:
            self._busy = True
            self._idle.clear()
            self.loop.call_soon(self._start)

    def _start(self) -> None:
        # After a failed batch its requests run one per transaction (`_alone` of them), counted
        # down only when one has really run (not when the lock was busy).
        size = 1 if self._alone else MAX_BATCH
        batch, self._pending = self._pending[:size], self._pending[size:]
        if not batch:
            self._finish()
            return
        loop = self.loop
        if any(r.size > HEAVY_BODY for r in batch):
            self._ran(batch)
            self._jobs.put((lambda: self._run_all(batch), lambda v, e: self._settle(batch, v, e)))
            return
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if _is_busy(exc) and self._retry_later(loop):  # another process holds the lock
                self._pending[:0] = batch
                return
            self._ran(batch)
            self._fail(batch, exc)
            self._next()
            return
        self._lock_since = 0.0
        self._ran(batch)
        try:
            results = _run_requests(self._conn, batch)
        except _Isolate:
            self._isolate(batch)
            self._next()
            return
        if not self._conn.in_transaction:  # a lone request failed: rolled back, nothing to commit
            self._resolve(results)
            self._next()
            return
        if sum(r.size for r in batch) > LOOP_COMMIT:  # its WAL writes go to the job thread
            self._jobs.put((self._commit, lambda _, exc: self._committed(results, exc)))
            return
        try:
            self._commit()
        except sqlite3.Error as exc:
            self._committed(results, exc)
            return
        self._committed(results, None)

    def _ran(self, batch: list[_Request]) -> None:
        """The batch runs (or fails) now: fewer requests are left to run alone."""
        self._alone = max(0, self._alone - len(batch))

    def _run_jobs(self) -> None:
        """The job thread: run each job, hand its outcome back to the loop."""
        while (job := self._jobs.get()) is not None:
            work, done = job
            try:
                value, error = work(), None
            except BaseException as exc:
                value, error = None, exc
            try:
                self.loop.call_soon_threadsafe(done, value, error)
            except RuntimeError:  # the loop is closed: nobody waits for the outcome any more
                return

    def _retry_later(self, loop: asyncio.AbstractEventLoop) -> bool:
        now = time.monotonic()
        self._lock_since = self._lock_since or now
        if now - self._lock_since > self._busy_ms / 1000:
            self._lock_since = 0.0
            return False
        loop.call_later(0.0003, self._start)
        return True

    def _commit(self) -> None:
        """COMMIT (the WAL written, not yet synced); undone if it fails."""
        try:
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _run_all(self, batch: list[_Request]) -> tuple[list[_Result], bool]:
        """On the job thread: a whole batch with a heavy request; True if it committed."""
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.0003)
        results = _run_requests(self._conn, batch)
        if not self._conn.in_transaction:
            return results, False
        self._commit()
        return results, True

    def _settle(
        self,
        batch: list[_Request],
        outcome: tuple[list[_Result], bool] | None,
        exc: BaseException | None,
    ) -> None:
        """Back on the loop after a heavy batch ran on the job thread."""
        if isinstance(exc, _Isolate):
            self._isolate(batch)
        elif exc is not None or outcome is None:
            self._fail(batch, exc)
        elif outcome[1]:
            self._committed(outcome[0], None)
            return
        else:
            self._resolve(outcome[0])
        self._next()

    def _committed(self, results: list[_Result], exc: BaseException | None) -> None:
        """COMMIT returned: sync the WAL, and only then tell the callers."""
        if exc is not None:  # nothing of the batch was committed (COMMIT rolled it back)
            self._fail([r for r, _, _ in results], exc)
            self._next()
            return
        if self._sync is None:
            self._synced(results, None)
        else:
            self._sync.start(lambda exc: self._synced(results, exc))

    def _synced(self, results: list[_Result], exc: BaseException | None) -> None:
        if exc is not None:
            self._break(exc)
            for request, _, _ in results:
                _settle(request.future, None, self._broken)
            self._finish()
            return
        # The next batch runs (and its sync starts) before this batch's callers wake, so that
        # its sync overlaps with writing their replies.
        self._since_checkpoint += 1
        self._wal_letters += sum(request.size for request, _, _ in results)
        if self._since_checkpoint >= CHECKPOINT_EVERY or self._wal_letters >= CHECKPOINT_BYTES:
            self._since_checkpoint = self._wal_letters = 0
            self._jobs.put((self._checkpoint, lambda _v, _e: self._next()))
        elif self._pending:
            self._start()
        else:
            self._finish()
        self.commits += 1
        self._resolve(results)

    def _break(self, exc: BaseException) -> None:
        """A sync of the WAL failed: what it covered may be lost from the disk, and SQLite's
        recovery stops at the first bad frame, so a later commit synced on top of it could be
        lost too. Nothing more is written until a restart (which recovers the WAL)."""
        if self._broken is None:
            self._broken = StoreUnavailable(f"sqlite: the WAL could not be synced: {exc}")
            logging.getLogger("pochta.store").error(
                "%s; refusing every write until pochta restarts", self._broken
            )
        pending, self._pending = self._pending, []
        for request in pending:
            _settle(request.future, None, self._broken)

    def _checkpoint(self) -> None:
        """On the job thread, between batches: copy the WAL into the database (PASSIVE: it
        never waits for readers). It syncs the WAL before and the database after copying."""
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _isolate(self, batch: list[_Request]) -> None:
        """A request of `batch` failed and the batch was rolled back: run its requests again,
        one per transaction."""
        self._pending[:0] = batch
        self._alone = len(batch)

    @staticmethod
    def _resolve(results: list[_Result]) -> None:
        for request, value, error in results:
            _settle(request.future, value, error)

    def _next(self) -> None:
        if self._pending:
            self.loop.call_soon(self._start)
        else:
            self._finish()

    def _finish(self) -> None:
        self._busy = False
        self._idle.set()

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("ROLLBACK")

    @staticmethod
    def _fail(batch: list[_Request], exc: BaseException | None) -> None:
        """The transaction as a whole failed: nothing of the batch was committed."""
        for request in batch:
            _settle(request.future, None, StoreUnavailable(f"sqlite transaction failed: {exc}"))

    async def close(self) -> None:
        """Let queued requests commit, then close the connection."""
        while self._busy or self._pending:
            await self._idle.wait()
        closed: asyncio.Future[None] = self.loop.create_future()
        self._jobs.put((self._conn.close, lambda _, exc: _settle(closed, None, exc)))
        self._jobs.put(None)
        await closed
        await asyncio.to_thread(self._committer.join)
        if self._sync is not None:
            self._sync.close()


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class _Isolate(Exception):
    """A request of a batch failed; the batch was rolled back (to run one request at a time)."""


def _run_requests(conn: Conn, batch: list[_Request]) -> list[_Result]:
    """Run the batch's requests in the open transaction. A lone request that fails is rolled
    back and gets its error; a failure in a larger batch rolls it back and raises _Isolate."""
    results: list[_Result] = []
    for request in batch:
        try:
            value = request.fn(conn)
        except Exception as exc:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if len(batch) > 1:
                raise _Isolate() from exc
            return [(request, None, _translate(exc))]
        results.append((request, value, None))
    return results


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
            conn = _connect(self._path, self._busy_ms, readonly=True)
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
            raise _translate(exc) from exc

    async def run(self, fn: Callable[[Conn], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._run, fn)

    def now(self, fn: Callable[[Conn], T]) -> tuple[bool, T | None]:
        """`run_here` without waiting: (True, result), or (False, None) when the database is
        busy (then the caller awaits `run_here`, which falls back to the pool)."""
        conn = self._inline()
        try:
            return True, fn(conn)
        except sqlite3.OperationalError:
            return False, None
        except Exception as exc:
            raise _translate(exc) from exc

    async def run_here(self, fn: Callable[[Conn], T]) -> T:
        """Run a small indexed lookup on the calling (event loop) thread.

        A hop to the pool costs more than such a query (WAL readers do not wait for the
        writer). The loop's connection gives up after INLINE_BUSY_MS if the database is busy
        (e.g. WAL recovery), and the lookup then goes to the pool instead of stalling the loop.
        """
        conn = self._inline()
        try:
            return fn(conn)  # one statement: its own implicit read transaction
        except sqlite3.OperationalError:
            return await self.run(fn)
        except Exception as exc:
            raise _translate(exc) from exc

    def _inline(self) -> Conn:
        """This thread's (the event loop's) own read connection."""
        conn: Conn | None = getattr(self._local, "inline", None)
        if conn is None:
            conn = _connect(self._path, INLINE_BUSY_MS, readonly=True)
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
    conn = _connect(path, busy_ms)
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


# -- operations: each runs inside one transaction on the connection it is given ----------------


def _one(c: Conn, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
    row: sqlite3.Row | None = c.execute(sql, params).fetchone()
    return row


def _scalar(c: Conn, sql: str, params: Sequence[Any] = ()) -> Any:
    row = _one(c, sql, params)
    return None if row is None else row[0]


def _ids(values: Sequence[int]) -> str:
    """A JSON array for `IN (SELECT value FROM json_each(?))`: no bound-variable limits."""
    return json.dumps([int(v) for v in values])


def _user_id(c: Conn, address: str) -> int:
    uid = _scalar(c, "SELECT id FROM users WHERE address = ?", (address,))
    if uid is None:
        raise NotFound(f"no such user: {address}")
    return int(uid)


def _require_hosted(c: Conn, domain: str) -> None:
    if _scalar(c, "SELECT 1 FROM domains WHERE name = ?", (domain,)) is None:
        raise NotFound(f"domain not hosted: {domain}")


def _insert_user(
    c: Conn, address: str, password_hash: str, scram: ScramCredentials | None, now: datetime
) -> User:
    if _scalar(c, "SELECT 1 FROM aliases WHERE alias = ?", (address,)) is not None:
        raise Conflict(f"address is an alias: {address}")
    if _scalar(c, "SELECT 1 FROM users WHERE address = ?", (address,)) is not None:
        raise Conflict(f"user exists: {address}")
    cur = c.execute(
        "INSERT INTO users (address, domain, password_hash, scram_salt, scram_iterations,"
        " scram_stored_key, scram_server_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (address, domain_of(address), password_hash, *cm.scram_params(scram), cm.to_us(now)),
    )
    user_id = int(cur.lastrowid or 0)
    for name in DEFAULT_FOLDERS:
        highest = _scalar(c, "SELECT MAX(uidvalidity) FROM mailboxes")
        c.execute(
            "INSERT INTO mailboxes (user_id, name, uidvalidity) VALUES (?, ?, ?)",
            (user_id, name, cm.new_uidvalidity(highest)),
        )
    row = _one(c, "SELECT * FROM users WHERE id = ?", (user_id,))
    assert row is not None
    return cm.user_from(row)


def _add_domain(c: Conn, name: str, now: datetime) -> Domain:
    if _scalar(c, "SELECT 1 FROM domains WHERE name = ?", (name,)) is not None:
        raise Conflict(f"domain already hosted: {name}")
    if _scalar(c, "SELECT 1 FROM relay_domains WHERE domain = ?", (name,)) is not None:
        raise Conflict(f"domain is a relay domain: {name}")
    c.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", (name, cm.to_us(now)))
    _insert_user(c, f"postmaster@{name}", "", None, now)  # RFC 5321 §4.5.1
    return Domain(name=name, created_at=cm.as_datetime(cm.to_us(now)))


def _release_relay_holds(c: Conn, owners_sql: str, params: Sequence[Any]) -> None:
    """Relay domains whose owner goes away: their queued mail returns to MX delivery."""
    c.execute(
        "UPDATE queue_rcpts SET held = 0 WHERE state = 'queued' AND domain IN"
        f" (SELECT domain FROM relay_domains WHERE owner IN ({owners_sql}))",
        params,
    )


def _remove_domain(c: Conn, name: str) -> None:
    _require_hosted(c, name)
    _release_relay_holds(c, "SELECT address FROM users WHERE domain = ?", (name,))
    c.execute("DELETE FROM domains WHERE name = ?", (name,))  # cascades to users and mail


def _set_password(
    c: Conn, address: str, password_hash: str, scram: ScramCredentials | None
) -> None:
    cur = c.execute(
        "UPDATE users SET password_hash = ?, scram_salt = ?, scram_iterations = ?,"
        " scram_stored_key = ?, scram_server_key = ? WHERE address = ?",
        (password_hash, *cm.scram_params(scram), address),
    )
    if cur.rowcount == 0:
        raise NotFound(f"no such user: {address}")


def _remove_user(c: Conn, address: str) -> None:
    _user_id(c, address)
    if cm.is_postmaster(address) and _scalar(
        c, "SELECT 1 FROM domains WHERE name = ?", (domain_of(address),)
    ):
        raise Conflict(f"{address} is required while the domain is hosted (RFC 5321 §4.5.1)")
    _release_relay_holds(c, "?", (address,))
    c.execute("DELETE FROM users WHERE address = ?", (address,))


def _add_alias(c: Conn, alias: str, address: str) -> Alias:
    _require_hosted(c, domain_of(alias))
    user_id = _user_id(c, address)
    if _scalar(c, "SELECT 1 FROM users WHERE address = ?", (alias,)) is not None:
        raise Conflict(f"address is a user: {alias}")
    if _scalar(c, "SELECT 1 FROM aliases WHERE alias = ?", (alias,)) is not None:
        raise Conflict(f"alias exists: {alias}")
    c.execute(
        "INSERT INTO aliases (alias, domain, user_id) VALUES (?, ?, ?)",
        (alias, domain_of(alias), user_id),
    )
    return Alias(alias=alias, address=address)


def _remove_alias(c: Conn, alias: str) -> None:
    if c.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount == 0:
        raise NotFound(f"no such alias: {alias}")


_RESOLVE = cm.RESOLVE_SQL.format(p="?1")


def _resolve(c: Conn, address: str) -> str | None:
    owner = _scalar(c, _RESOLVE, (address,))
    return None if owner is None else str(owner)


def _mailbox_id(c: Conn, address: str, folder: str) -> int:
    box = _scalar(
        c,
        "SELECT b.id FROM mailboxes b JOIN users u ON u.id = b.user_id"
        " WHERE u.address = ? AND b.name = ?",
        (address, cm.folder_name(folder)),
    )
    if box is None:
        _user_id(c, address)
        raise NotFound(f"no mailbox {folder!r} for {address}")
    return int(box)


def _deliver(c: Conn, letter: Letter, now: datetime) -> Accepted:
    outbound = cm.unique_addresses(letter.outbound)
    if not letter.targets and not outbound:
        return Accepted(message_ids=(), queue_id=None)
    body_id = _insert_body(c, body_parts(letter.body))
    # A missing target raises NotFound; the caller's transaction (or savepoint) undoes the rest.
    ids = tuple(_insert_copy(c, body_id, target, letter, now) for target in letter.targets)
    queue_id = None
    if outbound:
        queue_id = _enqueue(c, body_id, normalize_address(letter.sender), outbound, now)
    return Accepted(message_ids=ids, queue_id=queue_id)


def _insert_body(c: Conn, parts: tuple[bytes, ...]) -> int:
    """Store a body once; parts are written in place with incremental blob I/O, so a large
    letter is not joined into one more copy in memory."""
    size = sum(map(len, parts))
    if len(parts) == 1 or size <= JOIN_BODY:
        raw = parts[0] if len(parts) == 1 else b"".join(parts)
        cur = c.execute("INSERT INTO bodies (raw, size) VALUES (?, ?)", (raw, size))
        return int(cur.lastrowid or 0)
    cur = c.execute("INSERT INTO bodies (raw, size) VALUES (zeroblob(?), ?)", (size, size))
    body_id = int(cur.lastrowid or 0)
    with c.blobopen("bodies", "raw", body_id) as blob:
        for part in parts:
            blob.write(part)
    return body_id


def _insert_copy(c: Conn, body_id: int, target: Target, letter: Letter, now: datetime) -> int:
    # RFC 3501 §2.3.1.1: the next UID is uidnext, never reused; RFC 7162 §3.1: new modseq.
    # One statement finds the mailbox and takes its next UID (fewer round trips per letter).
    address = normalize_address(target.address)
    row = _one(
        c,
        "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1"
        " WHERE id = (SELECT b.id FROM mailboxes b JOIN users u ON u.id = b.user_id"
        " WHERE u.address = ? AND b.name = ?) RETURNING id, uidnext - 1, highestmodseq",
        (address, cm.folder_name(target.folder)),
    )
    if row is None:
        _user_id(c, address)
        raise NotFound(f"no mailbox {target.folder!r} for {address}")
    box, uid, modseq = row[0], row[1], row[2]
    s = letter.summary
    rp = None if target.return_path is None else normalize_address(target.return_path)
    cur = c.execute(
        "INSERT INTO messages (mailbox_id, uid, body_id, return_path, modseq, received_at,"
        " from_, to_, subject, date, message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (box, uid, body_id, rp, modseq, cm.to_us(now), s.from_, s.to, s.subject, s.date,
         s.message_id),
    )  # fmt: skip
    return int(cur.lastrowid or 0)


def _enqueue(c: Conn, body_id: int, sender: str, rcpts: list[str], now: datetime) -> int:
    cur = c.execute(
        "INSERT INTO queue (body_id, sender, created_at) VALUES (?, ?, ?)",
        (body_id, sender, cm.to_us(now)),
    )
    queue_id = int(cur.lastrowid or 0)
    c.executemany(
        "INSERT INTO queue_rcpts (queue_id, address, domain, next_attempt, held)"
        " VALUES (?, ?, ?, ?, EXISTS (SELECT 1 FROM relay_domains WHERE domain = ?))",
        [(queue_id, a, domain_of(a), cm.to_us(now), domain_of(a)) for a in rcpts],
    )
    return queue_id


def _delete_message(c: Conn, message_id: int) -> None:
    row = _one(c, "DELETE FROM messages WHERE id = ? RETURNING mailbox_id", (message_id,))
    if row is None:
        raise NotFound(f"no such message: {message_id}")
    # RFC 7162 §3.2.10: an expunge changes the mailbox's modification sequence
    c.execute("UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = ?", (row[0],))


def _list_messages(c: Conn, address: str, folder: str) -> list[MessageInfo]:
    box = _mailbox_id(c, address, folder)
    rows = c.execute(cm.MESSAGE_SELECT + " WHERE m.mailbox_id = ? ORDER BY m.uid", (box,))
    return [cm.message_from(r) for r in rows]


def _get_message(c: Conn, message_id: int) -> StoredMessage:
    row = _one(c, cm.MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
    raw = _scalar(
        c, "SELECT raw FROM bodies WHERE id = (SELECT body_id FROM messages WHERE id = ?)",
        (message_id,),
    )  # fmt: skip
    if row is None or raw is None:
        raise NotFound(f"no such message: {message_id}")
    return StoredMessage(
        info=cm.message_from(row), raw=cm.return_path_header(row["return_path"]) + bytes(raw)
    )


def _list_mailboxes(c: Conn, address: str) -> list[MailboxInfo]:
    _user_id(c, address)
    rows = c.execute(
        cm.MAILBOX_SELECT + " WHERE u.address = ? ORDER BY b.name <> 'INBOX', b.name", (address,)
    )
    return [cm.mailbox_from(r) for r in rows]


# -- queue operations ---------------------------------------------------------------------------

# unleased, or the lease ran out (a crashed worker); a live lease is never taken, not even by its
# own owner, so a worker that claims again while it is still delivering cannot deliver twice
_CLAIMABLE = "state = 'queued' AND (lease_owner IS NULL OR lease_until <= ?)"


def _claim(
    c: Conn,
    owner: str,
    now: datetime,
    lease: timedelta,
    limit: int,
    domains: Sequence[str] | None,
) -> list[Claim]:
    now_us = cm.to_us(now)
    if domains is None:
        where = _CLAIMABLE + " AND held = 0 AND next_attempt <= ?"
        params: list[Any] = [now_us, now_us]
    else:
        where = _CLAIMABLE + " AND domain IN (SELECT value FROM json_each(?))"
        params = [now_us, json.dumps([d.lower() for d in domains])]
    picked = c.execute(
        f"SELECT id FROM queue_rcpts WHERE {where} ORDER BY next_attempt, id LIMIT ?",
        [*params, limit],
    ).fetchall()
    if not picked:
        return []
    ids = _ids([r[0] for r in picked])
    c.execute(
        "UPDATE queue_rcpts SET lease_owner = ?, lease_until = ?"
        " WHERE id IN (SELECT value FROM json_each(?))",
        (owner, cm.to_us(now + lease), ids),
    )
    rows = c.execute(
        "SELECT * FROM queue_rcpts WHERE id IN (SELECT value FROM json_each(?))"
        " ORDER BY queue_id, domain, id",
        (ids,),
    ).fetchall()
    entries = {
        int(r["id"]): (r["sender"], cm.as_datetime(r["created_at"]), bytes(r["raw"]))
        for r in c.execute(
            "SELECT q.id, q.sender, q.created_at, b.raw FROM queue q"
            " JOIN bodies b ON b.id = q.body_id WHERE q.id IN"
            " (SELECT DISTINCT queue_id FROM queue_rcpts WHERE id IN"
            " (SELECT value FROM json_each(?)))",
            (ids,),
        )
    }
    return cm.group_claims(rows, entries)


def _record_outcomes(
    c: Conn, owner: str, outcomes: Sequence[Outcome], notice: Letter | None, now: datetime
) -> None:
    touched: set[int] = set()
    for outcome in outcomes:
        next_attempt = cm.outcome_next_attempt(outcome, now)
        row = _one(
            c,
            "UPDATE queue_rcpts SET state = ?, attempts = attempts + 1, last_reply = ?,"
            " next_attempt = ?, warned = (warned OR ?), lease_owner = NULL, lease_until = NULL"
            " WHERE id = ? AND lease_owner = ? AND state = 'queued' RETURNING queue_id",
            (
                cm.outcome_state(outcome.kind),
                outcome.reply,
                None if next_attempt is None else cm.to_us(next_attempt),
                int(outcome.warned),
                outcome.rcpt_id,
                owner,
            ),
        )
        if row is not None:
            touched.add(int(row[0]))
    # a notice for outcomes that were all ignored belongs to whoever holds the lease now
    if notice is not None and (touched or not outcomes):
        _deliver(c, notice, now)
    c.execute(
        "DELETE FROM queue WHERE id IN (SELECT value FROM json_each(?)) AND NOT EXISTS"
        " (SELECT 1 FROM queue_rcpts r WHERE r.queue_id = queue.id AND r.state = 'queued')",
        (_ids(sorted(touched)),),
    )


def _release(c: Conn, owner: str, rcpt_ids: Sequence[int]) -> None:
    c.execute(
        "UPDATE queue_rcpts SET lease_owner = NULL, lease_until = NULL"
        " WHERE lease_owner = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _ids(rcpt_ids)),
    )


def _require_entry(c: Conn, queue_id: int) -> None:
    if _scalar(c, "SELECT 1 FROM queue WHERE id = ?", (queue_id,)) is None:
        raise NotFound(f"no such queue entry: {queue_id}")


def _entries(c: Conn, where: str, params: Sequence[Any]) -> list[QueueEntry]:
    heads = c.execute(cm.QUEUE_SELECT + f" WHERE {where} ORDER BY q.created_at, q.id", params)
    heads_list = heads.fetchall()
    if not heads_list:
        return []
    rcpts = [
        cm.rcpt_from(r)
        for r in c.execute(
            "SELECT * FROM queue_rcpts WHERE queue_id IN (SELECT value FROM json_each(?))"
            " ORDER BY id",
            (_ids([h["id"] for h in heads_list]),),
        )
    ]
    return [cm.entry_from(h, rcpts) for h in heads_list]


def _flush(c: Conn, domain: str | None, now: datetime) -> int:
    sql = "UPDATE queue_rcpts SET next_attempt = ? WHERE state = 'queued' AND held = 0"
    if domain is None:
        return c.execute(sql, (cm.to_us(now),)).rowcount
    return c.execute(sql + " AND domain = ?", (cm.to_us(now), domain.lower())).rowcount


def _retry(c: Conn, queue_id: int, now: datetime) -> int:
    _require_entry(c, queue_id)
    return c.execute(
        "UPDATE queue_rcpts SET next_attempt = ? WHERE queue_id = ? AND state = 'queued'",
        (cm.to_us(now), queue_id),
    ).rowcount


def _delete_entry(c: Conn, queue_id: int) -> None:
    if c.execute("DELETE FROM queue WHERE id = ?", (queue_id,)).rowcount == 0:
        raise NotFound(f"no such queue entry: {queue_id}")


def _bounce_entry(c: Conn, queue_id: int, now: datetime) -> int:
    _require_entry(c, queue_id)
    return c.execute(
        "UPDATE queue_rcpts SET give_up = 1, held = 0, next_attempt = ?"
        " WHERE queue_id = ? AND state = 'queued'",
        (cm.to_us(now), queue_id),
    ).rowcount


def _add_relay(c: Conn, domain: str, owner: str) -> RelayDomain:
    _user_id(c, owner)
    if _scalar(c, "SELECT 1 FROM domains WHERE name = ?", (domain,)) is not None:
        raise Conflict(f"domain is hosted here: {domain}")
    if _scalar(c, "SELECT 1 FROM relay_domains WHERE domain = ?", (domain,)) is not None:
        raise Conflict(f"already a relay domain: {domain}")
    c.execute("INSERT INTO relay_domains (domain, owner) VALUES (?, ?)", (domain, owner))
    c.execute(
        "UPDATE queue_rcpts SET held = 1 WHERE domain = ? AND state = 'queued' AND give_up = 0",
        (domain,),
    )
    return RelayDomain(domain=domain, owner=owner)


def _remove_relay(c: Conn, domain: str) -> None:
    if c.execute("DELETE FROM relay_domains WHERE domain = ?", (domain,)).rowcount == 0:
        raise NotFound(f"no such relay domain: {domain}")
    c.execute("UPDATE queue_rcpts SET held = 0 WHERE domain = ? AND state = 'queued'", (domain,))


def _stats(c: Conn) -> Stats:
    def count(sql: str) -> int:
        return int(_scalar(c, sql) or 0)

    return Stats(
        domains=count("SELECT COUNT(*) FROM domains"),
        users=count("SELECT COUNT(*) FROM users"),
        messages=count("SELECT COUNT(*) FROM messages"),
        queued=count("SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued'"),
        extra={
            "bodies": count("SELECT COUNT(*) FROM bodies"),
            "queue_entries": count("SELECT COUNT(*) FROM queue"),
            "held": count("SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued' AND held"),
            "aliases": count("SELECT COUNT(*) FROM aliases"),
            "relay_domains": count("SELECT COUNT(*) FROM relay_domains"),
        },
    )


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
        self._writer: _Writer | None = None
        self._readers: _Readers | None = None

    @property
    def commits(self) -> int:
        """Group commits done by the writer thread since `open()`."""
        return 0 if self._writer is None else self._writer.commits

    # -- plumbing -------------------------------------------------------------------------------

    async def _write(self, fn: Callable[[Conn], T], *, size: int = 0) -> T:
        if self._writer is None:
            raise StoreUnavailable("the store is not open")
        future: asyncio.Future[T] = self._writer.loop.create_future()
        self._writer.submit(_Request(fn=fn, future=future, size=size))
        return await future

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        if self._readers is None:
            raise StoreUnavailable("the store is not open")
        return await self._readers.run(fn)

    async def _lookup(self, fn: Callable[[Conn], T]) -> T:
        """A point lookup on one indexed row by ONE statement (the per-RCPT checks): no thread
        hop and no BEGIN/ROLLBACK around it."""
        if self._readers is None:
            raise StoreUnavailable("the store is not open")
        return await self._readers.run_here(fn)

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
            self._writer = _Writer(self.path, self._busy_ms)
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
            await self._read(lambda c: _scalar(c, "SELECT MAX(version) FROM schema_version") or 0)
        )

    # -- domains --------------------------------------------------------------------------------

    async def add_domain(self, name: str) -> Domain:
        name, now = name.strip().lower(), cm.utcnow()
        return await self._write(lambda c: _add_domain(c, name, now))

    async def remove_domain(self, name: str) -> None:
        name = name.strip().lower()
        await self._write(lambda c: _remove_domain(c, name))

    async def list_domains(self) -> list[Domain]:
        rows = await self._read(lambda c: _rows(c, "SELECT * FROM domains ORDER BY name"))
        return [cm.domain_from(r) for r in rows]

    async def hosts_domain(self, name: str) -> bool:
        name = name.strip().lower()
        sql = "SELECT 1 FROM domains WHERE name = ?"
        return await self._lookup(lambda c: _scalar(c, sql, (name,)) is not None)

    # -- users and aliases ----------------------------------------------------------------------

    async def add_user(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> User:
        address, now = normalize_address(address), cm.utcnow()

        def op(c: Conn) -> User:
            _require_hosted(c, domain_of(address))
            return _insert_user(c, address, password_hash, scram, now)

        return await self._write(op)

    async def set_password(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> None:
        address = normalize_address(address)
        await self._write(lambda c: _set_password(c, address, password_hash, scram))

    async def remove_user(self, address: str) -> None:
        address = normalize_address(address)
        await self._write(lambda c: _remove_user(c, address))

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
            lambda c: _one(c, "SELECT * FROM users WHERE address = ?", (address,))
        )
        return None if row is None else cm.user_from(row)

    async def add_alias(self, alias: str, address: str) -> Alias:
        alias, address = normalize_address(alias), normalize_address(address)
        return await self._write(lambda c: _add_alias(c, alias, address))

    async def remove_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        await self._write(lambda c: _remove_alias(c, alias))

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
        return await self._lookup(lambda c: _resolve(c, address))

    def resolve_now(self, address: str) -> tuple[bool, str | None]:
        if self._readers is None:
            return False, None
        address = normalize_address(address)
        return self._readers.now(lambda c: _resolve(c, address))

    # -- mail -----------------------------------------------------------------------------------

    async def deliver(self, letter: Letter) -> Accepted:
        now = cm.utcnow()
        size = sum(map(len, body_parts(letter.body)))
        return await self._write(lambda c: _deliver(c, letter, now), size=size)

    async def delete_message(self, message_id: int) -> None:
        """Expunge one message (its UID is never handed out again). Not in the api.py Protocol."""
        await self._write(lambda c: _delete_message(c, message_id))

    async def list_mailboxes(self, address: str) -> list[MailboxInfo]:
        address = normalize_address(address)
        return await self._read(lambda c: _list_mailboxes(c, address))

    async def list_messages(self, address: str, folder: str = "INBOX") -> list[MessageInfo]:
        address = normalize_address(address)
        return await self._read(lambda c: _list_messages(c, address, folder))

    async def get_message(self, message_id: int) -> StoredMessage:
        return await self._read(lambda c: _get_message(c, message_id))

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
        return await self._write(lambda c: _claim(c, owner, now, lease, limit, doms))

    async def record_outcomes(
        self, owner: str, outcomes: Sequence[Outcome], notice: Letter | None = None
    ) -> None:
        items, now = list(outcomes), cm.utcnow()
        await self._write(lambda c: _record_outcomes(c, owner, items, notice, now))

    async def release(self, owner: str, rcpt_ids: Sequence[int]) -> None:
        ids = list(rcpt_ids)
        await self._write(lambda c: _release(c, owner, ids))

    async def count_queued(self, domains: Sequence[str] | None = None) -> int:
        sql = "SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued'"
        params: tuple[Any, ...] = ()
        if domains is not None:
            sql += " AND domain IN (SELECT value FROM json_each(?))"
            params = (json.dumps([d.lower() for d in domains]),)
        return int(await self._read(lambda c: _scalar(c, sql, params)))

    async def next_due(self) -> datetime | None:
        sql = cm.NEXT_DUE_SELECT.format(false="0")
        return cm.maybe_datetime(await self._read(lambda c: _scalar(c, sql)))

    async def list_queue(self) -> list[QueueEntry]:
        where = (
            "EXISTS (SELECT 1 FROM queue_rcpts r WHERE r.queue_id = q.id AND r.state = 'queued')"
        )
        return await self._read(lambda c: _entries(c, where, ()))

    async def get_queue_entry(self, queue_id: int) -> QueueEntry:
        found = await self._read(lambda c: _entries(c, "q.id = ?", (queue_id,)))
        if not found:
            raise NotFound(f"no such queue entry: {queue_id}")
        return found[0]

    async def get_queue_body(self, queue_id: int) -> bytes:
        sql = "SELECT b.raw FROM queue q JOIN bodies b ON b.id = q.body_id WHERE q.id = ?"
        raw = await self._read(lambda c: _scalar(c, sql, (queue_id,)))
        if raw is None:
            raise NotFound(f"no such queue entry: {queue_id}")
        return bytes(raw)

    async def flush(self, domain: str | None = None) -> int:
        now = cm.utcnow()
        return await self._write(lambda c: _flush(c, domain, now))

    async def retry(self, queue_id: int) -> int:
        now = cm.utcnow()
        return await self._write(lambda c: _retry(c, queue_id, now))

    async def delete_queue_entry(self, queue_id: int) -> None:
        await self._write(lambda c: _delete_entry(c, queue_id))

    async def bounce_queue_entry(self, queue_id: int) -> int:
        now = cm.utcnow()
        return await self._write(lambda c: _bounce_entry(c, queue_id, now))

    # -- relay customers ------------------------------------------------------------------------

    async def add_relay_domain(self, domain: str, owner: str) -> RelayDomain:
        domain, owner = domain.strip().lower(), normalize_address(owner)
        return await self._write(lambda c: _add_relay(c, domain, owner))

    async def remove_relay_domain(self, domain: str) -> None:
        domain = domain.strip().lower()
        await self._write(lambda c: _remove_relay(c, domain))

    async def list_relay_domains(self, owner: str | None = None) -> list[RelayDomain]:
        if owner is None:
            params: tuple[Any, ...] = ()
            sql = "SELECT * FROM relay_domains ORDER BY domain"
        else:
            sql = "SELECT * FROM relay_domains WHERE owner = ? ORDER BY domain"
            params = (normalize_address(owner),)
        return [cm.relay_from(r) for r in await self._read(lambda c: _rows(c, sql, params))]

    async def stats(self) -> Stats:
        return await self._read(_stats)
