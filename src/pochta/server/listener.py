"""Listeners: bind the SMTP ports and pump each connection through the core and its Session.
Imports `smtp`, `transport`, `tls`, `server.session` and `log`.

`mx` (25), `submission` (587, STARTTLS) and `submissions` (465, implicit TLS, RFC 8314) and
`odmr` (366) are the same pump with a different Session policy. The pump enforces the limits a
stranger controls: connections in total and per IP, read timeouts (RFC 5321 §4.5.3.2), errors per
connection, and sends 421 on shutdown.

Each connection is an asyncio Protocol (`_SmtpProtocol`) driven by the bytes that arrive: they go
into the core, its events to the Session, and the replies out in one write per batch of input
(so pipelined replies go out together, RFC 2920 §3), made at the end of the loop turn for all
connections that have replies: a client holding many sessions (a relay, a load generator) is
woken once for them all. A command that needs no store (EHLO, MAIL on port 25, DATA, RSET,
QUIT...), or that the store answers at once (RCPT of a known user on SQLite), is answered right
there; one that waits (other RCPTs, the end of the data, AUTH, the relay verbs) runs as a task
and the connection takes no further input until its reply is out. No task and no future per
command otherwise: with a non-pipelining client a letter is seven round trips, and each layer
per round trip costs CPU on every one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from pochta import log as maillog
from pochta import smtp
from pochta import tls as tlsmod
from pochta.server.session import SUBMISSIONS, ServerContext, Session
from pochta.smtp import Reply
from pochta.smtp import replies as R
from pochta.transport import BUFFER_LIMIT, Stream, adopt, trace, tracing

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
        *,
        session_class: type[Session] = Session,
    ) -> None:
        self.ctx = ctx
        self.session_class = session_class
        self.limits = limits
        self.tls_context = tls_context
        self.on_turn = on_turn
        self._servers: list[asyncio.Server] = []
        self._active: set[_SmtpProtocol] = set()
        self._per_ip: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid():x}"
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dirty: list[_SmtpProtocol] = []  # connections with replies to write this turn
        self.stopping = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the listeners run on (asked once)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def listen(
        self, kind: str, address: str, *, sock: socket.socket | None = None
    ) -> asyncio.Server:
        """Bind `host:port` for a listener kind, or serve `sock` (bound and listening already:
        worker processes share the sockets their parent bound); returns the asyncio server."""
        host, port = split_address(address)
        implicit = self.tls_context if kind == SUBMISSIONS else None
        if kind == SUBMISSIONS and implicit is None:
            raise OSError(f"{kind} needs a TLS certificate")
        where: dict[str, Any] = (
            {"sock": sock}
            if sock is not None
            else {"host": host, "port": port, "reuse_address": True}
        )
        server = await self.loop.create_server(
            lambda: self.protocol(kind),
            ssl=implicit,
            backlog=LISTEN_BACKLOG,
            ssl_handshake_timeout=self.handshake_timeout if implicit else None,
            **where,
        )
        self._servers.append(server)
        for bound in _sockets(server):
            maillog.event("listening", listener=kind, address=_sockname(bound))
        return server

    @property
    def handshake_timeout(self) -> float:
        """A silent client must not hold a connection in the TLS handshake (port 465 or after
        STARTTLS) longer than it could while we wait for a command (RFC 5321 §4.5.3.2)."""
        return min(HANDSHAKE_TIMEOUT, self.limits.command_timeout)

    @property
    def bound(self) -> list[tuple[str, int]]:
        return [s.getsockname()[:2] for srv in self._servers for s in _sockets(srv)]

    def protocol(self, kind: str) -> asyncio.Protocol:
        """The protocol for one new connection to a listener of `kind`."""
        return _SmtpProtocol(self, kind)

    def _flush_all(self) -> None:
        """End of the loop turn: write the replies of every connection that has some."""
        dirty, self._dirty = self._dirty, []
        for protocol in dirty:
            try:
                protocol._flush_now()
            except Exception:  # one transport's failure never keeps the others' replies
                log.exception("writing replies failed")
                protocol.abort()

    def next_conn_id(self) -> str:
        return f"{self._prefix}.{next(self._ids)}"

    async def serve_stream(
        self, stream: Stream, session: Session, conn: smtp.Connection | None = None
    ) -> None:
        """Run the server pump on a stream opened elsewhere (the customer side of ATRN/TURN):
        greet, then answer commands until QUIT or EOF. `conn` is a server-role Connection in
        START (e.g. from `Connection.turned()`, holding bytes already received)."""
        protocol = _SmtpProtocol(self, session.kind, session=session, conn=conn)
        pipe = stream.pipe
        pending = pipe.take() if pipe.chunks else b""  # take() resumes reading if it paused
        stream.transport.set_protocol(protocol)
        protocol.connection_made(stream.transport)
        if pending:
            protocol.data_received(pending)
        if pipe.eof and not stream.transport.is_closing():
            protocol.eof_received()
        elif pipe.lost or stream.transport.is_closing():
            protocol.connection_lost(pipe.error if isinstance(pipe.error, Exception) else None)
        await protocol.wait_closed()
        # The connection's end went to the protocol: the stream must not wait for it again.
        pipe.eof = pipe.lost = True

    def _admit(self, protocol: _SmtpProtocol, ip: str, conn_id: str) -> Reply | None:
        """Count a new connection in; the refusal to send when a limit is reached."""
        if self.stopping:
            return R.SHUTTING_DOWN
        if len(self._active) >= self.limits.connections:
            return TOO_MANY_CONNECTIONS
        if self._per_ip[ip] >= self.limits.connections_per_ip:
            maillog.event("refused", conn=conn_id, ip=ip, reason="per-ip limit")
            return TOO_MANY_FROM_YOU
        self._per_ip[ip] += 1
        self._enlist(protocol)
        return None

    def _enlist(self, protocol: _SmtpProtocol) -> None:
        self._active.add(protocol)
        if self._sweeper is None:
            self._sweeper = self.loop.create_task(self._sweep(), name="idle-sweeper")

    def _release(self, protocol: _SmtpProtocol, ip: str | None) -> None:
        self._active.discard(protocol)
        if ip is not None:
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]

    async def _sweep(self) -> None:
        """Time out connections idle past their read deadline (RFC 5321 §4.5.3.2): one timer
        for all of them rather than one per read."""
        loop = asyncio.get_running_loop()
        interval = max(
            0.05, min(1.0, self.limits.command_timeout / 4, self.limits.data_timeout / 4)
        )
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for protocol in list(self._active):
                if protocol.waiting and now > protocol.deadline:
                    protocol.time_out()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; idle sessions get 421 now, busy ones after their current command."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            server.close()
        for protocol in list(self._active):
            if protocol.waiting:
                protocol.refuse(R.SHUTTING_DOWN)
        if self._active:
            waits = [asyncio.ensure_future(p.wait_closed()) for p in self._active]
            _, pending = await asyncio.wait(waits, timeout=grace)
            for wait in pending:
                wait.cancel()
            for protocol in list(self._active):
                protocol.abort()
        for server in self._servers:
            await server.wait_closed()


class _SmtpProtocol(asyncio.Protocol):
    """One SMTP connection on the server side; see the module docstring."""

    def __init__(
        self,
        server: SmtpServer,
        kind: str,
        *,
        session: Session | None = None,
        conn: smtp.Connection | None = None,
    ) -> None:
        self.server = server
        self.kind = kind
        self.session = session
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.loop = server.loop  # Python 3.11's get_running_loop() is a getpid() system call
        self.deadline = 0.0  # loop time after which waiting for the client times out
        self._ip: str | None = None  # counted against the per-IP limit
        self._out: list[bytes] = []
        self._queued = False  # in the server's list of connections to flush
        self._task: asyncio.Task[None] | None = None  # a command (or hand-off) in progress
        self._paused_writing = False
        self._paused_reading = False
        self._done = False
        self._closed: asyncio.Future[None] | None = None  # made only when someone waits
        self._plain = False  # plain TCP (no TLS): the last reply may carry the FIN
        self._trace = tracing()

    @property
    def waiting(self) -> bool:
        """Waiting for the client (no command of ours in progress): the read timeout runs."""
        return self._task is None and not self._done

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods
        self.transport = t = cast(asyncio.Transport, transport)
        server = self.server
        if self.session is None:  # a connection accepted by a listener
            ip = str((t.get_extra_info("peername") or ("",))[0])
            conn_id = server.next_conn_id()
            refusal = server._admit(self, ip, conn_id)
            if refusal is not None:
                self._write(refusal.to_bytes())
                self._finish()
                return
            self._ip = ip
            tls = None
            if t.get_extra_info("sslcontext") is not None:
                tls = tlsmod.describe(t.get_extra_info("ssl_object"))
            else:
                self._plain = True
            self.session = server.session_class(server.ctx, self.kind, ip, conn_id, tls=tls)
        else:
            server._enlist(self)
        session = self.session
        if self.conn is None:
            self.conn = smtp.Connection(
                smtp.SERVER, server.ctx.limits, extensions=session.extensions()
            )
        self._write(self.conn.send(session.greeting()))
        maillog.detail("connect", conn=session.conn_id, ip=session.peer_ip, listener=self.kind)
        self._wait_for_client()

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        if self._trace:
            trace("server", "C", data)
        conn = self.conn
        assert conn is not None
        conn.receive_data(data)
        if self._task is None and not self._paused_writing:
            self._pump()
        elif not self._paused_reading and len(conn.trailing_data[0]) > BUFFER_LIMIT:
            self._paused_reading = True  # back-pressure until the command in progress ends
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        if not self._done and self.conn is not None:
            self.conn.receive_data(b"")
            if self._task is None:
                self._pump()
        # Keep a plain TCP connection open for our last replies (a client may half-close after
        # QUIT); a TLS transport cannot stay half-open.
        t = self.transport
        return t is not None and t.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._release()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        if self._task is None and not self._done:
            self._pump()

    # -- the pump ---------------------------------------------------------------------------
    def _pump(self) -> None:
        """Run the core on what has arrived; answer until it needs more input or a command
        must wait."""
        conn, session = self.conn, self.session
        assert conn is not None and session is not None
        try:
            while not self._paused_writing:
                try:
                    event = conn.next_event()
                except smtp.RemoteProtocolError as err:
                    if self._protocol_error(conn, session, err):
                        return
                    continue
                if event is smtp.NEED_DATA:
                    break
                if isinstance(event, smtp.BodyChunk):
                    session.body_chunk(event.data)
                    continue
                if isinstance(event, (smtp.ConnectionClosed, smtp.Turned, smtp.Reply)):
                    self._finish()
                    return
                reply = session.respond(conn, event)
                if reply is None:  # it waits for the store: the rest of the input waits too
                    self._flush()
                    self._task = self.loop.create_task(self._command(conn, session, event))
                    return
                if self._answer(conn, reply):
                    return
        except Exception:  # a bug of ours: say so to the peer rather than vanish
            log.exception("conn=%s failed", session.conn_id)
            self.refuse(LOCAL_ERROR)
            return
        self._wait_for_client()

    async def _command(self, conn: smtp.Connection, session: Session, event: Any) -> None:
        reply = await session.handle(conn, event)
        self._task = None
        if self._done:
            return
        try:
            if self._answer(conn, reply):
                return
        except Exception:
            log.exception("conn=%s failed", session.conn_id)
            self.refuse(LOCAL_ERROR)
            return
        self._pump()

    def _answer(self, conn: smtp.Connection, reply: Reply) -> bool:
        """Queue the reply; True when the conversation cannot go on in this pump (TLS, TURN,
        QUIT, shutdown)."""
        self._write(conn.send(reply))
        state = conn.state
        if state is smtp.State.TLS_PENDING:
            self._flush_now()
            self._task = self.loop.create_task(self._start_tls(conn))
            return True
        if state is smtp.State.TURNED:
            self._flush_now()
            self._task = self.loop.create_task(self._turn(conn))
            return True
        if state is smtp.State.CLOSED:
            self._finish()
            return True
        if self.server.stopping:
            self.refuse(R.SHUTTING_DOWN)
            return True
        return False

    def _protocol_error(
        self, conn: smtp.Connection, session: Session, err: smtp.RemoteProtocolError
    ) -> bool:
        """Answer a line the core refused; True when the connection ends."""
        hint = err.reply_hint or R.BAD_SEQUENCE
        session.protocol_error(conn)
        if err.fatal or session.errors >= self.server.ctx.max_errors:
            self.refuse(hint if err.fatal else R.TOO_MANY_ERRORS)
            return True
        self._write(conn.send(hint))
        return False

    def _wait_for_client(self) -> None:
        """Flush the replies; the read deadline starts now."""
        self._flush()
        conn = self.conn
        assert conn is not None
        limits = self.server.limits
        in_data = conn.state is smtp.State.DATA or conn.state is smtp.State.BDAT
        self.deadline = self.loop.time() + (
            limits.data_timeout if in_data else limits.command_timeout
        )
        if self._paused_reading and len(conn.trailing_data[0]) <= BUFFER_LIMIT:
            self._paused_reading = False
            assert self.transport is not None
            self.transport.resume_reading()

    # -- STARTTLS and TURN ------------------------------------------------------------------
    async def _start_tls(self, conn: smtp.Connection) -> None:
        session, transport = self.session, self.transport
        assert session is not None and transport is not None
        try:
            new = conn.start_tls()  # raises if plaintext was pipelined after STARTTLS
        except smtp.RemoteProtocolError as err:
            self.refuse(err.reply_hint or R.PIPELINED_STARTTLS)
            return
        context = self.server.tls_context
        assert context is not None
        # Whatever arrives from now on comes over TLS (the handshake takes the raw bytes), and
        # may arrive before the handshake's waiter wakes us: it goes to the new connection.
        self.conn = new
        self._plain = False
        try:
            upgraded = await self.loop.start_tls(
                transport,
                self,
                context,
                server_side=True,
                ssl_handshake_timeout=self.server.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            # Bytes sent after our 220 that are no TLS handshake end here, never as commands
            # (RFC 3207 §4.2, CVE-2011-0411).
            log.info("conn=%s TLS handshake failed: %r", session.conn_id, exc)
            self.abort()
            return
        if upgraded is None or self._done:
            self.abort()
            return
        self.transport = upgraded
        session.tls_started(tlsmod.describe(upgraded.get_extra_info("ssl_object")))
        self._task = None
        self._pump()

    async def _turn(self, conn: smtp.Connection) -> None:
        """After our 250 to TURN/ATRN the relay code is the client on this connection."""
        session, transport = self.session, self.transport
        assert session is not None and transport is not None
        handler = self.server.on_turn
        if handler is None:
            self._finish()
            return
        stream = adopt(transport, label="client")
        self._done = True  # the transport's events go to the stream from now on
        try:
            await handler(session, stream, conn.turned())
        except Exception:
            log.exception("conn=%s hand-off failed", session.conn_id)
        finally:
            await stream.close()
            self._release()

    # -- output and the end -----------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if self._trace:
            trace("server", "S", data)

    def _flush(self) -> None:
        """Write the replies at the end of this loop turn, together with those of the other
        connections (as Redis writes its replies before the loop sleeps): a client that holds
        several sessions is woken once for all of them rather than once per reply."""
        if not self._out or self._queued:
            return
        self._queued = True
        dirty = self.server._dirty
        if not dirty:
            self.loop.call_soon(self.server._flush_all)
        dirty.append(self)

    def _flush_now(self) -> None:
        """Write the replies now (before closing, STARTTLS or a TURN hand-off)."""
        self._queued = False
        out = self._out
        if out:
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def refuse(self, reply: Reply) -> None:
        """Send `reply` (a 421 or a fatal 5xx) and close."""
        self._write(reply.to_bytes())
        self._finish()

    def time_out(self) -> None:
        """RFC 5321 §4.5.3.2: the client has been silent too long."""
        if self._paused_writing:  # it does not even read our replies
            self.abort()
        else:
            self.refuse(R.TIMEOUT)

    def _finish(self) -> None:
        """Flush and close (plain TCP at once; TLS after its close_notify). A command still in
        progress finishes on its own (a letter being committed is never cut off); its reply
        goes nowhere. On plain TCP the last reply (221 after QUIT) is corked so that the FIN
        leaves in the same segment: one segment less through both ends' TCP stacks (and one
        wake-up less for the client) per connection."""
        if self._plain and self._out and self.transport is not None:
            _cork(self.transport)
        self._flush_now()
        self._done = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._out.clear()
        self._done = True
        if self.transport is not None:
            self.transport.abort()
        self._release()

    def _release(self) -> None:
        """The connection is over: out of the limits, the session's close hooks run once."""
        if self in self.server._active:
            self.server._release(self, self._ip)
            if self.session is not None:
                self.session.closed()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        if self not in self.server._active:
            return
        if self._closed is None:
            self._closed = self.loop.create_future()
        await self._closed


_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux


def _cork(transport: asyncio.Transport) -> None:
    """Hold what is written next until the close sends it with the FIN (Linux's TCP_CORK; the
    close pushes it out at once)."""
    sock = transport.get_extra_info("socket")
    if _TCP_CORK is not None and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1)


def split_address(address: str) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `:port` (all addresses)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address must be host:port, not {address!r}")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def _sockets(server: asyncio.Server) -> list[socket.socket]:
    """The server's sockets (uvloop gives a list where asyncio's typing says a tuple)."""
    return list(cast(Any, server).sockets)


def _sockname(sock: socket.socket | Any) -> str:
    name = sock.getsockname()
    return f"{name[0]}:{name[1]}"
