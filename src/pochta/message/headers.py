"""Header-block helpers on raw message bytes. Imports stdlib and `store.api` records only.

The SMTP server calls these on every message, so they scan bytes directly instead of running the
`email` parser: split the header block from the body, read the few summary fields (RFC 5322
§3.6), test for a header, and tell whether a message needs 8BITMIME or SMTPUTF8. Nothing here
raises on malformed input: damaged headers yield best-effort text.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterable, Iterator

from pochta.store.api import Summary

# One header field (RFC 5322 §2.2): its name (§3.6.8: field-name = 1*ftext, ftext = %d33-57 /
# %d59-126), the colon, and its value running on over folded continuation lines (§2.2.3: a line
# that starts with whitespace); the line end after it is taken too. Bare-LF line ends are
# accepted. Matched field after field from the start, it stops where the header block does: at
# the empty line, or at a line that is neither a field nor a continuation.
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)\n?")
# Summary fields (RFC 5322 §3.6) by lowercased name: their place in Summary's arguments.
_SUMMARY_SLOTS = {b"from": 0, b"to": 1, b"subject": 2, b"date": 3, b"message-id": 4}
# RFC 2047 §2: encoded-word = "=?" charset "?" encoding "?" encoded-text "?="
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t\r\n]+(=\?)")


def _fields_end(raw: bytes) -> int:
    """Where the fields of the header block end (the empty line, the body, or the end)."""
    pos, match = 0, _FIELD.match
    while (field := match(raw, pos)) is not None:
        pos = field.end()
    return pos


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """(header block including the empty separator line, body).

    RFC 5322 §2.1: the header section ends at the first empty line. Bare-LF line ends are
    accepted. A message with no empty line is all headers (empty body); a line that is neither a
    field nor a continuation (no colon) ends the header block early and starts the body, as
    lenient parsers do.
    """
    end = _fields_end(raw)
    if raw.startswith(b"\n", end) or raw[end:] == b"\r":
        end += 1
    elif raw.startswith(b"\r\n", end):
        end += 2
    return raw[:end], raw[end:]


def iter_fields(raw: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(lowercased name, unfolded raw value) for each field of the header block, in order."""
    pos, match = 0, _FIELD.match
    while (field := match(raw, pos)) is not None:
        pos = field.end()
        yield field.group(1).lower(), _unfold(field.group(2))


def _unfold(value: bytes) -> bytes:
    # RFC 5322 §2.2.3: unfolding removes the CRLF that precedes whitespace. (Stripping first
    # changes nothing, CR and LF being whitespace, and leaves most values without either.)
    value = value.strip()
    if 10 in value or 13 in value:  # LF, CR: ints make `in` a memchr (see smtp/_data.py)
        value = value.translate(None, b"\r\n").strip()
    return value


def has_header(raw: bytes, name: str) -> bool:
    """True if the header block has a field called `name` (case-insensitive)."""
    wanted = name.strip().lower().encode("ascii", "replace")
    return any(field == wanted for field, _ in iter_fields(raw))


def get_header(raw: bytes, name: str) -> str | None:
    """The first `name` field's value, unfolded and decoded (RFC 2047, RFC 6532); None if absent."""
    wanted = name.strip().lower().encode("ascii", "replace")
    for field, value in iter_fields(raw):
        if field == wanted:
            return decode_header_value(value)
    return None


def parse_summary(raw: bytes) -> Summary:
    """From, To, Subject, Date and Message-ID as decoded text ("" when absent). Never raises."""
    found: list[str | None] = [None] * len(_SUMMARY_SLOTS)
    left = len(found)
    pos, match = 0, _FIELD.match  # iter_fields, without a generator: it runs on every letter
    while left and (field := match(raw, pos)) is not None:
        pos = field.end()
        slot = _SUMMARY_SLOTS.get(field[1].lower())
        if slot is not None and found[slot] is None:  # the first occurrence wins
            found[slot] = decode_header_value(_unfold(field[2]))
            left -= 1
    from_, to, subject, date, message_id = [value or "" for value in found]
    return Summary(from_, to, subject, date, message_id)


def decode_header_value(value: bytes) -> str:
    """Decode a raw unfolded field value to text.

    Raw UTF-8 is accepted (RFC 6532 §3.2); other bytes become U+FFFD. RFC 2047 encoded-words are
    decoded; whitespace between adjacent encoded-words is dropped (RFC 2047 §6.2).
    """
    text = value.decode("utf-8", errors="replace")
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub(r"\1\2", text)
    return _ENCODED_WORD.sub(_decode_word, text)


def _decode_word(match: re.Match[str]) -> str:
    charset, encoding, encoded = match.group(1), match.group(2).upper(), match.group(3)
    charset = charset.split("*", 1)[0]  # RFC 2231 §5: charset*language
    try:
        data = encoded.encode("ascii")
        if encoding == "B":
            data = base64.b64decode(data + b"=" * (-len(data) % 4))
        else:
            data = binascii.a2b_qp(data, header=True)  # RFC 2047 §4.2: "_" is a space
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return match.group(0)
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except (LookupError, UnicodeError):
        return data.decode("utf-8", errors="replace")


def is_8bit(raw: bytes) -> bool:
    """True if any octet is >= 0x80: the message needs 8BITMIME (RFC 6152) to be relayed as is."""
    return not raw.isascii()


def needs_smtputf8(raw: bytes = b"", addresses: Iterable[str] = ()) -> bool:
    """True if a relay needs the SMTPUTF8 extension (RFC 6531 §3.2): a non-ASCII envelope
    address, or non-ASCII (UTF-8, RFC 6532) octets in the header block. 8-bit bodies alone only
    need 8BITMIME."""
    if any(not address.isascii() for address in addresses):
        return True
    headers, _ = split_header_block(raw)
    return not headers.isascii()


def from_addresses(raw: bytes) -> list[str]:
    """The addresses in every From: field (RFC 5322 §3.6.2), lowercased; [] if there is none."""
    from email.utils import getaddresses

    values = [decode_header_value(v) for f, v in iter_fields(raw) if f == b"from"]
    return [addr.lower() for _, addr in getaddresses(values) if addr]
