"""The mail-event log: one key=value line per event, peer strings made safe."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

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


def test_the_direct_mail_log_line_is_the_one_logging_writes(tmp_path: Path) -> None:
    """`pochta serve` logs a line per letter without going through `logging` (log._Direct);
    the stderr and mail-log file lines are byte for byte what the handlers would write, and
    a handler added later (here a capture) gets the records through `logging` again."""
    script = tmp_path / "emit.py"
    script.write_text(
        "import logging, sys\n"
        "from pochta import log\n"
        f"log.setup('info', mail_log={str(tmp_path / 'mail.log')!r})\n"
        "records = []\n"
        "make = logging.getLogRecordFactory()\n"
        "logging.setLogRecordFactory(lambda *a, **k: records.append(1) or make(*a, **k))\n"
        "log.event('accepted', conn='a.1', sender='two words')\n"
        "print(len(records))\n"  # 0: written directly
        "log._direct.arm([])\n"  # the same event through logging's handlers
        "log.event('accepted', conn='a.1', sender='two words')\n"
        "print(len(records))\n"
        "seen = []\n"
        "class Capture(logging.Handler):\n"
        "    def emit(self, record): seen.append(record.getMessage())\n"
        "logging.getLogger().addHandler(Capture())\n"
        "log._direct.arm(log._direct._sinks)\n"
        "log.event('rejected', ip='192.0.2.1')\n"
        "print(seen)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    direct, logged, captured = out.stderr.splitlines()
    line = 'INFO pochta.maillog: event=accepted conn=a.1 sender="two words"'
    assert direct.split(" ", 2)[2] == logged.split(" ", 2)[2] == line
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", direct[:23])
    assert captured.endswith("INFO pochta.maillog: event=rejected ip=192.0.2.1")
    assert out.stdout.split("\n")[:3] == ["0", "1", "['event=rejected ip=192.0.2.1']"]
    file_lines = (tmp_path / "mail.log").read_text().splitlines()
    assert [x.split(" ", 2)[2] for x in file_lines] == [
        'event=accepted conn=a.1 sender="two words"',
        'event=accepted conn=a.1 sender="two words"',
        "event=rejected ip=192.0.2.1",
    ]
