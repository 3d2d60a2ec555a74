"""Attempt results and the notices they cause: bounces, delay warnings and double bounces.
Imports `smtp` (Reply), `dns` (DnsError), `message` (DSN building, summaries), `log` and
`store.api`.

- `Attempt`: the result of one delivery attempt for one recipient, with everything a DSN needs
  (RFC 3463 status, RFC 3464 diagnostic, the remote MTA) and the text stored as `last_reply`.
- `log_result()`: the mail log line of one recipient's attempt.
- `make_notice()`: the DSN for a letter's failed or delayed recipients as a `Letter` routed the
  way RFC 5321 §4.5.5 and §6.1 want it: to the envelope sender with the null reverse-path,
  straight into a local mailbox when the sender is hosted here, queued outbound otherwise; never
  to a null sender: a bounce that fails goes to the local postmaster instead (a "double bounce").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from pochta import log as maillog
from pochta.dns import DnsError
from pochta.message.dsn import FailedRecipient, build_dsn
from pochta.message.headers import parse_summary
from pochta.queue.policy import classify
from pochta.smtp import Reply
from pochta.store.api import (
    INBOX,
    Claim,
    Letter,
    MailStore,
    OutcomeKind,
    QueueRecipient,
    Target,
    domain_of,
    postmaster_domains,
)
from pochta.store.api import normalize_address as _norm

log = logging.getLogger(__name__)

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class Attempt:
    """One recipient's result of one attempt.

    reply: stored as the recipient's `last_reply` ("550 5.1.1 No such user here").
    status: the RFC 3463 code for a DSN; diagnostic: RFC 3464 §2.3.6 "type; text".
    """

    kind: OutcomeKind
    reply: str
    status: str
    diagnostic: str
    remote_mta: str | None = None

    @classmethod
    def from_reply(cls, reply: Reply, remote_mta: str | None) -> Attempt:
        """A remote server's reply; classified by `policy.classify` (RFC 5321 §4.2.1)."""
        if not reply.code:
            return cls.local(OutcomeKind.TRANSIENT, "4.4.2", "no reply from the server", remote_mta)
        kind = classify(reply.code, reply.enhanced or None, str(reply))
        text = str(reply)
        status = reply.enhanced if _ENHANCED.match(reply.enhanced) else _class_status(kind)
        # RFC 3464 §2.3.6: SMTP replies are reported with diagnostic-type "smtp"
        return cls(kind, text, status, f"smtp; {text}", remote_mta)

    @classmethod
    def local(
        cls, kind: OutcomeKind, status: str, text: str, remote_mta: str | None = None
    ) -> Attempt:
        """A failure found on our side (connection refused, DNS, policy): "X-Pochta; ..."."""
        return cls(kind, f"{status} {text}", status, f"X-Pochta; {text}", remote_mta)

    @classmethod
    def from_dns(cls, exc: DnsError) -> Attempt:
        kind = OutcomeKind.PERMANENT if exc.permanent else OutcomeKind.TRANSIENT
        return cls.local(kind, exc.enhanced, str(exc))

    def expired(self) -> Attempt:
        """Give-up after a transient failure: RFC 3463 X.4.7 "delivery time expired", reported
        as 5.4.7 together with the last reply."""
        return replace(
            self,
            kind=OutcomeKind.PERMANENT,
            reply=f"5.4.7 delivery time expired; last reply: {self.reply}",
            status="5.4.7",
        )

    def failure(self, address: str, action: str = "failed") -> FailedRecipient:
        """This attempt as a DSN recipient block (RFC 3464 §2.3)."""
        status = self.status
        if action == "delayed" and not status.startswith("4"):
            status = "4" + status[1:] if _ENHANCED.match(status) else "4.0.0"
        return FailedRecipient(
            address=address,
            status=status,
            diagnostic=self.diagnostic,
            remote_mta=self.remote_mta,
            action="delayed" if action == "delayed" else "failed",
        )


DELIVERED_LOCALLY = Attempt(
    OutcomeKind.DELIVERED, "250 2.0.0 delivered to a local mailbox", "2.0.0", "smtp; 250 2.0.0"
)
UNKNOWN_LOCAL_USER = Reply(550, "5.1.1", "No such user here")
# `pochta queue bounce`: RFC 3463 X.0.0 "other undefined status" with an explanation.
ADMIN_BOUNCE = Attempt.local(
    OutcomeKind.PERMANENT, "5.0.0", "returned to sender by the mail system administrator"
)


def held_attempt(domain: str) -> Attempt:
    """The standing result of held relay mail that its customer has not collected: transient,
    RFC 3463 X.4.0 (a routing status). Expired, it reads "5.4.7 delivery time expired"."""
    text = f"held for the relay customer of {domain}, not collected"
    return Attempt.local(OutcomeKind.TRANSIENT, "4.4.0", text)


def _class_status(kind: OutcomeKind) -> str:
    return {OutcomeKind.DELIVERED: "2.0.0", OutcomeKind.PERMANENT: "5.0.0"}.get(kind, "4.0.0")


async def local_postmaster(store: MailStore, hostname: str) -> str | None:
    """The user that receives postmaster mail: postmaster of the domain of our hostname, else of
    the first hosted domain (RFC 5321 §4.5.1); None when no domain is hosted."""
    domains = [d.name for d in await store.list_domains()]
    for domain in postmaster_domains(domains, hostname):
        user = await store.resolve(f"postmaster@{domain}")
        if user is not None:
            return user
    return None


async def make_notice(
    store: MailStore,
    *,
    hostname: str,
    sender: str,
    body: bytes,
    arrival: datetime,
    now: datetime,
    failures: Sequence[FailedRecipient],
    retry_until: datetime | None = None,
) -> Letter | None:
    """The DSN about `failures` of a letter from `sender`, ready for `record_outcomes(notice=)`;
    None when nobody is to be told."""
    if not failures:
        return None
    if not _norm(sender):
        return await _double_bounce(store, hostname, body, arrival, now, failures)
    dsn = build_dsn(
        reporting_mta=hostname,
        original_sender=sender,
        original_body=body,
        failures=failures,
        arrival=arrival,
        now=now,
        retry_until=retry_until,
    )
    address = _norm(sender)
    if await store.hosts_domain(domain_of(address)):
        # a hosted sender gets the notice directly; a vanished one -> its postmaster
        user = await store.resolve(address) or await local_postmaster(store, hostname)
        if user is None:
            log.warning("dropping a DSN for %s: no such user and no postmaster", address)
            return None
        return _local_letter(dsn, user)
    # RFC 5321 §4.5.5: DSNs are sent with the null reverse-path
    return Letter(body=dsn, sender="", summary=parse_summary(dsn), outbound=(address,))


async def _double_bounce(
    store: MailStore,
    hostname: str,
    body: bytes,
    arrival: datetime,
    now: datetime,
    failures: Sequence[FailedRecipient],
) -> Letter | None:
    """RFC 5321 §4.5.5/§6.1: a letter with the null sender is never bounced; when it fails for
    good the local postmaster is told instead (delays of such letters are not reported)."""
    failed = [f for f in failures if f.action == "failed"]
    postmaster = await local_postmaster(store, hostname)
    if not failed or postmaster is None:
        if failed:
            log.warning("dropping a double bounce: no local postmaster")
        return None
    dsn = build_dsn(
        reporting_mta=hostname,
        original_sender=postmaster,
        original_body=body,
        failures=failed,
        arrival=arrival,
        now=now,
    )
    return _local_letter(dsn, postmaster)


def _local_letter(dsn: bytes, user: str) -> Letter:
    # RFC 3464 §2: the DSN's own return path is null, so it cannot loop
    target = Target(address=user, folder=INBOX, return_path="")
    return Letter(body=dsn, sender="", summary=parse_summary(dsn), targets=(target,))


def describe(exc: BaseException) -> str:
    """A connection failure in a few words, for replies and logs."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def log_result(
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
