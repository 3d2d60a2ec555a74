"""The mail user agent as a library: compose a letter and submit it to an MSA.

Imports stdlib (`email`, `mimetypes`), `client.session`, `message`, `tls`, `smtp` and `errors`.
`pochta send` (cli/send.py) is a thin shell around `build_message` and `submit`.

- `build_message` composes an RFC 5322 letter with the stdlib `email` package: UTF-8 subject and
  body, attachments typed by `mimetypes`, Message-ID and Date. Bcc recipients never appear in it:
  they are only envelope recipients (RFC 5322 §3.6.3).
- `submit` is the MSA client of RFC 6409: STARTTLS on 587 or implicit TLS on 465 (RFC 8314),
  certificates verified by default, AUTH before MAIL (RFC 4954), then one transaction with a
  result per recipient. Every failure before the transaction is a `SubmitError` with a one-line
  message fit for a user.
"""

from __future__ import annotations

import mimetypes
import socket
import ssl
from datetime import datetime
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, getaddresses
from pathlib import Path
from typing import Literal

from pochta import smtp
from pochta import tls as tlsmod
from pochta.client.session import SendResult, SmtpClient, SmtpError, Timeouts
from pochta.errors import MailError
from pochta.message import headers, ids

TlsMode = Literal["starttls", "implicit"]
TLS_MODES: tuple[TlsMode, ...] = ("starttls", "implicit")
DEFAULT_PORTS: dict[TlsMode, int] = {"starttls": 587, "implicit": 465}  # RFC 6409, RFC 8314


class SubmitError(MailError):
    """The letter was not submitted at all (no connection, TLS, AUTH, protocol trouble).

    Attributes:
        stage: "connect", "tls", "auth" or "smtp".
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


# -- composing ------------------------------------------------------------------------------


def build_message(
    *,
    sender: str,
    to: list[str],
    cc: list[str],
    subject: str,
    body: str,
    attachments: list[Path],
    from_header: str | None = None,
    hostname: str,
) -> bytes:
    """A complete letter (CRLF line ends) ready for `submit`.

    Args:
        sender: the author's address, used for From: unless `from_header` is given.
        to, cc: header recipients ("addr" or "Name <addr>"); Bcc is the caller's envelope matter.
        from_header: the From: value, e.g. "Alice <alice@example.org>".
        hostname: the right-hand side of the Message-ID (RFC 5322 §3.6.4).
    Raises:
        OSError: an attachment cannot be read.
    """
    everyone = [from_header or sender, *to, *cc]
    smtputf8 = any(not addr.isascii() for _, addr in getaddresses(everyone))
    msg = EmailMessage(policy=SMTPUTF8 if smtputf8 else SMTP)
    msg["From"] = from_header or sender  # RFC 5322 §3.6.2
    if to:
        msg["To"] = ", ".join(to)  # RFC 5322 §3.6.3
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Subject"] = subject  # non-ASCII text becomes RFC 2047 encoded-words
    msg["Date"] = format_datetime(datetime.now().astimezone())  # RFC 5322 §3.6.1
    msg["Message-ID"] = ids.make_message_id(hostname)  # RFC 5322 §3.6.4
    msg.set_content(_normalize_newlines(body), charset="utf-8")
    for path in attachments:
        _attach(msg, path)
    return msg.as_bytes()


def _normalize_newlines(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def _attach(msg: EmailMessage, path: Path) -> None:
    """RFC 2045-2047 and RFC 2183: base64 content typed by `mimetypes`, named by the file."""
    data = path.read_bytes()
    ctype, encoding = mimetypes.guess_type(path.name)
    if ctype is None or encoding is not None:  # unknown, or compressed (.gz): opaque bytes
        ctype = "application/octet-stream"
    maintype, _, subtype = ctype.partition("/")
    msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=path.name)
    part = list(msg.iter_parts())[-1]
    del part["MIME-Version"]  # RFC 2045 §4: required at the top level only


def envelope_address(text: str) -> str:
    """The bare address of "Name <addr>" or "addr"; raises ValueError when there is none."""
    pairs = getaddresses([text])
    if len(pairs) != 1 or "@" not in pairs[0][1]:
        raise ValueError(f"not an address: {text!r}")
    return pairs[0][1]


# -- submitting -----------------------------------------------------------------------------


def parse_server(text: str, tls: TlsMode) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]` or `[v6]:port`; the default port follows the TLS mode."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ValueError(f"not a server: {text!r} (use HOST or HOST:PORT)")
    return host, int(port) if port else DEFAULT_PORTS[tls]


def client_context(cafile: str | None, insecure: bool) -> ssl.SSLContext:
    """Verify the certificate and the host name unless `insecure` (RFC 8314 §4.1)."""
    try:
        return tlsmod.client_context(verify=not insecure, cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise SubmitError("tls", f"cannot load CA file {cafile}: {exc}") from None


async def submit(
    message: bytes,
    *,
    server: str,
    port: int,
    user: str,
    password: str,
    sender: str,
    recipients: list[str],
    tls: TlsMode,
    cafile: str | None,
    insecure: bool,
    server_hostname: str | None = None,
    helo_name: str | None = None,
    timeouts: Timeouts | None = None,
) -> SendResult:
    """Connect, secure the connection, authenticate and send one letter.

    Args:
        server, port: where the MSA listens (587 for STARTTLS, 465 for implicit TLS).
        server_hostname: the name the certificate must carry (default: `server`).
        recipients: every envelope recipient (To, Cc and Bcc).
    Returns:
        The deciding reply for each recipient (refusals are results, not exceptions).
    Raises:
        SubmitError: no connection, TLS failure, STARTTLS not offered, AUTH refused.
    """
    if tls not in TLS_MODES:
        raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
    context = client_context(cafile, insecure)
    name = server_hostname or server
    where = f"{server}:{port}"
    try:
        client = await _open(server, port, tls, context, name, helo_name, timeouts)
        try:
            await _authenticate(client, user, password)
            return await client.send(
                sender, recipients, message, params=_params(message, sender, recipients, client)
            )
        finally:
            await client.quit()
    except SubmitError:
        raise
    except SmtpError as exc:
        stage = "auth" if exc.stage == "AUTH" else "smtp"
        raise SubmitError(stage, f"{where}: {exc.stage} refused: {exc.reply}") from None
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        raise SubmitError(
            "tls", f"{where}: TLS certificate verification failed: {reason}"
        ) from None
    except ssl.SSLError as exc:
        raise SubmitError("tls", f"{where}: TLS failed: {_tls_reason(exc, tls)}") from None
    except TimeoutError:
        raise SubmitError("connect", f"{where}: timed out") from None
    except ConnectionRefusedError:
        raise SubmitError("connect", f"cannot connect to {where}: connection refused") from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise SubmitError("connect", f"{where}: {reason}") from None
    except smtp.ProtocolError as exc:
        raise SubmitError("smtp", f"{where}: SMTP protocol error: {exc}") from None


def _tls_reason(exc: ssl.SSLError, tls: TlsMode) -> str:
    reason = str(exc.reason or exc)
    if reason == "WRONG_VERSION_NUMBER" and tls == "implicit":
        reason += " (the port does not speak implicit TLS; try --tls starttls)"
    return reason


async def _open(
    server: str,
    port: int,
    tls: TlsMode,
    context: ssl.SSLContext,
    name: str,
    helo_name: str | None,
    timeouts: Timeouts | None,
) -> SmtpClient:
    helo = helo_name or socket.gethostname() or "localhost"
    if tls == "implicit":  # RFC 8314 §3.3
        return await SmtpClient.connect(
            server,
            port,
            helo_name=helo,
            timeouts=timeouts,
            implicit_tls=context,
            server_hostname=name,
        )
    client = await SmtpClient.connect(server, port, helo_name=helo, timeouts=timeouts)
    try:
        if not client.supports("STARTTLS"):  # never send credentials in the clear
            raise SubmitError("tls", f"{server}:{port}: the server does not offer STARTTLS")
        await client.starttls(context, name)  # RFC 3207
    except BaseException:
        await client.close()
        raise
    return client


async def _authenticate(client: SmtpClient, user: str, password: str) -> None:
    if "AUTH" not in client.extensions:  # RFC 4954 §3
        raise SubmitError("auth", "the server does not offer AUTH")
    await client.auth(user, password)


def _params(
    message: bytes, sender: str, recipients: list[str], client: SmtpClient
) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if headers.is_8bit(message) and client.supports("8BITMIME"):
        params["BODY"] = "8BITMIME"  # RFC 6152 §2
    if headers.needs_smtputf8(message, [sender, *recipients]) and client.supports("SMTPUTF8"):
        params["SMTPUTF8"] = None  # RFC 6531 §3.4
    return params


__all__ = [
    "DEFAULT_PORTS",
    "TLS_MODES",
    "SendResult",
    "SubmitError",
    "TlsMode",
    "build_message",
    "client_context",
    "envelope_address",
    "parse_server",
    "submit",
]
