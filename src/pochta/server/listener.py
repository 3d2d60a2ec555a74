"""Listeners: bind the SMTP ports and pump each connection through the core and its Session.
Imports `smtp`, `transport`, `server.session` and `log`.

`mx` (25), `submission` (587, STARTTLS) and `submissions` (465, implicit TLS, RFC 8314) and
`odmr` (366) are the same pump with a different Session policy. The pump enforces the limits a
stranger controls: connections in total and per IP, read timeouts (RFC 5321 §4.5.3.2), errors per
connection, and sends 421 on shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pochta import log as maillog
from pochta import smtp
from pochta.server.session import SUBMISSIONS, ServerContext, Session
from pochta.smtp import Reply
from pochta.smtp import replies as R
from pochta.transport import PlaintextAfterStartTLS, Stream, serve_streams

log = logging.getLogger(__name__)
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Too many connections from your address")
LOCAL_ERROR = Reply(421, "4.3.0", "Local error, closing transmission channel")
HANDSHAKE_TIMEOUT = 30.0  # seconds for a TLS handshake, at most
LISTEN_BACKLOG = 1024

# A hand-off after TURN/ATRN: the relay code takes the stream and the turned connection.
TurnHandler = Callable[[Session, Stream, smtp.Connection], Awaitable[None]]


@dataclass
class ServerLimits:
    connections: int = 1000
    connections_per_ip: int = 20
    command_timeout: float = 300.0
    data_timeout: float = 180.0


class SmtpServer:
    """All listeners of one node process, sharing one ServerContext."""

    def __init__(
        self,
        ctx: ServerContext,
        limits: ServerLimits,
        tls_context: ssl.SSLContext | None,
        on_turn: TurnHandler | None = None,
    ) -> None:
        self.ctx = ctx
        self.limits = limits
        self.tls_context = tls_context
        self.on_turn = on_turn
        self._servers: list[asyncio.Server] = []
        self._active: dict[asyncio.Task[None], _Conn] = {}
        self._per_ip: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._sweeper: asyncio.Task[None] | None = None
        self.stopping = False

    async def listen(
        self, kind: str, address: str, *, sock: socket.socket | None = None
    ) -> asyncio.Server:
        """Bind `host:port` for a listener kind, or serve `sock` (bound and listening already:
        worker processes share the sockets their parent bound); returns the asyncio server."""
        host, port = split_address(address)
        implicit = self.tls_context if kind == SUBMISSIONS else None
        if kind == SUBMISSIONS and implicit is None:
            raise OSError(f"{kind} needs a TLS certificate")

        async def accept(stream: Stream) -> None:
            await self._accept(kind, stream)

        where: dict[str, Any] = (
            {"sock": sock}
            if sock is not None
            else {"host": host, "port": port, "reuse_address": True}
        )
        server = await serve_streams(
            accept,
            ssl=implicit,
            backlog=LISTEN_BACKLOG,
            ssl_handshake_timeout=self.handshake_timeout if implicit else None,
            **where,
        )
        self._servers.append(server)
        for sock in server.sockets:
            maillog.event("listening", listener=kind, address=_sockname(sock))
        return server

    @property
    def handshake_timeout(self) -> float:
        """A silent client must not hold a connection in the TLS handshake (port 465 or after
        STARTTLS) longer than it could while we wait for a command (RFC 5321 §4.5.3.2)."""
        return min(HANDSHAKE_TIMEOUT, self.limits.command_timeout)

    @property
    def bound(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def _accept(self, kind: str, stream: Stream) -> None:
        ip = stream.peer[0]
        conn_id = f"{self._prefix}.{next(self._ids)}"
        if self.stopping or len(self._active) >= self.limits.connections:
            await _refuse(stream, R.SHUTTING_DOWN if self.stopping else TOO_MANY_CONNECTIONS)
            return
        if self._per_ip[ip] >= self.limits.connections_per_ip:
            maillog.event("refused", conn=conn_id, ip=ip, reason="per-ip limit")
            await _refuse(stream, TOO_MANY_FROM_YOU)
            return
        session = Session(self.ctx, kind, ip, conn_id, tls=stream.tls)
        task = asyncio.current_task(stream.pipe.loop)
        assert task is not None
        state = _Conn(session, watched=True)
        self._active[task] = state
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="idle-sweeper")
        self._per_ip[ip] += 1
        try:
            await self._serve(stream, session, state)
        except asyncio.CancelledError:
            if not self.stopping:
                raise
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            log.debug("conn=%s ended: %r", conn_id, exc)
        except Exception:  # a bug of ours: say so to the peer rather than vanish
            log.exception("conn=%s failed", conn_id)
            stream.write(LOCAL_ERROR.to_bytes())
        finally:
            del self._active[task]
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
            await stream.close()

    async def serve_stream(
        self, stream: Stream, session: Session, conn: smtp.Connection | None = None
    ) -> None:
        """Run the server pump on a stream opened elsewhere (the customer side of ATRN/TURN):
        greet, then answer commands until QUIT or EOF. `conn` is a server-role Connection in
        START (e.g. from `Connection.turned()`, holding bytes already received)."""
        await self._serve(stream, session, _Conn(session), conn)

    async def _serve(
        self,
        stream: Stream,
        session: Session,
        state: _Conn,
        conn: smtp.Connection | None = None,
    ) -> None:
        if conn is None:
            conn = smtp.Connection(smtp.SERVER, self.ctx.limits, extensions=session.extensions())
        stream.write(conn.send(session.greeting()))
        maillog.detail("connect", conn=session.conn_id, ip=session.peer_ip, listener=session.kind)
        while True:
            try:
                event = conn.next_event()
            except smtp.RemoteProtocolError as err:
                hint = err.reply_hint or R.BAD_SEQUENCE
                session.protocol_error(conn)
                if err.fatal or session.errors >= self.ctx.max_errors:
                    if not err.fatal:
                        hint = R.TOO_MANY_ERRORS
                    stream.write(hint.to_bytes())
                    await stream.flush()
                    return
                stream.write(conn.send(hint))
                continue
            if event is smtp.NEED_DATA:
                if not await self._read(stream, conn, state):
                    return
                continue
            if isinstance(event, smtp.BodyChunk):
                session.body_chunk(event.data)
                continue
            if isinstance(event, smtp.ConnectionClosed):
                return
            if isinstance(event, (smtp.Turned, smtp.Reply)):
                return
            reply = await session.handle(conn, event)
            stream.write(conn.send(reply))
            if conn.state is smtp.State.TLS_PENDING:
                upgraded = await self._start_tls(stream, conn, session)
                if upgraded is None:
                    return
                conn = upgraded
            elif conn.state is smtp.State.TURNED:
                await stream.flush()
                if self.on_turn is not None:
                    await self.on_turn(session, stream, conn.turned())
                return
            elif conn.state is smtp.State.CLOSED:
                await stream.flush()
                return
            if self.stopping:
                stream.write(conn.send(R.SHUTTING_DOWN))
                await stream.flush()
                return

    async def _read(self, stream: Stream, conn: smtp.Connection, state: _Conn) -> bool:
        """Flush our replies, then wait for the peer; False when the connection is over."""
        await stream.flush()
        in_data = conn.state in (smtp.State.DATA, smtp.State.BDAT)
        timeout = self.limits.data_timeout if in_data else self.limits.command_timeout
        state.idle = True
        state.deadline = stream.pipe.loop.time() + timeout
        try:
            # Watched connections have their deadline enforced by _sweep (one timer for all).
            data = await stream.read(None if state.watched else timeout)
        except TimeoutError:
            stream.write(R.TIMEOUT.to_bytes())  # RFC 5321 §4.5.3.2
            await stream.flush(timeout=5.0)
            return False
        except asyncio.CancelledError:
            if state.timed_out or self.stopping:
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # we handled this cancel; later timeouts must still work
            if state.timed_out:
                stream.write(R.TIMEOUT.to_bytes())  # RFC 5321 §4.5.3.2
                await stream.flush(timeout=5.0)
                return False
            if self.stopping:  # shutdown while idle: 421 (RFC 5321 §3.8)
                stream.write(R.SHUTTING_DOWN.to_bytes())
                await stream.flush(timeout=5.0)
                return False
            raise
        finally:
            state.idle = False
        conn.receive_data(data)
        return True

    async def _start_tls(
        self, stream: Stream, conn: smtp.Connection, session: Session
    ) -> smtp.Connection | None:
        try:
            new = conn.start_tls()  # raises if plaintext was pipelined after STARTTLS
        except smtp.RemoteProtocolError as err:
            if err.reply_hint is not None:
                stream.write(err.reply_hint.to_bytes())
            await stream.flush()
            return None
        assert self.tls_context is not None
        try:
            await stream.start_tls(self.tls_context, handshake_timeout=self.handshake_timeout)
        except PlaintextAfterStartTLS:  # RFC 3207 §4.2, CVE-2011-0411: never run those bytes
            maillog.event(
                "rejected",
                conn=session.conn_id,
                ip=session.peer_ip,
                reason="plaintext after STARTTLS",
            )
            return None
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            log.info("conn=%s TLS handshake failed: %r", session.conn_id, exc)
            return None
        session.tls_started(stream.tls)
        return new

    async def _sweep(self) -> None:
        """Time out idle connections whose read deadline passed (RFC 5321 §4.5.3.2)."""
        loop = asyncio.get_running_loop()
        interval = max(
            0.05, min(1.0, self.limits.command_timeout / 4, self.limits.data_timeout / 4)
        )
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for task, state in list(self._active.items()):
                if state.idle and not state.timed_out and now > state.deadline:
                    state.timed_out = True
                    task.cancel()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; idle sessions get 421 now, busy ones after their current command."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for task, state in list(self._active.items()):
            if state.idle:
                task.cancel()
        if self._active:
            _, pending = await asyncio.wait(list(self._active), timeout=grace)
            for task in pending:
                task.cancel()
        for server in self._servers:
            await server.wait_closed()


@dataclass
class _Conn:
    session: Session
    watched: bool = False  # registered with the idle sweeper
    idle: bool = False
    deadline: float = 0.0  # loop time after which an idle read times out
    timed_out: bool = False


async def _refuse(stream: Stream, reply: Reply) -> None:
    try:
        stream.write(reply.to_bytes())
        await stream.flush(timeout=5.0)
    except (OSError, TimeoutError):
        pass
    await stream.close()


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all addresses)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be host:port, not {address!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def _sockname(sock: socket.socket | Any) -> str:
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}"
