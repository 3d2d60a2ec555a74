"""The provider side of on-demand relay: TURN (RFC 821 §4.1.1), ETRN (RFC 1985) and ATRN
(RFC 2645, On-Demand Mail Relay). Imports `smtp`, `store.api`, `client`, `queue`, `dns`,
`message`, `server.session`, `transport`, `log` and `errors`; never `config` (`app.py` builds
the `RelaySettings`).

`RelayService` implements the Session's `RelayHooks` and the listener's `on_turn`:
- ATRN/TURN: the hook checks AUTH and ownership, takes the domains (an in-process lock set plus
  the store's lease, which also keeps other nodes off them) and claims the held recipients
  *before* it answers 250, so 450 (busy) and 453 (no mail) are decided honestly. After the 250
  the listener hands the stream over: we become the client on the same connection, read the
  customer's 220, EHLO, send every claimed letter, and record each letter's outcome as soon as
  the customer answered it (delivered only after its 250). A connection that breaks leaves the
  undecided recipients held (a transient outcome), so nothing is lost and nothing sent twice.
- ETRN: a queue run for a domain. Non-held mail is made due now for the queue worker
  (`store.flush`); held mail is claimed for the queue worker (`worker`, the node's, or a private
  one built from the settings) and delivered by its `QueueWorker.deliver()` to the domain's
  MX/route: the same resolve/connect/STARTTLS/send/classify/record/bounce path as the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pochta import log as maillog
from pochta import smtp
from pochta.client.session import SmtpClient, SmtpError, Timeouts
from pochta.dns.base import DnsError, Resolver
from pochta.errors import StoreError
from pochta.message import dsn
from pochta.queue.bounce import Attempt, make_notice
from pochta.queue.deliver import send_claim
from pochta.queue.policy import DEFAULT_RETRY, next_attempt
from pochta.queue.worker import QueueWorker, make_owner
from pochta.server.session import Session
from pochta.smtp import Reply
from pochta.store.api import (
    Claim,
    MailStore,
    Outcome,
    OutcomeKind,
    RcptState,
    domain_of,
)
from pochta.transport import Stream

log = logging.getLogger(__name__)

# RFC 2645 §4.2 and §5 (ATRN); RFC 821 §4.1.1 (TURN); RFC 3463 enhanced codes
TURNING = Reply(250, "2.0.0", "OK, now reversing the connection")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
NOT_AUTHORISED = Reply(530, "5.7.1", "Not authorised to dequeue mail for this domain")
NO_DOMAINS = Reply(502, "5.7.0", "TURN not available: no relay domains for this account")
DOMAIN_BUSY = Reply(450, "4.3.0", "Requested action not taken - the domain is busy")
NO_MAIL = Reply(453, "4.0.0", "You have no mail")
ATRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ATRN [domain[,domain]]")
# RFC 1985 §5 (ETRN)
ETRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ETRN domain | @domain | #queue")

ETRN_ANY, ETRN_OWNER, ETRN_OWNER_OR_DNS = "any", "owner", "owner-or-dns"
CLAIM_LIMIT = 1000
_CONNECTION_LOST = "421 4.4.2 connection lost during relay hand-over"


def etrn_none(node: str) -> Reply:
    return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")


def etrn_started(node: str, count: int) -> Reply:
    return Reply(253, "2.0.0", f"OK, {count} pending messages for node {node} started")


def etrn_unable(node: str) -> Reply:
    return Reply(458, "4.3.0", f"Unable to queue messages for node {node}")


def etrn_refused(node: str, reason: str) -> Reply:
    return Reply(459, "4.7.1", f"Node {node} not allowed: {reason}")


@dataclass(frozen=True)
class RelaySettings:
    """What the relay needs from the node's configuration (built by `app.py`).

    etrn_access: who may ETRN a domain: "any" client, its authenticated "owner" (the user a
    held domain belongs to), or "owner-or-dns" (default): the owner, or a client whose IP is
    one of the domain's MX/route/A addresses (RFC 1985 §7 suggests such a check).
    """

    hostname: str
    timeouts: Timeouts = field(default_factory=Timeouts)
    lease: timedelta = timedelta(minutes=10)
    delivery_port: int = 25
    etrn_access: str = ETRN_OWNER_OR_DNS
    retry: tuple[timedelta, ...] = DEFAULT_RETRY


@dataclass
class _Handover:
    owner: str  # the lease owner in the store
    domains: tuple[str, ...]
    claims: list[Claim]


class RelayService:
    """`RelayHooks` for the Session and `on_turn` for the SmtpServer of one node."""

    def __init__(
        self,
        store: MailStore,
        settings: RelaySettings,
        resolver: Resolver | None = None,
        worker: QueueWorker | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.resolver = resolver
        self.worker = worker  # the node's queue worker: ETRN delivers held mail through it
        self._own_worker: QueueWorker | None = None
        self._busy: set[str] = set()  # domains being handed over by this process
        self._handovers: dict[str, _Handover] = {}  # conn_id -> claims between 250 and on_turn
        self._tasks: set[asyncio.Task[None]] = set()

    # -- ATRN and TURN ------------------------------------------------------------------------
    async def atrn(self, session: Session, domains: tuple[str, ...]) -> Reply:
        if session.user is None:
            return AUTH_REQUIRED  # RFC 2645 §4.1: AUTH before ATRN
        owned = await self._owned(session.user.address)
        if domains:
            wanted = tuple(dict.fromkeys(d.lower().rstrip(".") for d in domains))
            if not all(smtp.valid_domain(d) for d in wanted):
                return ATRN_SYNTAX
            foreign = [d for d in wanted if d not in owned]
            if foreign:
                return NOT_AUTHORISED.with_text(f"Not authorised to dequeue mail for {foreign[0]}")
        elif owned:
            wanted = owned  # RFC 2645 §4.2: no argument means every domain of the account
        else:
            return NOT_AUTHORISED.with_text("No relay domains for this account")
        return await self._take(session, wanted, empty=NO_MAIL)

    async def turn(self, session: Session) -> Reply:
        if session.user is None:
            return AUTH_REQUIRED  # RFC 2645 §1: TURN without authentication is unsafe
        owned = await self._owned(session.user.address)
        if not owned:
            return NO_DOMAINS
        # RFC 821 §4.1.1 has no "no mail" reply: with nothing waiting we turn and just QUIT.
        return await self._take(session, owned, empty=None)

    async def _owned(self, address: str) -> tuple[str, ...]:
        return tuple(r.domain for r in await self.store.list_relay_domains(address))

    async def _take(
        self, session: Session, domains: tuple[str, ...], *, empty: Reply | None
    ) -> Reply:
        """Lock and claim `domains` for this session; TURNING when the hand-over may start."""
        if any(d in self._busy for d in domains):
            return DOMAIN_BUSY
        self._busy.update(domains)
        owner = self._lease_owner(session.conn_id)
        try:
            claims = await self._claim(owner, domains)
            reply = await self._take_reply(claims, domains, empty)
        except BaseException:
            self._busy.difference_update(domains)
            raise
        if reply is not TURNING:
            self._busy.difference_update(domains)
            return reply
        self._handovers[session.conn_id] = _Handover(owner, domains, claims)
        # the connection ends without a hand-over: give everything back
        session.on_close(lambda: self._abandon(session.conn_id))
        maillog.event(
            "relay-turn",
            conn=session.conn_id,
            user=session.user.address if session.user else "-",
            domains=",".join(domains),
            rcpts=sum(len(c.recipients) for c in claims),
        )
        return TURNING

    async def _take_reply(
        self, claims: list[Claim], domains: Sequence[str], empty: Reply | None
    ) -> Reply:
        if claims or empty is None:
            return TURNING
        if await self.store.count_queued(domains):
            return DOMAIN_BUSY  # queued but leased: another node or an ETRN run has them
        return empty

    def _abandon(self, conn_id: str) -> None:
        handover = self._handovers.pop(conn_id, None)
        if handover is None:
            return
        self._busy.difference_update(handover.domains)
        ids = [r.id for c in handover.claims for r in c.recipients]
        if ids:
            self._spawn(self.store.release(handover.owner, ids))

    async def on_turn(self, session: Session, stream: Stream, conn: smtp.Connection) -> None:
        """After our 250 to ATRN/TURN: be the client on the same stream (RFC 2645 §4.2)."""
        handover = self._handovers.pop(session.conn_id, None)
        if handover is None:
            return
        stream.label = "client"
        client = SmtpClient(stream, self.settings.timeouts, self.settings.hostname, conn=conn)
        try:
            await read_greeting(client)
            await client.ehlo()
            sent = await self._transfer(client, handover.owner, handover.domains, handover.claims)
            await client.quit()
            maillog.event("relay-done", conn=session.conn_id, delivered=sent)
        except (OSError, TimeoutError, smtp.ProtocolError, SmtpError) as exc:
            log.info("conn=%s relay hand-over ended: %r", session.conn_id, exc)
        finally:
            self._busy.difference_update(handover.domains)

    # -- sending claimed letters over a connected client ---------------------------------------
    async def _transfer(
        self, client: SmtpClient, owner: str, domains: Sequence[str], claims: list[Claim]
    ) -> int:
        """Send `claims` and whatever else is queued for `domains` meanwhile; each letter's
        outcome is recorded right after its reply. Returns the delivered recipients."""
        delivered = 0
        seen: set[int] = set()
        unsettled = list(claims)
        try:
            while unsettled:
                while unsettled:
                    claim = unsettled[0]
                    seen.update(r.id for r in claim.recipients)
                    replies = await send_claim(client, claim)
                    delivered += await self._settle(owner, claim, replies, client)
                    unsettled.pop(0)
                unsettled = await self._claim_more(owner, domains, seen)
        except BaseException:
            await self._lost(owner, unsettled)
            raise
        return delivered

    async def _claim(self, owner: str, domains: Sequence[str]) -> list[Claim]:
        now = datetime.now(UTC)
        return await self.store.claim(
            owner, now, self.settings.lease, CLAIM_LIMIT, domains=list(domains)
        )

    async def _claim_more(self, owner: str, domains: Sequence[str], seen: set[int]) -> list[Claim]:
        """Letters that arrived during the transfer; recipients already tried are given back."""
        fresh: list[Claim] = []
        again: list[int] = []
        for claim in await self._claim(owner, domains):
            new = tuple(r for r in claim.recipients if r.id not in seen)
            again += [r.id for r in claim.recipients if r.id in seen]
            if new:
                fresh.append(dataclasses.replace(claim, recipients=new))
        if again:
            await self.store.release(owner, again)
        return fresh

    async def _settle(
        self, owner: str, claim: Claim, replies: dict[int, Reply], client: SmtpClient
    ) -> int:
        now = datetime.now(UTC)
        peer = client.stream.peer[0] or None
        outcomes: list[Outcome] = []
        failures: list[dsn.FailedRecipient] = []
        for rcpt in claim.recipients:
            reply = replies.get(rcpt.id)
            attempt = Attempt.from_reply(reply, peer) if reply is not None else None
            if attempt is None or attempt.kind is OutcomeKind.TRANSIENT:
                text = attempt.reply if attempt is not None else _CONNECTION_LOST
                outcomes.append(self._transient(rcpt.id, rcpt.attempts, text, now))
                continue
            outcomes.append(Outcome(rcpt.id, attempt.kind, attempt.reply))
            if attempt.kind is OutcomeKind.PERMANENT:
                failures.append(attempt.failure(rcpt.address))
        notice = await make_notice(
            self.store,
            hostname=self.settings.hostname,
            sender=claim.sender,
            body=claim.body,
            arrival=claim.created_at,
            now=now,
            failures=failures,
        )
        await self.store.record_outcomes(owner, outcomes, notice)
        return sum(1 for o in outcomes if o.kind is OutcomeKind.DELIVERED)

    def _transient(self, rcpt_id: int, attempts: int, reply: str, now: datetime) -> Outcome:
        when = next_attempt(attempts + 1, now, self.settings.retry)
        return Outcome(rcpt_id, OutcomeKind.TRANSIENT, reply, when)

    async def _lost(self, owner: str, claims: Sequence[Claim]) -> None:
        """The connection broke: every recipient not yet decided stays held (transient)."""
        now = datetime.now(UTC)
        outcomes = [
            self._transient(r.id, r.attempts, _CONNECTION_LOST, now)
            for c in claims
            for r in c.recipients
        ]
        if outcomes:
            with contextlib.suppress(StoreError):
                await self.store.record_outcomes(owner, outcomes)

    # -- ETRN (RFC 1985) ----------------------------------------------------------------------
    async def etrn(self, session: Session, argument: str) -> Reply:
        node = argument
        if argument.startswith("#"):  # RFC 1985 §5.2: named queues; pochta has none
            return etrn_unable(node)
        subdomains = argument.startswith("@")  # RFC 1985 §5.3: the domain and its subdomains
        domain = (argument[1:] if subdomains else argument).lower().rstrip(".")
        if not domain or domain.startswith("[") or not smtp.valid_domain(domain):
            return ETRN_SYNTAX
        relays = {r.domain: r.owner for r in await self.store.list_relay_domains()}
        if not await self._may_etrn(session, domain, subdomains, relays):
            maillog.event("rejected", conn=session.conn_id, ip=session.peer_ip, reason="etrn")
            return etrn_refused(node, "not authorised")
        domains = await self._queued_domains(domain, subdomains)
        count = await self.store.count_queued(domains)
        if count == 0:
            return etrn_none(node)
        plain = [d for d in domains if d not in relays]
        for d in plain:
            await self.store.flush(d)
        if plain:
            session.ctx.wake_queue()
        for d in domains:
            if d in relays and d not in self._busy:
                self._spawn(self.deliver_held(d))
        maillog.event("etrn", conn=session.conn_id, ip=session.peer_ip, node=node, rcpts=count)
        return etrn_started(node, count)

    async def _may_etrn(
        self, session: Session, domain: str, subdomains: bool, relays: dict[str, str]
    ) -> bool:
        access = self.settings.etrn_access
        if access == ETRN_ANY:
            return True
        user = session.user
        if user is not None:
            mine = [d for d in relays if _under(d, domain, subdomains)]
            if mine and all(relays[d] == user.address for d in mine):
                return True
        if access == ETRN_OWNER:
            return False
        return await self._is_destination(session.peer_ip, domain)

    async def _is_destination(self, ip: str, domain: str) -> bool:
        """The client's address is one the domain's mail goes to (its MX/route/A)."""
        if self.resolver is None:
            return False
        try:
            hosts = await self.resolver.destinations(domain)
        except DnsError:
            return False
        peer = _ip(ip)
        return peer is not None and any(_ip(a) == peer for h in hosts for a in h.addresses)

    async def _queued_domains(self, domain: str, subdomains: bool) -> list[str]:
        if not subdomains:
            return [domain]
        found = {domain}
        for entry in await self.store.list_queue():
            for rcpt in entry.recipients:
                d = domain_of(rcpt.address)
                if rcpt.state is RcptState.QUEUED and _under(d, domain, True):
                    found.add(d)
        return sorted(found)

    async def deliver_held(self, domain: str) -> int:
        """One delivery run of a held domain's mail to its MX/route (ETRN), through the queue
        worker's delivery path; returns how many recipients the destination accepted.
        Undelivered recipients stay held (or bounce, as the queue decides)."""
        worker = self._delivery()
        if worker is None or domain in self._busy:
            return 0
        self._busy.add(domain)
        try:
            claims = await self._claim(worker.owner, [domain])
            if not claims:
                return 0
            return await worker.deliver(domain, claims)
        finally:
            self._busy.discard(domain)

    def _delivery(self) -> QueueWorker | None:
        """The node's queue worker; without one, a private worker built from the settings (it
        only delivers what ETRN hands it); None without a resolver."""
        if self.worker is not None:
            return self.worker
        if self._own_worker is None and self.resolver is not None:
            s = self.settings
            self._own_worker = QueueWorker(
                self.store,
                self.resolver,
                hostname=s.hostname,
                owner=make_owner(s.hostname),
                port=s.delivery_port,
                lease=s.lease,
                schedule=s.retry,
                timeouts=s.timeouts,
            )
        return self._own_worker

    # -- life cycle ---------------------------------------------------------------------------
    def _lease_owner(self, conn_id: str) -> str:
        return f"relay:{self.settings.hostname}:{os.getpid()}:{conn_id}"

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(_quietly(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel running ETRN deliveries (their leases are released; the mail stays held)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._own_worker is not None:
            await self._own_worker.stop()


async def read_greeting(client: SmtpClient) -> Reply:
    """Read the 220 of the peer that just became the server (after a role swap).

    Raises:
        SmtpError: the greeting was not 220. ConnectionResetError: the peer closed.
    """
    while True:
        event = client.conn.next_event()
        if isinstance(event, Reply):
            client.greeting = event
            if event.code != 220:
                raise SmtpError("greeting", event)
            return event
        if event is smtp.NEED_DATA:
            await client.stream.flush()
            client.conn.receive_data(await client.stream.read(client.timeouts.greeting))
            continue
        raise ConnectionResetError("peer closed before its greeting")


async def _quietly(coro: Coroutine[Any, Any, Any]) -> None:
    try:
        await coro
    except (StoreError, OSError, TimeoutError, smtp.ProtocolError, SmtpError) as exc:
        log.warning("relay background task failed: %r", exc)


def _under(candidate: str, domain: str, subdomains: bool) -> bool:
    return candidate == domain or (subdomains and candidate.endswith("." + domain))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
