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


def test_mail_event_lines_of_a_loop_turn_are_written_at_its_end(tmp_path: Path) -> None:
    """Under `pochta serve` (log.batch_lines armed on the loop) the lines logged in one turn of
    the event loop reach the log when the turn ends, in order; a line logged on another thread
    is written at once, a record logged through `logging` on the loop comes after the lines
    waiting before it, and disarming writes whatever waits."""
    mail_log = tmp_path / "mail.log"
    script = tmp_path / "turns.py"
    script.write_text(
        "import asyncio, logging, threading\n"
        "from pochta import log\n"
        f"PATH = {str(mail_log)!r}\n"
        "log.setup('info', mail_log=PATH)\n"
        "def lines():\n"
        "    return open(PATH).read().count('event=')\n"
        "async def main():\n"
        "    loop = asyncio.get_running_loop()\n"
        "    log.batch_lines(loop.call_soon)\n"
        "    seen = []\n"
        "    def turn():\n"
        "        log.event('accepted', n=1)\n"
        "        log.event('accepted', n=2)\n"
        "        seen.append(lines())\n"
        "    loop.call_soon(turn)\n"
        "    for _ in range(3):\n"
        "        await asyncio.sleep(0)\n"
        "    seen.append(lines())\n"
        "    t = threading.Thread(target=lambda: log.event('other', n=3))\n"
        "    t.start(); t.join()\n"
        "    seen.append(lines())\n"
        "    log.event('accepted', n=4)\n"
        "    seen.append(lines())\n"
        "    logging.getLogger('pochta.other').warning('in order')\n"
        "    seen.append(lines())\n"
        "    log.event('accepted', n=5)\n"
        "    seen.append(lines())\n"
        "    log.batch_lines(None)\n"
        "    seen.append(lines())\n"
        "    print(seen)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[0, 2, 3, 3, 4, 4, 5]"
    events = [line.split(" ", 2)[2] for line in mail_log.read_text().splitlines()]
    assert events == [
        "event=accepted n=1",
        "event=accepted n=2",
        "event=other n=3",
        "event=accepted n=4",
        "event=accepted n=5",
    ]
    # On the main log, a record logged on the loop comes after the lines logged before it.
    main = [line for line in out.stderr.splitlines() if "n=4" in line or "in order" in line]
    assert [("in order" in line) for line in main] == [False, True]
