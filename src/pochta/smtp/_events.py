"""Events: what one side of an SMTP connection says. Imports `_address`, `_replies` and
`pochta.value`.

Commands (client -> server) are the values below (`pochta.value`); the server answers each with a
`Reply`. Body bytes travel as `BodyChunk` (already dot-unstuffed on the server side; raw on the
client side, where `send()` dot-stuffs them). `EndOfData` ends a DATA body and, like a command,
gets a reply. `Bdat` carries its chunk's bytes when the client sends it; on the server side the
bytes arrive first as `BodyChunk` events and then the `Bdat` command that needs the reply.
"""

from __future__ import annotations

from typing import Final

from pochta.smtp._address import Path
from pochta.smtp._replies import Reply
from pochta.value import Value


class Helo(Value):
    __match_args__ = ("domain",)

    def __init__(self, domain: str) -> None:
        self.domain: Final = domain


class Ehlo(Value):
    __match_args__ = ("domain",)

    def __init__(self, domain: str) -> None:
        self.domain: Final = domain


class MailFrom(Value):
    __match_args__ = ("path", "params")

    def __init__(self, path: Path, params: dict[str, str | None] | None = None) -> None:
        self.path: Final = path
        self.params: Final[dict[str, str | None]] = {} if params is None else params

    @property
    def size(self) -> int | None:
        """The SIZE parameter (RFC 1870), if given."""
        value = self.params.get("SIZE")
        return int(value) if value else None

    @property
    def body(self) -> str:
        """The BODY parameter (RFC 6152, RFC 3030): 7BIT, 8BITMIME or BINARYMIME."""
        return (self.params.get("BODY") or "7BIT").upper()

    @property
    def smtputf8(self) -> bool:
        """RFC 6531 §3.4."""
        return "SMTPUTF8" in self.params


class RcptTo(Value):
    __match_args__ = ("path", "params")

    def __init__(self, path: Path, params: dict[str, str | None] | None = None) -> None:
        self.path: Final = path
        self.params: Final[dict[str, str | None]] = {} if params is None else params


class Data(Value):
    pass


class BodyChunk(Value):
    __match_args__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data: Final = data


class EndOfData(Value):
    pass


class Bdat(Value):
    """RFC 3030 BDAT. `data` is set when a client sends it; a server sees size and last only."""

    __match_args__ = ("size", "last", "data")

    def __init__(self, size: int, last: bool, data: bytes = b"") -> None:
        self.size: Final = size
        self.last: Final = last
        self.data: Final = data


class Rset(Value):
    pass


class Noop(Value):
    __match_args__ = ("argument",)

    def __init__(self, argument: str = "") -> None:
        self.argument: Final = argument


class Quit(Value):
    pass


class Vrfy(Value):
    __match_args__ = ("argument",)

    def __init__(self, argument: str) -> None:
        self.argument: Final = argument


class Expn(Value):
    __match_args__ = ("argument",)

    def __init__(self, argument: str) -> None:
        self.argument: Final = argument


class Help(Value):
    __match_args__ = ("argument",)

    def __init__(self, argument: str = "") -> None:
        self.argument: Final = argument


class StartTLS(Value):
    pass


class Auth(Value):
    """RFC 4954 AUTH. `initial` is the decoded initial response: None if absent, b"" for `=`."""

    __match_args__ = ("mechanism", "initial")

    def __init__(self, mechanism: str, initial: bytes | None = None) -> None:
        self.mechanism: Final = mechanism
        self.initial: Final = initial


class AuthResponse(Value):
    """One decoded client line of a SASL exchange; `cancelled` for the `*` line."""

    __match_args__ = ("data", "cancelled")

    def __init__(self, data: bytes, cancelled: bool = False) -> None:
        self.data: Final = data
        self.cancelled: Final = cancelled


class Turn(Value):
    """RFC 821 §4.1.1 TURN."""


class Etrn(Value):
    """RFC 1985 ETRN: `argument` is `domain`, `@domain` or `#queuename`."""

    __match_args__ = ("argument",)

    def __init__(self, argument: str) -> None:
        self.argument: Final = argument


class Atrn(Value):
    """RFC 2645 ATRN with an optional comma-separated list of domains."""

    __match_args__ = ("domains",)

    def __init__(self, domains: tuple[str, ...] = ()) -> None:
        self.domains: Final = domains


class ConnectionClosed(Value):
    pass


class Turned(Value):
    """Both sides agreed to swap roles (TURN/ATRN answered 250): call `Connection.turned()`."""


Command = (
    Helo
    | Ehlo
    | MailFrom
    | RcptTo
    | Data
    | EndOfData
    | Bdat
    | Rset
    | Noop
    | Quit
    | Vrfy
    | Expn
    | Help
    | StartTLS
    | Auth
    | AuthResponse
    | Turn
    | Etrn
    | Atrn
)
Event = Command | BodyChunk | Reply | ConnectionClosed | Turned
