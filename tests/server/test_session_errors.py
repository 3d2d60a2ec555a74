"""A fault of ours while handling a command is answered with 451 4.3.0 and logged; the
connection goes on (never a dropped connection without a reply). In-process listener, real
loopback socket, real SQLite store, Python's smtplib as the client."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pochta import smtp
from pochta.server import session as session_module
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.session import ServerContext
from pochta.store import open_store
from pochta.store.api import MailStore


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


async def test_an_internal_fault_is_a_451_and_the_connection_goes_on(
    served: tuple[SmtpServer, MailStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, store = served
    real = session_module.received.received_header
    calls = 0

    def flaky(**kwargs: object) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in the trace header")
        return real(**kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(session_module.received, "received_header", flaky)
    listening = await server.listen("mx", "127.0.0.1:0")
    port = listening.sockets[0].getsockname()[1]
    first, second = await asyncio.to_thread(_send_two, port)
    assert first[0] == 451 and first[1].startswith(b"4.3.0 Local error (conn ")
    assert second[0] == 250
    assert [m.subject for m in await store.list_messages("bob@mail.test")] == ["two"]
    assert "a bug in the trace header" in caplog.text


async def test_a_fault_outside_a_command_is_a_421_not_a_silent_close(
    served: tuple[SmtpServer, MailStore],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, _ = served

    def broken(self: session_module.Session, data: bytes) -> None:
        raise RuntimeError("a bug while taking the body")

    monkeypatch.setattr(session_module.Session, "body_chunk", broken)
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

    code, text = await asyncio.to_thread(send)
    assert (code, text) == (421, b"4.3.0 Local error, closing transmission channel")
    assert "a bug while taking the body" in caplog.text
