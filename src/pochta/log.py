"""Logging: setup, a TRACE level for wire lines, and the key=value mail-event log. Stdlib only.

The mail-event log (logger `pochta.maillog`) writes one stable line per event for operators and
fail2ban: `event=rejected conn=... ip=... reason=...`. Peer-controlled strings are sanitised.
"""

from __future__ import annotations

import logging
import sys
import time

TRACE = 5
logging.addLevelName(TRACE, "TRACE")
maillog = logging.getLogger("pochta.maillog")


def setup(level: str = "info", mail_log: str = "") -> None:
    """Configure the root logger on stderr (and the mail-event log's file, if given)."""
    numeric = TRACE if level.lower() == "trace" else getattr(logging, level.upper(), logging.INFO)
    # The logging HOWTO's "Optimization": no caller lookup (a stack walk per record), no
    # thread or process names; our format uses none of them, and a line is logged per letter.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler])
    if mail_log:
        file_handler = logging.FileHandler(mail_log)
        file_handler.setFormatter(_Formatter("%(asctime)s %(message)s"))
        maillog.addHandler(file_handler)


class _Formatter(logging.Formatter):
    """The standard format, with the timestamp's seconds formatted once per second (a mail
    server logs a line per letter)."""

    _second = -1
    _text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
        return f"{self._text},{int(record.msecs):03d}"


def clean(value: object, limit: int = 120) -> str:
    """A peer string made safe for one log line: printable ASCII, quoted when needed, bounded."""
    if type(value) is int:
        return str(value)
    text = str(value)
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        out = text  # the usual case, checked at C speed
    else:
        out = "".join(
            c if 32 <= ord(c) < 127 and c not in '"\\' else f"\\x{ord(c):02x}" for c in text
        )
    if len(out) > limit:
        out = out[:limit] + "..."
    return f'"{out}"' if (" " in out or not out) else out


def event(name: str, **fields: object) -> None:
    """Log one mail event as `event=NAME key=value ...`."""
    _emit(logging.INFO, name, fields)


def detail(name: str, **fields: object) -> None:
    """Like `event`, at DEBUG level: per-connection chatter kept off the hot path by default."""
    _emit(logging.DEBUG, name, fields)


def _emit(level: int, name: str, fields: dict[str, object]) -> None:
    if not maillog.isEnabledFor(level):
        return
    parts = [f"event={name}"] + [f"{k}={clean(v)}" for k, v in fields.items()]
    maillog.log(level, " ".join(parts))
