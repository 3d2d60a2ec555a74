"""The one asyncio adapter between sockets and the sans-IO core. Imports `tls` and `log`.

`Stream` is a byte stream over an asyncio transport and a small Protocol of ours (`_Pipe`):
reads with an optional timeout, buffered writes flushed once per batch of replies (so pipelined
replies go out together, RFC 2920 §3), STARTTLS on the same socket, and the wire transcript at
TRACE level (AUTH lines redacted). It is lighter than asyncio's StreamReader/StreamWriter (no
copy of every read through a bytearray), and it knows what it holds: STARTTLS refuses to start
while plaintext that arrived after the command is still buffered (CVE-2011-0411 class).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from typing import cast

from pochta import tls as tlsmod
from pochta.log import TRACE

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024
BUFFER_LIMIT = 1 << 20  # unread bytes before we stop reading from the socket (back-pressure)
_BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]{4,}")


class PlaintextAfterStartTLS(ConnectionError):
    """Bytes arrived after STARTTLS and before the handshake: never to be read as if over TLS."""


class _Pipe(asyncio.Protocol):
    """Receives bytes for one Stream; wakes the reader; relays write back-pressure."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.paused_reading = False
        self.paused_writing = False
        # Python 3.11's get_running_loop() makes a getpid() system call: ask once per connection
        self.loop = asyncio.get_running_loop()
        self.lost = False
        self.closed: asyncio.Future[None] | None = None  # made only when someone waits for it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > BUFFER_LIMIT and not self.paused_reading and self.transport is not None:
            self.paused_reading = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        # Keep a plain TCP connection open for our last replies (a client may half-close after
        # QUIT); a TLS transport cannot stay half-open.
        over_tls = self.transport is not None and self.transport.get_extra_info("sslcontext")
        return not over_tls

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        self.lost = True
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> bytes:
        data = self.chunks.popleft() if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        self.size = 0
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()
        return data


async def open_stream(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    local_address: str | None = None,
    label: str = "client",
) -> Stream:
    """Connect (with implicit TLS when `ssl_context` is given); raises OSError or ssl.SSLError."""
    loop = asyncio.get_running_loop()
    transport, pipe = await loop.create_connection(
        _Pipe,
        host,
        port,
        ssl=ssl_context,
        server_hostname=server_hostname if ssl_context else None,
        local_addr=(local_address, 0) if local_address else None,
    )
    return Stream(transport, pipe, label=label)


class Stream:
    """A byte stream with timeouts; `peer` is (ip, port)."""

    def __init__(self, transport: asyncio.Transport, pipe: _Pipe, *, label: str = "") -> None:
        self.transport = transport
        self.pipe = pipe
        self.label = label
        peer = transport.get_extra_info("peername") or ("", 0)
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1]))
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.local: tuple[str, int] = (str(sock[0]), int(sock[1]))
        self._out: list[bytes] = []
        self.trace = tracing()
        self._plain = transport.get_extra_info("sslcontext") is None  # no TLS shutdown to await

    @property
    def tls(self) -> str | None:
        """`TLS1.3 TLS_AES_...` once TLS is active, else None."""
        if self._plain:
            return None
        return tlsmod.describe(self.transport.get_extra_info("ssl_object"))

    async def read(self, timeout: float | None) -> bytes:
        """What has arrived (at least one byte), b"" at EOF. `timeout=None` leaves the deadline
        to the caller (the server's idle sweeper), which saves a timer per read on the hot path.

        Raises:
            TimeoutError: nothing arrived within `timeout` seconds.
            ConnectionError: the connection was reset.
        """
        pipe = self.pipe
        if not pipe.chunks and not pipe.eof:
            pipe.waiter = pipe.loop.create_future()
            try:
                if timeout is None:
                    await pipe.waiter
                else:
                    async with asyncio.timeout(timeout):
                        await pipe.waiter
            finally:
                pipe.waiter = None
        if pipe.chunks:
            data = pipe.take()
            if self.trace:
                trace(self.label, "C" if self.label == "server" else "S", data)
            return data
        if isinstance(pipe.error, OSError):
            raise pipe.error
        return b""

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out at the next `flush()`."""
        if data:
            self._out.append(data)
            if self.trace:
                trace(self.label, "S" if self.label == "server" else "C", data)

    async def flush(self, timeout: float = 60.0) -> None:
        """Hand the queued bytes to the socket; wait (at most `timeout`) only when the peer
        does not read them and the write buffer is over its limit."""
        if self._out:
            if self.transport.is_closing():
                self._out.clear()
                raise ConnectionResetError("connection closed")
            self.transport.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
            self._out.clear()
        pipe = self.pipe
        if pipe.paused_writing and not self.transport.is_closing():
            pipe.drain_waiter = pipe.loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await pipe.drain_waiter
            finally:
                pipe.drain_waiter = None

    async def start_tls(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None = None,
        *,
        handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade the connection in place (RFC 3207).

        Raises:
            PlaintextAfterStartTLS: bytes arrived after the STARTTLS exchange and are still
                unread; they must never be taken as if they had come over TLS.
            ssl.SSLError, OSError, TimeoutError: the handshake failed or took longer than
                `handshake_timeout` seconds (None: asyncio's 60 s).
        """
        await self.flush()
        if self.pipe.chunks:
            self.pipe.chunks.clear()
            raise PlaintextAfterStartTLS("plaintext received after STARTTLS")
        loop = asyncio.get_running_loop()
        server_side = self.label == "server"
        new = await loop.start_tls(
            self.transport,
            self.pipe,
            context,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
            ssl_handshake_timeout=handshake_timeout,
        )
        if new is None:
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = new
        self.pipe.transport = self.transport
        self._plain = False

    async def close(self) -> None:
        try:
            if self._out:
                await self.flush(timeout=5.0)
        except (OSError, TimeoutError):
            pass
        if self.transport.get_write_buffer_size() == 0 and self._plain:
            self.transport.close()  # plain TCP with nothing left to send: closed at once
            return
        self.transport.close()
        pipe = self.pipe
        if pipe.lost:
            return
        if pipe.closed is None:
            pipe.closed = pipe.loop.create_future()
        try:
            async with asyncio.timeout(5.0):
                await asyncio.shield(pipe.closed)
        except (OSError, TimeoutError, ssl.SSLError):
            self.transport.abort()


def tracing() -> bool:
    """Whether wire lines are logged (TRACE level)."""
    return log.isEnabledFor(TRACE)


def trace(label: str, who: str, data: bytes) -> None:
    """Log wire lines at TRACE level (`who` is C or S), AUTH lines and SASL responses redacted."""
    for line in data.split(b"\r\n")[:20]:
        if not line:
            continue
        text = line[:200].decode("utf-8", "replace")
        if text.upper().startswith("AUTH ") or (who == "C" and text.isascii() and _b64(text)):
            text = text.split(" ", 1)[0] + " <redacted>"
        log.log(TRACE, "%s %s: %s", label, who, text)


def adopt(transport: asyncio.Transport, *, label: str) -> Stream:
    """A Stream over a connection that another protocol has served so far (the hand-off after
    TURN/ATRN): from now on the transport's bytes and events go to the Stream."""
    pipe = _Pipe()
    pipe.transport = transport
    transport.set_protocol(pipe)
    if transport.is_closing():
        pipe.eof = pipe.lost = True
    else:
        transport.resume_reading()
    return Stream(transport, pipe, label=label)


def _b64(text: str) -> bool:
    """A line that may be a SASL response (base64): redacted in traces."""
    return bool(_BASE64_LINE.fullmatch(text))
