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
`pochta.store._sqlite_writer` (the writer).
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

from pochta.errors import Conflict, NotFound, StoreUnavailable
from pochta.store import _common as cm
from pochta.store._sqlite_writer import Conn, Request, Writer, connect, translate
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
BUSY_TIMEOUT_MS = 5000
JOIN_BODY = 64 * 1024  # smaller bodies are joined and inserted whole, larger ones in place
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
        conn = self._inline()
        try:
            return True, fn(conn)  # one statement: its own implicit read transaction
        except sqlite3.OperationalError:
            return False, None
        except Exception as exc:
            raise translate(exc) from exc

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
    # Read, then bumped by its rowid, in the writer's transaction (UPDATE ... RETURNING in one
    # statement costs more: SQLite collects RETURNING rows in a temporary table).
    address = normalize_address(target.address)
    row = _one(
        c,
        "SELECT b.id, b.uidnext, b.highestmodseq + 1 FROM mailboxes b"
        " JOIN users u ON u.id = b.user_id WHERE u.address = ? AND b.name = ?",
        (address, cm.folder_name(target.folder)),
    )
    if row is None:
        _user_id(c, address)
        raise NotFound(f"no mailbox {target.folder!r} for {address}")
    box, uid, modseq = row[0], row[1], row[2]
    c.execute(
        "UPDATE mailboxes SET uidnext = uidnext + 1, highestmodseq = highestmodseq + 1"
        " WHERE id = ?",
        (box,),
    )
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
        self._writer: Writer | None = None
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
        self._writer.submit(Request(fn=fn, future=future, size=size))
        return await future

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
        return self._now(lambda c: _resolve(c, address))

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
