"""The SMTP state machine shared by both roles: states, and the only code that changes them.
Imports `_events` and `_replies`.

Theory of operation (after h11): a client command is *proposed* and the server's reply *settles*
it. The server applies a transition when it sends the reply; the client applies the same
transition when it receives the reply. So both sides run `settle()` on the same (state, command,
reply) and always agree on the state. Commands that need no reply (body bytes, AUTH lines) do not
move the state by themselves.

    START --220--> INIT --EHLO/HELO 250--> READY --MAIL 250--> MAIL --RCPT 250--> RCPT
    RCPT --DATA 354--> DATA --end of data, any reply--> READY
    RCPT --BDAT 250--> BDAT --BDAT LAST 250 / any 4xx-5xx--> READY
    READY --STARTTLS 220--> TLS_PENDING   (a fresh Connection in INIT continues over TLS)
    READY --AUTH 334--> AUTH --235/5xx--> READY
    READY --TURN/ATRN 250--> TURNED     (a fresh Connection of the other role, in START)
    any   --QUIT 221 / 421--> CLOSED
    RSET 250 -> READY (INIT if no EHLO yet); EHLO/HELO 250 also reset the transaction.
"""

from __future__ import annotations

import enum
from typing import cast

from pochta.smtp._events import (
    Atrn,
    Auth,
    AuthResponse,
    Bdat,
    Command,
    Data,
    Ehlo,
    EndOfData,
    Expn,
    Helo,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Turn,
    Vrfy,
)
from pochta.smtp._replies import Reply


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"

    @property
    def other(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


CLIENT = Role.CLIENT
SERVER = Role.SERVER


class State(enum.Enum):
    # Members are singletons: hash them by identity (Enum's own __hash__ is Python code, and
    # the core looks states up in dicts on every command).
    __hash__ = object.__hash__

    START = "start"  # waiting for the greeting
    INIT = "init"  # greeted (or TLS just started): EHLO/HELO needed
    READY = "ready"  # no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # between 354 and the end of data
    BDAT = "bdat"  # inside a BDAT transaction (RFC 3030)
    AUTH = "auth"  # inside a SASL exchange (RFC 4954)
    TLS_PENDING = "tls-pending"  # STARTTLS accepted, handshake next (RFC 3207)
    TURNED = "turned"  # TURN/ATRN accepted: roles swap (RFC 821 §4.1.1, RFC 2645)
    CLOSED = "closed"


# Commands after which a pipelining client must wait for the reply (RFC 2920 §3.1, plus
# STARTTLS (RFC 3207 §4.2), AUTH (RFC 4954 §4), BDAT LAST-less chunks may continue).
GROUP_ENDERS: tuple[type[Command], ...] = (
    Ehlo,
    Helo,
    Data,
    Vrfy,
    Expn,
    Turn,
    Atrn,
    Quit,
    Noop,
    StartTLS,
    Auth,
    AuthResponse,
)

# (command type) -> (state after a positive reply, state after a negative one or None = unchanged)
_TABLE: dict[type[Command], tuple[State | None, State | None]] = {
    Ehlo: (State.READY, None),
    Helo: (State.READY, None),
    MailFrom: (State.MAIL, None),
    RcptTo: (State.RCPT, None),
    EndOfData: (State.READY, State.READY),
    Quit: (State.CLOSED, None),
    StartTLS: (State.TLS_PENDING, None),
    Turn: (State.TURNED, None),
    Atrn: (State.TURNED, None),
    Auth: (State.READY, State.READY),
    Noop: (None, None),
}


def settle(state: State, cmd: Command | None, reply: Reply, greeted: bool) -> State:
    """The state after `reply` answers `cmd` in `state` (None: a rejected, unparsable line)."""
    code = reply.code
    if code == 421:  # RFC 5321 §3.8: the server closes
        return State.CLOSED
    if cmd is None:
        return state
    kind = type(cmd)  # events are final classes
    positive = 200 <= code < 300
    if kind is Data:
        return State.DATA if code == 354 else state
    if kind is Auth and code == 334:
        return State.AUTH
    if kind is Bdat:
        if not positive:
            return State.READY  # RFC 3030 §2: a failed chunk ends the transaction
        return State.READY if cast(Bdat, cmd).last else State.BDAT
    if kind is Rset:
        return (State.READY if greeted else State.INIT) if positive else state
    after = _TABLE.get(kind)
    if after is None:
        return state
    new = after[0] if positive else after[1]
    return state if new is None else new
