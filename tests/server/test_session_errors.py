"""A fault of ours while handling a command is answered with 451 4.3.0 and logged; the
connection goes on (never a dropped connection without a reply). In-process listener, real
loopback socket, real SQLite store, Python's smtplib as the client."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import pytest

from pochta import smtp
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.session import ServerContext, Session
from pochta.store import open_store
from pochta.store.api import Accepted, Letter, MailStore


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[SmtpServer, MailStore]]:
    store = open_store(f"sqlite:///{tmp_path}/pochta.db")
    await store.open()
    await store.add_domain("mail.test")
    await store.add_user("bob@mail.test", "unused-hash")
    ctx = ServerContext(store=store, hostname="mx.mail.test", limits=smtp.Limits())
    srv = SmtpServer(ctx, ServerLimits(), None)
    try:
        yield srv, store
    finally:
        await srv.stop(grace=2)
        await store.close()


def _send_two(port: int) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        client.ehlo()
        client.mail("alice@outside.test")
        client.rcpt("bob@mail.test")
        first = client.data(b"Subject: one\r\n\r\nbody\r\n")
        client.mail("alice@outside.test")
        client.rcpt("bob@mail.test")
        second = client.data(b"Subject: two\r\n\r\nbody\r\n")
    return first, second


class _FlakyStore:
    """The real store, whose first `deliver` fails the way a bug of ours would."""

    def __init__(self, store: MailStore) -> None:
        self._store = store
        self.calls = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def deliver(self, letter: Letter) -> Accepted:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug while storing the letter")
        return await self._store.deliver(letter)


async def test_an_internal_fault_is_a_451_and_the_connection_goes_on(
    served: tuple[SmtpServer, MailStore], caplog: pytest.LogCaptureFixture
) -> None:
    server, store = served
    flaky = _FlakyStore(store)
    server.ctx.store = cast(MailStore, flaky)
    listening = await server.listen("mx", "127.0.0.1:0")
    port = listening.sockets[0].getsockname()[1]
    first, second = await asyncio.to_thread(_send_two, port)
    assert first[0] == 451 and first[1].startswith(b"4.3.0 Local error (conn ")
    assert second[0] == 250
    assert flaky.calls == 2
    assert [m.subject for m in await store.list_messages("bob@mail.test")] == ["two"]
    assert "a bug while storing the letter" in caplog.text


async def test_a_fault_outside_a_command_is_a_421_not_a_silent_close(
    served: tuple[SmtpServer, MailStore], caplog: pytest.LogCaptureFixture
) -> None:
    ctx = served[0].ctx

    class Broken(Session):
        def body_chunk(self, data: bytes) -> None:
            raise RuntimeError("a bug while taking the body")

    server = SmtpServer(ctx, ServerLimits(), None, session_class=Broken)
    listening = await server.listen("mx", "127.0.0.1:0")
    port = listening.sockets[0].getsockname()[1]

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as c:
            c.ehlo()
            c.mail("alice@outside.test")
            c.rcpt("bob@mail.test")
            try:
                return c.data(b"Subject: one\r\n\r\nbody\r\n")
            except smtplib.SMTPServerDisconnected:
                return (0, b"")

    try:
        code, text = await asyncio.to_thread(send)
    finally:
        await server.stop(grace=2)
    assert (code, text) == (421, b"4.3.0 Local error, closing transmission channel")
    assert "a bug while taking the body" in caplog.text
