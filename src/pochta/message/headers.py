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

# RFC 5322 §3.6.8: field-name = 1*ftext, ftext = %d33-57 / %d59-126 (printable ASCII except ":").
_FIELD_LINE = re.compile(rb"^[\x21-\x39\x3b-\x7e]+[ \t]*:")
# RFC 2047 §2: encoded-word = "=?" charset "?" encoding "?" encoded-text "?="
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t\r\n]+(=\?)")
_SUMMARY_FIELDS = {
    b"from": "from_",
    b"to": "to",
    b"subject": "subject",
    b"date": "date",
    b"message-id": "message_id",
}


def _lines(raw: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, line including its line end) for each line; the last one may lack an end."""
    start = 0
    size = len(raw)
    while start < size:
        end = raw.find(b"\n", start)
        end = size if end < 0 else end + 1
        yield start, raw[start:end]
        start = end


def _is_blank(line: bytes) -> bool:
    return line in (b"\r\n", b"\n", b"\r")


def split_header_block(raw: bytes) -> tuple[bytes, bytes]:
    """(header block including the empty separator line, body).

    RFC 5322 §2.1: the header section ends at the first empty line. Bare-LF line ends are
    accepted. A message with no empty line is all headers (empty body); a line that is neither a
    field nor a continuation (no colon) ends the header block early and starts the body, as
    lenient parsers do.
    """
    for offset, line in _lines(raw):
        if _is_blank(line):
            end = offset + len(line)
            return raw[:end], raw[end:]
        if line[:1] in (b" ", b"\t") and offset > 0:
            continue  # RFC 5322 §2.2.3 folded continuation
        if not _FIELD_LINE.match(line):
            return raw[:offset], raw[offset:]
    return raw, b""


def iter_fields(raw: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(lowercased name, unfolded raw value) for each field of the header block, in order.

    One pass over the lines, with the same bounds as `split_header_block` (it runs once per
    letter on the hot path)."""
    name: bytes | None = None
    value: list[bytes] = []
    start, size = 0, len(raw)
    while start < size:
        end = raw.find(b"\n", start)
        end = size if end < 0 else end + 1
        line = raw[start:end]
        if line[:1] in (b" ", b"\t") and start > 0:
            value.append(line)  # RFC 5322 §2.2.3 folded continuation
            start = end
            continue
        if _is_blank(line) or not _FIELD_LINE.match(line):
            break
        if name is not None:
            yield name, _unfold(value)
        field_name, _, rest = line.partition(b":")
        name, value = field_name.strip().lower(), [rest]
        start = end
    if name is not None:
        yield name, _unfold(value)


def _unfold(parts: list[bytes]) -> bytes:
    # RFC 5322 §2.2.3: unfolding removes the CRLF that precedes whitespace.
    return b"".join(parts).replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"").strip()


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
    found: dict[str, str] = {}
    for field, value in iter_fields(raw):
        key = _SUMMARY_FIELDS.get(field)
        if key is not None and key not in found:
            found[key] = decode_header_value(value)
            if len(found) == len(_SUMMARY_FIELDS):
                break
    return Summary(**found)


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
