"""The listener in-process (real loopback sockets, a real SQLite store): a client that sends
commands without ever reading the replies is held back (we stop reading once our replies pile
up) and dropped at the command timeout, while other clients are served meanwhile."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pochta import smtp
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.session import ServerContext
from pochta.store import open_store

FLOOD = 64 * 1024 * 1024  # what the client would send if nothing held it back


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SmtpServer]:
    store = open_store(f"sqlite:///{tmp_path}/pochta.db")
    await store.open()
    ctx = ServerContext(store=store, hostname="mx.test", limits=smtp.Limits())
    srv = SmtpServer(ctx, ServerLimits(command_timeout=2.0), None)
    try:
        yield srv
    finally:
        await srv.stop(grace=2)
        await store.close()


def _flood(port: int) -> tuple[int, bool]:
    """Send NOOPs and never read, for at most 20 s; (octets sent, whether the server ended the
    connection within that time)."""
    chunk = b"NOOP\r\n" * 10_000
    sent = 0
    deadline = time.monotonic() + 20
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        try:
            while sent < FLOOD and time.monotonic() < deadline:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the send blocked past the timeout, or the server reset us
            pass
        while time.monotonic() < deadline:
            try:
                if not sock.recv(1 << 20):
                    return sent, True  # EOF: closed by the server
            except ConnectionResetError:
                return sent, True
            except OSError:
                return sent, False
        return sent, False


def _noop(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        return client.noop()[0]


async def test_a_client_that_never_reads_is_held_back_then_dropped(server: SmtpServer) -> None:
    listening = await server.listen("mx", "127.0.0.1:0")
    port = listening.sockets[0].getsockname()[1]
    flood = asyncio.create_task(asyncio.to_thread(_flood, port))
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(_noop, port) == 250  # others are served meanwhile
    sent, closed = await flood
    assert closed, "the silent reader was never dropped"
    assert sent < FLOOD // 4, f"{sent} octets taken in: nothing held the client back"
