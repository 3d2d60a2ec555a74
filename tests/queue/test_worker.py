"""The queue worker against a real in-process destination node (app.Node listening on loopback)
and real SQLite stores: delivery, bounces, retries, give-up, delay warnings, MX fallback, local
short-cut, TLS logging and the CLI's view of the queue."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pochta import app, config
from pochta.client.session import Timeouts
from pochta.dns import DnsResolver
from pochta.message.headers import parse_summary
from pochta.queue.worker import QueueWorker, make_owner
from pochta.store import open_store
from pochta.store.api import Letter, MailStore, RcptState
from pochta.testing.dnsserver import DnsServer
from pochta.testing.node import free_port

REMOTE_IP = "127.0.0.3"
DEAD_IP = "127.0.0.9"  # nothing listens there
BODY = b"From: alice@mail.test\r\nTo: bob@yandex.test\r\nSubject: hello\r\n\r\nHi Bob\r\n"


@dataclass
class Remote:
    node: app.Node
    port: int
    cert: Path

    @property
    def store(self) -> MailStore:
        assert self.node.store is not None
        return self.node.store


@pytest.fixture
async def remote(tmp_path: Path) -> AsyncIterator[Remote]:
    """yandex.test: a real node with an MX listener on REMOTE_IP (port chosen by the kernel)."""
    cfg = config.from_dict(
        {
            "hostname": "mx.yandex.test",
            "data_dir": str(tmp_path / "yandex"),
            "listen": {"mx": [f"{REMOTE_IP}:0"]},
            "delivery": {"poll": 60},
        }
    )
    node = app.Node(cfg)
    await node.start()
    assert node.store is not None and node.server is not None
    await node.store.add_domain("yandex.test")
    await node.store.add_user("bob@yandex.test", "")
    cert = Path(cfg.data_dir) / "tls" / "cert.pem"
    try:
        yield Remote(node, node.server.bound[0][1], cert)
    finally:
        await node.stop()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[MailStore]:
    """mail.test: the sending node's store."""
    s = open_store(f"sqlite:///{tmp_path}/mail.db")
    await s.open()
    await s.add_domain("mail.test")
    await s.add_user("alice@mail.test", "")
    await s.add_user("carol@mail.test", "")
    try:
        yield s
    finally:
        await s.close()


def make_worker(store: MailStore, routes: dict[str, list[str]], **kwargs: object) -> QueueWorker:
    options: dict[str, object] = {
        "hostname": "mx.mail.test",
        "owner": make_owner("mx.mail.test"),
        "port": 25,
        "concurrency": 4,
        "lease": 30.0,
        "poll": 0.2,
        "schedule": (timedelta(seconds=60),),
        "give_up_after": timedelta(days=1),
        "warn_after": None,
        "timeouts": Timeouts(connect=2, greeting=5, command=5, data_init=5, data_block=5),
    }
    options.update(kwargs)
    resolver = kwargs.pop("resolver", None) or DnsResolver(nameservers=[], routes=routes)
    options.pop("resolver", None)
    return QueueWorker(store, resolver, **options)  # type: ignore[arg-type]


async def submit(
    store: MailStore, rcpts: list[str], sender: str = "alice@mail.test", body: bytes = BODY
) -> int:
    accepted = await store.deliver(Letter(body, sender, parse_summary(body), (), rcpts))
    assert accepted.queue_id is not None
    return accepted.queue_id


async def inbox_raw(store: MailStore, address: str) -> list[bytes]:
    return [(await store.get_message(m.id)).raw for m in await store.list_messages(address)]


def route(remote: Remote) -> dict[str, list[str]]:
    return {"yandex.test": [f"{REMOTE_IP}:{remote.port}"]}


async def test_delivers_to_the_remote_node_and_empties_the_queue(
    store: MailStore, remote: Remote, caplog: pytest.LogCaptureFixture
) -> None:
    await submit(store, ["bob@yandex.test"])
    caplog.set_level(logging.INFO, logger="pochta.maillog")
    worker = make_worker(store, route(remote))
    assert await worker.run_once() == 1
    (raw,) = await inbox_raw(remote.store, "bob@yandex.test")
    assert raw.startswith(b"Return-Path: <alice@mail.test>\r\n")
    assert b"Hi Bob" in raw and b"(using TLS" in raw  # STARTTLS was used
    assert await store.list_queue() == []
    line = next(r.getMessage() for r in caplog.records if "event=sent" in r.getMessage())
    assert "rcpt=bob@yandex.test" in line and 'tls="TLS' in line and "verified=no" in line


async def test_verified_flag_when_the_certificate_is_trusted(
    store: MailStore, remote: Remote, caplog: pytest.LogCaptureFixture
) -> None:
    records = {
        ("yandex.test", "MX"): ["10 mx.yandex.test."],
        ("mx.yandex.test", "A"): [REMOTE_IP],
    }
    caplog.set_level(logging.INFO, logger="pochta.maillog")
    with DnsServer(records) as dns_server:
        resolver = DnsResolver(nameservers=[dns_server.address])
        worker = make_worker(
            store, {}, resolver=resolver, port=remote.port, tls_cafile=str(remote.cert)
        )
        await submit(store, ["bob@yandex.test"])
        assert await worker.run_once() == 1
    assert len(await inbox_raw(remote.store, "bob@yandex.test")) == 1
    assert any("verified=yes" in r.getMessage() for r in caplog.records)


async def test_unknown_user_bounces_into_the_local_senders_inbox(
    store: MailStore, remote: Remote
) -> None:
    await submit(store, ["nobody@yandex.test", "bob@yandex.test"])
    worker = make_worker(store, route(remote))
    assert await worker.run_once() == 2
    assert len(await inbox_raw(remote.store, "bob@yandex.test")) == 1
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert dsn.startswith(b"Return-Path: <>\r\n")
    assert b"multipart/report; report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; nobody@yandex.test" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.1.1" in dsn
    assert b"Diagnostic-Code: smtp; 550 5.1.1" in dsn
    assert dsn.count(b"Final-Recipient:") == 1  # bob got it: not reported
    assert b"Remote-MTA: dns; 127.0.0.3\r\n" in dsn
    assert await store.list_queue() == []


async def test_bounce_to_a_remote_sender_is_queued_with_the_null_sender(
    store: MailStore, remote: Remote
) -> None:
    await submit(store, ["nobody@yandex.test"], sender="someone@elsewhere.test")
    worker = make_worker(store, route(remote))
    await worker.run_once()
    (entry,) = await store.list_queue()
    assert entry.sender == ""
    assert [r.address for r in entry.recipients] == ["someone@elsewhere.test"]
    assert b"Status: 5.1.1" in await store.get_queue_body(entry.id)


async def test_a_failing_bounce_goes_to_the_postmaster(store: MailStore, remote: Remote) -> None:
    await submit(store, ["nobody@yandex.test"], sender="")
    worker = make_worker(store, route(remote))
    await worker.run_once()
    assert await store.list_queue() == []  # never a bounce to <>
    (dsn,) = await inbox_raw(store, "postmaster@mail.test")
    assert b"To: <postmaster@mail.test>" in dsn and b"Status: 5.1.1" in dsn
    assert await inbox_raw(store, "alice@mail.test") == []


async def test_connection_refused_is_retried_later(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@yandex.test"])
    worker = make_worker(store, {"yandex.test": [f"{DEAD_IP}:{free_port(DEAD_IP)}"]})
    assert await worker.run_once() == 1
    entry = await store.get_queue_entry(queue_id)
    (rcpt,) = entry.recipients
    assert rcpt.state is RcptState.QUEUED and rcpt.attempts == 1
    assert rcpt.last_reply.startswith("4.4.1 connect to") and DEAD_IP in rcpt.last_reply
    assert rcpt.next_attempt is not None and rcpt.next_attempt > entry.created_at
    assert await worker.run_once() == 0  # not due yet
    assert await inbox_raw(store, "alice@mail.test") == []


async def test_second_host_takes_over(store: MailStore, remote: Remote) -> None:
    await submit(store, ["bob@yandex.test"])
    hosts = [f"{DEAD_IP}:{remote.port}", f"{REMOTE_IP}:{remote.port}"]
    worker = make_worker(store, {"yandex.test": hosts})
    await worker.run_once()
    assert len(await inbox_raw(remote.store, "bob@yandex.test")) == 1
    assert await store.list_queue() == []


async def test_give_up_bounces_with_delivery_time_expired(store: MailStore) -> None:
    await submit(store, ["bob@yandex.test"])
    dead = {"yandex.test": [f"{DEAD_IP}:{free_port(DEAD_IP)}"]}
    worker = make_worker(store, dead, give_up_after=timedelta(0))
    await worker.run_once()
    assert await store.list_queue() == []
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Status: 5.4.7" in dsn and b"Action: failed" in dsn
    assert b"connect to" in dsn  # the last reply is part of the report


async def test_delay_warning_is_sent_once(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@yandex.test"])
    dead = {"yandex.test": [f"{DEAD_IP}:{free_port(DEAD_IP)}"]}
    worker = make_worker(store, dead, warn_after=timedelta(microseconds=1))
    await worker.run_once()
    (warning,) = await inbox_raw(store, "alice@mail.test")
    assert b"Action: delayed" in warning and b"Will-Retry-Until:" in warning
    assert b"Status: 4.4.1" in warning
    (rcpt,) = (await store.get_queue_entry(queue_id)).recipients
    assert rcpt.warned and rcpt.state is RcptState.QUEUED
    assert await store.flush() == 1
    await worker.run_once()
    assert len(await inbox_raw(store, "alice@mail.test")) == 1  # no second warning


async def test_null_mx_bounces_without_connecting(store: MailStore) -> None:
    with DnsServer({("yandex.test", "MX"): ["0 ."]}) as dns_server:
        worker = make_worker(store, {}, resolver=DnsResolver(nameservers=[dns_server.address]))
        await submit(store, ["bob@yandex.test"])
        await worker.run_once()
        assert ("yandex.test", "A") not in dns_server.queries
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Status: 5.1.10" in dsn
    assert await store.list_queue() == []


async def test_hosted_recipients_are_delivered_locally(store: MailStore) -> None:
    await submit(store, ["carol@mail.test", "ghost@mail.test"])
    worker = make_worker(store, {})
    assert await worker.run_once() == 2
    (copy,) = await inbox_raw(store, "carol@mail.test")
    assert copy.startswith(b"Return-Path: <alice@mail.test>") and b"Hi Bob" in copy
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Final-Recipient: rfc822; ghost@mail.test" in dsn and b"Status: 5.1.1" in dsn
    assert await store.list_queue() == []


async def test_administrator_bounce(store: MailStore) -> None:
    queue_id = await submit(store, ["bob@yandex.test"])
    assert await store.bounce_queue_entry(queue_id) == 1
    worker = make_worker(store, {})  # no route at all: no connection is needed
    await worker.run_once()
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Status: 5.0.0" in dsn and b"administrator" in dsn
    assert await store.list_queue() == []


async def test_wake_delivers_at_once_and_stop_releases(store: MailStore, remote: Remote) -> None:
    worker = make_worker(store, route(remote), poll=30.0)
    worker.start()
    try:
        await asyncio.sleep(0.1)
        await submit(store, ["bob@yandex.test"])
        worker.wake()
        for _ in range(100):
            if await inbox_raw(remote.store, "bob@yandex.test"):
                break
            await asyncio.sleep(0.05)
        assert len(await inbox_raw(remote.store, "bob@yandex.test")) == 1
    finally:
        await worker.stop()
    assert await store.list_queue() == []


async def test_stop_releases_leases_of_unfinished_deliveries(store: MailStore) -> None:
    """A peer that accepts TCP but never greets: stop() cancels and gives the lease back."""
    hung: list[asyncio.StreamWriter] = []

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        hung.append(w)

    server = await asyncio.start_server(silent, REMOTE_IP, 0)
    port = server.sockets[0].getsockname()[1]
    queue_id = await submit(store, ["bob@yandex.test"])
    worker = make_worker(store, {"yandex.test": [f"{REMOTE_IP}:{port}"]}, grace=0.2)
    worker.start()
    for _ in range(100):
        if hung:
            break
        await asyncio.sleep(0.05)
    await worker.stop()
    server.close()
    for w in hung:
        w.close()
    (rcpt,) = (await store.get_queue_entry(queue_id)).recipients
    assert rcpt.attempts == 0  # released, not recorded
    claims = await store.claim("another-worker", datetime.now(UTC), timedelta(seconds=9))
    assert [c.queue_id for c in claims] == [queue_id]
