"""One connection per destination: claims for a domain that already has a delivery task are
handed to that task and go over its open connection (RFC 5321 §4.5.3: several letters on one
connection), so a destination never sees two connections at once from one worker. A counting
TCP relay on loopback sits between the worker and a real in-process destination node."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from test_worker import REMOTE_IP, Remote, inbox_raw, make_worker, remote, store, submit

from pochta.store.api import MailStore

__all__ = ["remote", "store"]  # fixtures


@dataclass
class Counter:
    """Forwards every connection to the destination; counts them and the most at once."""

    target: int
    port: int = 0
    total: int = 0
    open: int = 0
    most: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.total += 1
        self.open += 1
        self.most = max(self.most, self.open)
        up_reader, up_writer = await asyncio.open_connection(REMOTE_IP, self.target)
        try:
            await asyncio.gather(self._from_worker(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _from_worker(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            await _pipe(reader, writer)
        finally:
            self.open -= 1  # the worker closed its end


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@pytest.fixture
async def counter(remote: Remote) -> AsyncIterator[Counter]:
    c = Counter(remote.port)
    server = await asyncio.start_server(c.handle, REMOTE_IP, 0)
    c.port = server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        server.close()


async def _deliver(store: MailStore, remote: Remote, worker_options: dict[str, object]) -> None:
    """Run the worker until bob@yandex.test has every letter queued so far."""
    want = len(await store.list_queue())
    worker = make_worker(store, {}, poll=0.05, **worker_options)
    worker.start()
    try:
        for _ in range(400):
            if len(await inbox_raw(remote.store, "bob@yandex.test")) >= want:
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    assert len(await inbox_raw(remote.store, "bob@yandex.test")) == want
    assert await store.list_queue() == []


async def test_one_connection_carries_every_batch(
    store: MailStore, remote: Remote, counter: Counter
) -> None:
    for _ in range(12):
        await submit(store, ["bob@yandex.test"])
    routes = {"yandex.test": [f"{REMOTE_IP}:{counter.port}"]}
    # batch=2: six passes claim the twelve letters while the first connection is busy
    await _deliver(store, remote, {"batch": 2, "resolver": _resolver(routes)})
    assert counter.most == 1
    assert counter.total <= 2  # the handed batches rode on it (one more if the first ended early)


async def test_per_destination_cap(store: MailStore, remote: Remote, counter: Counter) -> None:
    for _ in range(12):
        await submit(store, ["bob@yandex.test"])
    routes = {"yandex.test": [f"{REMOTE_IP}:{counter.port}"]}
    options = {"batch": 2, "per_destination": 2, "resolver": _resolver(routes)}
    await _deliver(store, remote, options)
    assert 1 <= counter.most <= 2


def _resolver(routes: dict[str, list[str]]) -> object:
    from pochta.dns import DnsResolver

    return DnsResolver(nameservers=[], routes=routes)


async def test_deliver_sends_claims_made_elsewhere(store: MailStore, remote: Remote) -> None:
    """`deliver()` (the relay's ETRN path): held mail, claimed by domain, goes out and is
    recorded and bounced like any queued letter."""
    await store.add_relay_domain("yandex.test", "carol@mail.test")
    await submit(store, ["bob@yandex.test", "nobody@yandex.test"])
    worker = make_worker(store, {"yandex.test": [f"{REMOTE_IP}:{remote.port}"]})
    assert await worker.run_once() == 0  # held: no pass takes it
    now = datetime.now(UTC)
    claims = await store.claim(worker.owner, now, timedelta(seconds=30), domains=["yandex.test"])
    assert await worker.deliver("yandex.test", claims) == 1
    assert len(await inbox_raw(remote.store, "bob@yandex.test")) == 1
    (dsn,) = await inbox_raw(store, "alice@mail.test")
    assert b"Final-Recipient: rfc822; nobody@yandex.test" in dsn and b"Status: 5.1.1" in dsn
    assert await store.list_queue() == []
