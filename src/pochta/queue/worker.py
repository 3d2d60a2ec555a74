"""The outbound queue worker: claims due recipients, delivers them per destination domain over
SMTP (or into the local store for hosted domains), and records every outcome with its bounce or
delay notice in one store transaction. Imports `client`, `dns`, `smtp`, `tls`, `log`, `errors`,
`message`, `store.api` and its `queue` siblings; never `config` (app.py passes plain values).

One pass: `store.claim()` leases due recipients to this worker's `owner` (unique per process, so
a restarted node never mistakes an old lease for its own), groups them per domain and starts one
task per domain, at most `concurrency` at a time. A domain task resolves the destination
(`Resolver.destinations`), tries its hosts in order until one greets and accepts EHLO, uses
STARTTLS when offered (RFC 3207; opportunistic, RFC 7435), sends every letter of the domain on
that connection and commits each letter's outcomes right after its final reply, which keeps the
window for a duplicate after a crash (RFC 5321 §6.1 prefers duplicates to losses) small.
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
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pochta import log as maillog
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
    QueueRecipient,
    Target,
)

log = logging.getLogger(__name__)

# Connection-level failures: the next host is tried, recipients stay transient.
CONNECTION_ERRORS = (OSError, TimeoutError, SmtpError, smtp.ProtocolError)
LEASE_MARGIN = 0.8  # stop starting new letters after this share of the lease has passed
VERIFY_FAILED_TTL = 3600.0  # seconds to remember that a host's certificate does not verify
NO_RESULT = Attempt.local(OutcomeKind.TRANSIENT, "4.4.2", "delivery was interrupted")


def make_owner(hostname: str) -> str:
    """A lease owner unique to this process and start: hostname, pid and randomness."""
    return f"{hostname}/{os.getpid()}/{secrets.token_hex(6)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class TlsRequired(Exception):
    """`require_tls` is set and the peer did not offer (or failed) STARTTLS."""


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
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.hostname = hostname
        self.owner = owner
        self.port = port
        self.concurrency = max(1, concurrency)
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
        self._verifying = tlsmod.client_context(verify=True, cafile=tls_cafile)
        self._insecure = tlsmod.client_context(verify=False)
        self._unverifiable: dict[str, float] = {}  # host name -> monotonic expiry
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._inflight: set[int] = set()  # recipient ids leased to a running domain task

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
        """Claim due recipients and start a task per destination domain."""
        free = self._free()
        if free <= 0 or self._stopping:
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
        for index, (domain, group) in enumerate(groups.items()):
            ids = [r.id for c in group for r in c.recipients]
            if index >= free:
                await self._release(ids)
                continue
            self._inflight.update(ids)
            task = asyncio.create_task(self._deliver_domain(domain, group, started))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            count += len(ids)
        return count

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
    async def _deliver_domain(self, domain: str, claims: list[Claim], started: float) -> None:
        remaining = list(claims)  # claims are removed once their outcomes are recorded
        cancelled = False
        try:
            if await self.store.hosts_domain(domain):
                await self._deliver_local(remaining)
            else:
                await self._deliver_remote(domain, remaining, started)
        except asyncio.CancelledError:
            cancelled = True  # stop() releases what is left
            raise
        except Exception:
            log.exception("queue: delivery to %s failed", domain)
        finally:
            if not cancelled and remaining:
                await self._release([r.id for c in remaining for r in c.recipients])

    async def _deliver_remote(self, domain: str, remaining: list[Claim], started: float) -> None:
        for claim in list(remaining):  # administrator bounces need no connection
            if all(r.give_up for r in claim.recipients):
                await self._record(claim, {})
                remaining.remove(claim)
        if not remaining:
            return
        try:
            hosts = await self.resolver.destinations(domain)
        except DnsError as exc:
            await self._record_all(remaining, Attempt.from_dns(exc))
            return
        connected = await self._connect(hosts)
        if isinstance(connected, Attempt):
            await self._record_all(remaining, connected)
            return
        client, peer, mta = connected
        try:
            await self._send_all(client, (peer, mta), remaining, started)
        finally:
            await client.quit()

    async def _send_all(
        self, client: SmtpClient, peer: tuple[str, str], remaining: list[Claim], started: float
    ) -> None:
        """Every claimed letter over one connection; `peer`: ("host[ip]:port" for logs, the host
        name for DSNs)."""
        lease = self.lease.total_seconds()
        for claim in list(remaining):
            if time.monotonic() - started > lease * LEASE_MARGIN:
                return  # the lease is running out: the rest is released and claimed again
            sendable = replace(
                claim, recipients=tuple(r for r in claim.recipients if not r.give_up)
            )
            try:
                replies = await send_claim(client, sendable)
            except CONNECTION_ERRORS as exc:
                text = f"{peer[0]}: {_why(exc)}"
                failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.2", text, peer[1])
                await self._record_all(remaining, failure, peer[0])
                return
            attempts = {rid: Attempt.from_reply(reply, peer[1]) for rid, reply in replies.items()}
            await self._record(claim, attempts, peer[0], client)
            remaining.remove(claim)

    async def _record_all(
        self, claims: list[Claim], attempt: Attempt, peer: str | None = None
    ) -> None:
        for claim in list(claims):
            await self._record(claim, {r.id: attempt for r in claim.recipients}, peer)
            claims.remove(claim)

    async def _deliver_local(self, remaining: list[Claim]) -> None:
        """Recipients in a hosted domain go straight into the store (no SMTP to ourselves)."""
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
                _log_result(claim, rcpt, DELIVERED_LOCALLY, "local", None, None)

    # -- connecting ---------------------------------------------------------------------------
    async def _connect(self, hosts: Sequence[Host]) -> tuple[SmtpClient, str, str] | Attempt:
        """The first host (in MX order) that greets and takes EHLO; else why none did."""
        failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.3", "no host to deliver to")
        for host in hosts:
            port = host.port or self.port
            for address in host.addresses:
                peer = f"{host.name}[{address}]:{port}"
                try:
                    return await self._open(host.name, address, port), peer, host.name
                except SmtpError as exc:
                    # RFC 5321 §3.8 / §5.1: a refused greeting means: try the next MX
                    text = f"{peer} refused to talk to me: {exc.reply}"
                    failure = Attempt.local(OutcomeKind.TRANSIENT, "4.4.2", text, host.name)
                except TlsRequired as exc:
                    text = f"{peer}: {exc}"
                    failure = Attempt.local(OutcomeKind.TRANSIENT, "4.7.10", text, host.name)
                except CONNECTION_ERRORS as exc:
                    # RFC 3463 X.4.1 "no answer from host"
                    text = f"connect to {peer}: {_why(exc)}"
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
    ) -> None:
        """One `record_outcomes` for the claim, with the bounce or delay DSN as its notice."""
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
            _log_result(claim, rcpt, attempt, peer, tls_info, outcome.next_attempt)
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


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _log_result(
    claim: Claim,
    rcpt: QueueRecipient,
    attempt: Attempt,
    relay: str | None,
    tls_info: tuple[str | None, bool] | None,
    retry: datetime | None,
) -> None:
    """One Postfix-style line per recipient: status, relay, TLS version and verification."""
    status = {
        OutcomeKind.DELIVERED: "sent",
        OutcomeKind.PERMANENT: "bounced",
        OutcomeKind.TRANSIENT: "deferred",
    }[attempt.kind]
    maillog.event(
        status,
        queue=claim.queue_id,
        sender=claim.sender or "<>",
        rcpt=rcpt.address,
        relay=relay or "none",
        tls=tls_info[0] if tls_info else "none",
        verified=("yes" if tls_info[1] else "no") if tls_info else "-",
        attempts=rcpt.attempts + 1,
        dsn=attempt.status,
        reply=attempt.reply,
        retry=retry.isoformat(timespec="seconds") if retry else "-",
    )
