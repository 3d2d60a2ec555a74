"""The SQLite store's operations: each runs inside one transaction on the connection it is
given (the writer's, in a group commit, or a reader's snapshot); `SqliteStore` (sqlite.py) picks
the connection. Imports stdlib, `pochta.errors`, `pochta.store.api`, `pochta.store._common`.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pochta.errors import Conflict, NotFound
from pochta.store import _common as cm
from pochta.store._sqlite_writer import Conn
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

JOIN_BODY = 64 * 1024  # smaller bodies are joined and inserted whole, larger ones in place


def one(c: Conn, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
    row: sqlite3.Row | None = c.execute(sql, params).fetchone()
    return row


def scalar(c: Conn, sql: str, params: Sequence[Any] = ()) -> Any:
    row = one(c, sql, params)
    return None if row is None else row[0]


def _ids(values: Sequence[int]) -> str:
    """A JSON array for `IN (SELECT value FROM json_each(?))`: no bound-variable limits."""
    return json.dumps([int(v) for v in values])


def _user_id(c: Conn, address: str) -> int:
    uid = scalar(c, "SELECT id FROM users WHERE address = ?", (address,))
    if uid is None:
        raise NotFound(f"no such user: {address}")
    return int(uid)


def require_hosted(c: Conn, domain: str) -> None:
    if scalar(c, "SELECT 1 FROM domains WHERE name = ?", (domain,)) is None:
        raise NotFound(f"domain not hosted: {domain}")


def insert_user(
    c: Conn, address: str, password_hash: str, scram: ScramCredentials | None, now: datetime
) -> User:
    if scalar(c, "SELECT 1 FROM aliases WHERE alias = ?", (address,)) is not None:
        raise Conflict(f"address is an alias: {address}")
    if scalar(c, "SELECT 1 FROM users WHERE address = ?", (address,)) is not None:
        raise Conflict(f"user exists: {address}")
    cur = c.execute(
        "INSERT INTO users (address, domain, password_hash, scram_salt, scram_iterations,"
        " scram_stored_key, scram_server_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (address, domain_of(address), password_hash, *cm.scram_params(scram), cm.to_us(now)),
    )
    user_id = int(cur.lastrowid or 0)
    for name in DEFAULT_FOLDERS:
        highest = scalar(c, "SELECT MAX(uidvalidity) FROM mailboxes")
        c.execute(
            "INSERT INTO mailboxes (user_id, name, uidvalidity) VALUES (?, ?, ?)",
            (user_id, name, cm.new_uidvalidity(highest)),
        )
    row = one(c, "SELECT * FROM users WHERE id = ?", (user_id,))
    assert row is not None
    return cm.user_from(row)


def add_domain(c: Conn, name: str, now: datetime) -> Domain:
    if scalar(c, "SELECT 1 FROM domains WHERE name = ?", (name,)) is not None:
        raise Conflict(f"domain already hosted: {name}")
    if scalar(c, "SELECT 1 FROM relay_domains WHERE domain = ?", (name,)) is not None:
        raise Conflict(f"domain is a relay domain: {name}")
    c.execute("INSERT INTO domains (name, created_at) VALUES (?, ?)", (name, cm.to_us(now)))
    insert_user(c, f"postmaster@{name}", "", None, now)  # RFC 5321 §4.5.1
    return Domain(name=name, created_at=cm.as_datetime(cm.to_us(now)))


def _release_relay_holds(c: Conn, owners_sql: str, params: Sequence[Any]) -> None:
    """Relay domains whose owner goes away: their queued mail returns to MX delivery."""
    c.execute(
        "UPDATE queue_rcpts SET held = 0 WHERE state = 'queued' AND domain IN"
        f" (SELECT domain FROM relay_domains WHERE owner IN ({owners_sql}))",
        params,
    )


def remove_domain(c: Conn, name: str) -> None:
    require_hosted(c, name)
    _release_relay_holds(c, "SELECT address FROM users WHERE domain = ?", (name,))
    c.execute("DELETE FROM domains WHERE name = ?", (name,))  # cascades to users and mail


def set_password(c: Conn, address: str, password_hash: str, scram: ScramCredentials | None) -> None:
    cur = c.execute(
        "UPDATE users SET password_hash = ?, scram_salt = ?, scram_iterations = ?,"
        " scram_stored_key = ?, scram_server_key = ? WHERE address = ?",
        (password_hash, *cm.scram_params(scram), address),
    )
    if cur.rowcount == 0:
        raise NotFound(f"no such user: {address}")


def remove_user(c: Conn, address: str) -> None:
    _user_id(c, address)
    if cm.is_postmaster(address) and scalar(
        c, "SELECT 1 FROM domains WHERE name = ?", (domain_of(address),)
    ):
        raise Conflict(f"{address} is required while the domain is hosted (RFC 5321 §4.5.1)")
    _release_relay_holds(c, "?", (address,))
    c.execute("DELETE FROM users WHERE address = ?", (address,))


def add_alias(c: Conn, alias: str, address: str) -> Alias:
    require_hosted(c, domain_of(alias))
    user_id = _user_id(c, address)
    if scalar(c, "SELECT 1 FROM users WHERE address = ?", (alias,)) is not None:
        raise Conflict(f"address is a user: {alias}")
    if scalar(c, "SELECT 1 FROM aliases WHERE alias = ?", (alias,)) is not None:
        raise Conflict(f"alias exists: {alias}")
    c.execute(
        "INSERT INTO aliases (alias, domain, user_id) VALUES (?, ?, ?)",
        (alias, domain_of(alias), user_id),
    )
    return Alias(alias=alias, address=address)


def remove_alias(c: Conn, alias: str) -> None:
    if c.execute("DELETE FROM aliases WHERE alias = ?", (alias,)).rowcount == 0:
        raise NotFound(f"no such alias: {alias}")


_RESOLVE = cm.RESOLVE_SQL.format(p="?1")


def resolve(c: Conn, address: str) -> str | None:
    owner = scalar(c, _RESOLVE, (address,))
    return None if owner is None else str(owner)


def _mailbox_id(c: Conn, address: str, folder: str) -> int:
    box = scalar(
        c,
        "SELECT b.id FROM mailboxes b JOIN users u ON u.id = b.user_id"
        " WHERE u.address = ? AND b.name = ?",
        (address, cm.folder_name(folder)),
    )
    if box is None:
        _user_id(c, address)
        raise NotFound(f"no mailbox {folder!r} for {address}")
    return int(box)


def deliver(c: Conn, letter: Letter, now: datetime) -> Accepted:
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
    row = one(
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


def delete_message(c: Conn, message_id: int) -> None:
    row = one(c, "DELETE FROM messages WHERE id = ? RETURNING mailbox_id", (message_id,))
    if row is None:
        raise NotFound(f"no such message: {message_id}")
    # RFC 7162 §3.2.10: an expunge changes the mailbox's modification sequence
    c.execute("UPDATE mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = ?", (row[0],))


def list_messages(c: Conn, address: str, folder: str) -> list[MessageInfo]:
    box = _mailbox_id(c, address, folder)
    rows = c.execute(cm.MESSAGE_SELECT + " WHERE m.mailbox_id = ? ORDER BY m.uid", (box,))
    return [cm.message_from(r) for r in rows]


def get_message(c: Conn, message_id: int) -> StoredMessage:
    row = one(c, cm.MESSAGE_SELECT + " WHERE m.id = ?", (message_id,))
    raw = scalar(
        c, "SELECT raw FROM bodies WHERE id = (SELECT body_id FROM messages WHERE id = ?)",
        (message_id,),
    )  # fmt: skip
    if row is None or raw is None:
        raise NotFound(f"no such message: {message_id}")
    return StoredMessage(
        info=cm.message_from(row), raw=cm.return_path_header(row["return_path"]) + bytes(raw)
    )


def list_mailboxes(c: Conn, address: str) -> list[MailboxInfo]:
    _user_id(c, address)
    rows = c.execute(
        cm.MAILBOX_SELECT + " WHERE u.address = ? ORDER BY b.name <> 'INBOX', b.name", (address,)
    )
    return [cm.mailbox_from(r) for r in rows]


# -- queue operations ---------------------------------------------------------------------------

# unleased, or the lease ran out (a crashed worker); a live lease is never taken, not even by its
# own owner, so a worker that claims again while it is still delivering cannot deliver twice
_CLAIMABLE = "state = 'queued' AND (lease_owner IS NULL OR lease_until <= ?)"


def claim(
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


def record_outcomes(
    c: Conn, owner: str, outcomes: Sequence[Outcome], notice: Letter | None, now: datetime
) -> None:
    touched: set[int] = set()
    for outcome in outcomes:
        next_attempt = cm.outcome_next_attempt(outcome, now)
        row = one(
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
        deliver(c, notice, now)
    c.execute(
        "DELETE FROM queue WHERE id IN (SELECT value FROM json_each(?)) AND NOT EXISTS"
        " (SELECT 1 FROM queue_rcpts r WHERE r.queue_id = queue.id AND r.state = 'queued')",
        (_ids(sorted(touched)),),
    )


def release(c: Conn, owner: str, rcpt_ids: Sequence[int]) -> None:
    c.execute(
        "UPDATE queue_rcpts SET lease_owner = NULL, lease_until = NULL"
        " WHERE lease_owner = ? AND id IN (SELECT value FROM json_each(?))",
        (owner, _ids(rcpt_ids)),
    )


def _require_entry(c: Conn, queue_id: int) -> None:
    if scalar(c, "SELECT 1 FROM queue WHERE id = ?", (queue_id,)) is None:
        raise NotFound(f"no such queue entry: {queue_id}")


def entries(c: Conn, where: str, params: Sequence[Any]) -> list[QueueEntry]:
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


def flush(c: Conn, domain: str | None, now: datetime) -> int:
    sql = "UPDATE queue_rcpts SET next_attempt = ? WHERE state = 'queued' AND held = 0"
    if domain is None:
        return c.execute(sql, (cm.to_us(now),)).rowcount
    return c.execute(sql + " AND domain = ?", (cm.to_us(now), domain.lower())).rowcount


def retry(c: Conn, queue_id: int, now: datetime) -> int:
    _require_entry(c, queue_id)
    return c.execute(
        "UPDATE queue_rcpts SET next_attempt = ? WHERE queue_id = ? AND state = 'queued'",
        (cm.to_us(now), queue_id),
    ).rowcount


def delete_entry(c: Conn, queue_id: int) -> None:
    if c.execute("DELETE FROM queue WHERE id = ?", (queue_id,)).rowcount == 0:
        raise NotFound(f"no such queue entry: {queue_id}")


def bounce_entry(c: Conn, queue_id: int, now: datetime) -> int:
    _require_entry(c, queue_id)
    return c.execute(
        "UPDATE queue_rcpts SET give_up = 1, held = 0, next_attempt = ?"
        " WHERE queue_id = ? AND state = 'queued'",
        (cm.to_us(now), queue_id),
    ).rowcount


def add_relay(c: Conn, domain: str, owner: str) -> RelayDomain:
    _user_id(c, owner)
    if scalar(c, "SELECT 1 FROM domains WHERE name = ?", (domain,)) is not None:
        raise Conflict(f"domain is hosted here: {domain}")
    if scalar(c, "SELECT 1 FROM relay_domains WHERE domain = ?", (domain,)) is not None:
        raise Conflict(f"already a relay domain: {domain}")
    c.execute("INSERT INTO relay_domains (domain, owner) VALUES (?, ?)", (domain, owner))
    c.execute(
        "UPDATE queue_rcpts SET held = 1 WHERE domain = ? AND state = 'queued' AND give_up = 0",
        (domain,),
    )
    return RelayDomain(domain=domain, owner=owner)


def remove_relay(c: Conn, domain: str) -> None:
    if c.execute("DELETE FROM relay_domains WHERE domain = ?", (domain,)).rowcount == 0:
        raise NotFound(f"no such relay domain: {domain}")
    c.execute("UPDATE queue_rcpts SET held = 0 WHERE domain = ? AND state = 'queued'", (domain,))


def stats(c: Conn) -> Stats:
    def count(sql: str) -> int:
        return int(scalar(c, sql) or 0)

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
