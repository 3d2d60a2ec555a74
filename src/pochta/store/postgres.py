"""`PostgresStore`: the mail store engine for several nodes sharing one PostgreSQL database.

Driver: asyncpg, because it is the fastest asyncio PostgreSQL driver and maps bytea and
timestamptz natively to bytes and aware datetimes. A pool (min 1, max 10 by default; URL options
`?pool_min=`/`?pool_max=`) serves all calls; `?schema=NAME` puts the tables in their own schema
(created if missing). Every method is one transaction; commits are durable with PostgreSQL's
default `synchronous_commit=on`. `claim()` uses `SELECT ... FOR UPDATE SKIP LOCKED` plus the lease
columns, so workers on many nodes never take the same recipient. Migrations
`migrations/postgres/NNNN_*.sql` (numbered like SQLite's) run at `open()` under an advisory lock.
asyncpg errors are translated: connection trouble -> StoreUnavailable, unique violations ->
Conflict.

Imports stdlib, asyncpg, `pochta.errors`, `pochta.store.api`, `pochta.store._common`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from pochta.errors import Conflict, NotFound, StoreError, StoreUnavailable
from pochta.store import _common as cm
from pochta.store.api import (
    DEFAULT_FOLDERS,
    INBOX,
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
    body_bytes,
    domain_of,
    normalize_address,
)

Conn = Any  # asyncpg.Connection (asyncpg ships no type information)


def _translate(exc: BaseException) -> BaseException:
    """Driver exceptions never leave the engine (see api.py)."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return Conflict(f"postgres: {exc}")
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError):
        return StoreUnavailable(f"postgres: {type(exc).__name__}: {exc}")
    return exc


# -- migrations ---------------------------------------------------------------------------------


async def _migrate(conn: Conn, lock_name: str) -> None:
    async with conn.transaction():
        # concurrent openers (several nodes) apply each migration exactly once
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", lock_name)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_version")}
        for version, name, sql in cm.load_migrations("postgres"):
            if version not in done:
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_version (version, name) VALUES ($1, $2)", version, name
                )


# -- operations: each runs inside the caller's transaction --------------------------------------


async def _user_id(c: Conn, address: str) -> int:
    uid = await c.fetchval("SELECT id FROM users WHERE address = $1", address)
    if uid is None:
        raise NotFound(f"no such user: {address}")
    return int(uid)


async def _require_hosted(c: Conn, domain: str) -> None:
    if await c.fetchval("SELECT 1 FROM domains WHERE name = $1", domain) is None:
        raise NotFound(f"domain not hosted: {domain}")


async def _exists(c: Conn, sql: str, *args: Any) -> bool:
    return await c.fetchval(sql, *args) is not None


async def _insert_user(
    c: Conn, address: str, password_hash: str, scram: ScramCredentials | None, now: datetime
) -> User:
    if await _exists(c, "SELECT 1 FROM aliases WHERE alias = $1", address):
        raise Conflict(f"address is an alias: {address}")
    if await _exists(c, "SELECT 1 FROM users WHERE address = $1", address):
        raise Conflict(f"user exists: {address}")
    row = await c.fetchrow(
        "INSERT INTO users (address, domain, password_hash, scram_salt, scram_iterations,"
        " scram_stored_key, scram_server_key, created_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
        address, domain_of(address), password_hash, *cm.scram_params(scram), now,
    )  # fmt: skip
    for name in DEFAULT_FOLDERS:
        highest = await c.fetchval("SELECT MAX(uidvalidity) FROM mailboxes")
        await c.execute(
            "INSERT INTO mailboxes (user_id, name, uidvalidity) VALUES ($1, $2, $3)",
            row["id"], name, cm.new_uidvalidity(highest),
        )  # fmt: skip
    return cm.user_from(row)


async def _add_domain(c: Conn, name: str, now: datetime) -> Domain:
    if await _exists(c, "SELECT 1 FROM domains WHERE name = $1", name):
        raise Conflict(f"domain already hosted: {name}")
    if await _exists(c, "SELECT 1 FROM relay_domains WHERE domain = $1", name):
        raise Conflict(f"domain is a relay domain: {name}")
    row = await c.fetchrow(
        "INSERT INTO domains (name, created_at) VALUES ($1, $2) RETURNING *", name, now
    )
    await _insert_user(c, f"postmaster@{name}", "", None, now)  # RFC 5321 §4.5.1
    return cm.domain_from(row)


async def _release_relay_holds(c: Conn, owners_sql: str, arg: str) -> None:
    """Relay domains whose owner goes away: their queued mail returns to MX delivery."""
    await c.execute(
        "UPDATE queue_rcpts SET held = false WHERE state = 'queued' AND domain IN"
        f" (SELECT domain FROM relay_domains WHERE owner IN ({owners_sql}))",
        arg,
    )


async def _remove_domain(c: Conn, name: str) -> None:
    await _require_hosted(c, name)
    await _release_relay_holds(c, "SELECT address FROM users WHERE domain = $1", name)
    await c.execute("DELETE FROM domains WHERE name = $1", name)  # cascades to users and mail


async def _remove_user(c: Conn, address: str) -> None:
    await _user_id(c, address)
    hosted = await _exists(c, "SELECT 1 FROM domains WHERE name = $1", domain_of(address))
    if cm.is_postmaster(address) and hosted:
        raise Conflict(f"{address} is required while the domain is hosted (RFC 5321 §4.5.1)")
    await _release_relay_holds(c, "$1", address)
    await c.execute("DELETE FROM users WHERE address = $1", address)


async def _add_alias(c: Conn, alias: str, address: str) -> Alias:
    await _require_hosted(c, domain_of(alias))
    user_id = await _user_id(c, address)
    if await _exists(c, "SELECT 1 FROM users WHERE address = $1", alias):
        raise Conflict(f"address is a user: {alias}")
    if await _exists(c, "SELECT 1 FROM aliases WHERE alias = $1", alias):
        raise Conflict(f"alias exists: {alias}")
    await c.execute(
        "INSERT INTO aliases (alias, domain, user_id) VALUES ($1, $2, $3)",
        alias, domain_of(alias), user_id,
    )  # fmt: skip
    return Alias(alias=alias, address=address)


_RESOLVE = cm.RESOLVE_SQL.format(p="$1")


async def _mailbox_id(c: Conn, address: str, folder: str) -> int:
    box = await c.fetchval(
        "SELECT b.id FROM mailboxes b JOIN users u ON u.id = b.user_id"
        " WHERE u.address = $1 AND b.name = $2",
        address, cm.folder_name(folder),
    )  # fmt: skip
    if box is None:
        await _user_id(c, address)
        raise NotFound(f"no mailbox {folder!r} for {address}")
    return int(box)


async def _deliver(c: Conn, letter: Letter, now: datetime) -> Accepted:
    boxes = [await _mailbox_id(c, normalize_address(t.address), t.folder) for t in letter.targets]
    outbound = cm.unique_addresses(letter.outbound)
    if not boxes and not outbound:
        return Accepted(message_ids=(), queue_id=None)
    # lock the mailboxes in id order: concurrent deliveries to the same users cannot deadlock
    await c.execute(
        "SELECT 1 FROM mailboxes WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE",
        sorted(set(boxes)),
    )
    body = body_bytes(letter.body)
    body_id = await c.fetchval(
        "INSERT INTO bodies (raw, size) VALUES ($1, $2) RETURNING id", body, len(body)
    )
    s = letter.summary
    ids: list[int] = []
    for box, target in zip(boxes, letter.targets, strict=True):
        rp = None if target.return_path is None else normalize_address(target.return_path)
        # RFC 3501 §2.3.1.1: the next UID is uidnext, never reused; RFC 7162 §3.1: new modseq
        new_id = await c.fetchval(
            "WITH b AS (UPDATE mailboxes SET uidnext = uidnext + 1,"
            " highestmodseq = highestmodseq + 1 WHERE id = $1"
            " RETURNING id, uidnext - 1 AS uid, highestmodseq)"
            " INSERT INTO messages (mailbox_id, uid, body_id, return_path, modseq,"
            " received_at, from_, to_, subject, date, message_id)"
            " SELECT b.id, b.uid, $2, $3, b.highestmodseq, $4, $5, $6, $7, $8, $9 FROM b"
            " RETURNING id",
            box,
            body_id,
            rp,
            now,
            s.from_,
            s.to,
            s.subject,
            s.date,
            s.message_id,
        )
        ids.append(int(new_id))
    queue_id = None
    if outbound:
        queue_id = await _enqueue(c, body_id, normalize_address(letter.sender), outbound, now)
    return Accepted(message_ids=tuple(ids), queue_id=queue_id)


async def _enqueue(c: Conn, body_id: int, sender: str, rcpts: list[str], now: datetime) -> int:
    queue_id = await c.fetchval(
        "INSERT INTO queue (body_id, sender, created_at) VALUES ($1, $2, $3) RETURNING id",
        body_id, sender, now,
    )  # fmt: skip
    await c.execute(
        "INSERT INTO queue_rcpts (queue_id, address, domain, next_attempt, held)"
        " SELECT $1, t.a, t.d, $4, EXISTS (SELECT 1 FROM relay_domains r WHERE r.domain = t.d)"
        " FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(a, d, n) ORDER BY t.n",
        queue_id, rcpts, [domain_of(a) for a in rcpts], now,
    )  # fmt: skip
    return int(queue_id)


async def _delete_message(c: Conn, message_id: int) -> None:
    box = await c.fetchval("DELETE FROM messages WHERE id = $1 RETURNING mailbox_id", message_id)
    if box is None:
        raise NotFound(f"no such message: {message_id}")
    # RFC 7162 §3.2.10: an expunge changes the mailbox's modification sequence
    await c.execute("UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = $1", box)


async def _get_message(c: Conn, message_id: int) -> StoredMessage:
    row = await c.fetchrow(
        cm.MESSAGE_SELECT.replace("bo.size", "bo.size, bo.raw") + " WHERE m.id = $1", message_id
    )
    if row is None:
        raise NotFound(f"no such message: {message_id}")
    raw = cm.return_path_header(row["return_path"]) + bytes(row["raw"])
    return StoredMessage(info=cm.message_from(row), raw=raw)


# -- queue operations ---------------------------------------------------------------------------


async def _claim(
    c: Conn,
    owner: str,
    now: datetime,
    lease: timedelta,
    limit: int,
    domains: Sequence[str] | None,
) -> list[Claim]:
    if domains is None:
        extra, args = "NOT held AND next_attempt <= $2", [owner, now, now + lease, limit]
    else:
        extra = "domain = ANY($5::text[])"
        args = [owner, now, now + lease, limit, [d.lower() for d in domains]]
    rows = await c.fetch(
        "WITH picked AS (SELECT id FROM queue_rcpts WHERE state = 'queued'"
        " AND (lease_owner IS NULL OR lease_until <= $2)"  # a live lease is never taken
        f" AND {extra} ORDER BY next_attempt, id LIMIT $4 FOR UPDATE SKIP LOCKED)"
        " UPDATE queue_rcpts r SET lease_owner = $1, lease_until = $3"
        " FROM picked WHERE r.id = picked.id RETURNING r.*",
        *args,
    )
    if not rows:
        return []
    rows = sorted(rows, key=lambda r: (r["queue_id"], r["domain"], r["id"]))
    heads = await c.fetch(
        "SELECT q.id, q.sender, q.created_at, b.raw FROM queue q"
        " JOIN bodies b ON b.id = q.body_id WHERE q.id = ANY($1::bigint[])",
        sorted({r["queue_id"] for r in rows}),
    )
    entries = {
        int(h["id"]): (h["sender"], cm.as_datetime(h["created_at"]), bytes(h["raw"])) for h in heads
    }
    return cm.group_claims(rows, entries)


async def _record_outcomes(
    c: Conn, owner: str, outcomes: Sequence[Outcome], notice: Letter | None, now: datetime
) -> None:
    # lock the affected entries first so concurrent workers see each other's final states
    await c.execute(
        "SELECT 1 FROM queue WHERE id IN (SELECT queue_id FROM queue_rcpts"
        " WHERE id = ANY($1::bigint[])) ORDER BY id FOR UPDATE",
        [o.rcpt_id for o in outcomes],
    )
    touched: set[int] = set()
    for outcome in outcomes:
        queue_id = await c.fetchval(
            "UPDATE queue_rcpts SET state = $1, attempts = attempts + 1, last_reply = $2,"
            " next_attempt = $3, warned = (warned OR $4), lease_owner = NULL,"
            " lease_until = NULL WHERE id = $5 AND lease_owner = $6 AND state = 'queued'"
            " RETURNING queue_id",
            cm.outcome_state(outcome.kind), outcome.reply, cm.outcome_next_attempt(outcome, now),
            outcome.warned, outcome.rcpt_id, owner,
        )  # fmt: skip
        if queue_id is not None:
            touched.add(int(queue_id))
    # a notice for outcomes that were all ignored belongs to whoever holds the lease now
    if notice is not None and (touched or not outcomes):
        await _deliver(c, notice, now)
    await c.execute(
        "DELETE FROM queue q WHERE q.id = ANY($1::bigint[]) AND NOT EXISTS"
        " (SELECT 1 FROM queue_rcpts r WHERE r.queue_id = q.id AND r.state = 'queued')",
        sorted(touched),
    )


async def _entries(c: Conn, where: str, *args: Any) -> list[QueueEntry]:
    heads = await c.fetch(cm.QUEUE_SELECT + f" WHERE {where} ORDER BY q.created_at, q.id", *args)
    if not heads:
        return []
    rows = await c.fetch(
        "SELECT * FROM queue_rcpts WHERE queue_id = ANY($1::bigint[]) ORDER BY id",
        [h["id"] for h in heads],
    )
    rcpts = [cm.rcpt_from(r) for r in rows]
    return [cm.entry_from(h, rcpts) for h in heads]


async def _require_entry(c: Conn, queue_id: int) -> None:
    if not await _exists(c, "SELECT 1 FROM queue WHERE id = $1", queue_id):
        raise NotFound(f"no such queue entry: {queue_id}")


def _count(status: str) -> int:
    """The row count of an asyncpg command status such as 'UPDATE 3'."""
    return int(status.rsplit(" ", 1)[-1])


async def _add_relay(c: Conn, domain: str, owner: str) -> RelayDomain:
    await _user_id(c, owner)
    if await _exists(c, "SELECT 1 FROM domains WHERE name = $1", domain):
        raise Conflict(f"domain is hosted here: {domain}")
    if await _exists(c, "SELECT 1 FROM relay_domains WHERE domain = $1", domain):
        raise Conflict(f"already a relay domain: {domain}")
    await c.execute("INSERT INTO relay_domains (domain, owner) VALUES ($1, $2)", domain, owner)
    await c.execute(
        "UPDATE queue_rcpts SET held = true WHERE domain = $1 AND state = 'queued' AND NOT give_up",
        domain,
    )
    return RelayDomain(domain=domain, owner=owner)


async def _remove_relay(c: Conn, domain: str) -> None:
    if _count(await c.execute("DELETE FROM relay_domains WHERE domain = $1", domain)) == 0:
        raise NotFound(f"no such relay domain: {domain}")
    await c.execute(
        "UPDATE queue_rcpts SET held = false WHERE domain = $1 AND state = 'queued'", domain
    )


async def _stats(c: Conn) -> Stats:
    row = await c.fetchrow(
        "SELECT (SELECT COUNT(*) FROM domains) AS domains, (SELECT COUNT(*) FROM users) AS users,"
        " (SELECT COUNT(*) FROM messages) AS messages,"
        " (SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued') AS queued,"
        " (SELECT COUNT(*) FROM bodies) AS bodies, (SELECT COUNT(*) FROM queue) AS queue_entries,"
        " (SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued' AND held) AS held,"
        " (SELECT COUNT(*) FROM aliases) AS aliases,"
        " (SELECT COUNT(*) FROM relay_domains) AS relay_domains"
    )
    extra = ("bodies", "queue_entries", "held", "aliases", "relay_domains")
    return Stats(
        domains=int(row["domains"]),
        users=int(row["users"]),
        messages=int(row["messages"]),
        queued=int(row["queued"]),
        extra={k: int(row[k]) for k in extra},
    )


# -- the engine ---------------------------------------------------------------------------------


class PostgresStore:
    """The PostgreSQL engine (see the module docstring). Not connected until `await open()`."""

    def __init__(self, url: cm.PostgresUrl | str) -> None:
        parsed = cm.parse_store_url(url) if isinstance(url, str) else url
        if not isinstance(parsed, cm.PostgresUrl):
            raise StoreUnavailable(f"not a PostgreSQL URL: {url!r}")
        self.url = parsed
        self._pool: Any = None

    # -- plumbing -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _tx(self, *, readonly: bool = False) -> AsyncIterator[Conn]:
        """One pooled connection inside one transaction; driver errors translated."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            async with self._pool.acquire() as conn:
                isolation = "repeatable_read" if readonly else "read_committed"
                async with conn.transaction(isolation=isolation, readonly=readonly):
                    yield conn
        except Exception as exc:
            raised = _translate(exc)
            if raised is exc:
                raise
            raise raised from exc

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        async with self._tx(readonly=True) as c:
            return list(await c.fetch(sql, *args))

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        """One statement, no explicit transaction: a single statement is atomic on its own,
        and BEGIN/COMMIT would triple the round trips of the per-RCPT lookups."""
        if self._pool is None:
            raise StoreUnavailable("the store is not open")
        try:
            return await self._pool.fetchval(sql, *args)
        except Exception as exc:
            raised = _translate(exc)
            if raised is exc:
                raise
            raise raised from exc

    async def _status(self, sql: str, *args: Any) -> int:
        async with self._tx() as c:
            return _count(await c.execute(sql, *args))

    # -- life cycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        schema = self.url.schema
        settings = {} if schema is None else {"search_path": schema}
        try:
            conn = await asyncpg.connect(self.url.dsn, timeout=10)
            try:
                if schema is not None:
                    with contextlib.suppress(asyncpg.UniqueViolationError):  # a racing opener
                        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                    await conn.execute(f'SET search_path TO "{schema}"')
                await _migrate(conn, f"pochta-migrate:{schema or 'public'}")
            finally:
                await conn.close()
            self._pool = await asyncpg.create_pool(
                self.url.dsn,
                min_size=self.url.pool_min,
                max_size=self.url.pool_max,
                server_settings=settings,
                timeout=10,
            )
        except Exception as exc:
            raised = _translate(exc)
            if raised is exc:
                raise
            raise raised from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    async def schema_version(self) -> int:
        return int(await self._fetchval("SELECT MAX(version) FROM schema_version") or 0)

    # -- domains --------------------------------------------------------------------------------

    async def add_domain(self, name: str) -> Domain:
        async with self._tx() as c:
            return await _add_domain(c, name.strip().lower(), cm.utcnow())

    async def remove_domain(self, name: str) -> None:
        async with self._tx() as c:
            await _remove_domain(c, name.strip().lower())

    async def list_domains(self) -> list[Domain]:
        return [cm.domain_from(r) for r in await self._fetch("SELECT * FROM domains ORDER BY name")]

    async def hosts_domain(self, name: str) -> bool:
        sql = "SELECT 1 FROM domains WHERE name = $1"
        return await self._fetchval(sql, name.strip().lower()) is not None

    # -- users and aliases ----------------------------------------------------------------------

    async def add_user(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> User:
        address = normalize_address(address)
        async with self._tx() as c:
            await _require_hosted(c, domain_of(address))
            return await _insert_user(c, address, password_hash, scram, cm.utcnow())

    async def set_password(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> None:
        address = normalize_address(address)
        changed = await self._status(
            "UPDATE users SET password_hash = $1, scram_salt = $2, scram_iterations = $3,"
            " scram_stored_key = $4, scram_server_key = $5 WHERE address = $6",
            password_hash, *cm.scram_params(scram), address,
        )  # fmt: skip
        if changed == 0:
            raise NotFound(f"no such user: {address}")

    async def remove_user(self, address: str) -> None:
        async with self._tx() as c:
            await _remove_user(c, normalize_address(address))

    async def list_users(self, domain: str | None = None) -> list[User]:
        if domain is None:
            rows = await self._fetch("SELECT * FROM users ORDER BY address")
        else:
            sql = "SELECT * FROM users WHERE domain = $1 ORDER BY address"
            rows = await self._fetch(sql, domain.lower())
        return [cm.user_from(r) for r in rows]

    async def get_user(self, address: str) -> User | None:
        sql = "SELECT * FROM users WHERE address = $1"
        rows = await self._fetch(sql, normalize_address(address))
        return cm.user_from(rows[0]) if rows else None

    async def add_alias(self, alias: str, address: str) -> Alias:
        async with self._tx() as c:
            return await _add_alias(c, normalize_address(alias), normalize_address(address))

    async def remove_alias(self, alias: str) -> None:
        alias = normalize_address(alias)
        if await self._status("DELETE FROM aliases WHERE alias = $1", alias) == 0:
            raise NotFound(f"no such alias: {alias}")

    async def list_aliases(self, address: str | None = None) -> list[Alias]:
        if address is None:
            rows = await self._fetch(cm.ALIAS_SELECT + " ORDER BY a.alias")
        else:
            sql = cm.ALIAS_SELECT + " WHERE u.address = $1 ORDER BY a.alias"
            rows = await self._fetch(sql, normalize_address(address))
        return [cm.alias_from(r) for r in rows]

    async def resolve(self, address: str) -> str | None:
        owner = await self._fetchval(_RESOLVE, normalize_address(address))
        return None if owner is None else str(owner)

    def resolve_now(self, address: str) -> tuple[bool, str | None]:
        return False, None  # every query is a round trip to the server

    # -- mail -----------------------------------------------------------------------------------

    async def deliver(self, letter: Letter) -> Accepted:
        async with self._tx() as c:
            return await _deliver(c, letter, cm.utcnow())

    async def delete_message(self, message_id: int) -> None:
        """Expunge one message (its UID is never handed out again). Not in the api.py Protocol."""
        async with self._tx() as c:
            await _delete_message(c, message_id)

    async def list_mailboxes(self, address: str) -> list[MailboxInfo]:
        address = normalize_address(address)
        async with self._tx(readonly=True) as c:
            await _user_id(c, address)
            sql = cm.MAILBOX_SELECT + " WHERE u.address = $1 ORDER BY b.name <> 'INBOX', b.name"
            return [cm.mailbox_from(r) for r in await c.fetch(sql, address)]

    async def list_messages(self, address: str, folder: str = INBOX) -> list[MessageInfo]:
        async with self._tx(readonly=True) as c:
            box = await _mailbox_id(c, normalize_address(address), folder)
            sql = cm.MESSAGE_SELECT + " WHERE m.mailbox_id = $1 ORDER BY m.uid"
            return [cm.message_from(r) for r in await c.fetch(sql, box)]

    async def get_message(self, message_id: int) -> StoredMessage:
        async with self._tx(readonly=True) as c:
            return await _get_message(c, message_id)

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
        async with self._tx() as c:
            return await _claim(c, owner, cm.as_utc(now), lease, limit, domains)

    async def record_outcomes(
        self, owner: str, outcomes: Sequence[Outcome], notice: Letter | None = None
    ) -> None:
        async with self._tx() as c:
            await _record_outcomes(c, owner, outcomes, notice, cm.utcnow())

    async def release(self, owner: str, rcpt_ids: Sequence[int]) -> None:
        await self._status(
            "UPDATE queue_rcpts SET lease_owner = NULL, lease_until = NULL"
            " WHERE lease_owner = $1 AND id = ANY($2::bigint[])",
            owner, list(rcpt_ids),
        )  # fmt: skip

    async def count_queued(self, domains: Sequence[str] | None = None) -> int:
        sql = "SELECT COUNT(*) FROM queue_rcpts WHERE state = 'queued'"
        if domains is None:
            return int(await self._fetchval(sql))
        lowered = [d.lower() for d in domains]
        return int(await self._fetchval(sql + " AND domain = ANY($1::text[])", lowered))

    async def next_due(self) -> datetime | None:
        return cm.maybe_datetime(await self._fetchval(cm.NEXT_DUE_SELECT.format(false="false")))

    async def list_queue(self) -> list[QueueEntry]:
        where = (
            "EXISTS (SELECT 1 FROM queue_rcpts r WHERE r.queue_id = q.id AND r.state = 'queued')"
        )
        async with self._tx(readonly=True) as c:
            return await _entries(c, where)

    async def get_queue_entry(self, queue_id: int) -> QueueEntry:
        async with self._tx(readonly=True) as c:
            found = await _entries(c, "q.id = $1", queue_id)
        if not found:
            raise NotFound(f"no such queue entry: {queue_id}")
        return found[0]

    async def get_queue_body(self, queue_id: int) -> bytes:
        sql = "SELECT b.raw FROM queue q JOIN bodies b ON b.id = q.body_id WHERE q.id = $1"
        raw = await self._fetchval(sql, queue_id)
        if raw is None:
            raise NotFound(f"no such queue entry: {queue_id}")
        return bytes(raw)

    async def flush(self, domain: str | None = None) -> int:
        sql = "UPDATE queue_rcpts SET next_attempt = $1 WHERE state = 'queued' AND NOT held"
        if domain is None:
            return await self._status(sql, cm.utcnow())
        return await self._status(sql + " AND domain = $2", cm.utcnow(), domain.lower())

    async def retry(self, queue_id: int) -> int:
        async with self._tx() as c:
            await _require_entry(c, queue_id)
            status = await c.execute(
                "UPDATE queue_rcpts SET next_attempt = $1 WHERE queue_id = $2"
                " AND state = 'queued'",
                cm.utcnow(), queue_id,
            )  # fmt: skip
            return _count(status)

    async def delete_queue_entry(self, queue_id: int) -> None:
        if await self._status("DELETE FROM queue WHERE id = $1", queue_id) == 0:
            raise NotFound(f"no such queue entry: {queue_id}")

    async def bounce_queue_entry(self, queue_id: int) -> int:
        async with self._tx() as c:
            await _require_entry(c, queue_id)
            status = await c.execute(
                "UPDATE queue_rcpts SET give_up = true, held = false, next_attempt = $1"
                " WHERE queue_id = $2 AND state = 'queued'",
                cm.utcnow(), queue_id,
            )  # fmt: skip
            return _count(status)

    # -- relay customers ------------------------------------------------------------------------

    async def add_relay_domain(self, domain: str, owner: str) -> RelayDomain:
        async with self._tx() as c:
            return await _add_relay(c, domain.strip().lower(), normalize_address(owner))

    async def remove_relay_domain(self, domain: str) -> None:
        async with self._tx() as c:
            await _remove_relay(c, domain.strip().lower())

    async def list_relay_domains(self, owner: str | None = None) -> list[RelayDomain]:
        if owner is None:
            rows = await self._fetch("SELECT * FROM relay_domains ORDER BY domain")
        else:
            sql = "SELECT * FROM relay_domains WHERE owner = $1 ORDER BY domain"
            rows = await self._fetch(sql, normalize_address(owner))
        return [cm.relay_from(r) for r in rows]

    async def stats(self) -> Stats:
        async with self._tx(readonly=True) as c:
            return await _stats(c)
