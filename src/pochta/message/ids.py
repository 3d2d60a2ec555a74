"""Message-ID and Date values (RFC 5322 §3.6.1, §3.6.4, §3.3). Imports stdlib only."""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from datetime import UTC, datetime, timedelta, timezone
from email.utils import format_datetime
from functools import lru_cache
from typing import Any

# RFC 5322 §3.6.4: id-right = dot-atom-text / no-fold-literal; we only emit dot-atom-text.
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


def make_message_id(hostname: str) -> str:
    """A new globally unique "<time.random@hostname>" (RFC 5322 §3.6.4).

    Uniqueness comes from 96 random bits; the time prefix only helps humans. A hostname that is
    not a valid dot-atom (empty, IDN U-labels, spaces) is replaced by "localhost.invalid".
    """
    host = hostname.strip().rstrip(".")
    if not _DOT_ATOM.match(host):
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            host = ""
        if not _DOT_ATOM.match(host):
            host = "localhost.invalid"
    return f"<{int(time.time()):x}.{secrets.token_hex(12)}@{host}>"


def format_date(dt: datetime) -> str:
    """RFC 5322 §3.3 date-time, e.g. "Tue, 01 Jul 2025 12:00:00 +0000"; naive means UTC."""
    global _last_utc
    if dt.tzinfo is None or dt.tzinfo is UTC:
        return _utc_second(int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()))
    return _format_second(int(dt.timestamp()), dt.utcoffset() or timedelta(0))


def format_now() -> str:
    """`format_date` of the current time in UTC, without making a datetime for it."""
    return _utc_second(int(time.time()))


def _utc_second(second: int) -> str:
    global _last_utc
    last = _last_utc  # every letter carries a date: format UTC once per second
    if last[0] != second:
        last = _last_utc = (second, _format_second(second, timedelta(0)))
    return last[1]


_last_utc: tuple[int, str] = (-1, "")


@lru_cache(maxsize=16)
def _format_second(seconds: int, offset: timedelta) -> str:
    """One formatting per second and offset: every letter carries a date (Received:)."""
    return format_datetime(datetime.fromtimestamp(seconds, timezone(offset)))


_QUEUE_SEQ = itertools.count(secrets.randbelow(1 << 20))


def make_queue_id() -> str:
    """A short unique id for one accepted letter, quoted in the 250 reply and in Received:.

    Milliseconds, the process id and a per-process counter (random start): unique across the
    processes of a node and across restarts, without a random-number syscall per letter.
    """
    ms = int(time.time() * 1000)
    last = _LAST_MS
    if last[0] != ms:  # the time and pid part, formatted once per millisecond
        last[0], last[1] = ms, format(ms, "X") + _PID[0]
    prefix: str = last[1]
    seq = next(_QUEUE_SEQ) & 0xFFFFF  # five hex digits by table (an f-string spec is parsed)
    return prefix + _HEX[seq >> 16] + _HEX2[(seq >> 8) & 0xFF] + _HEX2[seq & 0xFF]


_HEX = "0123456789ABCDEF"
_HEX2 = [f"{i:02X}" for i in range(256)]


_LAST_MS: list[Any] = [-1, ""]


def _pid() -> str:
    return f"{os.getpid() & 0xFFFF:04X}"


_PID = [_pid()]  # getpid() is a system call; worker processes fork after import


def _forked() -> None:
    _PID[0] = _pid()
    _LAST_MS[0] = -1


os.register_at_fork(after_in_child=_forked)
