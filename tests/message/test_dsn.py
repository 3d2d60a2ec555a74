"""DSNs built by build_dsn, parsed back with the stdlib `email` package."""

from __future__ import annotations

import email
import email.message
import email.policy
from datetime import UTC, datetime

import pytest

from pochta.message import FailedRecipient, build_dsn, parse_summary
from pochta.message.dsn import SUBJECT_DELAYED, SUBJECT_FAILED

ARRIVAL = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)
NOW = datetime(2025, 7, 1, 12, 5, tzinfo=UTC)
ORIGINAL = (
    b"From: Alice <alice@pochta.test>\r\n"
    b"To: bob@yandex.test\r\n"
    b"Subject: quarterly report\r\n"
    b"Message-ID: <orig@pochta.test>\r\n"
    b"\r\n"
    b"secret body text\r\n"
)
BOB = FailedRecipient(
    "bob@yandex.test",
    "5.1.1",
    "smtp; 550 5.1.1 <bob@yandex.test>: no such user here",
    "mx.yandex.test",
)


def dsn(*failures: FailedRecipient, body: bytes = ORIGINAL, **kw: object) -> bytes:
    args: dict[str, object] = {
        "reporting_mta": "mx.pochta.test",
        "original_sender": "alice@pochta.test",
        "original_body": body,
        "failures": list(failures) or [BOB],
        "arrival": ARRIVAL,
        "now": NOW,
    }
    args.update(kw)
    return build_dsn(**args)  # type: ignore[arg-type]


def parse(raw: bytes) -> email.message.Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def status_blocks(msg: email.message.Message) -> list[email.message.Message]:
    part = msg.get_payload()[1]
    assert isinstance(part, email.message.Message)
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_crlf_line_ends_throughout() -> None:
    raw = dsn()
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"\r" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"--\r\n")
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_top_level_headers() -> None:
    msg = parse(dsn())
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.pochta.test>"
    assert msg["To"] == "<alice@pochta.test>"
    assert msg["Subject"] == SUBJECT_FAILED == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Date"] == "Tue, 01 Jul 2025 12:05:00 +0000"
    assert msg["Message-ID"].endswith("@mx.pochta.test>")
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert not msg.defects


def test_three_parts() -> None:
    msg = parse(dsn())
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    human = parts[0].get_payload(decode=True).decode()
    assert "bob@yandex.test" in human and "no such user here" in human
    headers = parts[2].get_payload()
    assert "Subject: quarterly report" in headers
    assert "Message-ID: <orig@pochta.test>" in headers
    assert "secret body text" not in msg.as_string()


def test_delivery_status_fields() -> None:
    per_message, bob = status_blocks(parse(dsn()))
    assert per_message["Reporting-MTA"] == "dns; mx.pochta.test"
    assert per_message["Arrival-Date"] == "Tue, 01 Jul 2025 12:00:00 +0000"
    assert bob["Final-Recipient"] == "rfc822; bob@yandex.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.yandex.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@yandex.test>: no such user here"
    assert bob["Last-Attempt-Date"] == "Tue, 01 Jul 2025 12:05:00 +0000"


def test_several_recipients_long_multiline_diagnostic_and_no_remote() -> None:
    long_reply = "550-5.7.1 first line of a long reply\r\n550 5.7.1 " + "word " * 40
    carol = FailedRecipient("carol@yandex.test", "5.7.1", long_reply, None)
    dave = FailedRecipient("dave@gone.test", "5.1.2", "x-pochta; Host not found", None)
    _, bob, carol_block, dave_block = status_blocks(parse(dsn(BOB, carol, dave)))
    assert bob["Final-Recipient"] == "rfc822; bob@yandex.test"
    assert carol_block["Remote-MTA"] is None
    diag = " ".join(carol_block["Diagnostic-Code"].split())
    assert diag == "smtp; " + " ".join(long_reply.split())
    assert dave_block["Diagnostic-Code"] == "x-pochta; Host not found"
    assert dave_block["Status"] == "5.1.2"


def test_delayed_notice() -> None:
    late = FailedRecipient("bob@yandex.test", "4.4.1", "smtp; connection refused", None, "delayed")
    until = datetime(2025, 7, 6, 12, 0, tzinfo=UTC)
    msg = parse(dsn(late, retry_until=until))
    assert msg["Subject"] == SUBJECT_DELAYED == "Delayed Mail (still being retried)"
    _, block = status_blocks(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Will-Retry-Until"] == "Sun, 06 Jul 2025 12:00:00 +0000"
    assert "keep trying" in msg.get_payload()[0].get_payload()


def test_mixed_failed_and_delayed_is_a_bounce() -> None:
    late = FailedRecipient("c@yandex.test", "4.4.1", "smtp; 421 busy", None, "delayed")
    assert parse(dsn(BOB, late))["Subject"] == SUBJECT_FAILED


def test_bad_status_code_is_replaced_by_class_default() -> None:
    _, block = status_blocks(parse(dsn(FailedRecipient("b@y.test", "bogus", "smtp; 550 no"))))
    assert block["Status"] == "5.0.0"


def test_bare_lf_original_and_no_body() -> None:
    msg = parse(dsn(body=b"Subject: lf only\nFrom: a@b.test\n"))
    headers = msg.get_payload()[2].get_payload()
    assert "Subject: lf only" in headers and "From: a@b.test" in headers


def test_null_sender_is_refused() -> None:
    with pytest.raises(ValueError):
        dsn(original_sender="")
    with pytest.raises(ValueError):
        dsn(original_sender="<>")
    with pytest.raises(ValueError):
        build_dsn(
            reporting_mta="h",
            original_sender="a@b.test",
            original_body=ORIGINAL,
            failures=[],
            arrival=ARRIVAL,
            now=NOW,
        )


def test_utf8_mail_uses_global_types() -> None:
    rcpt = FailedRecipient("ёж@пример.test", "5.1.1", "smtp; 550 5.1.1 нет", None)
    raw = dsn(rcpt, body="Subject: привет\r\n\r\nx".encode())
    msg = email.message_from_bytes(raw, policy=email.policy.SMTPUTF8)
    parts = list(msg.iter_parts())  # type: ignore[attr-defined]
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/global-delivery-status",
        "message/global-headers",
    ]
    assert "Final-Recipient: utf-8; ёж@пример.test" in raw.decode()
    assert "Subject: привет" in raw.decode()


def test_summary_of_a_dsn() -> None:
    summary = parse_summary(dsn())
    assert summary.subject == SUBJECT_FAILED
    assert summary.to == "<alice@pochta.test>"
    assert "MAILER-DAEMON@mx.pochta.test" in summary.from_
