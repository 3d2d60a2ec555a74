"""Client-role driver over asyncio: connect, EHLO (HELO fallback), STARTTLS, AUTH, and letters
with per-recipient results. Imports `smtp`, `transport`, `tls` and `auth` (SCRAM client).

Used by the MUA (`pochta send`, through an MSA with AUTH) and by the queue worker (MX delivery,
opportunistic STARTTLS). Replies never raise: `send()` returns each recipient's deciding reply.
Connection problems raise OSError/TimeoutError, protocol violations `smtp.RemoteProtocolError`.
Timeouts follow RFC 5321 §4.5.3.2.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from pochta import smtp
from pochta.auth.scram import ScramClient
from pochta.smtp import Reply
from pochta.transport import Stream, open_stream

NO_REPLY = Reply(0, "", "no reply")


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 (seconds)."""

    connect: float = 30.0
    greeting: float = 300.0  # §4.5.3.2.1
    command: float = 300.0  # MAIL, RCPT and others (§4.5.3.2.2-3)
    data_init: float = 120.0  # §4.5.3.2.4
    data_block: float = 180.0  # §4.5.3.2.5
    data_end: float = 600.0  # §4.5.3.2.6


class SmtpError(Exception):
    """The server refused a step that the session cannot go on without (greeting, EHLO, AUTH,
    STARTTLS). `reply.permanent` tells whether trying again later can help."""

    def __init__(self, stage: str, reply: Reply) -> None:
        super().__init__(f"{stage}: {reply}")
        self.stage = stage
        self.reply = reply


@dataclass(frozen=True)
class RecipientResult:
    address: str
    reply: Reply  # the reply that decided this recipient (MAIL, RCPT, DATA or end of data)

    @property
    def accepted(self) -> bool:
        return self.reply.positive


@dataclass(frozen=True)
class SendResult:
    recipients: tuple[RecipientResult, ...]
    mail_reply: Reply = NO_REPLY
    data_reply: Reply | None = None  # the reply after the body, if the body was sent

    @property
    def accepted(self) -> list[str]:
        return [r.address for r in self.recipients if r.accepted]


@dataclass
class SmtpClient:
    """One client connection; build with `await SmtpClient.connect(...)`."""

    stream: Stream
    timeouts: Timeouts
    helo_name: str
    conn: smtp.Connection = field(default_factory=lambda: smtp.Connection(smtp.CLIENT))
    greeting: Reply = NO_REPLY
    ehlo_reply: Reply = NO_REPLY
    tls_verified: bool = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        helo_name: str,
        timeouts: Timeouts | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        local_address: str | None = None,
    ) -> SmtpClient:
        """Open the connection, read the greeting and say EHLO (HELO if EHLO is refused).

        Raises:
            OSError, TimeoutError: no connection. SmtpError: the greeting or HELO was refused.
        """
        timeouts = timeouts or Timeouts()
        async with asyncio.timeout(timeouts.connect):
            stream = await open_stream(
                host,
                port,
                ssl_context=implicit_tls,
                server_hostname=server_hostname or host,
                local_address=local_address,
            )
        client = cls(stream, timeouts, helo_name)
        if implicit_tls is not None:
            client.tls_verified = implicit_tls.verify_mode != ssl.CERT_NONE
        try:
            client.greeting = await client._reply(timeouts.greeting)
            if client.greeting.code != 220:
                raise SmtpError("greeting", client.greeting)
            await client.ehlo()
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def extensions(self) -> dict[str, str]:
        return self.conn.peer_extensions

    @property
    def tls(self) -> str | None:
        return self.stream.tls

    def supports(self, keyword: str) -> bool:
        return keyword.upper() in self.conn.peer_extensions

    async def _reply(self, timeout: float) -> Reply:
        while True:
            event = self.conn.next_event()
            if isinstance(event, Reply):
                return event
            if isinstance(event, smtp.ConnectionClosed):
                raise ConnectionResetError("server closed the connection")
            if event is smtp.NEED_DATA:
                await self.stream.flush()
                self.conn.receive_data(await self.stream.read(timeout))
                continue
            raise smtp.RemoteProtocolError(f"unexpected event {event!r}", fatal=True)

    async def command(self, cmd: smtp.Command, timeout: float | None = None) -> Reply:
        """Send one command and wait for its reply."""
        self.stream.write(self.conn.send(cmd))
        return await self._reply(timeout or self.timeouts.command)

    async def ehlo(self) -> Reply:
        reply = await self.command(smtp.Ehlo(self.helo_name))
        if not reply.positive:  # RFC 5321 §3.2: fall back to HELO
            reply = await self.command(smtp.Helo(self.helo_name))
            if not reply.positive:
                raise SmtpError("HELO", reply)
        self.ehlo_reply = reply
        return reply

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """RFC 3207: STARTTLS, handshake, then EHLO again.

        Raises:
            SmtpError: STARTTLS refused. ssl.SSLError: the handshake failed.
        """
        reply = await self.command(smtp.StartTLS())
        if reply.code != 220:
            raise SmtpError("STARTTLS", reply)
        self.conn = self.conn.start_tls()
        await self.stream.start_tls(context, server_hostname=server_hostname)
        self.tls_verified = context.verify_mode != ssl.CERT_NONE
        await self.ehlo()

    async def auth(self, username: str, password: str) -> str:
        """Authenticate with the best mechanism both sides know; returns its name.

        Raises:
            SmtpError: no common mechanism, or the credentials were refused.
        """
        offered = self.extensions.get("AUTH", "").upper().split()
        for mech in ("SCRAM-SHA-256", "PLAIN", "LOGIN"):
            if mech in offered:
                await getattr(self, "_auth_" + mech.replace("-", "_").lower())(username, password)
                return mech
        raise SmtpError("AUTH", Reply(504, "5.5.4", f"no common mechanism in {offered}"))

    async def _auth_plain(self, username: str, password: str) -> None:
        token = b"\0" + username.encode() + b"\0" + password.encode()
        reply = await self.command(smtp.Auth("PLAIN", token))
        if reply.code == 334:  # the server did not take the initial response
            reply = await self._respond(token)
        self._auth_done(reply)

    async def _auth_login(self, username: str, password: str) -> None:
        reply = await self.command(smtp.Auth("LOGIN"))
        for value in (username, password):
            if reply.code != 334:
                break
            reply = await self._respond(value.encode())
        self._auth_done(reply)

    async def _auth_scram_sha_256(self, username: str, password: str) -> None:
        scram = ScramClient(username, password)
        reply = await self.command(smtp.Auth("SCRAM-SHA-256", scram.first()))
        if reply.code == 334:
            reply = await self._respond(scram.final(_b64(reply)))
        if reply.code == 334:  # server-final (v=...) in a challenge: verify, answer empty
            scram.verify(_b64(reply))
            reply = await self._respond(b"")
        self._auth_done(reply)

    async def _respond(self, data: bytes) -> Reply:
        self.stream.write(self.conn.send(smtp.AuthResponse(data)))
        return await self._reply(self.timeouts.command)

    @staticmethod
    def _auth_done(reply: Reply) -> None:
        if reply.code != 235:
            raise SmtpError("AUTH", reply)

    async def send(
        self,
        sender: str,
        recipients: Sequence[str],
        body: bytes,
        *,
        params: dict[str, str | None] | None = None,
    ) -> SendResult:
        """One letter: MAIL, RCPT per recipient, DATA (pipelined when offered, RFC 2920)."""
        params = dict(params or {})
        if self.supports("SIZE"):
            params.setdefault("SIZE", str(len(body)))
        mail = smtp.MailFrom(smtp.path_of(sender), params)
        rcpts = [smtp.RcptTo(smtp.path_of(r)) for r in recipients]
        if self.supports("PIPELINING"):
            group: list[smtp.Command] = [mail, *rcpts, smtp.Data()]
            for cmd in group:
                self.stream.write(self.conn.send(cmd))
            mail_reply = await self._reply(self.timeouts.command)
            rcpt_replies = [await self._reply(self.timeouts.command) for _ in rcpts]
            data_reply = await self._reply(self.timeouts.data_init)
        else:
            mail_reply = await self.command(mail)
            if not mail_reply.positive:
                return _all(recipients, mail_reply, mail_reply)
            rcpt_replies = [await self.command(r) for r in rcpts]
            if not any(r.positive for r in rcpt_replies):
                await self.command(smtp.Rset())
                return _each(recipients, rcpt_replies, mail_reply)
            data_reply = await self.command(smtp.Data(), self.timeouts.data_init)
        if not mail_reply.positive:
            return _all(recipients, mail_reply, mail_reply)
        if data_reply.code != 354:
            if self.conn.state is not smtp.State.READY:
                await self.command(smtp.Rset())
            replies = [r if not r.positive else data_reply for r in rcpt_replies]
            return _each(recipients, replies, mail_reply)
        final = await self._body(body)
        replies = [r if not r.positive else final for r in rcpt_replies]
        return SendResult(_results(recipients, replies), mail_reply, final)

    async def _body(self, body: bytes) -> Reply:
        step = 1 << 20
        for i in range(0, len(body), step):
            self.stream.write(self.conn.send(smtp.BodyChunk(body[i : i + step])))
            await self.stream.flush(self.timeouts.data_block)
        self.stream.write(self.conn.send(smtp.EndOfData()))
        return await self._reply(self.timeouts.data_end)

    async def quit(self) -> None:
        """QUIT politely; errors on the way out are ignored."""
        try:
            if self.conn.state not in (smtp.State.CLOSED, smtp.State.TURNED):
                await self.command(smtp.Quit(), 10.0)
        except (OSError, TimeoutError, smtp.ProtocolError):
            pass
        await self.close()

    async def close(self) -> None:
        await self.stream.close()


def _b64(reply: Reply) -> bytes:
    text = reply.text.strip()
    return base64.b64decode(text) if text else b""


def _results(recipients: Sequence[str], replies: Sequence[Reply]) -> tuple[RecipientResult, ...]:
    return tuple(RecipientResult(a, r) for a, r in zip(recipients, replies, strict=True))


def _all(recipients: Sequence[str], reply: Reply, mail_reply: Reply) -> SendResult:
    return SendResult(_results(recipients, [reply] * len(recipients)), mail_reply)


def _each(recipients: Sequence[str], replies: Sequence[Reply], mail_reply: Reply) -> SendResult:
    return SendResult(_results(recipients, replies), mail_reply)
