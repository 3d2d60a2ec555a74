"""Incremental dot-stuffing (RFC 5321 §4.5.2) for DATA, both directions. Stdlib only.

The decoder is the SMTP-smuggling defence: the ONLY end of a DATA body is <CRLF>.<CRLF>.
`<LF>.<LF>`, `<LF>.<CRLF>`, `<CR>.<CR>`, `<CRLF>.<LF>` and every other bare CR or LF are body
bytes, and their presence marks the letter as bad (rejected when the real terminator arrives), so
nothing after them can be taken as a new transaction (RFC 5321 §2.3.8: CR and LF only as CRLF).

Work is done on whole buffers with bytes methods (find, count, replace, split), never per byte
in Python; the two checks that must look at every octet (bare CR/LF, line length) are in C
(`_scan.c`) when pochta is built, with their Python references below.
"""

from __future__ import annotations

CRLF = b"\r\n"
# Octets as ints: `13 in data` is a memchr; `b"\r" in data` first tries the bytes object as an
# int, formats the TypeError and drops it (ten times slower on a command line).
CR, LF, NUL = 13, 10, 0
_TERMINATOR = b"\r\n.\r\n"
_LINE_DOT = b"\r\n."


class DataFlags:
    """What was wrong with a body; the first true flag decides the rejection reply."""

    def __init__(self) -> None:
        self.oversize = False
        self.bare_line_end = False
        self.nul = False
        self.long_line = False

    @property
    def bad(self) -> bool:
        return self.oversize or self.bare_line_end or self.nul or self.long_line


class DotDecoder:
    """Feed raw DATA bytes; get un-stuffed body pieces and, at the end, the bytes after it.

    `feed(data)` returns `(body, done)`: `body` is un-stuffed bytes of complete lines (empty
    once the body is bad: a bad body is consumed to its end but not passed on); when `done`,
    `remainder()` holds the bytes that followed the terminator (the next pipelined commands).
    """

    def __init__(self, max_size: int, max_line: int) -> None:
        self._buf = b""
        self._line_start = True  # _buf begins at the start of a line
        self._size = 0
        self._max_size = max_size
        self._max_line = max_line  # octets including CRLF (RFC 5321 §4.5.3.1.6)
        self._rest = b""
        self.flags = DataFlags()

    @property
    def size(self) -> int:
        """Octets of un-stuffed body seen so far (also counted while bad)."""
        return self._size

    def remainder(self) -> bytes:
        return self._rest

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        buf = self._buf + data if self._buf else data
        if self._line_start and buf[:3] == b".\r\n":
            # A "." line right at a line start (the previous piece ended with CRLF).
            self._rest = buf[3:]
            self._buf = b""
            return b"", True
        # Every terminator and every stuffed dot starts with CRLF "."; most bodies have none
        # but the terminator, so one search finds both and spares a pass over the body.
        first = _find_line_dot(buf)
        end = -1 if first < 0 else buf.find(_TERMINATOR, first)
        if end >= 0:
            body, self._rest = buf[: end + 2], buf[end + 5 :]
            self._buf = b""
            return self._accept(body, stuffed=first < end), True
        cut = buf.rfind(CRLF)
        if cut < 0:
            self._buf = self._hold_partial(buf)
            return b"", False
        body, self._buf = buf[: cut + 2], buf[cut + 2 :]
        out = self._accept(body, stuffed=0 <= first < cut)
        self._line_start = True
        if self._buf:
            self._buf = self._hold_partial(self._buf)
        return out, False

    def _hold_partial(self, partial: bytes) -> bytes:
        """Keep an incomplete line; if it is already too long, check and drop its bytes."""
        if len(partial) < self._max_line:
            return partial
        # Keep a trailing CR: it may be the start of the CRLF that ends this line.
        keep = b"\r" if partial.endswith(b"\r") else b""
        self._check(partial[: len(partial) - len(keep)])
        self.flags.long_line = True
        self._size += len(partial) - len(keep)
        self._line_start = False
        return keep

    def _accept(self, body: bytes, *, stuffed: bool) -> bytes:
        """Check and un-stuff complete lines (`body` ends with CRLF or is empty); `stuffed`:
        a CRLF "." occurs inside `body`."""
        if not body:
            return b""
        self._check(body)
        if self._line_start and body[:1] == b".":
            body = body[1:]
        if stuffed:
            body = body.replace(_LINE_DOT, CRLF)
        self._size += len(body)
        if self._size > self._max_size:
            self.flags.oversize = True
        return b"" if self.flags.bad else body

    def _check(self, chunk: bytes) -> None:
        flags = self.flags
        if NUL in chunk:
            flags.nul = True
        if CR not in chunk and LF not in chunk:  # no line end: part of one line
            if len(chunk) >= self._max_line:
                flags.long_line = True
            return
        # Long lines: `long_line`, a step per window of `max_line` octets (`_has_long_line`).
        if not flags.bare_line_end:
            flags.bare_line_end = bare_line_end(chunk)
        if not flags.long_line and len(chunk) >= self._max_line:
            # Without bare line ends the lines end at LF; with some, the letter is refused for
            # those first (DataFlags order), whatever this finds.
            flags.long_line = long_line(chunk, self._max_line)


def _bare_line_end(chunk: bytes) -> bool:
    """Whether `chunk` holds a CR or LF outside a CRLF pair: `bytes.splitlines` ends lines at
    CRLF, CR and LF alike, so the chunk is all CRLF-terminated exactly when its length is the
    lines' lengths plus two octets per line end. (Counting CR, LF and CRLF took three passes
    and a slow two-byte search.) The reference for the C version in `_scan.c`, and the test
    used without a native build."""
    if not chunk:
        return False
    lines = chunk.splitlines()
    ends = len(lines) if chunk[-1:] in (b"\n", b"\r") else len(lines) - 1
    return sum(map(len, lines)) + 2 * ends != len(chunk)


def _has_long_line(chunk: bytes, max_line: int) -> bool:
    """Whether a line of `chunk` (complete lines) is longer than `max_line` octets with its
    CRLF: the last LF of each window of `max_line` octets starts the next window, so a window
    with none holds a longer line. A few steps per window where a scan of every line's length
    cost a call per line (1,300 in 100 KiB)."""
    pos, size = 0, len(chunk)
    while pos + max_line < size:
        lf = chunk.rfind(b"\n", pos, pos + max_line)
        if lf < 0:
            return True
        pos = lf + 1
    return False


try:  # the same tests in C: a fifth of the CPU of a 100 KiB letter went to the first one
    from pochta.smtp._scan import bare_line_end, long_line
except ImportError:  # no native build (or POCHTA_NATIVE=0, or a stale one): the references
    bare_line_end = _bare_line_end
    long_line = _has_long_line


def _find_line_dot(buf: bytes) -> int:
    """Where CRLF "." first occurs in `buf`, or -1. A dot is found at memchr speed where a
    three-octet search costs a comparison at every CRLF (78 against 1.3 us in 100 KiB of
    76-octet lines): dots are looked at one by one, and a body with many of them (prose) gets
    the three-octet search after the first few."""
    dot = buf.find(b".", 2)
    for _ in range(_DOTS_ONE_BY_ONE):
        if dot < 0:
            return -1
        if buf[dot - 2 : dot] == CRLF:
            return dot - 2
        dot = buf.find(b".", dot + 1)
    return -1 if dot < 0 else buf.find(_LINE_DOT, dot - 2)


_DOTS_ONE_BY_ONE = 8


class DotEncoder:
    """Dot-stuff outgoing body bytes; `end()` gives the terminator (adding a final CRLF if the
    body did not end with one)."""

    def __init__(self) -> None:
        self._line_start = True
        self._cr = False  # the previous piece ended with CR
        self._empty = True

    def encode(self, data: bytes) -> bytes:
        if not data:
            return b""
        prefix = b""
        if self._line_start and data[:1] == b".":
            prefix, data = b".", data
        elif self._cr and data[:2] == b"\n.":
            prefix, data = b"\n.", data[1:]
        out = prefix + data.replace(b"\r\n.", b"\r\n..")
        self._line_start = data.endswith(b"\r\n") or (self._cr and data == b"\n")
        self._cr = data.endswith(b"\r")
        self._empty = False
        return out

    def end(self) -> bytes:
        if self._empty or self._line_start:
            return b".\r\n"
        return b"\r\n.\r\n"


def dot_stuff(body: bytes) -> bytes:
    """Whole-body dot-stuffing plus terminator."""
    enc = DotEncoder()
    return enc.encode(body) + enc.end()
