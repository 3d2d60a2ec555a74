"""CHUNKING / BDAT (RFC 3030) and BINARYMIME."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.smtp import replies as R
from pochta.testing.pair import CHUNK_OK, QUEUED, ConnectionPair, body_of, commands_of, hints

SENDER = smtp.MailFrom(smtp.path_of("a@example.org"))
RCPT = smtp.RcptTo(smtp.path_of("b@example.org"))


def in_rcpt(limits: smtp.Limits | None = None, sender: smtp.MailFrom = SENDER) -> ConnectionPair:
    pair = ConnectionPair.ready(limits)
    pair.run(sender, RCPT)
    assert pair.server.state is pair.client.state is smtp.State.RCPT
    return pair


def bdat(data: bytes, last: bool = False) -> smtp.Bdat:
    return smtp.Bdat(len(data), last, data)


def test_chunks_arrive_as_body_then_the_bdat_command() -> None:
    pair = in_rcpt()
    items = pair.client_send(bdat(b"Subject: x\r\n"))
    assert items == [smtp.BodyChunk(b"Subject: x\r\n"), smtp.Bdat(12, False)]
    [reply] = pair.server_send(CHUNK_OK)
    assert reply == CHUNK_OK and pair.client.answered == bdat(b"Subject: x\r\n")
    assert pair.server.state is pair.client.state is smtp.State.BDAT
    items = pair.client_send(bdat(b"\r\nbody", last=True))
    assert items == [smtp.BodyChunk(b"\r\nbody"), smtp.Bdat(6, True)]
    pair.server_send(QUEUED)
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.mail is None


def test_chunk_bytes_are_not_unstuffed_or_checked() -> None:
    pair = in_rcpt()
    raw = b".\r\n..x\n\r\x00\r\n.\r\n"
    assert body_of(pair.client_send(bdat(raw, last=True))) == raw


def test_bdat_zero_last_ends_the_message() -> None:
    pair = in_rcpt()
    pair.client_send(bdat(b"abc"))
    pair.server_send(CHUNK_OK)
    assert pair.client_send(smtp.Bdat(0, True)) == [smtp.Bdat(0, True)]
    pair.server_send(QUEUED)
    assert pair.server.state is smtp.State.READY


def test_chunks_split_across_reads() -> None:
    pair = in_rcpt()
    wire = pair.client.send(bdat(b"0123456789", last=True)) + b"NOOP\r\n"
    items: list[object] = []
    for i in range(len(wire)):
        items.extend(pair.feed_server(wire[i : i + 1]))
        if items and isinstance(items[-1], smtp.Bdat):
            pair.server.receive_data(wire[i + 1 :])
            break
    assert body_of(items) == b"0123456789" and items[-1] == smtp.Bdat(10, True)
    pair.server_send(QUEUED)
    assert pair.server_events() == [smtp.Noop()]


def test_pipelined_chunks_settle_in_order() -> None:
    pair = in_rcpt()
    seen, got = pair.run(bdat(b"one"), bdat(b"two"), bdat(b"three", last=True))
    assert body_of(seen) == b"onetwothree"
    assert commands_of(seen) == [smtp.Bdat(3, False), smtp.Bdat(3, False), smtp.Bdat(5, True)]
    assert got == [CHUNK_OK, CHUNK_OK, QUEUED]
    assert pair.client.answered == bdat(b"three", last=True)


def test_bdat_before_mail_consumes_the_chunk_and_is_503(pair: ConnectionPair) -> None:
    chunk = b"RCPT TO:<victim@example.org>\r\n"
    items = pair.feed_server(b"BDAT %d\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert commands_of(items) == [] and hints(items) == [R.NEED_MAIL_FIRST]
    assert body_of(items) == b""
    pair.server.send(R.NEED_MAIL_FIRST)
    assert pair.server_events() == [smtp.Noop()]  # "RCPT ..." was chunk data, never a command


def test_bdat_before_rcpt_is_503_and_keeps_the_transaction() -> None:
    pair = ConnectionPair.ready()
    pair.run(SENDER)
    items = pair.feed_server(b"BDAT 4 LAST\r\nDATA")
    assert hints(items) == [R.NEED_RCPT_FIRST]
    pair.server.send(R.NEED_RCPT_FIRST)
    assert pair.server.state is smtp.State.MAIL


def test_chunk_bytes_that_look_like_commands_are_not_executed() -> None:
    pair = in_rcpt()
    smuggled = b"\r\n.\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<v@example.org>\r\n"
    items = pair.client_send(bdat(smuggled, last=True))
    assert commands_of(items) == [smtp.Bdat(len(smuggled), True)]
    assert body_of(items) == smuggled


def test_bdat_without_chunking_is_502_and_the_chunk_is_consumed() -> None:
    pair = ConnectionPair.ready(extensions=frozenset({"PIPELINING"}))
    pair.run(SENDER, RCPT)
    items = pair.feed_server(b"BDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert hints(items) == [R.NOT_IMPLEMENTED]
    pair.server.send(R.NOT_IMPLEMENTED)
    assert pair.server_events() == [smtp.Noop()]


def test_oversize_chunk_is_552_5_3_4_and_ends_the_transaction() -> None:
    pair = in_rcpt(smtp.Limits(message_size=10))
    pair.client_send(bdat(b"123456"))
    pair.server_send(CHUNK_OK)
    items = pair.client_send(bdat(b"7890X", last=True))
    assert hints(items) == [R.BDAT_TOO_BIG] and body_of(items) == b""
    assert (R.BDAT_TOO_BIG.code, R.BDAT_TOO_BIG.enhanced) == (552, "5.3.4")
    [reply] = pair.answer_hint(items[-1])
    assert reply == R.BDAT_TOO_BIG
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.mail is None
    # the connection goes on with a new transaction; the size count starts again
    pair.run(SENDER, RCPT)
    assert body_of(pair.client_send(bdat(b"1234567890", last=True))) == b"1234567890"


def test_failed_chunk_ends_the_transaction() -> None:  # RFC 3030 §2
    pair = in_rcpt()
    pair.client_send(bdat(b"abc"))
    pair.server_send(smtp.Reply(452, "4.3.1", "Insufficient storage"))
    assert pair.server.state is pair.client.state is smtp.State.READY


def test_data_inside_a_bdat_transaction_is_503() -> None:
    pair = in_rcpt()
    pair.client_send(bdat(b"abc"))
    pair.server_send(CHUNK_OK)
    assert hints(pair.client_send(smtp.Data())) == [R.BDAT_DATA_MIX]


def test_rcpt_inside_a_bdat_transaction_is_503() -> None:
    pair = in_rcpt()
    pair.client_send(bdat(b"abc"))
    pair.server_send(CHUNK_OK)
    assert hints(pair.client_send(RCPT)) == [R.BAD_SEQUENCE]


def test_rset_inside_a_bdat_transaction_resets() -> None:
    pair = in_rcpt()
    pair.client_send(bdat(b"abc"))
    pair.server_send(CHUNK_OK)
    pair.client_send(smtp.Rset())
    pair.server_send(R.RESET_OK)
    assert pair.server.state is pair.client.state is smtp.State.READY


def test_binarymime_with_data_is_refused() -> None:  # RFC 3030 §3
    pair = in_rcpt(sender=smtp.MailFrom(smtp.NULL_PATH, {"BODY": "BINARYMIME"}))
    [err] = pair.client_send(smtp.Data())
    [reply] = hints([err])
    assert reply.code == 503 and reply.enhanced == "5.5.1"
    pair.answer_hint(err)
    assert body_of(pair.client_send(bdat(b"\x00\x01binary", last=True))) == b"\x00\x01binary"


def test_bdat_syntax_error_is_501(pair: ConnectionPair) -> None:
    for line in (b"BDAT\r\n", b"BDAT x\r\n", b"BDAT -1\r\n", b"BDAT 5 FIRST\r\n"):
        [err] = pair.feed_server(line)
        assert hints([err]) == [R.SYNTAX_ERROR], line
        pair.server.send(R.SYNTAX_ERROR)


def test_client_bdat_size_must_match_its_data() -> None:
    pair = in_rcpt()
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(smtp.Bdat(5, False, b"abc"))


def test_eof_inside_a_chunk_closes() -> None:
    pair = in_rcpt()
    pair.feed_server(b"BDAT 100\r\npartial")
    pair.server.receive_data(b"")
    assert pair.server_events() == [smtp.ConnectionClosed()]
