"""The SQLite engine's writer: ONE connection doing group commit, driven from the event loop,
each commit made durable by `WalSync` before its callers hear of it (see `Writer`); and the
connection set-up and error translation the engine's other connections share.

Imports stdlib, `pochta.errors`, `pochta.store._walsync`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pochta.errors import Conflict, StoreError, StoreUnavailable
from pochta.store._walsync import WalSync

Conn = sqlite3.Connection
MAX_BATCH = 500  # write requests per group commit
CHECKPOINT_EVERY = 100  # group commits between two checkpoints of the WAL (about 1000 pages)...
CHECKPOINT_BYTES = 4 * 1024 * 1024  # ...or fewer, once this much letter went into the WAL
WAL_LIMIT = 16 * 1024 * 1024  # a WAL this long is checkpointed between batches (then restarts)
HEAVY_BODY = 256 * 1024  # letters larger than this are written off the event loop
LOOP_COMMIT = 32 * 1024  # batches with more letter than this COMMIT (write the WAL) off the loop


T = TypeVar("T")


def connect(path: str, busy_ms: int, *, readonly: bool = False) -> Conn:
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


def translate(exc: BaseException) -> BaseException:
    """Driver exceptions never leave the engine (see api.py)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(f"sqlite: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"sqlite: {exc}")
    return exc


def read_now(conn: Conn, fn: Callable[[Conn], T]) -> tuple[bool, T | None]:
    """`fn` (ONE statement: its own implicit read transaction) on `conn` at once: (True,
    result), or (False, None) when the database is busy (the caller asks elsewhere)."""
    try:
        return True, fn(conn)
    except sqlite3.OperationalError:
        return False, None
    except Exception as exc:
        raise translate(exc) from exc


def _settle(fut: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


# -- the writer (group commit) ------------------------------------------------------------------


class Request:
    def __init__(
        self, fn: Callable[[Conn], Any], future: asyncio.Future[Any], size: int = 0
    ) -> None:
        self.fn = fn
        self.future = future
        self.size = size  # octets of letter it writes: large ones are written off the loop


_Result = tuple[Request, Any, BaseException | None]
_Job = tuple[Callable[[], Any], Callable[[Any, BaseException | None], None]]


class Writer:
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
    runs there whole. The WAL is checkpointed every CHECKPOINT_EVERY commits (sooner after
    CHECKPOINT_BYTES of letters; SQLite's automatic one would run inside COMMIT on the loop) on
    a connection of its own, on a thread of the loop's executor, while batches go on committing
    (PASSIVE: it copies the frames committed when it began). Under steady writes the WAL then
    never finds itself wholly copied when a write begins, which is when SQLite starts it over:
    once it holds WAL_LIMIT octets of frames, a checkpoint runs between two batches instead
    (copying only what the last one left, then the WAL restarts). Several
    processes sharing the database (`workers`) take the write lock in turn: BEGIN IMMEDIATE is
    retried every few hundred microseconds, never blocking the loop.
    """

    def __init__(self, path: str, busy_ms: int) -> None:
        # Setting up the connection may wait for another process (its first statements read
        # the schema); after that BEGIN IMMEDIATE is retried from the loop, never blocking it.
        self._conn = connect(path, busy_ms)
        self._conn.execute("PRAGMA busy_timeout = 0")
        self.loop = asyncio.get_running_loop()  # made on the loop that uses it (store.open)
        self._sync: WalSync | None = None
        self._aside_conn: Conn | None = None  # the checkpoints' own connection
        self._page_size = 4096
        if path != ":memory:":
            # COMMIT writes the WAL, WalSync makes it durable before anyone hears of it; the
            # checkpoints run aside or between batches (`_start_checkpoint`), not inside COMMIT.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._conn.execute("PRAGMA schema_version").fetchone()  # opens (makes) the WAL file
            self._sync = WalSync(self.loop, path + "-wal")
            self._aside_conn = connect(path, busy_ms)  # (set up like the writer's, then...)
            self._aside_conn.execute("PRAGMA busy_timeout = 0")  # ...busy: skipped, not waited
            self._aside_conn.execute("PRAGMA synchronous = NORMAL")
            self._page_size = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self._since_checkpoint = 0  # commits since the last checkpoint
        self._wal_letters = 0  # octets of letter committed since the last checkpoint
        self._wal_frames = 0  # the WAL's length in frames when the last checkpoint aside began
        self._aside: asyncio.Future[int | None] | None = None  # a checkpoint aside running
        self._broken: StoreUnavailable | None = None  # set for good when a WAL sync failed
        self._busy_ms = busy_ms
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # (not `_thread`: mypyc would name the C field `__thread`, a C keyword)
        self._committer = threading.Thread(
            target=self._run_jobs, name="pochta-sqlite-jobs", daemon=True
        )
        self._pending: list[Request] = []
        self._away = 0  # jobs handed to the job thread and not back yet (`_off_loop`)
        self._alone = 0  # requests to run one per transaction (after a failed batch)
        self._busy = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._lock_since = 0.0
        self.commits = 0
        self._committer.start()

    def submit(self, request: Request) -> None:
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
            self._off_loop(lambda: self._run_all(batch), lambda v, e: self._settle(batch, v, e))
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
            self._off_loop(self._commit, lambda _, exc: self._committed(results, exc))
            return
        try:
            self._commit()
        except sqlite3.Error as exc:
            self._committed(results, exc)
            return
        self._committed(results, None)

    def _off_loop(
        self, work: Callable[[], Any], done: Callable[[Any, BaseException | None], None]
    ) -> None:
        """Run `work` on the job thread (the connection is its own until then), `done(value,
        error)` back on the loop."""
        self._away += 1

        def back(value: Any, error: BaseException | None) -> None:
            self._away -= 1
            done(value, error)

        self._jobs.put((work, back))

    def read_now(self, fn: Callable[[Conn], T]) -> tuple[bool, T | None]:
        """One small read (ONE statement) on the writer's own connection, on the loop, between
        batches: (True, result), or (False, None) while the job thread has the connection or
        the database is busy. Its page cache stays warm from batch to batch, where a read
        connection's is emptied by every commit (a RCPT lookup took twice as long there)."""
        if self._away or self._conn.in_transaction:
            return False, None
        return read_now(self._conn, fn)

    def _ran(self, batch: list[Request]) -> None:
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

    def _run_all(self, batch: list[Request]) -> tuple[list[_Result], bool]:
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
        batch: list[Request],
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
        due = (
            self._since_checkpoint >= CHECKPOINT_EVERY
            or self._wal_letters >= CHECKPOINT_BYTES
            or self._wal_full()
        )
        if due and self._start_checkpoint():  # it must run between batches
            self._off_loop(lambda: _checkpoint(self._conn), lambda _v, _e: self._next())
        elif self._pending:
            self._start()
        else:
            self._finish()
        self.commits += 1
        self._resolve(results)

    def _wal_full(self) -> bool:
        """The WAL held WAL_LIMIT octets of frames when the last checkpoint aside began."""
        return self._wal_frames * self._page_size >= WAL_LIMIT

    def _start_checkpoint(self) -> bool:
        """A checkpoint is due: start one aside (True: it must run between batches instead,
        the WAL having grown to WAL_LIMIT without starting over). Not while one runs aside."""
        if self._aside is not None or self._aside_conn is None:
            return False
        self._since_checkpoint = self._wal_letters = 0
        if self._wal_full():
            self._wal_frames = 0
            return True
        self._aside = self.loop.run_in_executor(None, _checkpoint, self._aside_conn)
        self._aside.add_done_callback(self._aside_done)
        return False

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

    def _aside_done(self, done: asyncio.Future[int | None]) -> None:
        """A checkpoint aside ended. The WAL starts over only at a write transaction that
        began after every frame was copied, which a batch started while the checkpoint ran
        did not: under steady writes the WAL's length when a checkpoint began only grows, and
        once it reaches WAL_LIMIT, a checkpoint runs between the next two batches."""
        self._aside = None
        frames = None if done.cancelled() or done.exception() else done.result()
        if frames is not None:  # (None: busy, another process's checkpoint ran)
            self._wal_frames = frames

    def _isolate(self, batch: list[Request]) -> None:
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
    def _fail(batch: list[Request], exc: BaseException | None) -> None:
        """The transaction as a whole failed: nothing of the batch was committed."""
        for request in batch:
            _settle(request.future, None, StoreUnavailable(f"sqlite transaction failed: {exc}"))

    async def close(self) -> None:
        """Let queued requests commit, then close the connection."""
        while self._busy or self._pending:
            await self._idle.wait()
        if self._aside is not None:  # a checkpoint aside finishes before the connections close
            await asyncio.wait([self._aside])
        closed: asyncio.Future[None] = self.loop.create_future()
        self._off_loop(self._conn.close, lambda _, exc: _settle(closed, None, exc))
        self._jobs.put(None)
        await closed
        await asyncio.to_thread(self._committer.join)
        if self._aside_conn is not None:
            self._aside_conn.close()
        if self._sync is not None:
            self._sync.close()


def _checkpoint(conn: Conn) -> int | None:
    """Copy the WAL into the database (PASSIVE: it never waits for readers or a writer; it
    syncs the WAL before and the database after copying), on a thread: aside, on its own
    connection, or between batches on the writer's. The WAL's length in frames when it
    began; None when it could not run (another checkpoint was running)."""
    try:
        rows = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # no statement left open
    except sqlite3.Error:
        return None
    busy, frames, _copied = rows[0]
    return None if busy or frames < 0 else int(frames)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc)
    return "locked" in text or "busy" in text


class _Isolate(Exception):
    """A request of a batch failed; the batch was rolled back (to run one request at a time)."""


def _run_requests(conn: Conn, batch: list[Request]) -> list[_Result]:
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
            return [(request, None, translate(exc))]
        results.append((request, value, None))
    return results
