"""The outbound queue worker: claims due recipients, delivers them per destination domain over
SMTP (or into the local store for hosted domains), and records every outcome with its bounce or
delay notice in one store transaction. Imports `client`, `dns`, `smtp`, `tls`, `log`, `errors`,
`message`, `store.api` and its `queue` siblings; never `config` (app.py passes plain values).

One pass: `store.claim()` leases due recipients to this worker's `owner` (unique per process, so
a restarted node never mistakes an old lease for its own) and groups them per domain. A domain
has at most `per_destination` delivery tasks (default 1, so one connection per destination);
claims for a domain whose tasks are all busy are handed to the least loaded running task, which
sends them on its open connection after the letters it has. New tasks start while fewer than
`concurrency` run. A domain task resolves the destination (`Resolver.destinations`), tries its
hosts in order until one greets and accepts EHLO, uses STARTTLS when offered (RFC 3207;
opportunistic, RFC 7435), sends every letter handed to it on that connection and commits each
letter's outcomes right after its final reply, which keeps the window for a duplicate after a
crash (RFC 5321 §6.1 prefers duplicates to losses) to at most one letter per connection.
`deliver()` runs the same path for claims made elsewhere (the relay's ETRN for held domains).

Held relay mail waits for its customer (ETRN/ATRN/TURN) and is never claimed by a pass, so
`expire_held()` (run every `held_every` seconds) applies the queue's time limits to it: a
"delayed" DSN after `warn_after`, give-up with a bounce after `give_up_after` (RFC 5321
§4.5.4.1), and administrator bounces (`pochta queue bounce`).
Between passes the worker sleeps until `wake()`, the next due recipient, or `poll` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from pochta import smtp
from pochta import tls as tlsmod
from pochta.client.session import SmtpClient, SmtpError, Timeouts
from pochta.dns import DnsError, Host, Resolver
from pochta.errors import StoreError
from pochta.message.dsn import FailedRecipient
from pochta.message.headers import parse_summary
from pochta.queue import policy
from pochta.queue.bounce import (
    ADMIN_BOUNCE,
    DELIVERED_LOCALLY,
    UNKNOWN_LOCAL_USER,
    Attempt,
    describe,
    held_attempt,
    log_result,
    make_notice,
)
from pochta.queue.deliver import send_claim
from pochta.store.api import (
    INBOX,
    Claim,
    Letter,
    MailStore,
    Outcome,
    OutcomeKind,
    QueueEntry,
    QueueRecipient,
    RcptState,
    Target,
    domain_of,
)

log = logging.getLogger(__name__)

# Connection-level failures: the next host is tried, recipients stay transient.
CONNECTION_ERRORS = (OSError, TimeoutError, SmtpError, smtp.ProtocolError)
LEASE_MARGIN = 0.8  # stop starting new letters after this share of the lease has passed
VERIFY_FAILED_TTL = 3600.0  # seconds to remember that a host's certificate does not verify
NO_RESULT = Attempt.local(OutcomeKind.TRANSIENT, "4.4.2", "delivery was interrupted")
HELD_LIMIT = 1000  # recipients one expire_held() claims at most


def make_owner(hostname: str) -> str:
    """A lease owner unique to this process and start: hostname, pid and randomness."""
    return f"{hostname}/{os.getpid()}/{secrets.token_hex(6)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class TlsRequired(Exception):
    """`require_tls` is set and the peer did not offer (or failed) STARTTLS."""


Batch = tuple[float, list[Claim]]  # claims handed over together, with their monotonic claim time


@dataclass(eq=False)
class _Run:
    """One delivery task of a domain: the batches handed to it, the claims in hand (removed
    once recorded) and how many recipients it delivered."""

    domain: str
    backlog: deque[Batch] = field(default_factory=deque)
    current: list[Claim] = field(default_factory=list)
    delivered: int = 0
    task: asyncio.Task[None] | None = None

    def ids(self) -> list[int]:
        """Recipient ids handed to this run and not recorded yet."""
        claims = [*self.current, *(c for _, batch in self.backlog for c in batch)]
        return [r.id for c in claims for r in c.recipients]


@dataclass
class _Link:
    """An open connection to a destination."""

    client: SmtpClient
    peer: str  # "host[ip]:port", for logs
    mta: str  # the host name, for DSNs (RFC 3464 Remote-MTA)


class QueueWorker:
    """Delivers the outbound queue; `start()` runs it in the background, `stop()` ends it."""

    def __init__(
        self,
        store: MailStore,
        resolver: Resolver,
        *,
        hostname: str,
        owner: str,
        port: int = 25,
        concurrency: int = 20,
        per_destination: int = 1,
        lease: float | timedelta = 600.0,
        poll: float = 5.0,
        schedule: Sequence[timedelta] = policy.DEFAULT_RETRY,
        give_up_after: timedelta = policy.DEFAULT_GIVE_UP,
        warn_after: timedelta | None = policy.DEFAULT_WARN_AFTER,
        timeouts: Timeouts | None = None,
        local_address: str | None = None,
        rng: random.Random | None = None,
        require_tls: bool = False,
        tls_cafile: str | None = None,
        batch: int = 100,
        grace: float = 10.0,
        held_every: float = 60.0,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.hostname = hostname
        self.owner = owner
        self.port = port
        self.concurrency = max(1, concurrency)
        self.per_destination = max(1, per_destination)
        self.lease = lease if isinstance(lease, timedelta) else timedelta(seconds=lease)
        self.poll = poll
        self.schedule = tuple(schedule)
        self.give_up_after = give_up_after
        self.warn_after = warn_after
        self.timeouts = timeouts or Timeouts()
        self.local_address = local_address
        self.rng = rng
        self.require_tls = require_tls
        self.batch = batch
        self.grace = grace
        self.held_every = held_every
        self._verifying = tlsmod.client_context(verify=True, cafile=tls_cafile)
        self._insecure = tlsmod.client_context(verify=False)
        self._unverifiable: dict[str, float] = {}  # host name -> monotonic expiry
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[int] = set()  # recipient ids leased to a running domain task
        self._runs: dict[str, list[_Run]] = {}  # domain -> its running delivery tasks
        self._held_next = 0.0  # monotonic time of the next expire_held()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="queue-worker")

    def wake(self) -> None:
        """Claim now (called after a letter with outbound recipients was accepted)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, let running deliveries finish (at most `grace` seconds), cancel the
        rest and release their leases so another worker or the next start takes them."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._inflight:
            await self._release(list(self._inflight))

    async def run_once(self) -> int:
        """One pass, waiting for its deliveries: the number of recipients it claimed."""
        count = await self._dispatch()
        while self._tasks:
            await asyncio.gather(*set(self._tasks), return_exceptions=True)
        return count

    async def deliver(self, domain: str, claims: Sequence[Claim]) -> int:
        """Deliver `claims`, already leased to `self.owner` (the relay's ETRN claims held mail
        this way), to `domain` now, exactly as a queue pass would: resolve, connect, STARTTLS,
        send, classify, record, bounce. Returns how many recipients were delivered; whatever is
        not decided keeps its place in the queue."""
        ids = [r.id for c in claims for r in c.recipients]
        if self._stopping:
            await self.store.release(self.owner, ids)
            return 0
        self._inflight.update(ids)
        runs = self._runs.get(domain, [])
        joined = len(runs) >= self.per_destination  # the domain's connections are all busy
        run = min(runs, key=lambda r: len(r.backlog)) if joined else self._start(domain)
        run.backlog.append((time.monotonic(), list(claims)))
        assert run.task is not None
        # cancelling the caller cancels its own delivery (the leases are released), never one
        # it joined
        await (asyncio.shield(run.task) if joined else run.task)
        return run.delivered

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                claimed = await self._dispatch()
            except StoreError as exc:
                log.warning("queue: cannot claim: %s", exc)
                claimed = 0
            except Exception:
                log.exception("queue: pass failed")
                claimed = 0
            if self._stopping:
                break
            if claimed and self._free() > 0:
                continue  # more may be due right now
            await self._sleep()

    def _free(self) -> int:
        return self.concurrency - len(self._tasks)

    async def _sleep(self) -> None:
        """Until wake(), a finished domain task, the next due recipient or `poll` seconds."""
        timeout = self.poll
        if self._free() > 0:
            try:
                due = await self.store.next_due()
            except StoreError:
                due = None
            if due is not None:
                delta = (due - utcnow()).total_seconds()
                if delta > 0:  # a due-but-unclaimable recipient is leased: wait for the poll
                    timeout = min(timeout, delta + 0.01)
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _dispatch(self) -> int:
        """Claim due recipients and hand them to their domain's task (started when needed)."""
        if self._stopping:
            return 0
        if time.monotonic() >= self._held_next:
            self._held_next = time.monotonic() + self.held_every
            try:
                await self.expire_held()
            except StoreError as exc:
                log.warning("queue: cannot expire held mail: %s", exc)
        if self._free() <= 0:
            return 0
        claims = await self.store.claim(self.owner, utcnow(), self.lease, self.batch)
        groups: dict[str, list[Claim]] = {}
        for claim in claims:
            # an expired lease of our own still running task: that task settles it
            fresh = tuple(r for r in claim.recipients if r.id not in self._inflight)
            if fresh:
                groups.setdefault(claim.domain, []).append(replace(claim, recipients=fresh))
        started = time.monotonic()
        count = 0
        for domain, group in groups.items():
            ids = [r.id for c in group for r in c.recipients]
            run = self._run_for(domain)
            if run is None:
                await self._release(ids)
                continue
            run.backlog.append((started, group))  # no await since _run_for: the run is alive
            self._inflight.update(ids)
            count += len(ids)
        return count

    def _run_for(self, domain: str) -> _Run | None:
        """The task to hand `domain`'s claims to: a new one while the domain has fewer than
        `per_destination` and a slot is free, else the running one with the least backlog;
        None when the domain has none and no slot is free."""
        runs = self._runs.get(domain, [])
        if len(runs) < self.per_destination and self._free() > 0:
            return self._start(domain)
        return min(runs, key=lambda r: len(r.backlog)) if runs else None

    def _start(self, domain: str) -> _Run:
        run = _Run(domain)
        self._runs.setdefault(domain, []).append(run)
        task = asyncio.create_task(self._drive(run), name=f"deliver:{domain}")
        run.task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return run

    def _forget(self, run: _Run) -> None:
        runs = self._runs.get(run.domain, [])
        if run in runs:
            runs.remove(run)
        if not runs:
            self._runs.pop(run.domain, None)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("queue: domain task failed", exc_info=task.exception())

    async def _release(self, rcpt_ids: Sequence[int]) -> None:
        try:
            await self.store.release(self.owner, rcpt_ids)
        except StoreError as exc:
            log.warning("queue: cannot release %d leases: %s", len(rcpt_ids), exc)
        self._inflight.difference_update(rcpt_ids)

    # -- one domain ---------------------------------------------------------------------------
    async def _drive(self, run: _Run) -> None:
        """Deliver every batch handed to `run`, on one connection while it lasts; QUIT when the
        backlog is empty, and leave only after that (one connection per destination at a time)."""
        link: _Link | None = None
        try:
            local = await self.store.hosts_domain(run.domain)
            while True:
                if not run.backlog:
                    if link is None:
                        self._forget(run)  # no await between the check and this: none handed in
                        return
                    await link.client.quit()  # claims handed in meanwhile open a new connection
                    link = None
                    continue
                started, run.current = run.backlog.popleft()
                if local:
                    await self._deliver_local(run)
                else:
                    link = await self._deliver_remote(run, started, link)
                if run.current:  # the lease ran short: release, the next pass claims it again
                    await self._release([r.id for c in run.current for r in c.recipients])
                    run.current = []
        except Exception:
            log.exception("queue: delivery to %s failed", run.domain)
        finally:
            self._forget(run)
            if link is not None:
                await link.client.quit()
            leftover = run.ids()
            run.current, run.backlog = [], deque()
            if leftover:
                await self._release(leftover)

    async def _deliver_remote(self, run: _Run, started: float, link: _Link | None) -> _Link | None:
        """`run.current` over `link` (opened first when None); the link if it is still usable."""
        remaining = run.current
        for claim in list(remaining):  # administrator bounces need no connection
            if all(r.give_up for r in claim.recipients):
                await self._record(claim, {})
                remaining.remove(claim)
        if not remaining:
            return link
        if link is None:
            link = await self._open_link(run.domain, remaining)
            if link is None:
                return None
        if await self._send_all(link, run, started):
            return link
        await link.client.close()
        return None

    async def _open_link(self, domain: str, remaining: list[Claim]) -> _Link | None:
        """A connection to `domain`; None after recording why there is none."""
        try:
            hosts = await self.resolver.destinations(domain)
        except DnsError as exc:
            await self._record_all(remaining, Attempt.from_dns(exc))
            return None
        connected = await self._connect(hosts)
        if isinstance(connected, Attempt):
            await self._record_all(remaining, connected)
            return None
        return connected

    async def _send_all(self, link: _Link, run: _Run, started: float) -> bool:
        """Every letter of `run.current` over `link`; False when the connection failed."""
        lease = self.lease.total_seconds()
        remaining = run.current
        for claim in list(remaining):
            if time.monotonic() - started > lease * LEASE_MARGIN:
                return True  # the lease is running out: the rest is released and claimed again
            sendable = replace(
                claim, recipients=tuple(r for r in claim.recipients if not r.give_up)
            )
            try:
                replies = await send_claim(link.client, sendable)
            except CONNECTION_ERRORS as exc:
                text = f"{link.peer}: {describe(exc)}"
                failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.2", text, link.mta)
                await self._record_all(remaining, failure, link.peer)
                return False
            attempts = {rid: Attempt.from_reply(reply, link.mta) for rid, reply in replies.items()}
            run.delivered += await self._record(claim, attempts, link.peer, link.client)
            remaining.remove(claim)
        return True

    async def _record_all(
        self, claims: list[Claim], attempt: Attempt, peer: str | None = None
    ) -> None:
        for claim in list(claims):
            await self._record(claim, {r.id: attempt for r in claim.recipients}, peer)
            claims.remove(claim)

    async def _deliver_local(self, run: _Run) -> None:
        """Recipients in a hosted domain go straight into the store (no SMTP to ourselves)."""
        remaining = run.current
        for claim in list(remaining):
            attempts: dict[int, Attempt] = {}
            users: dict[int, str] = {}
            for r in claim.recipients:
                user = None if r.give_up else await self.store.resolve(r.address)
                if user is not None:
                    users[r.id] = user
                elif not r.give_up:
                    attempts[r.id] = Attempt.from_reply(UNKNOWN_LOCAL_USER, self.hostname)
            if users:
                await self._store_locally(claim, users)
                run.delivered += len(users)
            rest = tuple(r for r in claim.recipients if r.id not in users)
            if rest:
                await self._record(replace(claim, recipients=rest), attempts, self.hostname)
            remaining.remove(claim)

    async def _store_locally(self, claim: Claim, users: dict[int, str]) -> None:
        # The copies are the `notice` of the DELIVERED outcomes: one transaction, so a crash
        # can neither lose them nor store them twice.
        targets = [
            Target(user, INBOX, return_path=claim.sender) for user in dict.fromkeys(users.values())
        ]
        letter = Letter(claim.body, claim.sender, parse_summary(claim.body), targets)
        outcomes = [Outcome(rid, OutcomeKind.DELIVERED, DELIVERED_LOCALLY.reply) for rid in users]
        await self.store.record_outcomes(self.owner, outcomes, letter)
        self._inflight.difference_update(users)
        for rcpt in claim.recipients:
            if rcpt.id in users:
                log_result(claim, rcpt, DELIVERED_LOCALLY, "local", None, None)

    # -- held relay mail ----------------------------------------------------------------------
    async def expire_held(self) -> int:
        """Apply the time limits to held relay mail (see the module docstring); returns how
        many recipients got an outcome. Only domains with such recipients are claimed, and only
        for as long as it takes to record them."""
        if not await self.store.list_relay_domains():
            return 0
        now = utcnow()
        domains = sorted(
            {
                domain_of(r.address)
                for entry in await self.store.list_queue()
                for r in entry.recipients
                if self._held_due(entry, r, now)
            }
        )
        if not domains:
            return 0
        claims = await self.store.claim(self.owner, now, self.lease, HELD_LIMIT, domains=domains)
        # recipients of our own running tasks (an ETRN delivery) are theirs to settle
        mine = [replace(c, recipients=_not_in(c.recipients, self._inflight)) for c in claims]
        unsettled = {r.id for c in mine for r in c.recipients}
        settled = 0
        try:
            for claim in mine:
                due = [r for r in claim.recipients if self._held_due(claim, r, now)]
                if due:
                    attempt = held_attempt(claim.domain)
                    attempts = {r.id: attempt for r in due}
                    await self._record(replace(claim, recipients=tuple(due)), attempts)
                    unsettled.difference_update(attempts)
                    settled += len(due)
        finally:
            if unsettled:
                await self._release(list(unsettled))
        return settled

    def _held_due(self, letter: QueueEntry | Claim, rcpt: QueueRecipient, now: datetime) -> bool:
        """A held recipient whose time limit has come: an administrator bounce, give-up, or a
        "delayed" notice (RFC 3464) not sent yet."""
        if not rcpt.held or rcpt.state is not RcptState.QUEUED:
            return False
        return (
            rcpt.give_up
            or policy.should_give_up(letter.created_at, now, self.give_up_after)
            or (
                bool(letter.sender)
                and policy.should_warn(letter.created_at, now, self.warn_after, rcpt.warned)
            )
        )

    # -- connecting ---------------------------------------------------------------------------
    async def _connect(self, hosts: Sequence[Host]) -> _Link | Attempt:
        """The first host (in MX order) that greets and takes EHLO; else why none did."""
        failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.3", "no host to deliver to")
        for host in hosts:
            port = host.port or self.port
            for address in host.addresses:
                peer = f"{host.name}[{address}]:{port}"
                try:
                    return _Link(await self._open(host.name, address, port), peer, host.name)
                except SmtpError as exc:
                    # RFC 5321 §3.8 / §5.1: a refused greeting means: try the next MX
                    text = f"{peer} refused to talk to me: {exc.reply}"
                    failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.2", text, host.name)
                except TlsRequired as exc:
                    text = f"{peer}: {exc}"
                    failure = Attempt.local(OutcomeKind.TRANSIENT, "4.7.10", text, host.name)
                except CONNECTION_ERRORS as exc:
                    # RFC 3463 X.4.1 "no answer from host"
                    text = f"connect to {peer}: {describe(exc)}"
                    failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.1", text, host.name)
                log.info("queue: %s", failure.reply)
        return failure

    async def _open(self, name: str, address: str, port: int) -> SmtpClient:
        """Connect and start TLS when offered: a verifying handshake first (so the log can tell
        whether the certificate is good), the opportunistic one when verification fails, and
        plain text when the handshake itself fails (RFC 7435 §3), unless TLS is required."""
        verify, use_tls = not self._known_unverifiable(name), True
        while True:
            client = await SmtpClient.connect(
                address,
                port,
                helo_name=self.hostname,
                timeouts=self.timeouts,
                local_address=self.local_address,
            )
            if not use_tls or not client.supports("STARTTLS"):
                if self.require_tls:
                    await client.close()
                    raise TlsRequired("STARTTLS not offered" if use_tls else "TLS handshake failed")
                return client
            try:
                await client.starttls(self._verifying if verify else self._insecure, name)
                return client
            except ssl.SSLCertVerificationError as exc:
                log.info("queue: certificate of %s does not verify: %s", name, exc.verify_message)
                self._unverifiable[name] = time.monotonic() + VERIFY_FAILED_TTL
                verify = False
            except ssl.SSLError as exc:
                log.info("queue: TLS handshake with %s[%s] failed: %s", name, address, exc)
                use_tls = False
            except SmtpError as exc:
                if exc.stage == "STARTTLS" and not self.require_tls:
                    return client  # refused (454): go on in plain text
                await client.close()
                if exc.stage == "STARTTLS":
                    raise TlsRequired(f"STARTTLS refused: {exc.reply}") from None
                raise
            await client.close()

    def _known_unverifiable(self, name: str) -> bool:
        expiry = self._unverifiable.get(name)
        if expiry is not None and expiry < time.monotonic():
            del self._unverifiable[name]
            return False
        return expiry is not None

    # -- outcomes -----------------------------------------------------------------------------
    async def _record(
        self,
        claim: Claim,
        attempts: dict[int, Attempt],
        peer: str | None = None,
        client: SmtpClient | None = None,
    ) -> int:
        """One `record_outcomes` for the claim, with the bounce or delay DSN as its notice;
        returns how many recipients were delivered."""
        now = utcnow()
        outcomes: list[Outcome] = []
        failures: list[FailedRecipient] = []
        for rcpt in claim.recipients:
            attempt = ADMIN_BOUNCE if rcpt.give_up else attempts.get(rcpt.id, NO_RESULT)
            outcome, attempt, action = self._decide(claim, rcpt, attempt, now)
            outcomes.append(outcome)
            if action:
                failures.append(attempt.failure(rcpt.address, action))
            tls_info = (client.tls, client.tls_verified) if client and client.tls else None
            log_result(claim, rcpt, attempt, peer, tls_info, outcome.next_attempt)
        notice = await make_notice(
            self.store,
            hostname=self.hostname,
            sender=claim.sender,
            body=claim.body,
            arrival=claim.created_at,
            now=now,
            failures=failures,
            retry_until=claim.created_at + self.give_up_after,
        )
        await self.store.record_outcomes(self.owner, outcomes, notice)
        self._inflight.difference_update(r.id for r in claim.recipients)
        return sum(1 for o in outcomes if o.kind is OutcomeKind.DELIVERED)

    def _decide(
        self, claim: Claim, rcpt: QueueRecipient, attempt: Attempt, now: datetime
    ) -> tuple[Outcome, Attempt, str]:
        """The outcome, the (possibly expired) attempt, and the DSN action ("" for none)."""
        if attempt.kind is OutcomeKind.TRANSIENT and policy.should_give_up(
            claim.created_at, now, self.give_up_after
        ):
            attempt = attempt.expired()
        if attempt.kind is OutcomeKind.DELIVERED:
            return Outcome(rcpt.id, attempt.kind, attempt.reply), attempt, ""
        if attempt.kind is OutcomeKind.PERMANENT:
            return Outcome(rcpt.id, attempt.kind, attempt.reply), attempt, "failed"
        retry = policy.next_attempt(rcpt.attempts + 1, now, self.schedule, self.rng)
        warn = bool(claim.sender) and policy.should_warn(
            claim.created_at, now, self.warn_after, rcpt.warned
        )
        outcome = Outcome(rcpt.id, attempt.kind, attempt.reply, next_attempt=retry, warned=warn)
        return outcome, attempt, "delayed" if warn else ""


def _not_in(rcpts: tuple[QueueRecipient, ...], ids: set[int]) -> tuple[QueueRecipient, ...]:
    return tuple(r for r in rcpts if r.id not in ids)
