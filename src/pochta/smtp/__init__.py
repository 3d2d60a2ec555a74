"""pochta's SMTP protocol core: sans-IO, both roles (RFC 5321 and the ESMTP extensions pochta
speaks). No asyncio, sockets, ssl, logging, time, or other pochta imports here but
`pochta.value` (the base of its events).

    conn = smtp.Connection(smtp.SERVER, smtp.Limits())
    conn.receive_data(chunk)            # b"" signals EOF
    event = conn.next_event()           # an Event, or smtp.NEED_DATA
    wire = conn.send(smtp.Reply(250, "2.1.0", "Sender OK"))
"""

from pochta.smtp import _replies as replies
from pochta.smtp._address import NULL_PATH, AddressError, Path, parse_path, valid_domain
from pochta.smtp._connection import ALL_EXTENSIONS, NEED_DATA, Connection, Limits
from pochta.smtp._data import DotDecoder, DotEncoder, dot_stuff
from pochta.smtp._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
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
from pochta.smtp._grammar import decode_base64, encode_base64, path_of
from pochta.smtp._replies import Reply
from pochta.smtp._state import CLIENT, SERVER, Role, State

__all__ = [
    "ALL_EXTENSIONS",
    "CLIENT",
    "NEED_DATA",
    "NULL_PATH",
    "SERVER",
    "AddressError",
    "Atrn",
    "Auth",
    "AuthResponse",
    "Bdat",
    "BodyChunk",
    "Command",
    "Connection",
    "ConnectionClosed",
    "Data",
    "DotDecoder",
    "DotEncoder",
    "Ehlo",
    "EndOfData",
    "Etrn",
    "Event",
    "Expn",
    "Helo",
    "Help",
    "Limits",
    "LocalProtocolError",
    "MailFrom",
    "Noop",
    "Path",
    "ProtocolError",
    "Quit",
    "RcptTo",
    "RemoteProtocolError",
    "Reply",
    "Role",
    "Rset",
    "StartTLS",
    "State",
    "Turn",
    "Turned",
    "Vrfy",
    "decode_base64",
    "dot_stuff",
    "encode_base64",
    "parse_path",
    "path_of",
    "replies",
    "valid_domain",
]
