"""Command-line grammar of RFC 5321 §4.1 with the ESMTP parameters pochta knows. Stdlib only
(plus the core's own `_address`, `_events`, `_replies`, `_errors`).

Every parse failure is a RemoteProtocolError carrying the reply to send; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable

from pochta.smtp import _replies as R
from pochta.smtp._address import AddressError, Path, parse_path
from pochta.smtp._errors import RemoteProtocolError
from pochta.smtp._events import (
    Atrn,
    Auth,
    AuthResponse,
    Bdat,
    Command,
    Data,
    Ehlo,
    Etrn,
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
    Vrfy,
)

# esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")          RFC 5321 §4.1.2
# esmtp-value   = 1*(%d33-60 / %d62-126)  (RFC 6531 §3.3 adds UTF8-non-ascii)
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9\-]*)(?:=([\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+))?$")
# BDAT SP chunk-size [ SP end-marker ]                              RFC 3030 §2
_BDAT = re.compile(r"^([0-9]{1,15})(?: +(LAST))? *$", re.IGNORECASE)
_SIZE = re.compile(r"^[0-9]{1,20}$")
_BODY_VALUES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})
# xtext (RFC 3461 §4) for MAIL AUTH= (RFC 4954 §5)
_XTEXT = re.compile(r"^([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})+$")
_DOMAIN_ARG = re.compile(r"^[^\s]+$")


def _fail(reply: R.Reply, why: str) -> RemoteProtocolError:
    return RemoteProtocolError(why, reply)


def parse_command(line: str) -> Command:
    """Parse one command line (without CRLF) into a Command event.

    Raises:
        RemoteProtocolError: with the reply hint (500/501/502/555...) for anything malformed.
    """
    verb, _, arg = line.partition(" ")
    # ASCII only before case folding: str.upper() maps "ſ" to "S" and "ı" to "I".
    parser = _PARSERS.get(verb.upper()) if verb.isascii() else None
    if parser is None:
        raise _fail(R.UNRECOGNIZED, f"unknown verb {verb[:16]!r}")
    return parser(arg)


def _no_arg(cmd: Command) -> Callable[[str], Command]:
    def parse(arg: str) -> Command:
        if arg.strip():
            raise _fail(R.SYNTAX_ERROR, "unexpected argument")
        return cmd

    return parse


def _helo(arg: str) -> Command:
    arg = arg.strip()
    if not _DOMAIN_ARG.match(arg):
        raise _fail(R.Reply(501, "5.5.4", "HELO requires a domain name"), "bad helo")
    return Helo(arg)


def _ehlo(arg: str) -> Command:
    arg = arg.strip()
    if not _DOMAIN_ARG.match(arg):
        raise _fail(R.Reply(501, "5.5.4", "EHLO requires a domain name"), "bad ehlo")
    return Ehlo(arg)


def split_path(arg: str) -> tuple[str, str]:
    """Split `<path> params` respecting quoted local parts; the path keeps its brackets."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        raise _fail(R.SYNTAX_ERROR, "path must be in angle brackets")
    if '"' not in arg:  # the usual case: no quoted local part, the first ">" ends the path
        end = arg.find(">")
        if end < 0:
            raise _fail(R.SYNTAX_ERROR, "unterminated path")
        return arg[: end + 1], arg[end + 1 :]
    quoted = False
    i = 1
    while i < len(arg):
        c = arg[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return arg[: i + 1], arg[i + 1 :]
        i += 1
    raise _fail(R.SYNTAX_ERROR, "unterminated path")


def parse_params(text: str) -> dict[str, str | None]:
    """`KEY[=VALUE]` words separated by spaces (RFC 5321 §4.1.2 Mail-parameters)."""
    params: dict[str, str | None] = {}
    for word in text.split():
        m = _PARAM.match(word)
        if not m:
            raise _fail(R.SYNTAX_ERROR, "malformed parameter")
        key = m.group(1).upper()
        if key in params:
            raise _fail(R.SYNTAX_ERROR, "repeated parameter")
        params[key] = m.group(2)
    return params


def _address_reply(err: AddressError, *, sender: bool) -> R.Reply:
    if err.reason == "local":
        return R.LOCAL_PART_TOO_LONG
    if err.reason == "domain":
        return R.DOMAIN_TOO_LONG
    if err.reason == "path":
        return R.PATH_TOO_LONG
    return R.BAD_SENDER_ADDRESS if sender else R.BAD_ADDRESS


def _mail(arg: str) -> Command:
    if arg[:5].upper() != "FROM:":
        raise _fail(R.SYNTAX_ERROR, "expected MAIL FROM:")
    path_text, rest = split_path(arg[5:])
    try:
        path = parse_path(path_text, allow_null=True)
    except AddressError as err:
        raise _fail(_address_reply(err, sender=True), "bad sender") from None
    params = parse_params(rest)
    _check_mail_params(params)
    if not path.is_ascii and "SMTPUTF8" not in params:
        raise _fail(R.NON_ASCII_ADDRESS, "non-ASCII sender without SMTPUTF8")  # RFC 6531 §3.4
    return MailFrom(path, params)


def _check_mail_params(params: dict[str, str | None]) -> None:
    for key, value in params.items():
        if key == "SIZE":  # RFC 1870 §6
            if value is None or not _SIZE.match(value):
                raise _fail(R.SYNTAX_ERROR, "bad SIZE")
        elif key == "BODY":  # RFC 6152 §2, RFC 3030 §3
            if value is None or value.upper() not in _BODY_VALUES:
                raise _fail(R.SYNTAX_ERROR, "bad BODY")
        elif key == "SMTPUTF8":  # RFC 6531 §3.4: no value
            if value is not None:
                raise _fail(R.SYNTAX_ERROR, "SMTPUTF8 takes no value")
        elif key == "AUTH":  # RFC 4954 §5: accepted, and ignored unless trusted
            if value is None or (value != "<>" and not _XTEXT.match(value)):
                raise _fail(R.SYNTAX_ERROR, "bad AUTH parameter")
        else:
            raise _fail(R.UNKNOWN_PARAMETER, f"unknown MAIL parameter {key[:16]!r}")


def _rcpt(arg: str) -> Command:
    if arg[:3].upper() != "TO:":
        raise _fail(R.SYNTAX_ERROR, "expected RCPT TO:")
    path_text, rest = split_path(arg[3:])
    try:
        # RFC 5321 §4.1.1.3: "<Postmaster>" without a domain must be accepted.
        path = parse_path(path_text, allow_bare_postmaster=True)
    except AddressError as err:
        raise _fail(_address_reply(err, sender=False), "bad recipient") from None
    params = parse_params(rest)
    if params:
        raise _fail(R.UNKNOWN_PARAMETER, "unknown RCPT parameter")
    return RcptTo(path, params)


def _bdat(arg: str) -> Command:
    m = _BDAT.match(arg)
    if not m:
        raise _fail(R.SYNTAX_ERROR, "bad BDAT arguments")
    return Bdat(int(m.group(1)), m.group(2) is not None)


def decode_base64(text: str) -> bytes:
    """Strict base64 of a SASL line (RFC 4954 §4): `=` alone means empty."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise _fail(R.AUTH_BAD_BASE64, "bad base64") from None


def _auth(arg: str) -> Command:
    parts = arg.split()
    if not parts or len(parts) > 2:
        raise _fail(R.SYNTAX_ERROR, "AUTH mechanism [initial-response]")
    initial = decode_base64(parts[1]) if len(parts) == 2 else None
    return Auth(parts[0].upper(), initial)


def parse_auth_response(line: str) -> AuthResponse:
    """A client line during AUTH: base64 data, or `*` to cancel (RFC 4954 §4)."""
    if line.strip() == "*":
        return AuthResponse(b"", cancelled=True)
    return AuthResponse(decode_base64(line.strip()))


def _etrn(arg: str) -> Command:
    arg = arg.strip()
    if not arg or " " in arg:
        raise _fail(R.Reply(501, "5.5.4", "Syntax: ETRN domain"), "bad ETRN")
    return Etrn(arg)


def _atrn(arg: str) -> Command:
    arg = arg.strip()
    domains = tuple(d.strip().lower() for d in arg.split(",")) if arg else ()
    if any(not d or " " in d for d in domains):
        raise _fail(R.Reply(501, "5.5.4", "Syntax: ATRN [domain[,domain]]"), "bad ATRN")
    return Atrn(domains)


def _text_arg(cls: type[Vrfy] | type[Expn]) -> Callable[[str], Command]:
    def parse(arg: str) -> Command:
        if not arg.strip():
            raise _fail(R.SYNTAX_ERROR, "argument required")
        return cls(arg.strip())

    return parse


_PARSERS: dict[str, Callable[[str], Command]] = {
    "HELO": _helo,
    "EHLO": _ehlo,
    "MAIL": _mail,
    "RCPT": _rcpt,
    "DATA": _no_arg(Data()),
    "BDAT": _bdat,
    "RSET": _no_arg(Rset()),
    "NOOP": lambda arg: Noop(arg.strip()),
    "QUIT": _no_arg(Quit()),
    "VRFY": _text_arg(Vrfy),
    "EXPN": _text_arg(Expn),
    "HELP": lambda arg: Help(arg.strip()),
    "STARTTLS": _no_arg(StartTLS()),
    "AUTH": _auth,
    "TURN": _no_arg(Turn()),
    "ETRN": _etrn,
    "ATRN": _atrn,
}


def format_command(cmd: Command) -> str:
    """The command line (without CRLF) a client sends for `cmd`."""
    match cmd:
        case Helo(domain):
            return f"HELO {domain}"
        case Ehlo(domain):
            return f"EHLO {domain}"
        case MailFrom(path, params):
            return f"MAIL FROM:{path}{_format_params(params)}"
        case RcptTo(path, params):
            return f"RCPT TO:{path}{_format_params(params)}"
        case Data():
            return "DATA"
        case Bdat(size, last, _):
            return f"BDAT {size}{' LAST' if last else ''}"
        case Rset():
            return "RSET"
        case Noop(argument):
            return f"NOOP {argument}".rstrip()
        case Quit():
            return "QUIT"
        case Vrfy(argument):
            return f"VRFY {argument}"
        case Expn(argument):
            return f"EXPN {argument}"
        case Help(argument):
            return f"HELP {argument}".rstrip()
        case StartTLS():
            return "STARTTLS"
        case Auth(mechanism, initial):
            if initial is None:
                return f"AUTH {mechanism}"
            return f"AUTH {mechanism} {encode_base64(initial)}"
        case AuthResponse(data, cancelled):
            return "*" if cancelled else base64.b64encode(data).decode("ascii")
        case Turn():
            return "TURN"
        case Etrn(argument):
            return f"ETRN {argument}"
        case Atrn(domains):
            return f"ATRN {','.join(domains)}".rstrip()
    raise TypeError(f"not a command: {cmd!r}")


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") if data else "="


def _format_params(params: dict[str, str | None]) -> str:
    return "".join(f" {k}" if v is None else f" {k}={v}" for k, v in params.items())


def path_of(address: str) -> Path:
    """Build a Path from `local@domain` text (client side convenience; "" is the null path)."""
    if not address:
        return Path("", "")
    local, _, domain = address.rpartition("@")
    return Path(local, domain.lower()) if local else Path(address, "")
