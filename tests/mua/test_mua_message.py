"""`pochta.mua` without a network: composing letters with `build_message`, and the small parsers
(`parse_server`, `envelope_address`)."""

from __future__ import annotations

import email
import email.policy
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from pochta import mua

SUBJECT = "Привет, мир ✉"


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def text_of(part: EmailMessage) -> str:
    """The decoded text with the wire's CRLF line ends as "\n"."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def build(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "sender": "alice@example.test",
        "to": ["Bob <bob@example.test>"],
        "cc": [],
        "subject": "hello",
        "body": "Hi Bob.\n",
        "attachments": [],
        "hostname": "example.test",
    }
    args.update(overrides)
    return mua.build_message(**args)  # type: ignore[arg-type]


def test_headers_and_body() -> None:
    raw = build(cc=["carol@example.test", "Dan <dan@example.test>"], body="line 1\nline 2")
    msg = parse(raw)
    assert msg["From"] == "alice@example.test"
    assert msg["To"] == "Bob <bob@example.test>"
    assert msg["Cc"] == "carol@example.test, Dan <dan@example.test>"
    assert msg["Subject"] == "hello"
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith("@example.test>")
    assert isinstance(msg["Date"].datetime, datetime)  # RFC 5322 §3.3
    assert msg["Date"].datetime.tzinfo is not None
    assert text_of(msg) == "line 1\nline 2\n"
    assert msg["Bcc"] is None


def test_crlf_line_ends_and_line_length() -> None:
    raw = build(body="short\n" + "x" * 3000 + "\n", subject="s " * 300)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # RFC 5322 §2.1: CRLF only
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))  # RFC 5322 §2.1.1
    assert text_of(parse(raw)) == "short\n" + "x" * 3000 + "\n"


def test_utf8_subject_and_body() -> None:
    raw = build(subject=SUBJECT, body="Текст письма ✉\r\nвторая строка")
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.isascii()  # RFC 2047 encoded-words: no SMTPUTF8 needed for the header
    msg = parse(raw)
    assert msg["Subject"] == SUBJECT
    assert text_of(msg) == "Текст письма ✉\nвторая строка\n"
    assert msg.get_content_charset() == "utf-8"


def test_message_ids_are_unique() -> None:
    ids = {parse(build())["Message-ID"] for _ in range(20)}
    assert len(ids) == 20


def test_from_header_with_display_name() -> None:
    msg = parse(build(from_header="Алиса <alice@example.test>"))
    assert msg["From"].addresses[0].display_name == "Алиса"
    assert msg["From"].addresses[0].addr_spec == "alice@example.test"


def test_utf8_address_uses_smtputf8_headers() -> None:
    raw = build(to=["пользователь@пример.test"])
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert "To: пользователь@пример.test".encode() in head  # RFC 6532 raw UTF-8


def test_attachments_round_trip(tmp_path: Path) -> None:
    binary = tmp_path / "all-bytes.bin"
    binary.write_bytes(bytes(range(256)) * 3)
    text = tmp_path / "notes.txt"
    text.write_bytes("a note\r\nзаметка\n".encode())
    picture = tmp_path / "pixel.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    packed = tmp_path / "data.tar.gz"
    packed.write_bytes(b"\x1f\x8b" + bytes(range(100)))
    odd = tmp_path / "отчёт без типа"
    odd.write_bytes(b"\x00\xff")
    msg = parse(build(attachments=[binary, text, picture, packed, odd]))
    assert msg.get_content_type() == "multipart/mixed"
    parts = list(msg.iter_attachments())
    got = {p.get_filename(): (p.get_content_type(), p.get_payload(decode=True)) for p in parts}
    assert got == {
        "all-bytes.bin": ("application/octet-stream", bytes(range(256)) * 3),
        "notes.txt": ("text/plain", "a note\r\nзаметка\n".encode()),
        "pixel.png": ("image/png", b"\x89PNG\r\n\x1a\n" + bytes(40)),
        "data.tar.gz": ("application/octet-stream", b"\x1f\x8b" + bytes(range(100))),
        "отчёт без типа": ("application/octet-stream", b"\x00\xff"),
    }
    assert all(p.get_content_disposition() == "attachment" for p in parts)
    assert all(p["MIME-Version"] is None for p in parts)  # RFC 2045 §4: top level only
    body = msg.get_body(("plain",))
    assert body is not None and text_of(body) == "Hi Bob.\n"


def test_missing_attachment_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        build(attachments=[tmp_path / "missing.pdf"])


@pytest.mark.parametrize(
    ("text", "tls", "expected"),
    [
        ("mail.example.test", "starttls", ("mail.example.test", 587)),
        ("mail.example.test", "implicit", ("mail.example.test", 465)),
        ("127.0.0.5:2587", "starttls", ("127.0.0.5", 2587)),
        ("[::1]", "implicit", ("::1", 465)),
        ("[::1]:1025", "starttls", ("::1", 1025)),
        ("::1", "starttls", ("::1", 587)),
    ],
)
def test_parse_server(text: str, tls: mua.TlsMode, expected: tuple[str, int]) -> None:
    assert mua.parse_server(text, tls) == expected


@pytest.mark.parametrize("text", ["", ":25", "host:port", "host:0", "host:70000", "[::1]:x"])
def test_parse_server_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a server"):
        mua.parse_server(text, "starttls")


def test_envelope_address() -> None:
    assert mua.envelope_address("Bob Smith <bob@example.test>") == "bob@example.test"
    assert mua.envelope_address("bob@example.test") == "bob@example.test"
    for bad in ("bob", "", "a@b.test, c@d.test"):
        with pytest.raises(ValueError):
            mua.envelope_address(bad)
