"""The mail store interface: records and the `MailStore` Protocol. Imports stdlib and `errors` only.

Every read and write of mail state goes through this interface; `store/sqlite.py` and
`store/postgres.py` implement it and pass the same contract suite (`pochta.testing.storecheck`).

Rules every engine keeps:
- One method is one transaction. `deliver()` and `record_outcomes()` return only after their
  transaction is durably committed (fsync'd); the server sends 250 after `deliver()` returns.
  Engines may group several callers' transactions into one commit (group commit).
- Addresses are stored and compared in lowercase ASCII-case-folded form (`normalize_address`).
- A letter's body is stored once; every mailbox copy and the queue entry reference it.
- Mailboxes carry IMAP state from the first schema: UIDVALIDITY, per-mailbox UIDs never reused,
  flags, and a modification sequence (RFC 7162) bumped on every change.
- `postmaster@DOMAIN` exists for every hosted domain (RFC 5321 §4.5.1): `add_domain` creates it as a
  user that cannot log in (empty password hash) unless one is set later with `set_password`.
- Driver exceptions never leave an engine: busy/locked/lost connection -> `StoreUnavailable`,
  missing objects -> `NotFound`, duplicates and broken invariants -> `Conflict`.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, Protocol

from pochta.value import Value

INBOX = "INBOX"
SENT = "Sent"
DEFAULT_FOLDERS = (INBOX, SENT)


def normalize_address(address: str) -> str:
    """The stored form of an address: lowercase, without surrounding blanks and brackets."""
    return address.strip().strip("<>").lower()


def domain_of(address: str) -> str:
    """The domain part of `local@domain` (lowercase); "" when there is none."""
    _, _, domain = address.rpartition("@")
    return domain.lower()


def postmaster_domains(domains: Sequence[str], hostname: str) -> list[str]:
    """Hosted domains in the order their postmaster stands for this host (RFC 5321 §4.5.1):
    the domain of our hostname first (a suffix match), then every hosted domain in order."""
    name = hostname.lower()
    return [d for d in domains if name == d or name.endswith("." + d)] + list(domains)


@dataclass(frozen=True)
class Domain:
    name: str
    created_at: datetime


@dataclass(frozen=True)
class ScramCredentials:
    """SCRAM-SHA-256 verifiers (RFC 5802 §3, RFC 7677); never the password itself."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


@dataclass(frozen=True)
class User:
    id: int
    address: str
    domain: str
    password_hash: str  # argon2id encoded hash; "" means the account cannot log in
    scram: ScramCredentials | None
    created_at: datetime


@dataclass(frozen=True)
class Alias:
    alias: str  # an address in a hosted domain
    address: str  # the user it belongs to (delivers to and may send as)


@dataclass(frozen=True)
class RelayDomain:
    """A domain whose mail this node accepts and holds for a customer (ETRN/ATRN/TURN)."""

    domain: str
    owner: str  # the user address allowed to take the domain's mail


class Summary(Value):
    """Headers parsed for listing; values are decoded text ("" when the header is absent)."""

    __match_args__ = ("from_", "to", "subject", "date", "message_id")

    def __init__(
        self, from_: str = "", to: str = "", subject: str = "", date: str = "", message_id: str = ""
    ) -> None:
        self.from_: Final = from_
        self.to: Final = to
        self.subject: Final = subject
        self.date: Final = date
        self.message_id: Final = message_id


class Target(Value):
    """One mailbox copy of a letter: `address` is the owning user's (canonical, not an alias).

    `return_path` is the envelope sender recorded at final delivery (RFC 5321 §4.4): when not
    None, `get_message()` returns the body with `Return-Path: <return_path>` prepended. Sent
    copies use None.
    """

    __match_args__ = ("address", "folder", "return_path")

    def __init__(self, address: str, folder: str = INBOX, return_path: str | None = None) -> None:
        self.address: Final = address
        self.folder: Final = folder
        self.return_path: Final = return_path


Body = bytes | tuple[bytes, ...]
"""A letter's bytes, whole or as consecutive parts (so a large letter is never copied into one
object just to be stored: engines that can write parts do so)."""


def body_parts(body: Body) -> tuple[bytes, ...]:
    return (body,) if isinstance(body, bytes) else body


def body_bytes(body: Body) -> bytes:
    return body if isinstance(body, bytes) else b"".join(body)


class Letter(Value):
    """Everything `deliver()` stores in one transaction: `body`, the bytes as received with our
    Received: header already prepended; `sender`, the envelope return path ("" is the null
    path <>); `targets`, the local mailbox copies; `outbound`, the remote recipient addresses to
    queue for delivery."""

    __match_args__ = ("body", "sender", "summary", "targets", "outbound")

    def __init__(
        self,
        body: Body,
        sender: str,
        summary: Summary,
        targets: Sequence[Target] = (),
        outbound: Sequence[str] = (),
    ) -> None:
        self.body: Final = body
        self.sender: Final = sender
        self.summary: Final = summary
        self.targets: Final = targets
        self.outbound: Final = outbound


class Accepted(Value):
    """What `deliver()` stored: `message_ids`, one per target in the same order; `queue_id`,
    None when nothing was queued."""

    __match_args__ = ("message_ids", "queue_id")

    def __init__(self, message_ids: tuple[int, ...], queue_id: int | None) -> None:
        self.message_ids: Final = message_ids
        self.queue_id: Final = queue_id


@dataclass(frozen=True)
class MailboxInfo:
    id: int
    address: str
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    messages: int


@dataclass(frozen=True)
class MessageInfo:
    id: int
    address: str  # owner
    folder: str
    uid: int
    from_: str
    to: str
    subject: str
    date: str
    message_id: str
    size: int  # octets of the message as `get_message()` returns it
    received_at: datetime
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredMessage:
    info: MessageInfo
    raw: bytes


class RcptState(enum.StrEnum):
    QUEUED = "queued"  # waiting for (another) attempt
    DELIVERED = "delivered"
    FAILED = "failed"  # failed for good; a bounce was generated in the same transaction (if any)


@dataclass(frozen=True)
class QueueRecipient:
    id: int
    queue_id: int
    address: str
    state: RcptState
    attempts: int
    next_attempt: datetime | None
    last_reply: str
    held: bool = False  # in a relay domain: waits for ETRN/ATRN/TURN instead of MX delivery
    warned: bool = False  # a "delayed" DSN was sent
    give_up: bool = False  # an administrator asked for a bounce (`pochta queue bounce`)


@dataclass(frozen=True)
class QueueEntry:
    id: int
    sender: str
    created_at: datetime
    size: int
    recipients: tuple[QueueRecipient, ...]


@dataclass(frozen=True)
class Claim:
    """Recipients of one queue entry, all in one domain, leased to one worker."""

    queue_id: int
    sender: str
    created_at: datetime
    domain: str
    body: bytes
    recipients: tuple[QueueRecipient, ...]


class OutcomeKind(enum.StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt for one claimed recipient.

    TRANSIENT: attempts += 1, state stays QUEUED, `next_attempt` is set, the lease is released.
    PERMANENT: state becomes FAILED. DELIVERED: state becomes DELIVERED.
    `warned=True` records that a delayed-delivery DSN went out with this outcome.
    """

    rcpt_id: int
    kind: OutcomeKind
    reply: str
    next_attempt: datetime | None = None
    warned: bool = False


@dataclass(frozen=True)
class Stats:
    domains: int
    users: int
    messages: int
    queued: int
    extra: dict[str, int] = field(default_factory=dict)


class MailStore(Protocol):
    """The store. Engines: `SqliteStore` (embedded default), `PostgresStore` (several nodes)."""

    # -- life cycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect, create the schema or run pending numbered migrations."""

    async def close(self) -> None:
        """Finish pending commits and release connections."""

    async def schema_version(self) -> int: ...

    # -- domains ------------------------------------------------------------------------------
    async def add_domain(self, name: str) -> Domain:
        """Host a domain (Conflict if hosted); creates postmaster@name."""

    async def remove_domain(self, name: str) -> None:
        """Stop hosting (NotFound); removes its users, aliases and their mail."""

    async def list_domains(self) -> list[Domain]: ...

    async def hosts_domain(self, name: str) -> bool: ...

    # -- users and aliases --------------------------------------------------------------------
    async def add_user(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> User:
        """Create a user and its INBOX and Sent (NotFound if the domain is not hosted,
        Conflict if the address is taken by a user or an alias)."""

    async def set_password(
        self, address: str, password_hash: str, scram: ScramCredentials | None = None
    ) -> None: ...

    async def remove_user(self, address: str) -> None:
        """Remove a user, its aliases and mailboxes (NotFound)."""

    async def list_users(self, domain: str | None = None) -> list[User]: ...

    async def get_user(self, address: str) -> User | None: ...

    async def add_alias(self, alias: str, address: str) -> Alias: ...

    async def remove_alias(self, alias: str) -> None: ...

    async def list_aliases(self, address: str | None = None) -> list[Alias]: ...

    async def resolve(self, address: str) -> str | None:
        """The user address that mail for `address` goes to (a user, or an alias's owner); None if
        no such recipient exists in a hosted domain."""

    def resolve_now(self, address: str) -> tuple[bool, str | None]:
        """`resolve()` answered on the spot when the engine can do so without waiting (an
        indexed read on the calling thread): (True, owner or None). (False, None) when it
        cannot: then `await resolve()`. Spares the SMTP server a task per RCPT."""

    # -- mail ---------------------------------------------------------------------------------
    def deliver(self, letter: Letter) -> Awaitable[Accepted]:
        """Store the body once, a copy per target, queue `outbound`; one durable transaction.
        A target whose user does not exist raises NotFound and nothing is stored. (An awaitable
        rather than a coroutine function: the SQLite engine hands back its write's future.)"""

    async def list_mailboxes(self, address: str) -> list[MailboxInfo]: ...

    async def list_messages(self, address: str, folder: str = INBOX) -> list[MessageInfo]:
        """Messages of one mailbox in UID order (NotFound if user or mailbox does not exist)."""

    async def get_message(self, message_id: int) -> StoredMessage:
        """One message with its raw bytes (Return-Path prepended when recorded) (NotFound)."""

    async def delete_message(self, message_id: int) -> None:
        """Expunge one message; its UID is never reused; bumps the mailbox modseq (NotFound)."""

    # -- the outbound queue -------------------------------------------------------------------
    async def claim(
        self,
        owner: str,
        now: datetime,
        lease: timedelta,
        limit: int = 100,
        *,
        domains: Sequence[str] | None = None,
    ) -> list[Claim]:
        """Lease queued recipients to `owner` until now+lease and return them grouped per
        (queue entry, domain).

        Without `domains`: recipients that are due (next_attempt <= now), not held, and not
        leased by anyone else (or whose lease expired). With `domains`: every queued recipient in
        those domains, held or not, due or not (ETRN, ATRN, TURN). At most `limit` recipients.
        On PostgreSQL this is `FOR UPDATE SKIP LOCKED`; on SQLite one `BEGIN IMMEDIATE`.
        """

    async def record_outcomes(
        self, owner: str, outcomes: Sequence[Outcome], notice: Letter | None = None
    ) -> None:
        """Apply outcomes of recipients leased to `owner` and release their leases; in the same
        transaction store/queue `notice` (a bounce or delay DSN), so a crash never loses or
        doubles it. Outcomes for recipients no longer leased to `owner` are ignored."""

    async def release(self, owner: str, rcpt_ids: Sequence[int]) -> None:
        """Give back leases without recording an attempt (shutdown, dropped ATRN session)."""

    async def count_queued(self, domains: Sequence[str] | None = None) -> int:
        """Queued (not yet delivered or failed) recipients, optionally only in `domains`."""

    async def next_due(self) -> datetime | None:
        """The earliest next_attempt of a queued, non-held recipient (the worker's sleep hint)."""

    async def list_queue(self) -> list[QueueEntry]:
        """Entries that still have queued recipients, oldest first."""

    async def get_queue_entry(self, queue_id: int) -> QueueEntry: ...

    async def get_queue_body(self, queue_id: int) -> bytes: ...

    async def flush(self, domain: str | None = None) -> int:
        """Make queued, non-held recipients (in `domain`, if given) due now; returns how many."""

    async def retry(self, queue_id: int) -> int:
        """Make one entry's queued recipients due now (NotFound)."""

    async def delete_queue_entry(self, queue_id: int) -> None:
        """Drop an entry and its recipients without a bounce (NotFound)."""

    async def bounce_queue_entry(self, queue_id: int) -> int:
        """Mark an entry's queued recipients give_up and due now: the next worker pass fails them
        permanently and bounces (NotFound)."""

    # -- relay customers (ETRN/ATRN/TURN) ------------------------------------------------------
    async def add_relay_domain(self, domain: str, owner: str) -> RelayDomain:
        """Hold mail for `domain` for user `owner` (NotFound if owner is no user; Conflict if the
        domain is hosted or already a relay domain). Queued recipients in it become held."""

    async def remove_relay_domain(self, domain: str) -> None:
        """Stop holding (NotFound); its queued recipients are released to MX delivery."""

    async def list_relay_domains(self, owner: str | None = None) -> list[RelayDomain]: ...

    async def stats(self) -> Stats: ...
