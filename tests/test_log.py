"""The mail-event log: one key=value line per event, peer strings made safe."""

from __future__ import annotations

import logging

import pytest

from pochta import log


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@mail.test", "alice@mail.test"),
        ("two words", '"two words"'),
        ("", '""'),
        ('quote"d', "quote\\x22d"),
        ("back\\slash", "back\\x5cslash"),
        ("new\r\nline", "new\\x0d\\x0aline"),
        ("tab\there", "tab\\x09here"),
        ("ünïcode", "\\xfcn\\xefcode"),
    ],
)
def test_clean_keeps_a_log_line_one_line(value: str, expected: str) -> None:
    assert log.clean(value) == expected


def test_clean_bounds_length() -> None:
    assert log.clean("x" * 500, limit=10) == "x" * 10 + "..."


def test_event_is_one_key_value_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pochta.maillog"):
        log.event("rejected", ip="203.0.113.5", rcpt="evil\r\nevent=forged@x")
    (record,) = caplog.records
    assert record.getMessage() == "event=rejected ip=203.0.113.5 rcpt=evil\\x0d\\x0aevent=forged@x"
