"""Engine-independent helpers shared by `store/sqlite.py` and `store/postgres.py`.

What lives here: store URL parsing, UTC time conversion, migration file loading, row -> record
converters (rows are `sqlite3.Row` or `asyncpg.Record`; both are indexed by column name), the
Return-Path rule and claim grouping. Imports stdlib, `pochta.errors` and `pochta.store.api` only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from pochta.errors import ConfigError
from pochta.store.api import (
    INBOX,
    Alias,
    Claim,
    Domain,
    MailboxInfo,
    MessageInfo,
    Outcome,
    OutcomeKind,
    QueueEntry,
    QueueRecipient,
    RcptState,
    RelayDomain,
    ScramCredentials,
    User,
    normalize_address,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_MIGRATION = re.compile(r"(\d{4})_[A-Za-z0-9_]+\.sql")


class Row(Protocol):
    """A database row addressed by column name (`sqlite3.Row`, `asyncpg.Record`)."""

    def __getitem__(self, key: str, /) -> Any: ...


# -- URLs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SqliteUrl:
    path: str


@dataclass(frozen=True)
class PostgresUrl:
    dsn: str  # the URL without pochta's own options
    schema: str | None
    pool_min: int
    pool_max: int


def parse_store_url(url: str) -> SqliteUrl | PostgresUrl:
    """`sqlite:///rel/path.db`, `sqlite:////abs/path.db`, `postgresql://...?schema=s&pool_max=n`."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ConfigError(f"store URL without a scheme: {url!r}")
    if scheme == "sqlite":
        path = unquote(rest.split("?", 1)[0])
        if not path.startswith("/") or path == "/":
            raise ConfigError(f"sqlite URL needs a path (sqlite:///file.db): {url!r}")
        return SqliteUrl(path=path[1:])  # "/rel" -> "rel", "//abs" -> "/abs"
    if scheme in ("postgresql", "postgres"):
        return _parse_postgres(url)
    raise ConfigError(f"unknown store URL scheme {scheme!r} (use sqlite:// or postgresql://)")


def _parse_postgres(url: str) -> PostgresUrl:
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    ours = {k: v[-1] for k, v in query.items() if k in ("schema", "pool_min", "pool_max")}
    rest = "&".join(f"{k}={x}" for k, v in query.items() if k not in ours for x in v)
    dsn = parts._replace(query=rest).geturl()
    schema = ours.get("schema") or None
    if schema is not None and not _IDENT.fullmatch(schema):
        raise ConfigError(f"invalid PostgreSQL schema name {schema!r}")
    try:
        pool_min = int(ours.get("pool_min", "1"))
        pool_max = int(ours.get("pool_max", "10"))
    except ValueError as exc:
        raise ConfigError(f"pool_min/pool_max must be integers in {url!r}") from exc
    if not 0 <= pool_min <= pool_max or pool_max < 1:
        raise ConfigError(f"need 0 <= pool_min <= pool_max and pool_max >= 1 in {url!r}")
    return PostgresUrl(dsn=dsn, schema=schema, pool_min=pool_min, pool_max=pool_max)


# -- time ---------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; naive values are taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime) -> int:
    """SQLite stores timestamps as integer microseconds since the epoch (exact, sortable)."""
    delta = as_utc(value) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def as_datetime(value: object) -> datetime:
    """A stored timestamp (SQLite int microseconds or PostgreSQL timestamptz) as aware UTC."""
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, int):
        seconds, micros = divmod(value, 1_000_000)
        return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    raise TypeError(f"not a timestamp: {value!r}")


def maybe_datetime(value: object) -> datetime | None:
    return None if value is None else as_datetime(value)


def new_uidvalidity(highest: int | None) -> int:
    """RFC 3501 §2.3.1.1: UIDVALIDITY must grow when a mailbox name is reused; seconds since the
    epoch, bumped past the highest value in use, kept within 32 bits."""
    value = max(int(time.time()), (highest or 0) + 1)
    return value if value < 2**32 else 1


# -- migrations ---------------------------------------------------------------------------------


def load_migrations(engine: str) -> list[tuple[int, str, str]]:
    """(version, file name, SQL) for `migrations/<engine>/NNNN_name.sql`, in version order."""
    folder = resources.files("pochta.store").joinpath("migrations").joinpath(engine)
    found: list[tuple[int, str, str]] = []
    for entry in folder.iterdir():
        match = _MIGRATION.fullmatch(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"duplicate migration numbers in migrations/{engine}")
    return found


# -- addresses and names ------------------------------------------------------------------------


def folder_name(folder: str) -> str:
    """RFC 3501 §5.1: the name INBOX is case-insensitive; other names are kept as given."""
    return INBOX if folder.upper() == INBOX else folder


def unique_addresses(addresses: Iterable[str]) -> list[str]:
    """Normalised addresses without duplicates, first occurrence order."""
    seen: dict[str, None] = {}
    for address in addresses:
        seen.setdefault(normalize_address(address), None)
    return list(seen)


def return_path_header(return_path: str | None) -> bytes:
    """RFC 5321 §4.4: the Return-Path trace line added at final delivery."""
    if return_path is None:
        return b""
    return b"Return-Path: <" + return_path.encode("utf-8") + b">\r\n"


# -- converters ---------------------------------------------------------------------------------


def domain_from(row: Row) -> Domain:
    return Domain(name=row["name"], created_at=as_datetime(row["created_at"]))


def user_from(row: Row) -> User:
    scram = None
    if row["scram_salt"] is not None:
        scram = ScramCredentials(
            salt=bytes(row["scram_salt"]),
            iterations=int(row["scram_iterations"]),
            stored_key=bytes(row["scram_stored_key"]),
            server_key=bytes(row["scram_server_key"]),
        )
    return User(
        id=int(row["id"]),
        address=row["address"],
        domain=row["domain"],
        password_hash=row["password_hash"],
        scram=scram,
        created_at=as_datetime(row["created_at"]),
    )


def scram_params(scram: ScramCredentials | None) -> tuple[Any, Any, Any, Any]:
    if scram is None:
        return (None, None, None, None)
    return (scram.salt, scram.iterations, scram.stored_key, scram.server_key)


def alias_from(row: Row) -> Alias:
    return Alias(alias=row["alias"], address=row["address"])


def relay_from(row: Row) -> RelayDomain:
    return RelayDomain(domain=row["domain"], owner=row["owner"])


def message_from(row: Row) -> MessageInfo:
    """Needs columns id, address, folder, uid, from_, to_, subject, date, message_id, size,
    return_path, received_at, flags."""
    return MessageInfo(
        id=int(row["id"]),
        address=row["address"],
        folder=row["folder"],
        uid=int(row["uid"]),
        from_=row["from_"],
        to=row["to_"],
        subject=row["subject"],
        date=row["date"],
        message_id=row["message_id"],
        size=int(row["size"]) + len(return_path_header(row["return_path"])),
        received_at=as_datetime(row["received_at"]),
        flags=tuple(row["flags"].split()),
    )


def rcpt_from(row: Row) -> QueueRecipient:
    return QueueRecipient(
        id=int(row["id"]),
        queue_id=int(row["queue_id"]),
        address=row["address"],
        state=RcptState(row["state"]),
        attempts=int(row["attempts"]),
        next_attempt=maybe_datetime(row["next_attempt"]),
        last_reply=row["last_reply"],
        held=bool(row["held"]),
        warned=bool(row["warned"]),
        give_up=bool(row["give_up"]),
    )


def entry_from(row: Row, rcpts: Sequence[QueueRecipient]) -> QueueEntry:
    """`row` has id, sender, created_at, size."""
    return QueueEntry(
        id=int(row["id"]),
        sender=row["sender"],
        created_at=as_datetime(row["created_at"]),
        size=int(row["size"]),
        recipients=tuple(r for r in rcpts if r.queue_id == int(row["id"])),
    )


def group_claims(
    rcpt_rows: Sequence[Row], entries: dict[int, tuple[str, datetime, bytes]]
) -> list[Claim]:
    """Claims per (queue entry, domain) in first-seen order; `entries` maps queue id to
    (sender, created_at, body)."""
    groups: dict[tuple[int, str], list[QueueRecipient]] = {}
    for row in rcpt_rows:
        groups.setdefault((int(row["queue_id"]), row["domain"]), []).append(rcpt_from(row))
    claims = []
    for (queue_id, domain), rcpts in groups.items():
        sender, created_at, body = entries[queue_id]
        claims.append(
            Claim(
                queue_id=queue_id,
                sender=sender,
                created_at=created_at,
                domain=domain,
                body=body,
                recipients=tuple(rcpts),
            )
        )
    return claims


# -- SQL shared by both engines (no placeholders) -------------------------------------------------

MESSAGE_SELECT = """
SELECT m.id, u.address, b.name AS folder, m.uid, m.from_, m.to_, m.subject, m.date,
       m.message_id, bo.size, m.return_path, m.received_at, m.flags
FROM messages m
JOIN mailboxes b ON b.id = m.mailbox_id
JOIN users u ON u.id = b.user_id
JOIN bodies bo ON bo.id = m.body_id
"""

MAILBOX_SELECT = """
SELECT b.id, u.address, b.name, b.uidvalidity, b.uidnext, b.highestmodseq,
       (SELECT COUNT(*) FROM messages m WHERE m.mailbox_id = b.id) AS messages
FROM mailboxes b JOIN users u ON u.id = b.user_id
"""

ALIAS_SELECT = "SELECT a.alias, u.address FROM aliases a JOIN users u ON u.id = a.user_id"
# resolve(): a user's own address, else the owner of an alias, in one statement ({p} = placeholder)
RESOLVE_SQL = (
    "SELECT address FROM users WHERE address = {p} UNION ALL"
    " SELECT u.address FROM aliases a JOIN users u ON u.id = a.user_id WHERE a.alias = {p}"
    " LIMIT 1"
)

QUEUE_SELECT = """
SELECT q.id, q.sender, q.created_at, bo.size
FROM queue q JOIN bodies bo ON bo.id = q.body_id
"""

# the worker's sleep hint: a leased recipient is due again when its lease runs out
NEXT_DUE_SELECT = """
SELECT MIN(CASE WHEN lease_until IS NOT NULL AND lease_until > next_attempt
                THEN lease_until ELSE next_attempt END)
FROM queue_rcpts WHERE state = 'queued' AND held = {false}
"""


def mailbox_from(row: Row) -> MailboxInfo:
    return MailboxInfo(
        id=int(row["id"]),
        address=row["address"],
        name=row["name"],
        uidvalidity=int(row["uidvalidity"]),
        uidnext=int(row["uidnext"]),
        highestmodseq=int(row["highestmodseq"]),
        messages=int(row["messages"]),
    )


def outcome_state(kind: OutcomeKind) -> str:
    return {
        OutcomeKind.DELIVERED: RcptState.DELIVERED,
        OutcomeKind.TRANSIENT: RcptState.QUEUED,
        OutcomeKind.PERMANENT: RcptState.FAILED,
    }[kind].value


def outcome_next_attempt(outcome: Outcome, now: datetime) -> datetime | None:
    """A transient failure waits until the given time (now if none); final states have none."""
    if outcome.kind is OutcomeKind.TRANSIENT:
        return as_utc(outcome.next_attempt) if outcome.next_attempt is not None else now
    return None


def is_postmaster(address: str) -> bool:
    return address.partition("@")[0] == "postmaster"
