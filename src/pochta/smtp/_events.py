"""Events: what one side of an SMTP connection says. Imports `_address` and `_replies`.

Commands (client -> server) are the frozen dataclasses below; the server answers each with a
`Reply`. Body bytes travel as `BodyChunk` (already dot-unstuffed on the server side; raw on the
client side, where `send()` dot-stuffs them). `EndOfData` ends a DATA body and, like a command,
gets a reply. `Bdat` carries its chunk's bytes when the client sends it; on the server side the
bytes arrive first as `BodyChunk` events and then the `Bdat` command that needs the reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pochta.smtp._address import Path
from pochta.smtp._replies import Reply


@dataclass(frozen=True, slots=True)
class Helo:
    domain: str


@dataclass(frozen=True, slots=True)
class Ehlo:
    domain: str


@dataclass(frozen=True, slots=True)
class MailFrom:
    path: Path
    params: dict[str, str | None] = field(default_factory=dict)

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


@dataclass(frozen=True, slots=True)
class RcptTo:
    path: Path
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    pass


@dataclass(frozen=True, slots=True)
class BodyChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfData:
    pass


@dataclass(frozen=True, slots=True)
class Bdat:
    """RFC 3030 BDAT. `data` is set when a client sends it; a server sees size and last only."""

    size: int
    last: bool
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class Rset:
    pass


@dataclass(frozen=True, slots=True)
class Noop:
    argument: str = ""


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class Vrfy:
    argument: str


@dataclass(frozen=True, slots=True)
class Expn:
    argument: str


@dataclass(frozen=True, slots=True)
class Help:
    argument: str = ""


@dataclass(frozen=True, slots=True)
class StartTLS:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    """RFC 4954 AUTH. `initial` is the decoded initial response: None if absent, b"" for `=`."""

    mechanism: str
    initial: bytes | None = None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """One decoded client line of a SASL exchange; `cancelled` for the `*` line."""

    data: bytes
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class Turn:
    """RFC 821 §4.1.1 TURN."""


@dataclass(frozen=True, slots=True)
class Etrn:
    """RFC 1985 ETRN: `argument` is `domain`, `@domain` or `#queuename`."""

    argument: str


@dataclass(frozen=True, slots=True)
class Atrn:
    """RFC 2645 ATRN with an optional comma-separated list of domains."""

    domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    pass


@dataclass(frozen=True, slots=True)
class Turned:
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
