"""The engine-independent store contract: plain async checks run against a fresh, opened store.

`tests/store/test_contract.py` runs every check in `CHECKS` against each engine; a new engine
passes when all of them do. Checks raise AssertionError (or an unexpected store error) on failure.
Imports stdlib, `pochta.errors` and `pochta.store.api` only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pochta.errors import Conflict, NotFound
from pochta.store.api import (
    INBOX,
    SENT,
    Claim,
    Letter,
    MailStore,
    Outcome,
    OutcomeKind,
    RcptState,
    ScramCredentials,
    Summary,
    Target,
)

Check = Callable[[MailStore], Awaitable[None]]
OWNER = "worker-a"
OTHER = "worker-b"
LEASE = timedelta(minutes=5)


class ExpungingStore(MailStore, Protocol):
    """Engines also offer `delete_message` (IMAP EXPUNGE); not part of api.py's Protocol yet."""

    async def delete_message(self, message_id: int) -> None: ...


def letter(
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    *,
    sender: str = "alice@remote.test",
    targets: Sequence[Target] = (),
    outbound: Sequence[str] = (),
    subject: str = "hi",
) -> Letter:
    return Letter(
        body=body,
        sender=sender,
        summary=Summary(from_=sender, to="x", subject=subject, date="d", message_id="<m@x>"),
        targets=tuple(targets),
        outbound=tuple(outbound),
    )


def later(minutes: int = 0) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)


async def raises(exc: type[Exception], awaitable: Awaitable[object]) -> None:
    try:
        await awaitable
    except exc:
        return
    raise AssertionError(f"expected {exc.__name__}")


async def _body_rows(store: MailStore) -> int:
    return (await store.stats()).extra["bodies"]


async def _hosted(store: MailStore, *users: str) -> None:
    """Host example.test and create the given local users there."""
    await store.add_domain("example.test")
    for user in users:
        await store.add_user(f"{user}@example.test", "hash")


# -- life cycle, domains, users ----------------------------------------------------------------


async def check_schema_version(store: MailStore) -> None:
    assert await store.schema_version() >= 1


async def check_domains_and_postmaster(store: MailStore) -> None:
    domain = await store.add_domain("Example.TEST")
    assert domain.name == "example.test"
    assert domain.created_at.tzinfo is not None
    assert await store.hosts_domain("EXAMPLE.test")
    assert not await store.hosts_domain("other.test")
    await raises(Conflict, store.add_domain("example.test"))
    postmaster = await store.get_user("Postmaster@example.test")
    assert postmaster is not None and postmaster.password_hash == ""
    assert [d.name for d in await store.list_domains()] == ["example.test"]
    await raises(Conflict, store.remove_user("postmaster@example.test"))
    await store.remove_domain("example.test")
    assert await store.list_domains() == []
    assert await store.get_user("postmaster@example.test") is None
    await raises(NotFound, store.remove_domain("example.test"))


async def check_users(store: MailStore) -> None:
    await _hosted(store)
    scram = ScramCredentials(salt=b"s", iterations=4096, stored_key=b"k1", server_key=b"k2")
    user = await store.add_user("<Bob@Example.test>", "h1", scram)
    assert user.address == "bob@example.test" and user.domain == "example.test"
    assert user.scram == scram
    await raises(Conflict, store.add_user("bob@example.test", "h2"))
    await raises(NotFound, store.add_user("carol@nowhere.test", "h"))
    names = [m.name for m in await store.list_mailboxes("bob@example.test")]
    assert names == [INBOX, SENT]
    await store.set_password("bob@example.test", "h3")
    updated = await store.get_user("bob@example.test")
    assert updated is not None and updated.password_hash == "h3" and updated.scram is None
    await raises(NotFound, store.set_password("nobody@example.test", "h"))
    listed = [u.address for u in await store.list_users("example.test")]
    assert listed == ["bob@example.test", "postmaster@example.test"]
    await store.remove_user("bob@example.test")
    assert await store.get_user("bob@example.test") is None
    await raises(NotFound, store.remove_user("bob@example.test"))
    await raises(NotFound, store.list_mailboxes("bob@example.test"))


async def check_aliases_and_resolve(store: MailStore) -> None:
    await _hosted(store, "bob")
    alias = await store.add_alias("Robert@example.test", "bob@example.test")
    assert (alias.alias, alias.address) == ("robert@example.test", "bob@example.test")
    assert await store.resolve("ROBERT@example.test") == "bob@example.test"
    assert await store.resolve("bob@example.test") == "bob@example.test"
    assert await store.resolve("postmaster@example.test") == "postmaster@example.test"
    assert await store.resolve("nobody@example.test") is None
    assert await store.resolve("bob@elsewhere.test") is None
    for address in ("ROBERT@example.test", "bob@example.test", "nobody@example.test"):
        known, owner = store.resolve_now(address)  # at once, or not at all: never a wrong answer
        assert not known or owner == await store.resolve(address)
    await raises(Conflict, store.add_alias("robert@example.test", "bob@example.test"))
    await raises(Conflict, store.add_alias("bob@example.test", "postmaster@example.test"))
    await raises(Conflict, store.add_user("robert@example.test", "h"))
    await raises(NotFound, store.add_alias("x@example.test", "nobody@example.test"))
    await raises(NotFound, store.add_alias("x@unhosted.test", "bob@example.test"))
    assert [a.alias for a in await store.list_aliases("bob@example.test")] == [
        "robert@example.test"
    ]
    await store.remove_alias("robert@example.test")
    assert await store.resolve("robert@example.test") is None
    assert store.resolve_now("robert@example.test")[1] is None
    await raises(NotFound, store.remove_alias("robert@example.test"))
    await store.add_alias("bobby@example.test", "bob@example.test")
    await store.remove_user("bob@example.test")
    assert await store.list_aliases() == []


# -- mail -------------------------------------------------------------------------------------


async def check_deliver_and_read(store: MailStore) -> None:
    await _hosted(store, "bob", "carol")
    targets = [
        Target("bob@example.test", INBOX, "alice@remote.test"),
        Target("carol@example.test", INBOX, "alice@remote.test"),
        Target("bob@example.test", SENT, None),
    ]
    accepted = await store.deliver(letter(b"body-1", targets=targets, subject="first"))
    assert len(accepted.message_ids) == 3 and accepted.queue_id is None
    assert len(set(accepted.message_ids)) == 3
    assert await _body_rows(store) == 1  # one body row shared by every copy
    inbox = await store.list_messages("bob@example.test")
    assert [(m.uid, m.subject, m.folder) for m in inbox] == [(1, "first", INBOX)]
    assert inbox[0].received_at.tzinfo is not None
    sent = await store.list_messages("bob@example.test", SENT)
    assert [m.id for m in sent] == [accepted.message_ids[2]]
    stored = await store.get_message(accepted.message_ids[1])
    assert stored.info.address == "carol@example.test"
    assert stored.raw == b"Return-Path: <alice@remote.test>\r\nbody-1"
    assert stored.info.size == len(stored.raw) == inbox[0].size
    copy = await store.get_message(accepted.message_ids[2])
    assert copy.raw == b"body-1" and copy.info.size == 6
    boxes = {b.name: b for b in await store.list_mailboxes("bob@example.test")}
    assert boxes[INBOX].messages == 1 and boxes[INBOX].uidnext == 2
    await raises(NotFound, store.get_message(max(accepted.message_ids) + 1000))
    await raises(NotFound, store.list_messages("bob@example.test", "NoSuchFolder"))
    await raises(NotFound, store.list_messages("nobody@example.test"))


async def check_null_return_path(store: MailStore) -> None:
    await _hosted(store, "bob")
    accepted = await store.deliver(
        letter(b"x", sender="", targets=[Target("bob@example.test", return_path="")])
    )
    stored = await store.get_message(accepted.message_ids[0])
    assert stored.raw == b"Return-Path: <>\r\nx"


async def check_uids_increase_and_never_reused(store: MailStore) -> None:
    assert hasattr(store, "delete_message"), "engines provide delete_message"
    expunging = store
    await _hosted(store, "bob")
    target = [Target("bob@example.test")]
    ids = [(await store.deliver(letter(targets=target))).message_ids[0] for _ in range(3)]
    before = (await store.list_mailboxes("bob@example.test"))[0]
    await expunging.delete_message(ids[2])
    await expunging.delete_message(ids[1])
    await raises(NotFound, expunging.delete_message(ids[1]))
    after = (await store.list_mailboxes("bob@example.test"))[0]
    assert after.highestmodseq > before.highestmodseq
    await store.deliver(letter(targets=target))
    uids = [m.uid for m in await store.list_messages("bob@example.test")]
    assert uids == [1, 4]
    modseqs = await store.list_mailboxes("bob@example.test")
    assert modseqs[0].uidnext == 5 and modseqs[0].uidvalidity > 0


async def check_deliver_body_in_parts(store: MailStore) -> None:
    """A body given as parts is stored as their concatenation, for mailboxes and the queue."""
    await _hosted(store, "bob")
    parts = (b"Received: x\r\n", b"Subject: parts\r\n\r\n", b"a" * 70000, b"\r\nend\r\n")
    body = Letter(
        parts,
        "alice@remote.test",
        Summary(subject="parts"),
        [Target("bob@example.test")],
        ["carol@remote.test"],
    )
    accepted = await store.deliver(body)
    stored = await store.get_message(accepted.message_ids[0])
    assert stored.raw == b"".join(parts)
    assert stored.info.size == len(b"".join(parts))
    assert accepted.queue_id is not None
    assert await store.get_queue_body(accepted.queue_id) == b"".join(parts)


async def check_deliver_unknown_target_stores_nothing(store: MailStore) -> None:
    await _hosted(store, "bob")
    targets = [Target("bob@example.test"), Target("ghost@example.test")]
    await raises(NotFound, store.deliver(letter(targets=targets, outbound=["x@remote.test"])))
    wrong_folder = [Target("bob@example.test", "Nope")]
    await raises(NotFound, store.deliver(letter(targets=wrong_folder)))
    assert await store.list_messages("bob@example.test") == []
    assert await store.count_queued() == 0
    assert await _body_rows(store) == 0


async def check_bodies_removed_with_last_reference(store: MailStore) -> None:
    await _hosted(store, "bob", "carol")
    targets = [Target("bob@example.test"), Target("carol@example.test")]
    accepted = await store.deliver(letter(targets=targets, outbound=["x@remote.test"]))
    assert accepted.queue_id is not None
    await store.remove_user("bob@example.test")
    assert await _body_rows(store) == 1
    await store.delete_queue_entry(accepted.queue_id)
    assert await _body_rows(store) == 1
    await store.remove_domain("example.test")
    assert await _body_rows(store) == 0
    assert (await store.stats()).messages == 0


async def check_concurrent_deliveries_land_once(store: MailStore) -> None:
    await _hosted(store, "bob")

    async def one(n: int) -> int:
        mail = letter(f"n={n}".encode(), targets=[Target("bob@example.test")], subject=str(n))
        return (await store.deliver(mail)).message_ids[0]

    ids = await asyncio.gather(*(one(n) for n in range(200)))
    assert len(set(ids)) == 200
    messages = await store.list_messages("bob@example.test")
    assert sorted(m.subject for m in messages) == sorted(str(n) for n in range(200))
    assert [m.uid for m in messages] == list(range(1, 201))
    assert (await store.stats()).extra["bodies"] == 200


async def check_failing_writes_do_not_disturb_others(store: MailStore) -> None:
    await _hosted(store, "bob")
    good = [store.deliver(letter(targets=[Target("bob@example.test")])) for _ in range(20)]
    bad = [store.deliver(letter(targets=[Target("ghost@example.test")])) for _ in range(20)]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results[:20])
    assert all(isinstance(r, NotFound) for r in results[20:])
    assert len(await store.list_messages("bob@example.test")) == 20


# -- the outbound queue -----------------------------------------------------------------------


async def _queue(store: MailStore, *rcpts: str, sender: str = "bob@example.test") -> int:
    accepted = await store.deliver(letter(b"queued body", sender=sender, outbound=rcpts))
    assert accepted.queue_id is not None
    return accepted.queue_id


def _rcpt_ids(claims: Sequence[Claim]) -> list[int]:
    return sorted(r.id for c in claims for r in c.recipients)


async def check_enqueue_and_claim(store: MailStore) -> None:
    await _hosted(store, "bob")
    mail = letter(
        b"out",
        sender="<Bob@example.test>",
        targets=[Target("bob@example.test", SENT)],
        outbound=["Dave@Remote.test", "eve@remote.test", "frank@other.test", "dave@remote.test"],
    )
    accepted = await store.deliver(mail)
    assert accepted.queue_id is not None and len(accepted.message_ids) == 1
    assert await _body_rows(store) == 1  # the Sent copy and the queue entry share the body
    entry = await store.get_queue_entry(accepted.queue_id)
    assert entry.sender == "bob@example.test" and entry.size == 3
    assert [r.address for r in entry.recipients] == [
        "dave@remote.test",
        "eve@remote.test",
        "frank@other.test",
    ]
    assert all(r.state is RcptState.QUEUED and r.attempts == 0 for r in entry.recipients)
    assert all(r.next_attempt is not None and not r.held for r in entry.recipients)
    assert await store.get_queue_body(accepted.queue_id) == b"out"
    assert await store.count_queued() == 3
    assert await store.count_queued(["remote.test"]) == 2
    assert [e.id for e in await store.list_queue()] == [accepted.queue_id]
    due = await store.next_due()
    assert due is not None and due <= later(1)
    claims = await store.claim(OWNER, later(1), LEASE)
    by_domain = {c.domain: c for c in claims}
    assert sorted(by_domain) == ["other.test", "remote.test"]
    assert len(by_domain["remote.test"].recipients) == 2
    assert by_domain["other.test"].body == b"out"
    assert by_domain["other.test"].sender == "bob@example.test"
    assert await store.claim(OTHER, later(1), LEASE) == []
    assert await store.claim(OWNER, later(1), LEASE) == []  # a live lease is never re-issued
    second = await _queue(store, "a@x.test", "b@x.test", "c@x.test")
    limited = await store.claim(OTHER, later(1), LEASE, limit=2)
    assert len(_rcpt_ids(limited)) == 2 and {c.queue_id for c in limited} == {second}


async def check_lease_expiry_and_stale_outcomes(store: MailStore) -> None:
    await _hosted(store, "bob")
    queue_id = await _queue(store, "dave@remote.test")
    first = await store.claim(OWNER, later(1), LEASE)
    assert len(first) == 1
    rcpt = first[0].recipients[0].id
    assert await store.claim(OTHER, later(2), LEASE) == []
    taken = await store.claim(OTHER, later(1) + LEASE + timedelta(seconds=1), LEASE)
    assert _rcpt_ids(taken) == [rcpt]
    bounce = letter(b"bounce", sender="", targets=[Target("bob@example.test", return_path="")])
    await store.record_outcomes(OWNER, [Outcome(rcpt, OutcomeKind.PERMANENT, "550 x")], bounce)
    assert await store.count_queued() == 1  # the stale owner's outcome was ignored ...
    assert await store.list_messages("bob@example.test") == []  # ... and so was its notice
    await store.record_outcomes(OTHER, [Outcome(rcpt, OutcomeKind.PERMANENT, "550 x")], bounce)
    assert await store.count_queued() == 0
    assert len(await store.list_messages("bob@example.test")) == 1
    await raises(NotFound, store.get_queue_entry(queue_id))  # nothing left to deliver


async def check_record_outcomes(store: MailStore) -> None:
    await _hosted(store, "bob")
    queue_id = await _queue(store, "a@remote.test", "b@remote.test", "c@remote.test")
    (claim,) = await store.claim(OWNER, later(1), LEASE)
    a, b, c = (r.id for r in claim.recipients)
    retry_at = later(30)
    outcomes = [
        Outcome(a, OutcomeKind.DELIVERED, "250 ok"),
        Outcome(b, OutcomeKind.TRANSIENT, "451 later", next_attempt=retry_at, warned=True),
        Outcome(c, OutcomeKind.PERMANENT, "550 no such user"),
    ]
    dsn = letter(b"dsn", sender="", outbound=["bob@remote.test"])
    await store.record_outcomes(OWNER, outcomes, dsn)
    entry = await store.get_queue_entry(queue_id)
    states = {r.id: r for r in entry.recipients}
    assert states[a].state is RcptState.DELIVERED and states[a].attempts == 1
    assert states[b].state is RcptState.QUEUED and states[b].warned
    assert states[b].last_reply == "451 later" and states[b].attempts == 1
    b_next = states[b].next_attempt
    assert b_next is not None and abs((b_next - retry_at).total_seconds()) < 1
    assert states[c].state is RcptState.FAILED and states[c].last_reply == "550 no such user"
    assert await store.count_queued() == 2  # b, and the DSN queued in the same transaction
    assert await store.count_queued(["remote.test"]) == 2
    next_due = await store.next_due()
    assert next_due is not None and next_due < retry_at
    assert b not in _rcpt_ids(await store.claim(OTHER, later(1), LEASE))  # the DSN only
    assert b in _rcpt_ids(await store.claim(OWNER, later(31), LEASE))


async def check_release(store: MailStore) -> None:
    await _hosted(store, "bob")
    await _queue(store, "dave@remote.test")
    ids = _rcpt_ids(await store.claim(OWNER, later(1), LEASE))
    await store.release(OTHER, ids)  # not OTHER's lease: no effect
    assert await store.claim(OTHER, later(1), LEASE) == []
    await store.release(OWNER, ids)
    again = await store.claim(OTHER, later(1), LEASE)
    assert _rcpt_ids(again) == ids and again[0].recipients[0].attempts == 0


async def check_flush_and_retry(store: MailStore) -> None:
    await _hosted(store, "bob")
    queue_id = await _queue(store, "a@remote.test", "b@other.test")
    ids = _rcpt_ids(await store.claim(OWNER, later(1), LEASE))
    await store.record_outcomes(
        OWNER, [Outcome(i, OutcomeKind.TRANSIENT, "451", next_attempt=later(60)) for i in ids]
    )
    assert await store.claim(OTHER, later(1), LEASE) == []
    assert await store.flush("nowhere.test") == 0
    assert await store.flush("other.test") == 1
    assert len(_rcpt_ids(await store.claim(OTHER, later(1), LEASE))) == 1
    await store.release(OTHER, ids)
    assert await store.flush() == 2
    assert _rcpt_ids(await store.claim(OTHER, later(1), LEASE)) == ids
    await store.record_outcomes(
        OTHER, [Outcome(i, OutcomeKind.TRANSIENT, "451", next_attempt=later(60)) for i in ids]
    )
    assert await store.retry(queue_id) == 2
    assert _rcpt_ids(await store.claim(OWNER, later(1), LEASE)) == ids
    await raises(NotFound, store.retry(queue_id + 1000))


async def check_delete_and_bounce(store: MailStore) -> None:
    await _hosted(store, "bob")
    dropped = await _queue(store, "a@remote.test")
    await store.delete_queue_entry(dropped)
    await raises(NotFound, store.get_queue_entry(dropped))
    await raises(NotFound, store.get_queue_body(dropped))
    await raises(NotFound, store.delete_queue_entry(dropped))
    assert await store.count_queued() == 0
    bounced = await _queue(store, "b@remote.test", "c@remote.test")
    assert await store.bounce_queue_entry(bounced) == 2
    entry = await store.get_queue_entry(bounced)
    assert all(r.give_up for r in entry.recipients)
    claims = await store.claim(OWNER, later(0) + timedelta(seconds=1), LEASE)
    assert all(r.give_up for c in claims for r in c.recipients) and len(claims) == 1
    await raises(NotFound, store.bounce_queue_entry(bounced + 1000))


async def check_relay_domains(store: MailStore) -> None:
    await _hosted(store, "bob")
    early = await _queue(store, "z@late.test")
    relay = await store.add_relay_domain("Relay.TEST", "bob@example.test")
    assert (relay.domain, relay.owner) == ("relay.test", "bob@example.test")
    await raises(Conflict, store.add_relay_domain("relay.test", "bob@example.test"))
    await raises(Conflict, store.add_relay_domain("example.test", "bob@example.test"))
    await raises(Conflict, store.add_domain("relay.test"))
    await raises(NotFound, store.add_relay_domain("x.test", "nobody@example.test"))
    queue_id = await _queue(store, "x@relay.test", "y@remote.test")
    held = {r.address: r.held for r in (await store.get_queue_entry(queue_id)).recipients}
    assert held == {"x@relay.test": True, "y@remote.test": False}
    await store.add_relay_domain("late.test", "bob@example.test")
    assert (await store.get_queue_entry(early)).recipients[0].held  # held once relayed
    assert await store.flush("relay.test") == 0
    mx = await store.claim(OWNER, later(1), LEASE)
    assert [r.address for c in mx for r in c.recipients] == ["y@remote.test"]
    assert await store.count_queued(["relay.test", "late.test"]) == 2
    etrn = await store.claim(OTHER, later(-60), LEASE, domains=["RELAY.test"])
    assert [(c.domain, [r.address for r in c.recipients]) for c in etrn] == [
        ("relay.test", ["x@relay.test"])
    ]
    listed = await store.list_relay_domains("bob@example.test")
    assert [r.domain for r in listed] == ["late.test", "relay.test"]
    await store.remove_relay_domain("late.test")
    assert not (await store.get_queue_entry(early)).recipients[0].held
    await raises(NotFound, store.remove_relay_domain("late.test"))
    assert [r.domain for r in await store.list_relay_domains()] == ["relay.test"]


async def check_concurrent_claims_are_disjoint(store: MailStore) -> None:
    await _hosted(store, "bob")
    for n in range(10):
        await _queue(store, *(f"r{i}@d{n % 3}.test" for i in range(5)))
    owners = [f"worker-{n}" for n in range(6)]
    results = await asyncio.gather(*(store.claim(o, later(1), LEASE, limit=12) for o in owners))
    ids = [i for claims in results for i in _rcpt_ids(claims)]
    assert len(ids) == len(set(ids)) == 50  # every recipient leased to exactly one worker


async def check_concurrent_duplicates_conflict(store: MailStore) -> None:
    results = await asyncio.gather(
        *(store.add_domain("race.test") for _ in range(5)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))


CHECKS: list[Check] = [
    check_deliver_body_in_parts,
    check_schema_version,
    check_domains_and_postmaster,
    check_users,
    check_aliases_and_resolve,
    check_deliver_and_read,
    check_null_return_path,
    check_uids_increase_and_never_reused,
    check_deliver_unknown_target_stores_nothing,
    check_bodies_removed_with_last_reference,
    check_concurrent_deliveries_land_once,
    check_failing_writes_do_not_disturb_others,
    check_enqueue_and_claim,
    check_lease_expiry_and_stale_outcomes,
    check_record_outcomes,
    check_release,
    check_flush_and_retry,
    check_delete_and_bounce,
    check_relay_domains,
    check_concurrent_claims_are_disjoint,
    check_concurrent_duplicates_conflict,
]
