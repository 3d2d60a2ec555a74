"""Logging: setup, a TRACE level for wire lines, and the key=value mail-event log. Stdlib only.

The mail-event log (logger `pochta.maillog`) writes one stable line per event for operators and
fail2ban: `event=rejected conn=... ip=... reason=...`. Peer-controlled strings are sanitised.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

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
    handler = _InOrder(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=numeric, handlers=[handler])
    sinks: list[tuple[logging.StreamHandler[Any], str]] = [(handler, f" INFO {maillog.name}: ")]
    if mail_log:
        file_handler = logging.FileHandler(mail_log)
        file_handler.setFormatter(_Formatter("%(asctime)s %(message)s"))
        maillog.addHandler(file_handler)
        sinks.insert(0, (file_handler, " "))
    # basicConfig leaves a root logger that has handlers alone: then so does the direct path
    _direct.arm(sinks if logging.getLogger().handlers == [handler] else [])


class _InOrder(logging.StreamHandler[Any]):
    """The main log's handler: a record logged on the event loop's thread is written after the
    mail-event lines that wait for the end of the turn (`batch_lines`), so the log keeps the
    order in which things happened."""

    def emit(self, record: logging.LogRecord) -> None:
        if _direct._pending and threading.get_ident() == _direct._loop_thread:
            _direct.flush()
        super().emit(record)


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
    line = " ".join(parts)
    if level != logging.INFO or not _direct.write(line):
        _direct.flush()  # the lines before it first
        maillog.log(level, line)


_MILLIS = [f",{ms:03d}" for ms in range(1000)]  # the timestamp's ",123"


class _Direct:
    """The INFO mail-event line written straight to the streams `setup()` configured, in the
    same format: a line per letter through `logging` (a LogRecord, filters, a formatter, handler
    locks) cost more than compiling the whole SMTP core saved (`perf` on a running node). Used
    only while the handlers are exactly those `setup()` installed, so anything that adds one
    (a test's caplog, an embedding application) gets every record through `logging` again.

    Under `pochta serve` the lines of one event-loop turn are written together at its end
    (`batch`): the letters of one group commit are logged in one write rather than one each."""

    def __init__(self) -> None:
        self._sinks: list[tuple[logging.StreamHandler[Any], str]] = []
        self._root: list[logging.Handler] = []
        self._own: list[logging.Handler] = []
        self._second = -1
        self._stamp = ""
        self._defer: Callable[[Callable[[], None]], object] | None = None
        self._pending: list[tuple[str, str]] = []  # (timestamp, line) waiting for the turn's end
        self._loop_thread = 0  # the thread whose loop `_defer` schedules on

    def arm(self, sinks: list[tuple[logging.StreamHandler[Any], str]]) -> None:
        self._sinks = sinks
        self._root = list(logging.getLogger().handlers)
        self._own = list(maillog.handlers)

    def write(self, line: str) -> bool:
        """Write `line` as the handlers would; False when they are not the ones armed."""
        sinks = self._sinks
        if (
            not sinks
            or logging.root.handlers != self._root
            or maillog.handlers != self._own
            or not maillog.propagate
            or maillog.filters
        ):
            return False
        for handler, _ in sinks:
            if handler.filters:
                return False
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        stamp = self._stamp + _MILLIS[int((now - second) * 1000) % 1000]
        if self._defer is None or threading.get_ident() != self._loop_thread:
            self._write([(stamp, line)])  # not batching, or not on the loop's thread
            return True
        pending = self._pending
        pending.append((stamp, line))
        if len(pending) == 1:
            self._defer(self.flush)
        return True

    def batch(self, call_soon: Callable[[Callable[[], None]], object] | None) -> None:
        """Write lines logged on the calling (event loop) thread at the end of the loop turn
        they were logged in (`loop.call_soon`), or at once again (None); what is waiting is
        written first."""
        self.flush()
        self._defer = call_soon
        self._loop_thread = threading.get_ident()

    def flush(self) -> None:
        """Write the waiting lines, one write per stream."""
        pending = self._pending
        if pending:
            self._pending = []
            self._write(pending)

    def _write(self, pending: list[tuple[str, str]]) -> None:
        for handler, middle in self._sinks:
            if handler.level > logging.INFO:
                continue
            text = "".join([f"{stamp}{middle}{line}\n" for stamp, line in pending])
            lock = handler.lock  # what handler.acquire() takes, without its Python frame
            if lock is not None:
                lock.acquire()
            try:
                handler.stream.write(text)
                handler.stream.flush()
            except (OSError, ValueError):
                pass  # as in logging: a log line that cannot be written never fails the mail
            finally:
                if lock is not None:
                    lock.release()


_direct = _Direct()
atexit.register(_direct.flush)


def batch_lines(call_soon: Callable[[Callable[[], None]], object] | None) -> None:
    """Mail-event lines logged during an event-loop turn are written at its end, all together
    (`loop.call_soon`); None writes them at once again. A serving process arms it on its loop."""
    _direct.batch(call_soon)
