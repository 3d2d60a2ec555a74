"""Held relay mail and the queue's time limits (RFC 5321 §4.5.4.1): the worker never delivers
held recipients itself, but `expire_held()` bounces them after `give_up_after`, warns once after
`warn_after`, applies administrator bounces, and leaves younger ones alone. Real SQLite store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from test_worker import inbox_raw, make_worker, submit

from pochta.store import open_store
from pochta.store.api import MailStore, RcptState


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailStore]:
    """mail.test, holding branch.test's mail for its customer cust@mail.test."""
    s = open_store(f"sqlite:///{tmp_path}/mail.db")
    await s.open()
    await s.add_domain("mail.test")
    await s.add_user("alice@mail.test", "")
    await s.add_user("cust@mail.test", "")
    await s.add_relay_domain("branch.test", "cust@mail.test")
    try:
        yield s
    finally:
        await s.close()


async def test_held_mail_older_than_give_up_after_bounces(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@branch.test"])
    (rcpt,) = (await store.get_queue_entry(queue_id)).recipients
    assert rcpt.held
    worker = make_worker(store, {}, give_up_after=timedelta(0), held_every=0.0)
    assert await worker.run_once() == 0  # a pass claims no held mail...
    assert await store.list_queue() == []  # ...but the held recipient has expired
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Final-Recipient: rfc822; bob@branch.test" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.4.7" in dsn
    assert b"not collected" in dsn


async def test_young_held_mail_is_left_alone_and_not_leased(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@branch.test"])
    worker = make_worker(store, {}, give_up_after=timedelta(days=1), held_every=0.0)
    assert await worker.expire_held() == 0
    await worker.run_once()
    (rcpt,) = (await store.get_queue_entry(queue_id)).recipients
    assert rcpt.state is RcptState.QUEUED and rcpt.attempts == 0 and rcpt.held
    assert await inbox_raw(store, "alice@mail.test") == []
    # the customer can still take it at once (ATRN claims the domain): no lease is left behind
    claims = await store.claim(
        "atrn", datetime.now(UTC), timedelta(seconds=9), domains=["branch.test"]
    )
    assert [c.queue_id for c in claims] == [queue_id]


async def test_only_the_expired_recipients_of_a_domain_bounce(store: MailStore) -> None:
    await submit(store, ["old@branch.test"])
    worker = make_worker(store, {}, give_up_after=timedelta(milliseconds=300), held_every=0.0)
    await asyncio.sleep(0.4)
    young = await submit(store, ["young@branch.test"])
    assert await worker.expire_held() == 1
    assert [e.id for e in await store.list_queue()] == [young]  # the old entry is done
    (kept,) = (await store.get_queue_entry(young)).recipients
    assert kept.state is RcptState.QUEUED and kept.attempts == 0
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"old@branch.test" in dsn and b"young@branch.test" not in dsn
    claims = await store.claim(
        "atrn", datetime.now(UTC), timedelta(seconds=9), domains=["branch.test"]
    )
    assert [c.queue_id for c in claims] == [young]  # released, not kept leased


async def test_held_mail_gets_one_delay_warning(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@branch.test"])
    worker = make_worker(store, {}, warn_after=timedelta(microseconds=1), held_every=0.0)
    assert await worker.expire_held() == 1
    (warning,) = await inbox_raw(store, "alice@mail.test")
    assert b"Action: delayed" in warning and b"Status: 4.4.0" in warning
    (rcpt,) = (await store.get_queue_entry(queue_id)).recipients
    assert rcpt.warned and rcpt.held and rcpt.state is RcptState.QUEUED
    assert await worker.expire_held() == 0  # warned once only
    assert len(await inbox_raw(store, "alice@mail.test")) == 1


async def test_administrator_bounce_of_held_mail(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@branch.test"])
    assert await store.bounce_queue_entry(queue_id) == 1
    worker = make_worker(store, {}, held_every=0.0)
    await worker.run_once()
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Status: 5.0.0" in dsn and b"administrator" in dsn
    assert await store.list_queue() == []


async def test_the_check_runs_every_held_every_seconds(store: MailStore) -> None:
    worker = make_worker(store, {}, give_up_after=timedelta(0), held_every=3600.0)
    await worker.run_once()  # the first pass checks (nothing held yet) ...
    queue_id = await submit(store, ["bob@branch.test"])
    await worker.run_once()  # ... the next one is an hour away
    (rcpt,) = (await store.get_queue_entry(queue_id)).recipients
    assert rcpt.state is RcptState.QUEUED
