"""Relay test helpers: an in-process provider (SQLite store in tmp_path, real listeners on loopback
port 0) and a raw line-level SMTP peer for dialog tests. Provider mx.mail.test on 127.0.0.21;
customer addresses use 127.0.0.22.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pochta import smtp
from pochta.auth.passwords import hash_password
from pochta.dns import DnsResolver
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.relay import RelayService, RelaySettings
from pochta.server.session import ServerContext
from pochta.store import open_store
from pochta.store.api import Letter, MailStore, ScramCredentials, Summary

PROVIDER_IP = "127.0.0.21"
CUSTOMER_IP = "127.0.0.22"
PASSWORD = "relay-pw-1"
TIMEOUT = 10.0


class Raw:
    """A line-level SMTP peer on a real socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, *, local: str | None = None) -> Raw:
        reader, writer = await asyncio.open_connection(
            PROVIDER_IP, port, local_addr=(local, 0) if local else None
        )
        raw = cls(reader, writer)
        code, _ = await raw.reply()
        assert code == 220
        return raw

    async def line(self) -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = (await self.line()).decode()
            lines.append(line[4:].rstrip("\r\n"))
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    async def cmd(self, text: str) -> tuple[int, str]:
        self.writer.write(text.encode() + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def login(self, user: str, password: str = PASSWORD) -> None:
        code, _ = await self.cmd("EHLO branch.test")
        assert code == 250
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, text = await self.cmd(f"AUTH PLAIN {token}")
        assert code == 235, text

    def write(self, text: str) -> None:
        self.writer.write(text.encode())

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Customer:
    """Plays the customer after a 250 to ATRN/TURN: greets, accepts (or refuses) letters."""

    reject: set[str] = field(default_factory=set)
    cut_in_letter: int | None = None  # close the socket inside the DATA of this letter (1-based)
    letters: list[bytes] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    async def serve(self, raw: Raw) -> list[bytes]:
        raw.write("220 branch.test ESMTP raw customer\r\n")
        while True:
            line = (await raw.line()).decode().rstrip("\r\n")
            self.commands.append(line)
            verb = line[:4].upper()
            if verb in ("EHLO", "HELO"):
                raw.write("250 branch.test\r\n")
            elif verb == "MAIL":
                raw.write("250 2.1.0 OK\r\n")
            elif verb == "RCPT":
                address = line.split(":", 1)[1].strip().strip("<>").lower()
                raw.write("550 5.1.1 No such user\r\n" if address in self.reject else "250 OK\r\n")
            elif verb == "DATA":
                raw.write("354 go ahead\r\n")
                if self.cut_in_letter == len(self.letters) + 1:
                    await raw.writer.drain()
                    await raw.line()  # the first body line arrives, then the line drops
                    raw.writer.transport.abort()
                    return self.letters
                self.letters.append(await self._body(raw))
                raw.write("250 2.0.0 stored\r\n")
            elif verb == "QUIT":
                raw.write("221 bye\r\n")
                await raw.writer.drain()
                await raw.close()
                return self.letters
            else:
                raw.write("502 5.5.1 no\r\n")
            await raw.writer.drain()

    @staticmethod
    async def _body(raw: Raw) -> bytes:
        lines = []
        while (line := await raw.line()) != b".\r\n":
            lines.append(line)
        return b"".join(lines)


@dataclass
class Provider:
    store: MailStore
    ctx: ServerContext
    relay: RelayService
    server: SmtpServer
    ports: dict[str, int]
    woken: list[int]

    async def hold(self, rcpt: str = "bob@branch.test", subject: str = "hello") -> None:
        """A letter for a remote recipient, queued as port 25 would (held for relay domains)."""
        body = f"From: alice@far.test\r\nSubject: {subject}\r\n\r\n{subject} body\r\n".encode()
        await self.store.deliver(Letter(body, "alice@far.test", Summary(), outbound=[rcpt]))

    async def queued(self, domain: str = "branch.test") -> int:
        return await self.store.count_queued([domain])


@functools.cache
def _hashed(password: str) -> tuple[str, ScramCredentials]:
    return hash_password(password, iterations=4096)  # argon2 is slow: once per password


async def add_user(store: MailStore, address: str, password: str = PASSWORD) -> None:
    encoded, scram = _hashed(password)
    await store.add_user(address, encoded, scram)


async def start_provider(store: MailStore, routes: dict[str, list[str]] | None = None) -> Provider:
    settings = RelaySettings(hostname="mx.mail.test", lease=timedelta(minutes=5))
    resolver = DnsResolver(routes={"*": ["127.0.0.254:9"], **(routes or {})})
    relay = RelayService(store, settings, resolver)
    woken: list[int] = []
    ctx = ServerContext(
        store=store,
        hostname="mx.mail.test",
        limits=smtp.Limits(),
        allow_plaintext_auth=True,
        relay=relay,
        turn_enabled=True,
        wake_queue=lambda: woken.append(1),
    )
    server = SmtpServer(ctx, ServerLimits(command_timeout=TIMEOUT), None, on_turn=relay.on_turn)
    ports = {}
    for kind in ("mx", "submission", "odmr"):
        srv = await server.listen(kind, f"{PROVIDER_IP}:0")
        ports[kind] = srv.sockets[0].getsockname()[1]
    return Provider(store, ctx, relay, server, ports, woken)


async def open_sqlite(path: Path) -> MailStore:
    store = open_store(f"sqlite:///{path}")
    await store.open()
    return store


@pytest.fixture
async def provider_store(tmp_path: Path) -> AsyncIterator[MailStore]:
    store = await open_sqlite(tmp_path / "provider.db")
    await store.add_domain("mail.test")
    await add_user(store, "cust@mail.test")
    await add_user(store, "other@mail.test")
    await store.add_relay_domain("branch.test", "cust@mail.test")
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def provider(provider_store: MailStore) -> AsyncIterator[Provider]:
    p = await start_provider(provider_store)
    try:
        yield p
    finally:
        await p.server.stop(grace=2.0)
        await p.relay.stop()


async def eventually(check: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll an async or plain predicate until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def now() -> datetime:
    return datetime.now(UTC)
