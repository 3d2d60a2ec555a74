"""The one asyncio adapter between sockets and the sans-IO core. Imports `smtp` and `log`.

`Stream` wraps an asyncio StreamReader/StreamWriter pair: reads with a timeout, buffered writes
flushed once per batch of replies (so pipelined replies go out together, RFC 2920 §3), STARTTLS
on the same socket, and the wire transcript at TRACE level (AUTH lines redacted).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from typing import Any

from pochta import tls as tlsmod
from pochta.log import TRACE

log = logging.getLogger(__name__)
READ_SIZE = 256 * 1024
_BASE64_LINE = re.compile(r"[A-Za-z0-9+/=]{4,}")


class Stream:
    """A byte stream with timeouts; `peer` is (ip, port)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, label: str = ""
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.label = label
        peer = writer.get_extra_info("peername") or ("", 0)
        self.peer: tuple[str, int] = (str(peer[0]), int(peer[1]))
        sock = writer.get_extra_info("sockname") or ("", 0)
        self.local: tuple[str, int] = (str(sock[0]), int(sock[1]))
        self._out: list[bytes] = []
        self.trace = log.isEnabledFor(TRACE)

    @property
    def tls(self) -> str | None:
        """`TLS1.3 TLS_AES_...` once TLS is active, else None."""
        obj = self.writer.get_extra_info("ssl_object")
        return tlsmod.describe(obj)

    def peer_certificate(self) -> dict[str, Any] | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj.getpeercert() if obj is not None else None

    async def read(self, timeout: float | None) -> bytes:
        """Up to READ_SIZE bytes; b"" at EOF. `timeout=None` leaves the deadline to the caller
        (the server's idle sweeper), which saves a timer per read on the hot path.

        Raises:
            TimeoutError: nothing arrived within `timeout` seconds.
        """
        if timeout is None:
            data = await self.reader.read(READ_SIZE)
        else:
            async with asyncio.timeout(timeout):
                data = await self.reader.read(READ_SIZE)
        if self.trace and data:
            self._trace("C" if self.label == "server" else "S", data)
        return data

    def write(self, data: bytes) -> None:
        """Queue bytes; they go out at the next `flush()`."""
        if data:
            self._out.append(data)
            if self.trace:
                self._trace("S" if self.label == "server" else "C", data)

    async def flush(self, timeout: float = 60.0) -> None:
        if self._out:
            self.writer.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
            self._out.clear()
        # Wait only when the kernel did not take everything (drain would block): no timer
        # is armed for the usual case of a reply that went out at once.
        if self.writer.transport.get_write_buffer_size() > 0:
            async with asyncio.timeout(timeout):
                await self.writer.drain()

    async def start_tls(
        self,
        context: ssl.SSLContext,
        server_hostname: str | None = None,
        *,
        handshake_timeout: float | None = None,
    ) -> None:
        """Upgrade the connection in place (RFC 3207); raises ssl.SSLError or OSError (also when
        the handshake takes longer than `handshake_timeout` seconds; None: asyncio's 60 s)."""
        await self.flush()
        await self.writer.start_tls(
            context, server_hostname=server_hostname, ssl_handshake_timeout=handshake_timeout
        )

    async def close(self) -> None:
        try:
            if self._out:
                await self.flush(timeout=5.0)
        except (OSError, TimeoutError):
            pass
        self.writer.close()
        try:
            async with asyncio.timeout(5.0):
                await self.writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            pass

    def _trace(self, who: str, data: bytes) -> None:
        for line in data.split(b"\r\n")[:20]:
            if not line:
                continue
            text = line[:200].decode("utf-8", "replace")
            if text.upper().startswith("AUTH ") or (who == "C" and text.isascii() and _b64(text)):
                text = text.split(" ", 1)[0] + " <redacted>"
            log.log(TRACE, "%s %s: %s", self.label, who, text)


def _b64(text: str) -> bool:
    """A line that may be a SASL response (base64): redacted in traces."""
    return bool(_BASE64_LINE.fullmatch(text))
