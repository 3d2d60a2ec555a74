"""`Connection`: one side of an SMTP conversation, sans-IO. Imports the `smtp._*` modules only.

    conn = Connection(SERVER, Limits())
    conn.receive_data(chunk)           # b"" signals EOF
    event = conn.next_event()          # an Event, or NEED_DATA
    wire = conn.send(Reply(...))       # bytes to write

Server role: `next_event()` returns commands (and BodyChunk pieces); every command must be
answered with `send(Reply)` before the next `next_event()` (replies go out in command order, which
is what PIPELINING needs, RFC 2920 §3). A malformed or out-of-sequence line raises
RemoteProtocolError whose `reply_hint` the caller sends; that reply settles the bad line and the
connection goes on (unless `fatal`).
Client role: `send(command)` returns the bytes; `next_event()` returns each Reply in order.
"""

from __future__ import annotations

import enum
import re
from collections import deque
from dataclasses import dataclass
from typing import cast

from pochta.smtp import _replies as R
from pochta.smtp._data import CR, LF, NUL, DotDecoder, DotEncoder
from pochta.smtp._errors import LocalProtocolError, RemoteProtocolError
from pochta.smtp._events import (
    Atrn,
    Auth,
    AuthResponse,
    Bdat,
    BodyChunk,
    Command,
    ConnectionClosed,
    Data,
    Ehlo,
    EndOfData,
    Etrn,
    Event,
    Expn,
    Helo,
    Help,
    MailFrom,
    Noop,
    Quit,
    RcptTo,
    Rset,
    StartTLS,
    Turn,
    Turned,
    Vrfy,
)
from pochta.smtp._grammar import format_command, parse_auth_response, parse_command
from pochta.smtp._replies import Reply, parse_reply_lines
from pochta.smtp._state import GROUP_ENDERS, Role, State, settle


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA

ALL_EXTENSIONS = frozenset({"PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "CHUNKING", "BINARYMIME"})
_MAX_REPLY_LINES = 100
_REPLY_LINE = re.compile(r"[2-5][0-9][0-9](?:[ -]|$)", re.ASCII)  # RFC 5321 §4.2 Reply-line


@dataclass(frozen=True)
class Limits:
    """RFC 5321 §4.5.3.1 sizes; every one configurable."""

    command_line: int = 512  # octets incl. CRLF (§4.5.3.1.4)
    text_line: int = 1000  # octets incl. CRLF (§4.5.3.1.6)
    reply_line: int = 512  # octets incl. CRLF (§4.5.3.1.5)
    recipients: int = 100  # per transaction, at least 100 (§4.5.3.1.8)
    message_size: int = 25 * 1024 * 1024  # octets; advertised with SIZE (RFC 1870)
    auth_line: int = 12288  # octets of one SASL line (RFC 4954 §4)


# Commands a server accepts in each state; anything else gets the reply in _OUT_OF_SEQUENCE.
_ANY = (Noop, Rset, Quit, Help, Vrfy, Expn, Ehlo, Helo)
_ALLOWED: dict[State, frozenset[type[Command]]] = {
    State.INIT: frozenset(_ANY),
    State.READY: frozenset((*_ANY, MailFrom, StartTLS, Auth, Turn, Etrn, Atrn)),
    State.MAIL: frozenset((*_ANY, RcptTo)),
    State.RCPT: frozenset((*_ANY, RcptTo, Data, Bdat)),
    State.BDAT: frozenset((Noop, Rset, Quit, Bdat)),
}


def _out_of_sequence(state: State, cmd: Command) -> Reply:
    if state is State.INIT:
        return R.HELO_FIRST
    if isinstance(cmd, MailFrom):
        return R.NESTED_MAIL
    if state is State.BDAT:  # RFC 3030 §2: only BDAT (or RSET) until the LAST chunk
        return R.BDAT_DATA_MIX if isinstance(cmd, Data) else R.BAD_SEQUENCE
    if isinstance(cmd, (RcptTo, Data, Bdat)):
        return R.NEED_MAIL_FIRST if state is State.READY else R.NEED_RCPT_FIRST
    return R.BAD_SEQUENCE


class Connection:
    """One side of an SMTP connection; see the module docstring."""

    def __init__(
        self,
        our_role: Role,
        limits: Limits | None = None,
        *,
        extensions: frozenset[str] = ALL_EXTENSIONS,
        state: State = State.START,
        tls: bool = False,
    ) -> None:
        self.our_role = our_role
        self.limits = limits or Limits()
        self.extensions = extensions  # server: what we advertise; client: filled from EHLO
        self.peer_extensions: dict[str, str] = {}
        self.state = state
        self.tls = tls
        self.authenticated = False
        self.greeted = state not in (State.START, State.INIT)
        self._esmtp = self.greeted  # EHLO (not HELO) was accepted: extensions are in force
        self._buf = b""
        self._eof = False
        self._pending: deque[Command | None] = deque()
        self._skip_line = False
        self._auth_turn = False  # AUTH: a client line was read and awaits our reply
        self._decoder: DotDecoder | None = None
        self._data_done = False
        self._encoder: DotEncoder | None = None
        self._bdat: Bdat | None = None
        self._bdat_left = 0
        self._bdat_error: Reply | None = None
        self._message_size = 0
        self._recipients = 0
        self._mail: MailFrom | None = None
        self._reply_lines: list[str] = []
        self.answered: Command | None = None  # client: the command the last reply settled

    # -- input ------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; b"" means the peer closed its side."""
        if data:
            self._buf += data
        else:
            self._eof = True

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not yet processed, and whether EOF was seen."""
        return self._buf, self._eof

    @property
    def their_role(self) -> Role:
        return self.our_role.other

    @property
    def mail(self) -> MailFrom | None:
        """The MAIL command of the current transaction (server side)."""
        return self._mail

    def next_event(self) -> Event | _NeedData:
        """The next event from the peer, or NEED_DATA.

        Raises:
            RemoteProtocolError: the peer broke the protocol; on the server side send its
                `reply_hint`, and close if it is `fatal`.
            LocalProtocolError: called while a command still waits for our reply.
        """
        if self.state is State.CLOSED:
            return ConnectionClosed()
        if self.state is State.TURNED:
            return Turned()
        if self.our_role is Role.SERVER:
            if self._decoder is not None:
                return self._next_data()
            if self._bdat is not None:
                return self._next_bdat()
            return self._next_command()
        return self._next_reply()

    # -- server: commands -------------------------------------------------------------------
    def _next_command(self) -> Event | _NeedData:
        # In AUTH the AUTH command stays pending (RFC 4954 §4); each client line needs a reply.
        if self._auth_turn if self.state is State.AUTH else self._pending:
            raise LocalProtocolError("reply to the pending command first")
        while True:
            line = self._take_line(
                self.limits.auth_line if self.state is State.AUTH else self.limits.command_line
            )
            if line is None:
                if self._eof:
                    self.state = State.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            return self._command(line)

    def _reject(self, reply: Reply, why: str, *, fatal: bool = False) -> RemoteProtocolError:
        if self.state is State.AUTH:  # in AUTH the reply settles (ends) the AUTH command
            self._auth_turn = True
        else:
            self._pending.append(None)
        return RemoteProtocolError(why, reply, fatal=fatal)

    def _take_line(self, limit: int) -> bytes | None:
        """The next CRLF-terminated line without its CRLF; None when incomplete.

        Only CRLF ends a line (RFC 5321 §2.3.8): a bare CR or LF makes the whole line, up to
        the next CRLF, one bad line, answered with 500 5.5.2 as soon as it is seen. A line
        over `limit` (RFC 5321 §4.5.3.1.4) likewise gets one 500 and its tail is dropped
        unread, so no part of a bad line can ever run as a command.
        """
        while True:
            buf = self._buf
            end = buf.find(b"\r\n")
            if self._skip_line:  # the rest of a line already answered
                if end < 0:
                    self._buf = b"\r" if buf.endswith(b"\r") else b""
                    return None
                self._buf, self._skip_line = buf[end + 2 :], False
                continue
            line = buf[:end] if end >= 0 else buf.removesuffix(b"\r")  # CR: maybe a CRLF
            if CR in line or LF in line:
                raise self._bad_line(end, R.BARE_LINE_END, "bare CR or LF")
            if len(buf) >= limit if end < 0 else end + 2 > limit:
                too_long = R.AUTH_LINE_TOO_LONG if self.state is State.AUTH else R.LINE_TOO_LONG
                raise self._bad_line(end, too_long, "line too long")
            if end < 0:
                return None
            self._buf = buf[end + 2 :]
            return line

    def _bad_line(self, end: int, reply: Reply, why: str) -> RemoteProtocolError:
        """Drop the line that ends at `end` (-1: not yet arrived, skip to its CRLF)."""
        if end >= 0:
            self._buf = self._buf[end + 2 :]
        else:
            self._buf = b"\r" if self._buf.endswith(b"\r") else b""
            self._skip_line = True
        return self._reject(reply, why)

    def _command(self, raw: bytes) -> Event | _NeedData:
        if NUL in raw:
            raise self._reject(R.NUL_IN_COMMAND, "NUL in command")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self._reject(R.BAD_ENCODING, "8-bit garbage") from None
        if self.state is State.AUTH:
            self._auth_turn = True
            return parse_auth_response(line)  # a 501 for bad base64 ends the exchange
        try:
            cmd = parse_command(line)
        except RemoteProtocolError as err:
            self._pending.append(None)
            raise err from None
        if isinstance(cmd, Bdat):  # RFC 3030 §2: the chunk is read even when refused
            self._start_bdat(cmd, self._bdat_refusal(cmd))
            return self._next_bdat()
        self._check_sequence(cmd)
        self._pending.append(cmd)
        return cmd

    def _check_sequence(self, cmd: Command) -> None:
        kind = type(cmd)
        if kind not in _ALLOWED.get(self.state, ()):
            raise self._reject(_out_of_sequence(self.state, cmd), "out of sequence")
        if kind is MailFrom:
            self._check_mail(cast(MailFrom, cmd))
        elif kind is RcptTo:
            if self._recipients >= self.limits.recipients:
                raise self._reject(R.TOO_MANY_RECIPIENTS, "too many recipients")
            if not cast(RcptTo, cmd).path.is_ascii and not (self._mail and self._mail.smtputf8):
                raise self._reject(R.NON_ASCII_ADDRESS, "non-ASCII recipient")  # RFC 6531 §3.4
        elif kind is Data:
            if self._mail is not None and self._mail.body == "BINARYMIME":
                raise self._reject(R.BAD_SEQUENCE, "BINARYMIME needs BDAT")  # RFC 3030 §3
        elif kind is StartTLS:
            if self.tls:
                raise self._reject(R.ALREADY_TLS, "TLS twice")
            if self._buf:  # RFC 3207 §4.2, CVE-2011-0411: nothing may follow STARTTLS
                self._buf = b""
                raise self._reject(R.PIPELINED_STARTTLS, "pipelined STARTTLS", fatal=True)
        elif kind is Auth and self.authenticated:
            raise self._reject(R.ALREADY_AUTHENTICATED, "AUTH twice")

    def _check_mail(self, cmd: MailFrom) -> None:
        ext = self._in_force()
        if cmd.params and not self._esmtp:  # RFC 5321 §4.1.1.11: parameters need EHLO
            raise self._reject(R.PARAMETER_NO_EXT, "MAIL parameters after HELO")
        if "SIZE" in cmd.params:
            if "SIZE" not in ext:
                raise self._reject(R.PARAMETER_NO_EXT, "SIZE not advertised")
            if (cmd.size or 0) > self.limits.message_size:
                raise self._reject(R.SIZE_DECLARED_TOO_BIG, "declared size too big")
        body = cmd.body
        if (body == "8BITMIME" and "8BITMIME" not in ext) or (
            body == "BINARYMIME" and "BINARYMIME" not in ext
        ):
            raise self._reject(R.PARAMETER_NO_EXT, "BODY not advertised")
        if cmd.smtputf8 and "SMTPUTF8" not in ext:
            raise self._reject(R.PARAMETER_NO_EXT, "SMTPUTF8 not advertised")

    # -- server: DATA and BDAT ---------------------------------------------------------------
    def _next_data(self) -> Event | _NeedData:
        decoder = self._decoder
        assert decoder is not None
        if self._data_done:
            return self._finish_data(decoder)
        if not self._buf:
            if self._eof:
                self.state = State.CLOSED
                self._decoder = None
                return ConnectionClosed()
            return NEED_DATA
        body, done = decoder.feed(self._buf)
        self._buf = b""
        if done:
            self._buf = decoder.remainder()
            self._data_done = True
            # The last piece of body may come with the terminator: hand it out first.
            return BodyChunk(body) if body else self._finish_data(decoder)
        return BodyChunk(body) if body else NEED_DATA

    def _finish_data(self, decoder: DotDecoder) -> Event:
        self._decoder = None
        self._data_done = False
        self._pending.append(EndOfData())
        flags = decoder.flags
        if flags.oversize:
            raise RemoteProtocolError("message too big", R.MESSAGE_TOO_BIG)
        if flags.bare_line_end:
            raise RemoteProtocolError("bare CR/LF in data", R.BARE_LINE_END_IN_DATA)
        if flags.nul:
            raise RemoteProtocolError("NUL in data", R.NUL_IN_DATA)
        if flags.long_line:
            raise RemoteProtocolError("line too long in data", R.TEXT_LINE_TOO_LONG)
        return EndOfData()

    def _in_force(self) -> frozenset[str]:
        """The extensions the client may use: none after HELO (RFC 5321 §4.1.1.1)."""
        return self.extensions if self._esmtp else frozenset()

    def _bdat_refusal(self, cmd: Bdat) -> Reply | None:
        if "CHUNKING" not in self._in_force():
            return R.NOT_IMPLEMENTED
        if type(cmd) not in _ALLOWED.get(self.state, ()):
            return _out_of_sequence(self.state, cmd)
        return None

    def _start_bdat(self, cmd: Bdat, error: Reply | None) -> None:
        self._bdat = cmd
        self._bdat_left = cmd.size
        self._bdat_error = error
        if error is None and self._message_size + cmd.size > self.limits.message_size:
            self._bdat_error = R.BDAT_TOO_BIG

    def _next_bdat(self) -> Event | _NeedData:
        cmd = self._bdat
        assert cmd is not None
        if self._bdat_left > 0:
            if not self._buf:
                if self._eof:
                    self.state = State.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            piece = self._buf[: self._bdat_left]
            self._buf = self._buf[len(piece) :]
            self._bdat_left -= len(piece)
            if self._bdat_error is None:
                self._message_size += len(piece)
                return BodyChunk(piece)
            return self._next_bdat()
        self._bdat = None
        error = self._bdat_error
        if error is not None:
            # A too-big chunk ends the transaction; a refused one changes nothing.
            self._pending.append(cmd if error is R.BDAT_TOO_BIG else None)
            raise RemoteProtocolError("BDAT rejected", error)
        self._pending.append(cmd)
        return cmd

    # -- sending -----------------------------------------------------------------------------
    def send(self, event: Command | BodyChunk | Reply) -> bytes:
        """Bytes to write for `event`.

        Raises:
            LocalProtocolError: the event is not allowed now (wrong role or state, a reply with
                no command to answer, pipelining without PIPELINING...).
        """
        if isinstance(event, Reply):
            if self.our_role is not Role.SERVER:
                raise LocalProtocolError("only a server sends replies")
            return self._send_reply(event)
        if self.our_role is not Role.CLIENT:
            raise LocalProtocolError("only a client sends commands")
        return self._send_command(event)

    def _send_reply(self, reply: Reply) -> bytes:
        if self.state is State.CLOSED:
            raise LocalProtocolError("connection closed")
        if self.state is State.START:
            self.state = State.INIT if reply.code == 220 else State.CLOSED
            return reply.to_bytes()
        self._auth_turn = False
        if reply.code == 334 and self._pending and isinstance(self._pending[0], Auth):
            self.state = State.AUTH  # RFC 4954 §4: the exchange goes on; AUTH stays pending
            return reply.to_bytes()
        if not self._pending:
            if reply.code == 421:
                self.state = State.CLOSED
                return reply.to_bytes()
            raise LocalProtocolError("no command to reply to")
        self._apply(self._pending.popleft(), reply)
        return reply.to_bytes()

    def _apply(self, cmd: Command | None, reply: Reply) -> None:
        """Settle `cmd` with `reply` (both roles) and keep the transaction bookkeeping."""
        old = self.state
        code = reply.code
        positive = 200 <= code < 300
        self.state = new = settle(old, cmd, reply, self.greeted)
        kind = type(cmd)  # events are final classes: compared by identity, once per reply
        if positive:
            if kind is Ehlo or kind is Helo:
                self.greeted = True
                self._esmtp = kind is Ehlo
            elif kind is MailFrom:
                self._mail = cast(MailFrom, cmd)
            elif kind is RcptTo:
                self._recipients += 1
            elif kind is Auth and code == 235:
                self.authenticated = True
        elif kind is Data and code == 354:
            if self.our_role is Role.SERVER:
                max_size = self.limits.message_size - self._message_size
                self._decoder = DotDecoder(max_size, self.limits.text_line)
            else:
                self._encoder = DotEncoder()
        idle = new is State.READY or new is State.INIT
        if (idle and not (old is State.READY or old is State.INIT)) or (
            positive and (kind is Ehlo or kind is Helo or kind is Rset)
        ):
            self._reset_transaction()

    def _reset_transaction(self) -> None:
        self._mail = None
        self._recipients = 0
        self._message_size = 0
        self._encoder = None

    def _send_command(self, event: Command | BodyChunk) -> bytes:
        if self.state in (State.CLOSED, State.TURNED, State.TLS_PENDING):
            raise LocalProtocolError(f"cannot send in state {self.state.value}")
        if isinstance(event, BodyChunk):
            if self._encoder is None:
                raise LocalProtocolError("body bytes outside DATA")
            return self._encoder.encode(event.data)
        if isinstance(event, EndOfData):
            if self._encoder is None:
                raise LocalProtocolError("end of data outside DATA")
            wire = self._encoder.end()
            self._encoder = None
            self._pending.append(event)
            return wire
        if isinstance(event, AuthResponse):
            if self.state is not State.AUTH:
                raise LocalProtocolError("AUTH response outside AUTH")
            return format_command(event).encode("ascii") + b"\r\n"
        if isinstance(event, Bdat) and event.size != len(event.data):
            raise LocalProtocolError("BDAT size does not match its data")  # RFC 3030 §2
        self._check_pipelining(event)
        self._pending.append(event)
        wire = format_command(event).encode("utf-8") + b"\r\n"
        if isinstance(event, Bdat):
            return wire + event.data
        return wire

    def _check_pipelining(self, event: Command) -> None:
        if not self._pending:
            return
        if "PIPELINING" not in self.peer_extensions:
            raise LocalProtocolError("the server did not advertise PIPELINING")
        last = self._pending[-1]
        if isinstance(last, GROUP_ENDERS):  # RFC 2920 §3.1
            raise LocalProtocolError(f"{type(last).__name__} must end a pipelined group")

    # -- client: replies ---------------------------------------------------------------------
    def _next_reply(self) -> Event | _NeedData:
        while True:
            lf = self._buf.find(b"\n")
            if lf < 0:
                if len(self._buf) > self.limits.reply_line * 8:
                    raise RemoteProtocolError("reply line too long", fatal=True)
                if self._eof:
                    self.state = State.CLOSED
                    return ConnectionClosed()
                return NEED_DATA
            raw, self._buf = self._buf[:lf], self._buf[lf + 1 :]
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not _REPLY_LINE.match(line) or (
                self._reply_lines and line[:3] != self._reply_lines[0][:3]
            ):  # RFC 5321 §4.2: 2yz-5yz, and the same code on every line of a reply
                raise RemoteProtocolError(f"malformed reply {line[:40]!r}", fatal=True)
            self._reply_lines.append(line)
            if len(self._reply_lines) > _MAX_REPLY_LINES:
                raise RemoteProtocolError("reply has too many lines", fatal=True)
            if line[3:4] == "-":
                continue
            lines, self._reply_lines = self._reply_lines, []
            return self._settle_reply(parse_reply_lines(lines))

    def _settle_reply(self, reply: Reply) -> Reply:
        if self.state is State.START:
            self.state = State.INIT if reply.code == 220 else State.CLOSED
            self.answered = None
            return reply
        if self.state is State.AUTH and reply.code == 334:
            self.answered = self._pending[0] if self._pending else None
            return reply
        if not self._pending:
            if reply.code == 421:
                self.state = State.CLOSED
                self.answered = None
                return reply
            raise RemoteProtocolError(f"unexpected reply {reply}", fatal=True)
        cmd = self._pending.popleft()
        if isinstance(cmd, Auth) and reply.code == 334:
            self._pending.appendleft(cmd)
        self.answered = cmd
        self._apply(cmd, reply)
        if isinstance(cmd, Ehlo) and reply.positive:
            self.peer_extensions = _parse_ehlo(reply)
        elif isinstance(cmd, Helo) and reply.positive:
            self.peer_extensions = {}  # RFC 5321 §4.1.1.1: no extensions after HELO
        return reply

    # -- hand-offs ---------------------------------------------------------------------------
    def start_tls(self) -> Connection:
        """The connection to use once the TLS handshake is done: same role, INIT state (EHLO
        again, RFC 3207 §4.2), nothing carried over.

        Raises:
            RemoteProtocolError: plaintext arrived after STARTTLS (CVE-2011-0411 class).
        """
        if self.state is not State.TLS_PENDING:
            raise LocalProtocolError("STARTTLS was not accepted")
        if self._buf:
            self._buf = b""
            raise RemoteProtocolError("data after STARTTLS", R.PIPELINED_STARTTLS, fatal=True)
        return Connection(
            self.our_role, self.limits, extensions=self.extensions, state=State.INIT, tls=True
        )

    def turned(self) -> Connection:
        """After TURN/ATRN: a connection of the other role in its initial state (RFC 821
        §4.1.1: as if the channel just opened), holding the bytes already received."""
        if self.state is not State.TURNED:
            raise LocalProtocolError("TURN/ATRN was not accepted")
        new = Connection(self.their_role, self.limits, extensions=self.extensions, tls=self.tls)
        new._buf, new._eof = self._buf, self._eof
        self._buf = b""
        self.state = State.CLOSED
        return new


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    """EHLO keywords (RFC 5321 §4.1.1.1): the first line is the greeting, the rest
    `KEYWORD [params]`."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params
    return ext
