"""The listener in-process (real loopback sockets, a real SQLite store): a client that goes silent
in a TLS handshake (after STARTTLS, or on the implicit-TLS port) is dropped within the command
timeout, not after asyncio's default 60 s. Imports pochta's server, smtp, tls and store modules.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pochta import smtp, tls
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.session import ServerContext
from pochta.store import open_store


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SmtpServer]:
    store = open_store(f"sqlite:///{tmp_path}/pochta.db")
    await store.open()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls.ensure_self_signed(cert, key, "mx.test")
    ctx = ServerContext(store=store, hostname="mx.test", limits=smtp.Limits(), tls_available=True)
    srv = SmtpServer(ctx, ServerLimits(command_timeout=0.5), tls.server_context(cert, key))
    try:
        yield srv
    finally:
        await srv.stop(grace=2)
        await store.close()


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await asyncio.wait_for(reader.readline(), 5)
        if line[3:4] != b"-":
            return line


async def test_silent_client_after_starttls_is_dropped(server: SmtpServer) -> None:
    listening = await server.listen("mx", "127.0.0.1:0")
    port = listening.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await read_reply(reader)).startswith(b"220 ")
    writer.write(b"EHLO client.test\r\n")
    assert (await read_reply(reader)).startswith(b"250 ")
    writer.write(b"STARTTLS\r\n")
    assert (await read_reply(reader)).startswith(b"220 ")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""  # no ClientHello from us: closed
    assert time.monotonic() - started < 3
    writer.close()


async def test_silent_client_on_implicit_tls_port_is_dropped(server: SmtpServer) -> None:
    listening = await server.listen("submissions", "127.0.0.1:0")
    port = listening.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert time.monotonic() - started < 3
    writer.close()
