"""Plaintext that arrives after STARTTLS and before the handshake is never read as if it had
come over TLS (RFC 3207 §4.2, the CVE-2011-0411 class), even when it came in a later packet than
the STARTTLS line (so the SMTP core never saw it)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from pochta import tls as tlsmod
from pochta.transport import PlaintextAfterStartTLS, Stream, adopt, open_stream

Handler = Callable[[Stream], Coroutine[Any, Any, None]]


async def serve_streams(handler: Handler, **kwargs: Any) -> asyncio.Server:
    """A server whose every connection runs `handler` on a server-side Stream."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            stream = adopt(transport, label="server")  # type: ignore[arg-type]
            task = loop.create_task(handler(stream))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return await loop.create_server(Accept, **kwargs)


async def test_plaintext_buffered_before_the_handshake_is_refused(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tlsmod.ensure_self_signed(cert, key, "mx.test")
    context = tlsmod.server_context(cert, key)
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        assert await stream.read(5.0) == b"STARTTLS\r\n"
        stream.write(b"220 2.0.0 Ready to start TLS\r\n")
        await stream.flush()
        await asyncio.sleep(0.3)  # the injected line arrives meanwhile, in its own packet
        try:
            await stream.start_tls(context, handshake_timeout=2.0)
        except BaseException as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)
        await stream.close()

    server = await serve_streams(handler, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    client = await open_stream("127.0.0.1", port)
    client.write(b"STARTTLS\r\n")
    await client.flush()
    assert (await client.read(5.0)).startswith(b"220")
    client.write(b"MAIL FROM:<injected@evil.test>\r\n")
    await client.flush()
    result = await asyncio.wait_for(outcome, 5.0)
    assert isinstance(result, PlaintextAfterStartTLS)
    assert await client.read(5.0) == b""  # the server closed instead of starting TLS
    await client.close()
    server.close()
    await server.wait_closed()


async def test_starttls_without_pending_bytes_upgrades(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tlsmod.ensure_self_signed(cert, key, "mx.test")
    context = tlsmod.server_context(cert, key)

    async def handler(stream: Stream) -> None:
        assert await stream.read(5.0) == b"STARTTLS\r\n"
        stream.write(b"220 go\r\n")
        await stream.start_tls(context, handshake_timeout=5.0)
        stream.write(b"secret " + (stream.tls or "").encode() + b"\r\n")
        await stream.flush()
        await stream.close()

    server = await serve_streams(handler, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    client = await open_stream("127.0.0.1", port)
    client.write(b"STARTTLS\r\n")
    await client.flush()
    assert await client.read(5.0) == b"220 go\r\n"
    verify = ssl.create_default_context(cafile=str(cert))
    await client.start_tls(verify, server_hostname="mx.test")
    line = await client.read(5.0)
    assert line.startswith(b"secret TLS1.")
    assert client.tls is not None
    await client.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("size", [1, 3 << 20])
async def test_reads_return_everything_in_order(size: int) -> None:
    """Back-pressure (reading paused past 1 MiB) loses and reorders nothing."""
    payload = bytes(range(256)) * (size // 256 + 1)
    payload = payload[:size]
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handler(stream: Stream) -> None:
        data = b""
        while len(data) < size:
            await asyncio.sleep(0.01)  # a slow reader: the sender fills the buffer
            chunk = await stream.read(5.0)
            assert chunk
            data += chunk
        got.set_result(data)
        await stream.close()

    server = await serve_streams(handler, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    client = await open_stream("127.0.0.1", port)
    client.write(payload)
    await client.flush()
    assert await asyncio.wait_for(got, 10.0) == payload
    await client.close()
    server.close()
    await server.wait_closed()


async def test_a_half_closed_client_still_gets_the_last_reply() -> None:
    """A client that sends QUIT and shuts down its side still receives our 221."""

    async def handler(stream: Stream) -> None:
        assert await stream.read(5.0) == b"QUIT\r\n"
        assert await stream.read(5.0) == b""  # the client's EOF
        stream.write(b"221 2.0.0 Bye\r\n")
        await stream.flush()
        await stream.close()

    server = await serve_streams(handler, host="127.0.0.1", port=0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(100), 5.0) == b"221 2.0.0 Bye\r\n"
    writer.close()
    server.close()
    await server.wait_closed()
