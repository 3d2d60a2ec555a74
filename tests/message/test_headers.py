"""Header block splitting, summaries and the 8-bit / SMTPUTF8 tests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pochta.message import (
    get_header,
    has_header,
    is_8bit,
    needs_smtputf8,
    parse_summary,
    split_header_block,
)
from pochta.store.api import Summary

MSG = (
    b"From: Alice <alice@pochta.test>\r\n"
    b"To: bob@yandex.test,\r\n"
    b"\tcarol@yandex.test\r\n"
    b"Subject: =?utf-8?B?0J/RgNC40LLQtdGC?= =?utf-8?Q?_=D0=BC=D0=B8=D1=80?=\r\n"
    b"Date: Tue, 01 Jul 2025 12:00:00 +0000\r\n"
    b"Message-ID: <abc@pochta.test>\r\n"
    b"\r\n"
    b"Body line\r\nFrom: not a header\r\n"
)


def test_split_crlf() -> None:
    headers, body = split_header_block(MSG)
    assert headers.endswith(b"<abc@pochta.test>\r\n\r\n")
    assert body == b"Body line\r\nFrom: not a header\r\n"
    assert headers + body == MSG


def test_split_bare_lf_no_body_and_empty() -> None:
    assert split_header_block(b"Subject: x\nTo: y\n\nbody\n") == (
        b"Subject: x\nTo: y\n\n",
        b"body\n",
    )
    assert split_header_block(b"Subject: x\r\n") == (b"Subject: x\r\n", b"")
    assert split_header_block(b"Subject: x") == (b"Subject: x", b"")
    assert split_header_block(b"") == (b"", b"")
    assert split_header_block(b"\r\nbody") == (b"\r\n", b"body")


def test_split_stops_at_a_line_that_is_no_field() -> None:
    headers, body = split_header_block(b"Subject: x\r\nthis is body\r\n")
    assert (headers, body) == (b"Subject: x\r\n", b"this is body\r\n")


@given(st.binary(max_size=300))
def test_split_never_loses_bytes(raw: bytes) -> None:
    headers, body = split_header_block(raw)
    assert headers + body == raw


def test_summary_decodes_and_unfolds() -> None:
    assert parse_summary(MSG) == Summary(
        from_="Alice <alice@pochta.test>",
        to="bob@yandex.test,\tcarol@yandex.test",
        subject="Привет мир",
        date="Tue, 01 Jul 2025 12:00:00 +0000",
        message_id="<abc@pochta.test>",
    )


def test_summary_first_occurrence_wins_and_body_is_ignored() -> None:
    raw = b"Subject: one\nsubject: two\n\nSubject: body\n"
    assert parse_summary(raw).subject == "one"
    assert parse_summary(b"\r\nSubject: x\r\n").subject == ""


def test_summary_utf8_headers_and_bad_bytes() -> None:
    raw = "Subject: Grüße\r\nFrom: Ёж <ёж@пример.test>\r\n\r\n".encode() + b"x"
    summary = parse_summary(raw)
    assert summary.subject == "Grüße"
    assert summary.from_ == "Ёж <ёж@пример.test>"
    assert parse_summary(b"Subject: a\xff\xfeb\r\n\r\n").subject == "a\ufffd\ufffdb"


def test_summary_bad_encoded_words_do_not_raise() -> None:
    raw = (
        b"Subject: =?x-unknown?Q?caf=E9?= =?utf-8?B?!!!?= =?iso-8859-1?q?caf=E9?=\r\n"
        b"To: =?rot13?Q?abc?=\r\n\r\n"
    )
    summary = parse_summary(raw)
    assert summary.subject.endswith("café")
    assert summary.to == "abc"


def test_encoded_words_keep_surrounding_text() -> None:
    raw = b"Subject: Re: =?ISO-8859-1?Q?Andr=E9?= Pirard says hi\r\n\r\n"
    assert parse_summary(raw).subject == "Re: André Pirard says hi"


@given(st.binary(max_size=500))
def test_summary_never_raises(raw: bytes) -> None:
    assert isinstance(parse_summary(raw), Summary)


def test_has_and_get_header() -> None:
    assert has_header(MSG, "message-id")
    assert has_header(MSG, "TO")
    assert not has_header(MSG, "Received")
    assert not has_header(b"Subject: x\r\n\r\nReceived: y\r\n", "received")
    assert get_header(MSG, "to") == "bob@yandex.test,\tcarol@yandex.test"
    assert get_header(MSG, "cc") is None


def test_8bit_and_smtputf8() -> None:
    assert not is_8bit(MSG)
    assert is_8bit("Subject: x\r\n\r\nпривет".encode())
    assert not needs_smtputf8("Subject: x\r\n\r\nпривет".encode())  # 8BITMIME is enough
    assert needs_smtputf8("Subject: привет\r\n\r\n".encode())
    assert needs_smtputf8(b"Subject: x\r\n\r\n", ["ёж@пример.test"])
    assert not needs_smtputf8(b"Subject: x\r\n\r\n", ["a@b.test"])


def _reference_fields(raw: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """The header block read line by line, as RFC 5322 §2.2 states it: the (lowercased name,
    unfolded value) of each field, and where the header block ends (after the empty line)."""
    fields: list[tuple[bytes, bytes]] = []
    start = 0
    while start < len(raw):
        newline = raw.find(b"\n", start)
        end = len(raw) if newline < 0 else newline + 1
        line = raw[start:end]
        if start > 0 and line[:1] in (b" ", b"\t") and fields:  # §2.2.3 continuation
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        elif line in (b"\r\n", b"\n", b"\r"):
            return _unfolded(fields), end
        else:
            name, colon, value = line.partition(b":")
            if not colon or not name.rstrip(b" \t") or name.rstrip(b" \t") != name.strip():
                return _unfolded(fields), start
            if any(not 33 <= c <= 126 for c in name.rstrip(b" \t")):
                return _unfolded(fields), start
            fields.append((name.rstrip(b" \t").lower(), value))
        start = end
    return _unfolded(fields), len(raw)


def _unfolded(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [
        (n, v.replace(b"\r\n", b"").replace(b"\n", b"").replace(b"\r", b"").strip())
        for n, v in fields
    ]


_PIECES = [
    b"From: a@b\r\n", b"to:c@d\n", b"Subject : x\r\n", b"X-A:\r\n", b" folded\r\n",
    b"\tfolded tab\n", b"\r\n", b"\n", b"\r", b"no colon here\r\n", b" lead\r\n", b"A\r:b\r\n",
    b"Date: 1\rmid\r\n", b"Message-ID: <m@x>", b"X \t: y\r\n", b"\x7f: z\r\n", b"\xc3\xa9: q\n",
    b":empty name\r\n", b"Body: after\r\n",
]  # fmt: skip


@given(st.lists(st.sampled_from(_PIECES), max_size=12))
def test_fields_and_split_agree_with_reading_line_by_line(pieces: list[bytes]) -> None:
    """iter_fields, split_header_block and parse_summary (one regex, field after field) read
    exactly what a line-by-line reading of RFC 5322 §2.2 does, on every mix of fields, folded
    lines, empty lines, bare CR/LF, and lines that end the header block."""
    from pochta.message import iter_fields

    raw = b"".join(pieces)
    fields, end = _reference_fields(raw)
    assert list(iter_fields(raw)) == fields
    assert split_header_block(raw) == (raw[:end], raw[end:])
    first: dict[bytes, str] = {}
    for name, value in fields:
        first.setdefault(name, value.decode("utf-8", errors="replace"))
    summary = parse_summary(raw)
    assert (summary.from_, summary.to, summary.subject, summary.date, summary.message_id) == (
        first.get(b"from", ""),
        first.get(b"to", ""),
        first.get(b"subject", ""),
        first.get(b"date", ""),
        first.get(b"message-id", ""),
    )
