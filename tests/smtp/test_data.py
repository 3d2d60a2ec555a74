"""DATA (RFC 5321 §4.1.1.4, §4.5.2), line and size limits (§4.5.3.1), and the SMTP-smuggling
defence (§2.3.8: CR and LF only as CRLF; the only end of data is <CRLF>.<CRLF>)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

import pochta
from pochta import smtp
from pochta.smtp import _data
from pochta.smtp import replies as R
from pochta.smtp._data import DotDecoder, _bare_line_end, _find_line_dot, _has_long_line
from pochta.testing.pair import QUEUED, ConnectionPair, body_of, commands_of, hints

SENDER = smtp.MailFrom(smtp.path_of("a@example.org"))
RCPT = smtp.RcptTo(smtp.path_of("b@example.org"))


def in_data(limits: smtp.Limits | None = None) -> ConnectionPair:
    """A pair whose server has answered DATA with 354."""
    pair = ConnectionPair.ready(limits)
    pair.server.receive_data(b"".join(pair.client.send(c) for c in (SENDER, RCPT, smtp.Data())))
    pair.serve()
    assert pair.server.state is pair.client.state is smtp.State.DATA
    return pair


def feed_all(pair: ConnectionPair, pieces: list[bytes]) -> list[object]:
    """Feed raw pieces to the server one by one; collect everything up to the first command."""
    items: list[object] = []
    for n, piece in enumerate(pieces):
        got = pair.feed_server(piece)
        items.extend(got)
        if got and not isinstance(got[-1], smtp.BodyChunk):
            pair.server.receive_data(b"".join(pieces[n + 1 :]))  # buffered, not yet read
            break
    return items


def send_body(pair: ConnectionPair, *pieces: bytes) -> list[object]:
    """Send body pieces and the end of data through the client Connection."""
    items: list[object] = []
    for piece in pieces:
        items.extend(pair.client_send(smtp.BodyChunk(piece)))
    items.extend(pair.client_send(smtp.EndOfData()))
    return items


# -- the body ------------------------------------------------------------------------------------


def test_body_arrives_and_end_of_data_gets_a_reply() -> None:
    pair = in_data()
    items = send_body(pair, b"Subject: hi\r\n\r\nhello\r\n")
    assert body_of(items) == b"Subject: hi\r\n\r\nhello\r\n"
    assert items[-1] == smtp.EndOfData()
    [reply] = pair.server_send(QUEUED)
    assert reply == QUEUED and pair.client.answered == smtp.EndOfData()
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.mail is None


def test_dot_stuffing_round_trips() -> None:
    body = b".starts with a dot\r\n..two dots\r\n.\r\n\r\n. \r\nend.\r\n"
    pair = in_data()
    wire = pair.client.send(smtp.BodyChunk(body)) + pair.client.send(smtp.EndOfData())
    assert wire == (b"..starts with a dot\r\n...two dots\r\n..\r\n\r\n.. \r\nend.\r\n.\r\n")
    items = pair.feed_server(wire)
    assert body_of(items) == body and items[-1] == smtp.EndOfData()


def test_dot_unstuffing_of_raw_input() -> None:
    pair = in_data()
    items = pair.feed_server(b"..a\r\n.b\r\n...\r\n.\r\n")
    assert body_of(items) == b".a\r\nb\r\n..\r\n"


def test_empty_body() -> None:
    pair = in_data()
    assert pair.client.send(smtp.EndOfData()) == b".\r\n"
    items = pair.feed_server(b".\r\n")
    assert items == [smtp.EndOfData()]


def test_body_not_ending_with_crlf_gets_one_from_the_client() -> None:
    pair = in_data()
    wire = pair.client.send(smtp.BodyChunk(b"no newline")) + pair.client.send(smtp.EndOfData())
    assert wire == b"no newline\r\n.\r\n"
    assert body_of(pair.feed_server(wire)) == b"no newline\r\n"


def test_body_split_across_client_sends_is_stuffed_correctly() -> None:
    pair = in_data()
    items = send_body(pair, b"a\r", b"\n.", b"b\r\n", b".", b"\r\n", b"x")
    assert body_of(items) == b"a\r\n.b\r\n.\r\nx\r\n"


BODY = b"Subject: split\r\n\r\n.leading dot\r\nline\r\n..\r\nlast\r\n"
WIRE = smtp.dot_stuff(BODY) + b"NOOP\r\n"


@pytest.mark.parametrize("cut", range(1, len(WIRE)))
def test_body_split_at_every_byte_boundary(cut: int) -> None:
    pair = in_data()
    items = feed_all(pair, [WIRE[:cut], WIRE[cut:]])
    assert body_of(items) == BODY
    assert items[-1] == smtp.EndOfData()
    pair.server_send(QUEUED)
    assert pair.server_events() == [smtp.Noop()]


def test_body_fed_one_byte_at_a_time() -> None:
    pair = in_data()
    items = feed_all(pair, [WIRE[i : i + 1] for i in range(len(WIRE))])
    assert body_of(items) == BODY and items[-1] == smtp.EndOfData()


@pytest.mark.parametrize("cut", range(1, 5))
def test_terminator_split_inside_crlf_dot_crlf(cut: int) -> None:
    pair = in_data()
    wire = b"text\r\n.\r\nRSET\r\n"
    at = wire.index(b"\r\n.\r\n") + cut
    items = feed_all(pair, [wire[:at], wire[at:]])
    assert body_of(items) == b"text\r\n" and items[-1] == smtp.EndOfData()


def test_commands_pipelined_after_the_terminator_are_read_after_the_reply() -> None:
    pair = in_data()
    items = pair.feed_server(b"body\r\n.\r\nMAIL FROM:<a@example.org>\r\n")
    assert items[-1] == smtp.EndOfData()
    pair.server_send(QUEUED)
    assert pair.server_events() == [SENDER]


def test_eof_inside_data_closes() -> None:
    pair = in_data()
    pair.feed_server(b"partial body\r\n")
    pair.server.receive_data(b"")
    assert pair.server_events() == [smtp.ConnectionClosed()]


def test_rejected_data_leaves_the_transaction_open() -> None:
    pair = ConnectionPair.ready()
    pair.run(SENDER, RCPT)
    pair.client_send(smtp.Data())
    pair.server_send(smtp.Reply(554, "5.5.1", "No valid recipients"))
    assert pair.server.state is pair.client.state is smtp.State.RCPT


# -- SMTP smuggling ------------------------------------------------------------------------------

SMUGGLERS = [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\n.\r"]
SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\n"
    b"RCPT TO:<victim@example.org>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n\r\nforged\r\n"
)


@pytest.mark.parametrize("fake", SMUGGLERS, ids=repr)
@pytest.mark.parametrize("split", [False, True], ids=["one-read", "byte-by-byte"])
def test_smuggled_end_of_data_is_body_and_the_letter_is_rejected(fake: bytes, split: bool) -> None:
    pair = in_data()
    wire = b"Subject: real\r\n\r\nhello" + fake + SMUGGLED + b".\r\nNOOP\r\n"
    pieces = [wire[i : i + 1] for i in range(len(wire))] if split else [wire]
    items = feed_all(pair, pieces)
    assert commands_of(items) == []  # no MailFrom/RcptTo/Data: only the rejected end of data
    assert hints(items) == [R.BARE_LINE_END_IN_DATA]
    assert (R.BARE_LINE_END_IN_DATA.code, R.BARE_LINE_END_IN_DATA.enhanced) == (550, "5.6.0")
    pair.server.send(R.BARE_LINE_END_IN_DATA)
    assert pair.server.state is smtp.State.READY and pair.server.mail is None
    # the connection goes on, and only after the real terminator
    assert pair.feed_server(b"") == [smtp.Noop()]


@pytest.mark.parametrize("fake", SMUGGLERS, ids=repr)
def test_smuggling_bytes_are_not_passed_on_as_body(fake: bytes) -> None:
    pair = in_data()
    items = feed_all(pair, [b"first\r\n", b"x" + fake + SMUGGLED + b".\r\n"])
    assert b"evil" not in body_of(items)


def test_bare_lf_in_an_otherwise_normal_body_is_rejected() -> None:
    pair = in_data()
    items = pair.feed_server(b"line one\nline two\r\n.\r\n")
    assert hints(items) == [R.BARE_LINE_END_IN_DATA]


def test_bare_cr_at_a_piece_boundary_is_rejected() -> None:
    pair = in_data()
    items = feed_all(pair, [b"line\r", b"x\r\n.\r\n"])
    assert hints(items) == [R.BARE_LINE_END_IN_DATA]


def test_client_encoder_never_emits_a_premature_terminator() -> None:
    # The client passes bare LF/CR through; the server then rejects instead of ending early.
    pair = in_data()
    items = send_body(pair, b"a\n.\nMAIL FROM:<x@y.example>\r\n")
    assert commands_of(items) == [] and hints(items) == [R.BARE_LINE_END_IN_DATA]


# -- NUL, 8-bit, long lines, size ----------------------------------------------------------------


def test_nul_in_data_is_550() -> None:
    pair = in_data()
    items = pair.feed_server(b"a\x00b\r\n.\r\nNOOP\r\n")
    assert hints(items) == [R.NUL_IN_DATA]
    pair.answer_hint(items[-1])
    assert pair.server_events() == [smtp.Noop()]


def test_8bit_body_passes() -> None:
    pair = in_data()
    body = "Grüße\r\n".encode() + b"\xff\xfe raw\r\n"
    assert body_of(send_body(pair, body)) == body


def test_text_line_of_the_limit_passes_one_more_is_rejected() -> None:
    pair = in_data(smtp.Limits(text_line=100))
    items = pair.feed_server(b"x" * 98 + b"\r\n.\r\n")
    assert body_of(items) == b"x" * 98 + b"\r\n" and items[-1] == smtp.EndOfData()
    pair.server_send(QUEUED)
    pair.run(SENDER, RCPT)
    pair.client_send(smtp.Data())
    pair.server_send(R.START_INPUT)
    items = pair.feed_server(b"x" * 99 + b"\r\n.\r\nNOOP\r\n")
    assert hints(items) == [R.TEXT_LINE_TOO_LONG]
    pair.answer_hint(items[-1])
    assert pair.server_events() == [smtp.Noop()]


@pytest.mark.parametrize("step", [1, 7, 64, 1000])
def test_overlong_text_line_in_pieces_is_rejected(step: int) -> None:
    pair = in_data(smtp.Limits(text_line=100))
    wire = b"ok\r\n" + b"y" * 500 + b"\r\n.\r\nNOOP\r\n"
    items = feed_all(pair, [wire[i : i + step] for i in range(0, len(wire), step)])
    assert hints(items) == [R.TEXT_LINE_TOO_LONG]
    assert b"y" not in body_of(items)
    pair.answer_hint(items[-1])
    assert pair.server_events() == [smtp.Noop()]


def test_overlong_line_ending_with_cr_at_a_boundary_is_a_long_line_not_a_bare_cr() -> None:
    pair = in_data(smtp.Limits(text_line=100))
    items = feed_all(pair, [b"z" * 150 + b"\r", b"\n.\r\n"])
    assert hints(items) == [R.TEXT_LINE_TOO_LONG]


def test_message_over_the_size_limit_is_552_and_the_connection_survives() -> None:
    pair = in_data(smtp.Limits(message_size=100))
    items = send_body(pair, b"a" * 60 + b"\r\n", b"b" * 60 + b"\r\n")
    assert hints(items) == [R.MESSAGE_TOO_BIG]
    assert (R.MESSAGE_TOO_BIG.code, R.MESSAGE_TOO_BIG.enhanced) == (552, "5.3.4")
    assert b"b" not in body_of(items)
    pair.answer_hint(items[-1])
    assert pair.server.state is pair.client.state is smtp.State.READY
    # next transaction
    pair.run(SENDER, RCPT, smtp.Data())
    items = send_body(pair, b"small\r\n")
    assert body_of(items) == b"small\r\n" and items[-1] == smtp.EndOfData()


def test_message_of_exactly_the_size_limit_passes() -> None:
    pair = in_data(smtp.Limits(message_size=10))
    items = pair.feed_server(b"12345678\r\n.\r\n")
    assert items[-1] == smtp.EndOfData()


def test_declared_size_too_big_is_552_5_3_4() -> None:
    pair = ConnectionPair.ready(smtp.Limits(message_size=1000))
    items = pair.client_send(smtp.MailFrom(smtp.NULL_PATH, {"SIZE": "1001"}))
    assert hints(items) == [R.SIZE_DECLARED_TOO_BIG]
    assert (R.SIZE_DECLARED_TOO_BIG.code, R.SIZE_DECLARED_TOO_BIG.enhanced) == (552, "5.3.4")
    pair.answer_hint(items[0])
    assert pair.client_send(smtp.MailFrom(smtp.NULL_PATH, {"SIZE": "1000"})) == [
        smtp.MailFrom(smtp.NULL_PATH, {"SIZE": "1000"})
    ]


# -- command lines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"RSET\nMAIL FROM:<a@example.org>\r\n",
        b"RSET\rMAIL FROM:<a@example.org>\r\n",
        b"MAIL FROM:<a@example.org>\n",
        b"MAIL FROM:<a@example.org>\r\r\n",
        b"\nMAIL FROM:<a@example.org>\r\n",
    ],
    ids=repr,
)
def test_bare_line_end_in_a_command_is_500_5_5_2_and_nothing_runs(data: bytes) -> None:
    pair = ConnectionPair.ready()
    items = pair.feed_server(data + b"NOOP\r\n")
    assert hints(items) == [R.BARE_LINE_END]
    assert (R.BARE_LINE_END.code, R.BARE_LINE_END.enhanced) == (500, "5.5.2")
    pair.answer_hint(items[0])
    rest = pair.server_events()
    if data.endswith(b"\r\n"):
        assert rest == [smtp.Noop()]  # the whole line (up to CRLF) was the bad one
    else:
        assert rest == []  # "...\nNOOP\r\n" is one bad line
    assert pair.server.mail is None


@pytest.mark.parametrize("cut", range(1, 12))
def test_bare_lf_split_across_reads_is_one_error(cut: int) -> None:
    pair = ConnectionPair.ready()
    wire = b"NOOP\nRSET\r\nQUIT\r\n"
    items = feed_all(pair, [wire[:cut], wire[cut:]])
    assert hints(items) == [R.BARE_LINE_END]
    pair.answer_hint(items[-1])
    assert pair.feed_server(b"") == [smtp.Quit()]


def test_nul_in_a_command_is_500(pair: ConnectionPair) -> None:
    items = pair.feed_server(b"MAIL FROM:<a@example.org>\x00\r\nNOOP\r\n")
    assert hints(items) == [R.NUL_IN_COMMAND]
    pair.answer_hint(items[0])
    assert pair.server_events() == [smtp.Noop()] and pair.server.mail is None


@pytest.mark.parametrize("garbage", [b"\xff\xfe\xfd", b"MAIL FROM:<\xe9@example.org>", b"\xc3("])
def test_8bit_garbage_in_a_command_is_500(pair: ConnectionPair, garbage: bytes) -> None:
    [err] = pair.feed_server(garbage + b"\r\n")
    assert hints([err]) == [R.BAD_ENCODING]


def test_command_line_of_the_limit_passes_one_more_is_500() -> None:
    pair = ConnectionPair.ready(smtp.Limits(command_line=20))
    ok = b"NOOP " + b"x" * 13 + b"\r\n"
    assert len(ok) == 20 and pair.feed_server(ok) == [smtp.Noop("x" * 13)]
    pair.server_send(R.NOOP_OK)
    assert hints(pair.feed_server(b"NOOP " + b"x" * 14 + b"\r\n")) == [R.LINE_TOO_LONG]


@pytest.mark.parametrize("step", [None, 1, 5, 100, 511, 512, 513])
def test_overlong_command_line_is_500_and_its_tail_does_not_run(step: int | None) -> None:
    pair = ConnectionPair.ready()
    wire = b"NOOP " + b"x" * 600 + b"MAIL FROM:<evil@attacker.example>\r\nRSET\r\n"
    pieces = [wire] if step is None else [wire[i : i + step] for i in range(0, len(wire), step)]
    items = feed_all(pair, pieces)
    assert hints(items) == [R.LINE_TOO_LONG]
    pair.answer_hint(items[-1])
    assert pair.feed_server(b"") == [smtp.Rset()]  # the next real line
    assert pair.server.mail is None


def test_overlong_command_ending_in_cr_at_a_boundary_is_one_line_too_long() -> None:
    pair = ConnectionPair.ready()
    items = feed_all(pair, [b"N" * 600 + b"\r", b"\nNOOP\r\n"])
    assert hints(items) == [R.LINE_TOO_LONG]
    pair.answer_hint(items[-1])
    assert pair.server_events() == [smtp.Noop()]


@pytest.mark.parametrize(
    "lengths", [[0], [998], [999], [497, 999], [998, 998, 1], [500] * 9, [2000]]
)
def test_long_line_check_matches_the_exact_rule(lengths: list[int]) -> None:
    """A body is flagged exactly when one of its lines is over 1000 octets with its CRLF."""
    body = b"\r\n".join(b"y" * n for n in lengths) + b"\r\n"
    for pieces in ([body], [body[i : i + 700] for i in range(0, len(body), 700)]):
        decoder = DotDecoder(1 << 20, 1000)
        for piece in pieces:
            decoder.feed(piece)
        assert decoder.feed(b".\r\n")[1]
        assert decoder.flags.long_line == (max(lengths) + 2 > 1000), (lengths, len(pieces))
        assert not decoder.flags.bare_line_end


@given(st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n."]), max_size=60))
def test_the_line_dot_search_finds_what_a_plain_search_finds(pieces: list[bytes]) -> None:
    """The decoder looks for CRLF "." dot by dot (few dots), then with one search (many)."""
    buf = b"".join(pieces)
    assert _find_line_dot(buf) == buf.find(b"\r\n.")


@given(
    st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=40),
    st.integers(min_value=3, max_value=12),
)
def test_the_long_line_check_agrees_with_measuring_every_line(
    lengths: list[int], max_line: int
) -> None:
    """Window by window, as the decoder checks (in Python and in C), against every line
    measured (CRLF included)."""
    chunk = b"".join(b"x" * n + b"\r\n" for n in lengths)
    expected = max(lengths) + 2 > max_line
    assert _has_long_line(chunk, max_line) is expected
    scan = _built_scan()
    if scan is not None:
        assert scan.long_line(chunk, max_line) is expected


def _line_by_line(chunk: bytes) -> bool:
    """RFC 5321 §2.3.8 read literally: some CR not followed by LF, or LF not preceded by CR."""
    for i, octet in enumerate(chunk):
        if octet == 13 and chunk[i + 1 : i + 2] != b"\n":
            return True
        if octet == 10 and (i == 0 or chunk[i - 1] != 13):
            return True
    return False


def _built_scan() -> ModuleType | None:
    """The C tests (`_scan.c`) when the native build is in use (which must then have built
    them); None when pochta runs from source (no build, a stale one, POCHTA_NATIVE=0)."""
    if "pochta.smtp._data" not in pochta.running_native():
        return None
    scan = importlib.import_module("pochta.smtp._scan")
    # the decoder really uses them
    assert _data.bare_line_end is scan.bare_line_end and _data.long_line is scan.long_line
    return scan


BARE_CASES = [
    (b"", False),
    (b"x", False),
    (b"\r\n", False),
    (b"ab\r\ncd\r\n", False),
    (b"\r\n\r\n", False),
    (b"\n", True),
    (b"\r", True),
    (b"ab\ncd\r\n", True),
    (b"ab\rcd\r\n", True),
    (b"ab\r\r\n", True),
    (b"ab\r\n\n", True),
    (b"ab\n\r", True),
    (b"x" * 100 + b"\r\n" + b"y" * 100 + b"\n" + b"z" * 100 + b"\r\n", True),
]


@pytest.mark.parametrize(("chunk", "bare"), BARE_CASES)
def test_bare_line_ends_are_found(chunk: bytes, bare: bool) -> None:
    assert _line_by_line(chunk) is bare
    assert _bare_line_end(chunk) is bare
    scan = _built_scan()
    if scan is not None:
        assert scan.bare_line_end(chunk) is bare
        # any buffer (the core passes bytes: compiled, it refuses anything else)
        assert scan.bare_line_end(bytearray(chunk)) is scan.bare_line_end(memoryview(chunk)) is bare


# Long runs as well as short ones: the C loop is vectorised, with a tail after the last vector.
_OCTETS = st.sampled_from([b"\r", b"\n", b"\r\n", b"x", b".", b"\x00", b"\r\n" * 20, b"x" * 37])


@given(st.lists(_OCTETS, max_size=80))
def test_the_bare_line_end_tests_agree_with_a_literal_reading(pieces: list[bytes]) -> None:
    """The Python reference (splitlines) and the C version (one vectorised pass) against a
    byte-by-byte reading of the rule."""
    chunk = b"".join(pieces)
    expected = _line_by_line(chunk)
    assert _bare_line_end(chunk) is expected
    scan = _built_scan()
    if scan is not None:
        assert scan.bare_line_end(chunk) is expected
