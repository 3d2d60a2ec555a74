"""`ConnectionPair`: a client and a server `pochta.smtp.Connection` wired together in memory, for
tests of the sans-IO core and of code built on it (the idea of h11's tests/helpers.py).
Imports `pochta.smtp` only.

    pair = ConnectionPair.ready()                   # greeted, EHLO answered
    pair.client_send(MailFrom(path_of("a@b.example")))  # -> [MailFrom(...)] seen by the server
    pair.server_send(replies.SENDER_OK)             # -> [Reply(250, ...)] seen by the client

Server-side items are events or the `RemoteProtocolError` the server's `next_event()` raised
(its `reply_hint` is what a real server sends). Collection stops where the server has to act:
after a command (it needs a reply), after an error (it needs the hint), at NEED_DATA,
ConnectionClosed or Turned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pochta import smtp
from pochta.smtp import replies as R

ServerItem = smtp.Event | smtp.RemoteProtocolError
ClientItem = smtp.Event | smtp.RemoteProtocolError
Responder = Callable[[smtp.Event], smtp.Reply]

QUEUED = smtp.Reply(250, "2.0.0", "Queued")
CHUNK_OK = smtp.Reply(250, "2.0.0", "Chunk received")
AUTH_OK = smtp.Reply(235, "2.7.0", "Authentication successful")
AUTH_GO_ON = smtp.Reply(334, "", "")
HELP_OK = smtp.Reply(214, "2.0.0", "See RFC 5321")
TURN_OK = smtp.Reply(250, "2.0.0", "Turning around")
ETRN_OK = smtp.Reply(250, "2.0.0", "Queue run started")
GREETING = smtp.Reply(220, "", "server.test ESMTP pochta")


def ehlo_reply(extensions: Iterable[str], size: int | None = None) -> smtp.Reply:
    """A 250 EHLO reply advertising `extensions` (no enhanced code: RFC 2034 §3)."""
    lines = ["server.test Hello"]
    for keyword in sorted(extensions):
        lines.append(f"SIZE {size}" if keyword == "SIZE" and size is not None else keyword)
    return smtp.Reply(250, "", "\n".join(lines))


def default_reply(event: smtp.Event, extensions: Iterable[str] = smtp.ALL_EXTENSIONS) -> smtp.Reply:
    """A plausible positive reply to any command (what a permissive server would say)."""
    match event:
        case smtp.Ehlo():
            return ehlo_reply(extensions)
        case smtp.Helo():
            return smtp.Reply(250, "", "server.test")
        case smtp.MailFrom():
            return R.SENDER_OK
        case smtp.RcptTo():
            return R.RECIPIENT_OK
        case smtp.Data():
            return R.START_INPUT
        case smtp.EndOfData():
            return QUEUED
        case smtp.Bdat(last=last):
            return QUEUED if last else CHUNK_OK
        case smtp.Rset():
            return R.RESET_OK
        case smtp.Quit():
            return R.BYE
        case smtp.Vrfy():
            return R.VRFY_CANNOT
        case smtp.Help():
            return HELP_OK
        case smtp.StartTLS():
            return R.READY_FOR_TLS
        case smtp.Auth(initial=initial):
            return AUTH_GO_ON if initial is None else AUTH_OK
        case smtp.AuthResponse(cancelled=cancelled):
            return R.AUTH_CANCELLED if cancelled else AUTH_OK
        case smtp.Turn() | smtp.Atrn():
            return TURN_OK
        case smtp.Etrn():
            return ETRN_OK
        case smtp.Expn():
            return R.NOT_IMPLEMENTED
    return R.OK


def drain(conn: smtp.Connection) -> list[smtp.Event | smtp.RemoteProtocolError]:
    """Events of `conn` up to the point where its owner must act (see the module docstring).

    A client connection is drained of every complete reply.
    """
    items: list[smtp.Event | smtp.RemoteProtocolError] = []
    while True:
        try:
            event = conn.next_event()
        except smtp.RemoteProtocolError as err:
            items.append(err)
            return items
        if event is smtp.NEED_DATA:
            return items
        items.append(event)
        if isinstance(event, smtp.ConnectionClosed | smtp.Turned):
            return items
        if conn.our_role is smtp.SERVER and not isinstance(event, smtp.BodyChunk):
            return items


def hints(items: Iterable[object]) -> list[smtp.Reply]:
    """The reply hints of the RemoteProtocolErrors among `items`."""
    return [
        item.reply_hint
        for item in items
        if isinstance(item, smtp.RemoteProtocolError) and item.reply_hint is not None
    ]


def replies_of(items: Iterable[object]) -> list[smtp.Reply]:
    return [item for item in items if isinstance(item, smtp.Reply)]


def commands_of(items: Iterable[object]) -> list[object]:
    """Items that are neither body chunks nor errors."""
    return [
        item
        for item in items
        if not isinstance(item, smtp.BodyChunk | smtp.RemoteProtocolError | smtp.Reply)
    ]


def body_of(items: Iterable[object]) -> bytes:
    return b"".join(item.data for item in items if isinstance(item, smtp.BodyChunk))


class ConnectionPair:
    """A client and a server Connection talking through memory."""

    def __init__(
        self,
        limits: smtp.Limits | None = None,
        *,
        extensions: frozenset[str] = smtp.ALL_EXTENSIONS,
        client_limits: smtp.Limits | None = None,
    ) -> None:
        self.server = smtp.Connection(smtp.SERVER, limits, extensions=extensions)
        self.client = smtp.Connection(smtp.CLIENT, client_limits)
        self.extensions = extensions

    @classmethod
    def ready(
        cls,
        limits: smtp.Limits | None = None,
        *,
        extensions: frozenset[str] = smtp.ALL_EXTENSIONS,
        client_limits: smtp.Limits | None = None,
    ) -> ConnectionPair:
        """A pair past the greeting and EHLO (both sides in READY)."""
        pair = cls(limits, extensions=extensions, client_limits=client_limits)
        pair.greet()
        pair.client_send(smtp.Ehlo("client.test"))
        pair.server_send(ehlo_reply(extensions))
        assert pair.server.state is smtp.State.READY, pair.server.state
        assert pair.client.state is smtp.State.READY, pair.client.state
        return pair

    def greet(self, reply: smtp.Reply = GREETING) -> list[ClientItem]:
        return self.server_send(reply)

    # -- client -> server ------------------------------------------------------------------
    def client_send(self, *events: smtp.Command | smtp.BodyChunk) -> list[ServerItem]:
        """Send `events` from the client (in one write) and return what the server sees."""
        return self.feed_server(b"".join(self.client.send(event) for event in events))

    def feed_server(self, data: bytes) -> list[ServerItem]:
        """Raw bytes to the server (what a broken or hostile client might send)."""
        if data:
            self.server.receive_data(data)
        return self.server_events()

    def server_events(self) -> list[ServerItem]:
        return drain(self.server)

    # -- server -> client ------------------------------------------------------------------
    def server_send(self, reply: smtp.Reply) -> list[ClientItem]:
        """Send `reply` from the server and return what the client sees."""
        return self.feed_client(self.server.send(reply))

    def feed_client(self, data: bytes) -> list[ClientItem]:
        if data:
            self.client.receive_data(data)
        return self.client_events()

    def client_events(self) -> list[ClientItem]:
        return drain(self.client)

    def answer_hint(self, error: object) -> list[ClientItem]:
        """Send the reply hint of `error` (a RemoteProtocolError from the server's events) from
        the server, as a real server does."""
        assert isinstance(error, smtp.RemoteProtocolError), error
        assert error.reply_hint is not None
        return self.server_send(error.reply_hint)

    # -- both ------------------------------------------------------------------------------
    def run(
        self, *events: smtp.Command | smtp.BodyChunk, respond: Responder | None = None
    ) -> tuple[list[ServerItem], list[ClientItem]]:
        """Send `events` from the client in one write, then `serve()`."""
        self.server.receive_data(b"".join(self.client.send(event) for event in events))
        return self.serve(respond)

    def serve(self, respond: Responder | None = None) -> tuple[list[ServerItem], list[ClientItem]]:
        """Run the server until it needs data: answer each command with `respond(event)`
        (default: `default_reply`) and each error with its hint. Return everything the server
        saw and everything the client saw, in order."""
        seen: list[ServerItem] = []
        got: list[ClientItem] = []
        while True:
            items = self.server_events()
            seen.extend(items)
            if not items:
                return seen, got
            last = items[-1]
            if isinstance(last, smtp.RemoteProtocolError):
                if last.fatal:
                    return seen, got
                got.extend(self.answer_hint(last))
            elif isinstance(last, smtp.ConnectionClosed | smtp.Turned):
                return seen, got
            elif not isinstance(last, smtp.BodyChunk | smtp.Reply):
                reply = respond(last) if respond else default_reply(last, self.extensions)
                got.extend(self.server_send(reply))
                if self.server.state in (smtp.State.CLOSED, smtp.State.TLS_PENDING):
                    return seen, got
