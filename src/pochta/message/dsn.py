"""Delivery status notifications: RFC 3464 reports in RFC 6522 (ex-3462) multipart/report.
Imports stdlib and `pochta.message` siblings only.

`build_dsn` returns the complete message (CRLF line ends) that the queue stores as a new letter
with the null sender "<>" (RFC 5321 §4.5.5: a DSN is never itself bounced). Layout:

    multipart/report; report-type=delivery-status
      text/plain                    what happened, for humans
      message/delivery-status       RFC 3464 §2.2-2.3 machine-readable fields
      text/rfc822-headers           the original message's header block (RFC 6522 §4)

When an address or the original header block is not ASCII (SMTPUTF8 mail), the RFC 6533 forms
are used: message/global-delivery-status, "utf-8;" address types and message/global-headers.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pochta.message.headers import split_header_block
from pochta.message.ids import format_date, make_message_id

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"
_CTL = re.compile(r"[\x00-\x1f\x7f]+")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_MAX_LINE = 76


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient to report.

    status: RFC 3463 code "5.1.1"; diagnostic: "smtp; 550 5.1.1 no such user" (a reply without
    a "type;" prefix gets "smtp; "); remote_mta: the host that answered, if any.
    """

    address: str
    status: str
    diagnostic: str
    remote_mta: str | None = None
    action: Literal["failed", "delayed"] = "failed"


def build_dsn(
    *,
    reporting_mta: str,
    original_sender: str,
    original_body: bytes,
    failures: Sequence[FailedRecipient],
    arrival: datetime,
    now: datetime,
    retry_until: datetime | None = None,
) -> bytes:
    """The bounce (any recipient "failed") or delay notice (all "delayed") as message bytes.

    `retry_until` adds Will-Retry-Until to delayed recipients (RFC 3464 §2.3.9).
    Raises ValueError for the null sender (RFC 5321 §4.5.5) or an empty `failures`.
    """
    if not original_sender.strip("<> "):
        raise ValueError("no DSN for the null reverse-path (RFC 5321 §4.5.5)")
    if not failures:
        raise ValueError("a DSN needs at least one recipient")
    original_headers = _crlf(split_header_block(original_body)[0]).rstrip(b"\r\n") + b"\r\n"
    utf8 = (
        not original_headers.isascii()
        or not all(f.address.isascii() for f in failures)
        or not original_sender.isascii()
    )
    delayed = all(f.action == "delayed" for f in failures)
    host = _clean(reporting_mta) or "localhost"
    boundary = _boundary(original_headers)
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    parts = [
        _part("text/plain; charset=" + ("utf-8" if utf8 else "us-ascii"), _human(host, failures)),
        _part(status_type, _status(host, failures, arrival, now, retry_until, utf8)),
        _part(headers_type, original_headers.decode("utf-8", errors="replace")),
    ]
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{_clean(original_sender.strip('<>'))}>",
        f"Subject: {SUBJECT_DELAYED if delayed else SUBJECT_FAILED}",
        f"Date: {format_date(now)}",
        f"Message-ID: {make_message_id(host)}",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if utf8:
        head.append("Content-Transfer-Encoding: 8bit")
    text = "\r\n".join(head) + "\r\n\r\nThis is a MIME-encapsulated message.\r\n\r\n"
    for part in parts:
        text += f"--{boundary}\r\n{part}\r\n"
    text += f"--{boundary}--\r\n"
    return text.encode("utf-8")


def _part(content_type: str, body: str) -> str:
    encoding = "7bit" if body.isascii() else "8bit"
    return (
        f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n\r\n"
        + body.rstrip("\r\n")
        + "\r\n"
    )


def _human(host: str, failures: Sequence[FailedRecipient]) -> str:
    failed = [f for f in failures if f.action == "failed"]
    delayed = [f for f in failures if f.action == "delayed"]
    lines = [f"This is the mail system at host {host}.", ""]
    if failed:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
        ]
        lines += _recipient_lines(failed)
    if delayed:
        lines += [
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying; you do not need to resend it.",
            "",
        ]
        lines += _recipient_lines(delayed)
    return "\r\n".join(lines)


def _recipient_lines(failures: Sequence[FailedRecipient]) -> list[str]:
    lines: list[str] = []
    for failure in failures:
        via = f" (host {_clean(failure.remote_mta)})" if failure.remote_mta else ""
        lines.append(f"<{_clean(failure.address)}>{via}:")
        wrapped = _wrap(_clean(failure.diagnostic), "    ")
        lines += ["    " + wrapped[0], *wrapped[1:]]
        lines.append("")
    return lines


def _status(
    host: str,
    failures: Sequence[FailedRecipient],
    arrival: datetime,
    now: datetime,
    retry_until: datetime | None,
    utf8: bool,
) -> str:
    # RFC 3464 §2.2 per-message fields, then one block per recipient (§2.3), blank-line separated
    blocks = [[f"Reporting-MTA: dns; {host}", f"Arrival-Date: {format_date(arrival)}"]]
    addr_type = "utf-8" if utf8 else "rfc822"  # RFC 6533 §3
    for failure in failures:
        block = [
            f"Final-Recipient: {addr_type}; {_clean(failure.address.strip('<>'))}",
            f"Action: {failure.action}",
            f"Status: {_status_code(failure)}",
        ]
        if failure.remote_mta:
            block.append(f"Remote-MTA: dns; {_clean(failure.remote_mta)}")
        if failure.diagnostic:
            block += _wrap("Diagnostic-Code: " + _diagnostic(failure.diagnostic), "\t")
        block.append(f"Last-Attempt-Date: {format_date(now)}")
        if failure.action == "delayed" and retry_until is not None:
            block.append(f"Will-Retry-Until: {format_date(retry_until)}")
        blocks.append(block)
    return "\r\n\r\n".join("\r\n".join(block) for block in blocks)


def _status_code(failure: FailedRecipient) -> str:
    # RFC 3464 §2.3.4: status-code = DIGIT "." 1*3DIGIT "." 1*3DIGIT, class 5 for failed,
    # class 4 for delayed.
    code = failure.status.strip()
    if re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", code):
        return code
    return "4.0.0" if failure.action == "delayed" else "5.0.0"


def _diagnostic(text: str) -> str:
    # RFC 3464 §2.3.6: diagnostic-type ";" *text; SMTP replies use type "smtp".
    text = _clean(text)
    if re.match(r"^[A-Za-z][A-Za-z0-9-]*;", text):
        return text
    return f"smtp; {text}"


def _clean(text: str | None) -> str:
    """Control characters (CR/LF from multi-line replies) become single spaces."""
    return _CTL.sub(" ", text or "").strip()


def _wrap(text: str, indent: str) -> list[str]:
    """Fold a long line at spaces (continuation lines start with `indent`)."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        if current and len(current) + 1 + len(word) > _MAX_LINE:
            lines.append(current)
            current = indent + word
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return lines


def _crlf(data: bytes) -> bytes:
    return _BARE_LF.sub(b"\r\n", data)


def _boundary(content: bytes) -> str:
    while True:
        boundary = "=_pochta_" + secrets.token_hex(12)
        if boundary.encode() not in content:
            return boundary
