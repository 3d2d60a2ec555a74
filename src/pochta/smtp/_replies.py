"""SMTP replies as values, and every reply the core itself sends, named once. Stdlib only.

A reply is `Reply(code, enhanced, text)`; `text` may hold several lines separated by "\n" and is
sent as a multi-line reply (RFC 5321 §4.2.1). Enhanced status codes (RFC 2034, RFC 3463) prefix
every line of every reply, except where RFC 2034 §3 forbids them: the greeting and the replies to
HELO/EHLO (whose lines carry the extension keywords). Pass `enhanced=""` for those.
"""

from __future__ import annotations

import re
from typing import Final

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")


class Reply:
    """A reply, a value: compared and hashed by code, enhanced code and text; never changed.

    A plain class rather than a frozen dataclass: compiled (scripts/build_native.py), its
    constructor is a C function, where a dataclass's generated `__init__` is interpreted code
    run through `object.__setattr__`; the wire form is made once per reply and kept on it."""

    def __init__(self, code: int, enhanced: str = "", text: str = "") -> None:
        self.code: Final = code
        self.enhanced: Final = enhanced
        self.text: Final = text
        self._wire: bytes | None = None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (
            self.code == other.code and self.enhanced == other.enhanced and self.text == other.text
        )

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))

    def __repr__(self) -> str:
        return f"Reply(code={self.code!r}, enhanced={self.enhanced!r}, text={self.text!r})"

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n") if self.text else [""]

    @property
    def positive(self) -> bool:
        """2xx: the command succeeded (RFC 5321 §4.2.1)."""
        return 200 <= self.code < 300

    @property
    def intermediate(self) -> bool:
        """3xx: go on (354 after DATA, 334 during AUTH)."""
        return 300 <= self.code < 400

    @property
    def transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        """5xx: do not repeat the same request."""
        return 500 <= self.code < 600

    def to_bytes(self) -> bytes:
        """The reply on the wire, CRLF-terminated, multi-line with `code-` continuation lines
        (made on first use and kept: the named replies below are sent again and again)."""
        wire = self._wire
        if wire is None:
            wire = self._wire = self._format()
        return wire

    def _format(self) -> bytes:
        prefix = f"{self.code:03d}"
        enh = f"{self.enhanced} " if self.enhanced else ""
        if "\n" not in self.text:  # one line, as nearly every reply is
            return f"{prefix} {enh}{self.text}".rstrip(" ").encode("utf-8", "replace") + b"\r\n"
        lines = self.lines
        out = [f"{prefix}-{enh}{line}\r\n" for line in lines[:-1]]
        out.append(f"{prefix} {enh}{lines[-1]}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        enh = f" {self.enhanced}" if self.enhanced else ""
        return f"{self.code}{enh} {' / '.join(self.lines)}".rstrip()

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


def parse_reply_lines(lines: list[str]) -> Reply:
    """Build a Reply from the text after `NNN-`/`NNN ` of each line; the enhanced code of the
    first line (if any) is split off every line that carries the same one."""
    code = int(lines[0][:3])
    texts = [line[4:] for line in lines]
    m = _ENHANCED.match(texts[0])
    enhanced = ""
    if m and str(code)[0] == m.group(1):
        enhanced = texts[0].split(" ", 1)[0]
        texts = [t[len(enhanced) + 1 :] if t.startswith(enhanced) else t for t in texts]
    return Reply(code, enhanced, "\n".join(texts))


# -- replies the core sends on its own (the session sends its policy replies) ------------------
# RFC 5321 §4.3.2 lists which codes each command may get.
OK = Reply(250, "2.0.0", "OK")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_INPUT = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "OK")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing transmission channel")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing transmission channel")
TOO_MANY_ERRORS = Reply(421, "4.5.0", "Too many errors, closing transmission channel")

# Syntax and sequence (RFC 5321 §4.2.4, RFC 3463 §3.6)
UNRECOGNIZED = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_LINE_END = Reply(500, "5.5.2", "Bare CR or LF in command line (RFC 5321 §2.3.8)")
NUL_IN_COMMAND = Reply(500, "5.5.2", "NUL byte in command line")
BAD_ENCODING = Reply(500, "5.5.2", "Command line is not valid UTF-8")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
BAD_SENDER_ADDRESS = Reply(501, "5.1.7", "Bad sender address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
HELO_FIRST = Reply(503, "5.5.1", "Send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL_FIRST = Reply(503, "5.5.1", "MAIL first")
NEED_RCPT_FIRST = Reply(503, "5.5.1", "RCPT first")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
BDAT_DATA_MIX = Reply(503, "5.5.1", "DATA not allowed in a BDAT transaction")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "MAIL/RCPT parameter not recognized or not implemented")
PARAMETER_NO_EXT = Reply(555, "5.5.4", "Parameter requires an extension not advertised")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
PATH_TOO_LONG = Reply(501, "5.1.3", "Path too long")
LOCAL_PART_TOO_LONG = Reply(501, "5.1.3", "Local part too long")
DOMAIN_TOO_LONG = Reply(501, "5.1.3", "Domain too long")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
PIPELINED_STARTTLS = Reply(
    554, "5.5.1", "Commands pipelined after STARTTLS, closing (RFC 3207 §4.2)"
)
ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")

# Message content (RFC 5321 §4.5.3.1, §2.3.8, RFC 1870)
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
SIZE_DECLARED_TOO_BIG = Reply(552, "5.3.4", "Declared message size exceeds fixed maximum")
BARE_LINE_END_IN_DATA = Reply(
    550, "5.6.0", "Message contains bare CR or LF, rejected (RFC 5321 §2.3.8)"
)
NUL_IN_DATA = Reply(550, "5.6.0", "Message contains NUL bytes, rejected")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Message line too long (RFC 5321 §4.5.3.1.6)")
BDAT_TOO_BIG = Reply(552, "5.3.4", "BDAT chunk exceeds fixed maximum message size")

# AUTH (RFC 4954 §6)
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64 response")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
