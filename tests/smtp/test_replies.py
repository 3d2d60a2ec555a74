"""Replies: enhanced status codes (RFC 2034, RFC 3463) and the multi-line format (RFC 5321 §4.2)."""

from __future__ import annotations

import re

import pytest

from pochta import smtp
from pochta.smtp import replies as R
from pochta.testing.pair import ConnectionPair, hints

CORE_REPLIES = {name: value for name, value in vars(R).items() if isinstance(value, smtp.Reply)}
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def test_core_reply_table_is_not_empty() -> None:
    assert len(CORE_REPLIES) > 30


@pytest.mark.parametrize("name", sorted(CORE_REPLIES))
def test_every_core_reply_carries_an_enhanced_status_code(name: str) -> None:
    reply = CORE_REPLIES[name]
    assert 200 <= reply.code < 600
    if reply.intermediate:  # RFC 3463 §2: classes are 2, 4 and 5 only (no 354/334 codes)
        assert reply.enhanced == ""
        return
    assert _ENHANCED.match(reply.enhanced), reply
    assert reply.enhanced[0] == str(reply.code)[0], reply  # RFC 3463 §2: same class
    wire = reply.to_bytes()
    assert wire.startswith(f"{reply.code} {reply.enhanced} ".encode())


BAD_INPUT = [
    b"FOO\r\n",
    b"MAIL FROM:<a@example.org> FOO=1\r\n",
    b"RCPT TO:<a@example.org>\r\n",
    b"DATA\r\n",
    b"NOOP\x00\r\n",
    b"NOOP \xff\xfe\r\n",
    b"NOOP\nNOOP\r\n",
    b"QUIT now\r\n",
    b"MAIL FROM:<@>\r\n",
    b"BDAT 3\r\nabc",
    b"BDAT x\r\n",
    b"AUTH\r\n",
    b"N" * 600 + b"\r\n",
]


@pytest.mark.parametrize("data", BAD_INPUT)
def test_every_error_hint_carries_an_enhanced_status_code(
    pair: ConnectionPair, data: bytes
) -> None:
    [reply] = hints(pair.feed_server(data))
    assert _ENHANCED.match(reply.enhanced) and reply.enhanced[0] == str(reply.code)[0]


def test_greeting_and_ehlo_replies_carry_no_enhanced_code() -> None:
    # RFC 2034 §3: not in the greeting nor in the EHLO/HELO replies.
    pair = ConnectionPair()
    [greeting] = pair.greet()
    assert isinstance(greeting, smtp.Reply) and greeting.enhanced == ""
    pair.client_send(smtp.Ehlo("c.test"))
    [ehlo] = pair.server_send(smtp.Reply(250, "", "server.test\nPIPELINING\nSIZE 100"))
    assert isinstance(ehlo, smtp.Reply) and ehlo.enhanced == ""
    assert ehlo.lines == ["server.test", "PIPELINING", "SIZE 100"]


def test_multiline_reply_to_bytes() -> None:
    reply = smtp.Reply(250, "2.0.0", "first\nsecond\nlast")
    assert reply.to_bytes() == b"250-2.0.0 first\r\n250-2.0.0 second\r\n250 2.0.0 last\r\n"
    assert smtp.Reply(250, "", "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"


def test_reply_without_text_is_the_bare_code() -> None:
    assert smtp.Reply(334).to_bytes() == b"334\r\n"
    assert smtp.Reply(250, "2.0.0").to_bytes() == b"250 2.0.0\r\n"


@pytest.mark.parametrize(
    "reply",
    [
        smtp.Reply(250, "2.0.0", "OK"),
        smtp.Reply(250, "2.0.0", "first\nsecond\nlast"),
        smtp.Reply(250, "", "server.test\nPIPELINING\nSIZE 1000"),
        smtp.Reply(550, "5.7.1", ""),
        smtp.Reply(334, "", "VXNlcm5hbWU6"),
        smtp.Reply(334, "", ""),
        smtp.Reply(451, "4.3.0", "try later"),
        smtp.Reply(220, "", "mx.example ESMTP"),
    ],
)
def test_reply_round_trips_through_parse_reply_lines(reply: smtp.Reply) -> None:
    lines = reply.to_bytes().decode().split("\r\n")[:-1]
    assert R.parse_reply_lines(lines) == reply


def test_parse_reply_lines_keeps_a_mismatched_class_as_text() -> None:
    assert R.parse_reply_lines(["250 5.0.0 odd"]) == smtp.Reply(250, "", "5.0.0 odd")


def test_parse_reply_lines_strips_the_code_from_each_line() -> None:
    reply = R.parse_reply_lines(["550-5.1.1 no such user", "550 5.1.1 here"])
    assert reply == smtp.Reply(550, "5.1.1", "no such user\nhere")


def test_reply_classes() -> None:
    assert smtp.Reply(250).positive and not smtp.Reply(250).permanent
    assert smtp.Reply(354).intermediate and smtp.Reply(451).transient
    assert smtp.Reply(554).permanent and not smtp.Reply(554).positive


def test_with_text_keeps_code_and_enhanced() -> None:
    assert R.OK.with_text("fine") == smtp.Reply(250, "2.0.0", "fine")
