"""Server-role policy: turns the core's events into replies. Never touches a socket.
Imports `smtp`, `store.api`, `auth`, `message`, `log` and `errors`.

One `Session` per connection. The listener kind decides the policy:
- `mx` (port 25): anyone may send to hosted domains and held relay domains; no AUTH; no relay.
- `submission` (587, STARTTLS) and `submissions` (465, implicit TLS): AUTH is mandatory
  (RFC 6409 §4.3), the sender must be the user or one of the user's aliases, any destination.
- `odmr` (366): AUTH then ATRN (RFC 2645); see `server/relay.py`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, cast

from mypy_extensions import mypyc_attr

from pochta import log as maillog
from pochta import smtp
from pochta.auth import sasl
from pochta.auth.throttle import FailureThrottle, auth_failure_log_line
from pochta.errors import StoreError, StoreUnavailable
from pochta.message import headers, ids, received
from pochta.smtp import Reply
from pochta.smtp import replies as R
from pochta.store.api import (
    INBOX,
    SENT,
    Letter,
    MailStore,
    Target,
    User,
    domain_of,
    normalize_address,
    postmaster_domains,
)

log = logging.getLogger(__name__)

MX, SUBMISSION, SUBMISSIONS, ODMR = "mx", "submission", "submissions", "odmr"

# Replies of the policy (RFC 5321 §4.2.3, RFC 3463, RFC 4954 §6, RFC 6409)
USER_UNKNOWN = Reply(550, "5.1.1", "No such user here")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_UNAVAILABLE = Reply(502, "5.5.1", "AUTH not available on this port")
AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_BLOCKED = Reply(421, "4.7.0", "Too many failed authentications, closing")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
NOT_YOUR_ADDRESS = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
RATE_LIMITED = Reply(451, "4.7.1", "Sending rate limit exceeded, try again later")
STORE_BUSY = Reply(451, "4.3.0", "Temporary local problem, try again later")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
EXPN_DISABLED = Reply(502, "5.5.1", "EXPN not available")
TURN_DISABLED = Reply(502, "5.5.1", "TURN not available")
HELP = Reply(
    214,
    "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\n"
    "STARTTLS AUTH ETRN ATRN TURN\nSee RFC 5321",
)


class RateLimiter:
    """Per-user sliding hour of messages and recipients (submission only)."""

    def __init__(self, messages: int, recipients: int) -> None:
        self.messages = messages
        self.recipients = recipients
        self._log: dict[str, list[tuple[float, int]]] = {}

    def allow(self, user: str, rcpts: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        entries = [e for e in self._log.get(user, []) if now - e[0] < 3600]
        sent_rcpts = sum(n for _, n in entries)
        if len(entries) + 1 > self.messages or sent_rcpts + rcpts > self.recipients:
            self._log[user] = entries
            return False
        entries.append((now, rcpts))
        self._log[user] = entries
        return True


class RelayHooks(Protocol):
    """What TURN/ETRN/ATRN need from the node (implemented in `server/relay.py`)."""

    async def etrn(self, session: Session, argument: str) -> Reply: ...
    async def atrn(self, session: Session, domains: tuple[str, ...]) -> Reply: ...
    async def turn(self, session: Session) -> Reply: ...


@dataclass
class ServerContext:
    """What every session of a node shares (built by `app.py`)."""

    store: MailStore
    hostname: str
    limits: smtp.Limits
    auth_mechanisms: tuple[str, ...] = sasl.MECHANISMS
    allow_plaintext_auth: bool = False
    throttle: FailureThrottle = field(default_factory=FailureThrottle)
    rates: RateLimiter = field(default_factory=lambda: RateLimiter(1000, 5000))
    scram_secret: bytes | None = None
    tls_available: bool = False
    max_errors: int = 10
    wake_queue: Callable[[], None] = lambda: None
    relay: RelayHooks | None = None
    turn_enabled: bool = False
    etrn_enabled: bool = True
    delivered: int = 0  # letters accepted since start (for logs and benchmarks)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep


class Transaction:
    """One mail transaction: MAIL, its recipients (`targets`: user address -> as given in RCPT;
    `outbound`: remote addresses) and the body as it arrived."""

    def __init__(self, mail: smtp.MailFrom) -> None:
        self.mail = mail
        self.targets: dict[str, str] = {}
        self.outbound: list[str] = []
        self.chunks: list[bytes] = []


@mypyc_attr(allow_interpreted_subclasses=True)
class Session:
    """The policy of one server connection. A subclass (given to `SmtpServer` as
    `session_class`) may change it, compiled or not (scripts/build_native.py)."""

    def __init__(
        self, ctx: ServerContext, kind: str, peer_ip: str, conn_id: str, *, tls: str | None
    ) -> None:
        self.ctx = ctx
        self.kind = kind
        self.peer_ip = peer_ip
        self.conn_id = conn_id
        self.tls = tls
        self.helo = ""
        self.esmtp = False
        self.user: User | None = None
        self.tx: Transaction | None = None
        self.errors = 0
        self._sasl: sasl.SaslServer | None = None
        self._sasl_done: User | None = None
        self._on_close: list[Callable[[], None]] = []

    # -- the listener's view ------------------------------------------------------------------
    @property
    def submission(self) -> bool:
        return self.kind in (SUBMISSION, SUBMISSIONS, ODMR)

    def greeting(self) -> Reply:
        return _kept(f"{self.ctx.hostname} ESMTP pochta", 220)

    def extensions(self) -> frozenset[str]:
        """Extensions the core enforces for this listener (they match the EHLO keywords): AUTH
        (RFC 4954) only on the listeners that can offer it."""
        return smtp.ALL_EXTENSIONS | {"AUTH"} if self.submission else smtp.ALL_EXTENSIONS

    def auth_offered(self) -> bool:
        """EHLO lists AUTH: a submission listener, over TLS unless plaintext AUTH is allowed."""
        return self.submission and (self.tls is not None or self.ctx.allow_plaintext_auth)

    def tls_started(self, description: str | None) -> None:
        """After STARTTLS: forget everything from before (RFC 3207 §4.2)."""
        self.tls = description
        self.helo = ""
        self.tx = None

    def body_chunk(self, data: bytes) -> None:
        if self.tx is not None:
            self.tx.chunks.append(data)

    def protocol_error(self, conn: smtp.Connection) -> None:
        """A RemoteProtocolError was answered; drop a transaction the core has ended."""
        self.errors += 1
        if conn.state in (smtp.State.READY, smtp.State.INIT):
            self.tx = None

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback` when the connection ends (the listener calls `closed()`)."""
        self._on_close.append(callback)

    def closed(self) -> None:
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("conn=%s close hook failed", self.conn_id)

    # -- commands -----------------------------------------------------------------------------
    def respond(self, conn: smtp.Connection, event: smtp.Command) -> Reply | None:
        """The reply to a command that needs no store and no wait, or None when it does (then
        `await handle()`). Lets the listener answer most commands without a task."""
        try:
            return self._respond(event)
        except Exception:  # a bug of ours: a clear 451 and a log entry, never a silent drop
            return self._local_error(event)

    async def handle(self, conn: smtp.Connection, event: smtp.Command) -> Reply:
        """The reply to a command `respond` left (None): it waits for the store, a password
        check or the relay. Policy and store errors become 4xx/5xx replies."""
        try:
            return await self._dispatch(conn, event)
        except StoreUnavailable:
            log.warning("conn=%s store unavailable", self.conn_id)
            return STORE_BUSY
        except Exception:  # a bug of ours: a clear 451 and a log entry, never a silent drop
            return self._local_error(event)

    def _local_error(self, event: smtp.Command) -> Reply:
        log.exception("conn=%s error handling %s", self.conn_id, type(event).__name__)
        return STORE_BUSY.with_text(f"Local error (conn {self.conn_id})")

    def _respond(self, event: smtp.Command) -> Reply | None:
        kind = type(event)  # events are final classes; the commands of a letter come first
        if kind is smtp.RcptTo:
            return self._rcpt_now(cast(smtp.RcptTo, event).path)
        if kind is smtp.EndOfData:
            return None
        if kind is smtp.MailFrom:
            return self._mail_now(cast(smtp.MailFrom, event))
        if kind is smtp.Data:
            return R.START_INPUT
        if kind is smtp.Ehlo or kind is smtp.Helo:
            return self._ehlo(cast(smtp.Ehlo | smtp.Helo, event).domain, esmtp=kind is smtp.Ehlo)
        if kind is smtp.Quit:
            return _kept(f"{self.ctx.hostname} closing connection", 221, "2.0.0")
        match event:
            case smtp.Bdat(size, last) if not last:
                return Reply(250, "2.0.0", f"{size} octets received")
            case smtp.Rset():
                self.tx = None
                return R.RESET_OK
            case smtp.Noop():
                return R.NOOP_OK
            case smtp.Vrfy():
                return R.VRFY_CANNOT  # RFC 5321 §3.5.3: 252, no user enumeration
            case smtp.Expn():
                return EXPN_DISABLED
            case smtp.Help():
                return HELP
            case smtp.StartTLS():
                return R.READY_FOR_TLS if self.ctx.tls_available else TLS_UNAVAILABLE
        return None

    def _dispatch(self, conn: smtp.Connection, event: smtp.Command) -> Awaitable[Reply]:
        """The commands that wait for the store, a password check or the relay: the coroutine
        that answers it (returned, not awaited here: one coroutine frame less per letter)."""
        match event:
            case smtp.EndOfData() | smtp.Bdat():
                return self._end_of_data(conn)
            case smtp.RcptTo(path):
                return self._rcpt(path)
            case smtp.MailFrom():
                return self._mail(event)
            case smtp.Auth(mechanism, initial):
                return self._auth_start(mechanism, initial)
            case smtp.AuthResponse():
                return self._auth_step(event)
            case smtp.Etrn(argument):
                return self._relay_call("etrn", argument)
            case smtp.Atrn(domains):
                return self._relay_call("atrn", domains)
            case smtp.Turn():
                return self._relay_call("turn", None)
        return _ready(R.NOT_IMPLEMENTED)

    def _ehlo(self, domain: str, *, esmtp: bool) -> Reply:
        self.helo, self.esmtp, self.tx = domain, esmtp, None
        if not esmtp:
            return Reply(250, "", f"{self.ctx.hostname} Hello {domain}")
        lines = [f"{self.ctx.hostname} Hello {domain}", "PIPELINING"]
        lines += [f"SIZE {self.ctx.limits.message_size}", "8BITMIME", "SMTPUTF8"]
        lines += ["CHUNKING", "BINARYMIME", "ENHANCEDSTATUSCODES"]
        if self.ctx.tls_available and self.tls is None:
            lines.append("STARTTLS")
        if self.auth_offered():
            lines.append("AUTH " + " ".join(self.ctx.auth_mechanisms))
        if self.ctx.relay is not None:
            if self.ctx.etrn_enabled and self.kind in (MX, SUBMISSION, SUBMISSIONS):
                lines.append("ETRN")
            if self.kind == ODMR:
                lines.append("ATRN")
            if self.ctx.turn_enabled and self.kind in (SUBMISSION, SUBMISSIONS):
                lines.append("TURN")
        return _kept("\n".join(lines))

    # -- the transaction ----------------------------------------------------------------------
    def _mail_now(self, event: smtp.MailFrom) -> Reply | None:
        """MAIL, unless the sender check needs the store (submission: None)."""
        if "AUTH" in event.params and not self.auth_offered():
            # RFC 4954 §5 defines AUTH= for servers that advertise AUTH; RFC 5321 §4.1.1.11:
            # a parameter of an extension not advertised is refused with 555
            return R.PARAMETER_NO_EXT
        if self.submission:
            return AUTH_REQUIRED if self.user is None else None  # RFC 6409 §4.3, RFC 4954 §6
        return self._begin(event)

    async def _mail(self, event: smtp.MailFrom) -> Reply:
        """MAIL from an authenticated user: the sender must be one of theirs (RFC 6409 §4.3)."""
        if not await self._owns(event.path.address):
            maillog.event(
                "rejected",
                conn=self.conn_id,
                ip=self.peer_ip,
                reason="sender not owned",
                sender=event.path.address,
            )
            return NOT_YOUR_ADDRESS
        return self._begin(event)

    def _begin(self, event: smtp.MailFrom) -> Reply:
        self.tx = Transaction(event)
        return R.SENDER_OK

    async def _owns(self, address: str) -> bool:
        """The authenticated user may send as its own address or an alias it owns."""
        if self.user is None or not address:
            return False
        owner = await self.ctx.store.resolve(address)
        return owner == self.user.address

    def _rcpt_now(self, path: smtp.Path) -> Reply | None:
        """RCPT for an existing user when the store can tell at once (the usual recipient);
        None when it cannot, or for anything else: then `_rcpt` decides."""
        tx = self.tx
        if tx is None or not path.domain:
            return None
        address = normalize_address(path.address)
        try:
            known, user = self.ctx.store.resolve_now(address)
        except StoreError:
            return None  # `_rcpt` asks again and answers for the store's state
        if not known or user is None:
            return None
        tx.targets.setdefault(user, address)
        return R.RECIPIENT_OK

    async def _rcpt(self, path: smtp.Path) -> Reply:
        tx = self.tx
        assert tx is not None  # the core allows RCPT only after MAIL
        store = self.ctx.store
        address = normalize_address(path.address)
        if not path.domain:  # RFC 5321 §4.1.1.3: <postmaster> means this host's postmaster
            address = await self._local_postmaster()
        # A user or alias exists only in a hosted domain (the schema cascades): one lookup for
        # the usual recipient, the domain's only for an address that is not ours.
        user = await store.resolve(address)
        if user is not None:
            tx.targets.setdefault(user, address)
            return R.RECIPIENT_OK
        domain = domain_of(address)
        if await store.hosts_domain(domain):
            maillog.event(
                "rejected", conn=self.conn_id, ip=self.peer_ip, reason="unknown user", rcpt=address
            )
            return USER_UNKNOWN
        if self.user is not None or await self._held(domain):
            if address not in tx.outbound:
                tx.outbound.append(address)
            return R.RECIPIENT_OK
        maillog.event(
            "rejected", conn=self.conn_id, ip=self.peer_ip, reason="relay denied", rcpt=address
        )
        return RELAY_DENIED

    async def _held(self, domain: str) -> bool:
        return any(r.domain == domain for r in await self.ctx.store.list_relay_domains())

    async def _local_postmaster(self) -> str:
        domains = [d.name for d in await self.ctx.store.list_domains()]
        ordered = postmaster_domains(domains, self.ctx.hostname)
        return f"postmaster@{ordered[0]}" if ordered else "postmaster"

    async def _end_of_data(self, conn: smtp.Connection) -> Reply:
        tx, self.tx = self.tx, None
        assert tx is not None
        # The body stays in the pieces it arrived in (never joined here: a 50 MiB letter costs
        # 50 MiB); only the header block is looked at.
        head = _header_block(tx.chunks)
        sender = tx.mail.path.address
        extra = b""
        if self.user is not None and self.submission:
            refusal = await self._check_submitted(head, tx)
            if refusal is not None:
                return refusal
            extra = self._missing_headers(head, sender)
        queue_id = ids.make_queue_id()
        body = (self._trace_header(tx, queue_id, conn) + extra, *tx.chunks)
        tx.chunks.clear()
        targets = [Target(u, INBOX, return_path=sender) for u in tx.targets]
        if self.user is not None and self.submission:
            targets.append(Target(self.user.address, SENT))
        summary = headers.parse_summary(extra + head)
        letter = Letter(body, sender, summary, targets, tx.outbound)
        accepted = await self.ctx.store.deliver(letter)  # durable before the 250
        self.ctx.delivered += 1
        if accepted.queue_id is not None:
            self.ctx.wake_queue()
        maillog.event(
            "accepted",
            conn=self.conn_id,
            ip=self.peer_ip,
            id=queue_id,
            sender=sender or "<>",
            rcpts=len(tx.targets) + len(tx.outbound),
            size=sum(map(len, body)),
            queue=accepted.queue_id or "-",
        )
        return Reply(250, "2.0.0", f"OK queued as {queue_id}")

    async def _check_submitted(self, raw: bytes, tx: Transaction) -> Reply | None:
        assert self.user is not None
        for address in headers.from_addresses(raw):  # RFC 6409 §8.1 sender checks
            if not await self._owns(address):
                return NOT_YOUR_ADDRESS.with_text("From: header not owned by authenticated user")
        for address in _sender_addresses(raw):  # RFC 5322 §3.6.2 Sender: is checked like From:
            if not await self._owns(address):
                return NOT_YOUR_ADDRESS.with_text("Sender: header not owned by authenticated user")
        if not self.ctx.rates.allow(self.user.address, len(tx.targets) + len(tx.outbound)):
            maillog.event("ratelimited", conn=self.conn_id, user=self.user.address)
            return RATE_LIMITED
        return None

    def _missing_headers(self, raw: bytes, sender: str) -> bytes:
        """RFC 6409 §8.1-8.3: the From: (the envelope sender, which the user owns), Message-ID
        and Date fields to add when the client did not (RFC 5322 §3.6 requires From: and
        Date:)."""
        extra = b""
        if not headers.has_header(raw, "From"):
            extra += f"From: <{sender}>\r\n".encode()
        if not headers.has_header(raw, "Message-ID"):
            extra += f"Message-ID: {ids.make_message_id(self.ctx.hostname)}\r\n".encode()
        if not headers.has_header(raw, "Date"):
            extra += f"Date: {ids.format_date(datetime.now(UTC))}\r\n".encode()
        return extra

    def _trace_header(self, tx: Transaction, queue_id: str, conn: smtp.Connection) -> bytes:
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if tx.mail.smtputf8:
            protocol = "UTF8SMTP"  # RFC 6531 §3.7.3
        if self.tls is not None:
            protocol += "S"
        if self.user is not None:
            protocol += "A"  # RFC 3848
        rcpts = list(tx.targets.values()) + tx.outbound
        return received.received_header(
            from_helo=self.helo,
            peer_ip=self.peer_ip,
            peer_host=None,
            by_host=self.ctx.hostname,
            protocol=protocol,
            queue_id=queue_id,
            recipient=rcpts[0] if len(rcpts) == 1 else None,
            tls=self.tls,
        )

    # -- AUTH (RFC 4954) ----------------------------------------------------------------------
    async def _auth_start(self, mechanism: str, initial: bytes | None) -> Reply:
        if not self.submission:
            return AUTH_UNAVAILABLE
        if self.tls is None and not self.ctx.allow_plaintext_auth:
            return ENCRYPTION_REQUIRED  # RFC 4954 §4, RFC 8314
        if self.ctx.throttle.blocked(self.peer_ip):
            return AUTH_BLOCKED
        if mechanism not in self.ctx.auth_mechanisms:
            return UNKNOWN_MECHANISM
        try:
            self._sasl = sasl.start(
                mechanism, self.ctx.store.get_user, secret=self.ctx.scram_secret
            )
        except sasl.UnknownMechanism:
            return UNKNOWN_MECHANISM
        self._sasl_done = None
        return await self._sasl_step(initial)

    async def _auth_step(self, event: smtp.AuthResponse) -> Reply:
        if event.cancelled:
            self._sasl = self._sasl_done = None
            return R.AUTH_CANCELLED
        if self._sasl_done is not None:  # the client acknowledged our final SCRAM data
            return self._auth_success(self._sasl_done)
        return await self._sasl_step(event.data)

    async def _sasl_step(self, data: bytes | None) -> Reply:
        assert self._sasl is not None
        try:
            step = await self._sasl.step(data)
        except StoreUnavailable:
            return AUTH_TEMP
        if isinstance(step, sasl.Challenge):
            return Reply(334, "", smtp.encode_base64(step.data) if step.data else "")
        if isinstance(step, sasl.Success):
            if step.data:  # SCRAM's server-final goes in a 334; the client answers empty
                self._sasl_done = step.user
                return Reply(334, "", smtp.encode_base64(step.data))
            return self._auth_success(step.user)
        return await self._auth_failure(step)

    def _auth_success(self, user: User) -> Reply:
        self.user, self._sasl, self._sasl_done = user, None, None
        self.ctx.throttle.record_success(self.peer_ip)
        maillog.event("auth", conn=self.conn_id, ip=self.peer_ip, user=user.address)
        return AUTH_OK

    async def _auth_failure(self, failure: sasl.Failure) -> Reply:
        username = (self._sasl.username if self._sasl else None) or ""
        mechanism = self._sasl.mechanism if self._sasl else ""
        self._sasl = None
        self.ctx.throttle.record_failure(self.peer_ip)
        logging.getLogger("pochta.auth").warning(
            auth_failure_log_line(self.peer_ip, username, mechanism)
        )
        delay = self.ctx.throttle.delay(self.peer_ip)
        if delay > 0:
            await self.ctx.sleep(delay)
        if self.ctx.throttle.blocked(self.peer_ip):
            return AUTH_BLOCKED
        return (
            R.AUTH_BAD_BASE64.with_text("Malformed authentication data")
            if (failure.malformed)
            else AUTH_FAILED
        )

    # -- TURN, ETRN, ATRN ---------------------------------------------------------------------
    async def _relay_call(self, verb: str, arg: object) -> Reply:
        relay = self.ctx.relay
        if relay is None:
            return R.NOT_IMPLEMENTED
        if verb == "etrn" and isinstance(arg, str):
            return await relay.etrn(self, arg) if self.ctx.etrn_enabled else R.NOT_IMPLEMENTED
        if verb == "atrn" and isinstance(arg, tuple):
            return await relay.atrn(self, arg) if self.kind == ODMR else R.NOT_IMPLEMENTED
        if verb == "turn":
            if not (self.ctx.turn_enabled and self.kind in (SUBMISSION, SUBMISSIONS)):
                return TURN_DISABLED
            return await relay.turn(self)
        return R.NOT_IMPLEMENTED


_KEPT: dict[tuple[int, str, str], Reply] = {}


async def _ready(reply: Reply) -> Reply:
    return reply


def _kept(text: str, code: int = 250, enhanced: str = "") -> Reply:
    """The greeting, the EHLO reply and the 221, made once per text (their wire form with
    them): every connection gets them, and clients of a node greet with the same few names."""
    key = (code, enhanced, text)
    reply = _KEPT.get(key)
    if reply is None:
        reply = Reply(code, enhanced, text)
        if len(_KEPT) < 1024:
            _KEPT[key] = reply
    return reply


def _sender_addresses(raw: bytes) -> list[str]:
    """The addresses in every Sender: field (RFC 5322 §3.6.2), lowercased."""
    from email.utils import getaddresses

    values = [headers.decode_header_value(v) for f, v in headers.iter_fields(raw) if f == b"sender"]
    return [addr.lower() for _, addr in getaddresses(values) if addr]


def _header_block(chunks: list[bytes], limit: int = 1 << 20) -> bytes:
    """The message's header block (up to and including the empty line) from its first pieces;
    at most `limit` octets when no empty line comes first (RFC 5322 §2.1)."""
    head = b""
    for chunk in chunks:
        head += chunk
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            return head[: end + 4]
        if len(head) >= limit:
            return head[:limit]
    return head
