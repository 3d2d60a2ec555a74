"""The client role: reading replies (RFC 5321 §4.2), EHLO keywords (§4.1.1.1), `answered`."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.smtp import replies as R


def client(state: smtp.State = smtp.State.START) -> smtp.Connection:
    return smtp.Connection(smtp.CLIENT, state=state)


def test_greeting_is_read_and_moves_to_init() -> None:
    conn = client()
    conn.receive_data(b"220 mx.example ESMTP ready\r\n")
    assert conn.next_event() == smtp.Reply(220, "", "mx.example ESMTP ready")
    assert conn.state is smtp.State.INIT and conn.answered is None


def test_554_greeting_closes() -> None:
    conn = client()
    conn.receive_data(b"554 5.7.1 go away\r\n")
    assert conn.next_event() == smtp.Reply(554, "5.7.1", "go away")
    assert conn.state is smtp.State.CLOSED


def test_ehlo_keywords_are_parsed() -> None:
    conn = client(smtp.State.INIT)
    conn.send(smtp.Ehlo("c.test"))
    conn.receive_data(
        b"250-mx.example Hello c.test\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n"
        b"250-auth PLAIN LOGIN\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
    )
    reply = conn.next_event()
    assert isinstance(reply, smtp.Reply) and reply.lines[0] == "mx.example Hello c.test"
    assert conn.peer_extensions == {
        "PIPELINING": "",
        "SIZE": "35882577",
        "AUTH": "PLAIN LOGIN",
        "8BITMIME": "",
        "ENHANCEDSTATUSCODES": "",
    }
    assert conn.answered == smtp.Ehlo("c.test") and conn.state is smtp.State.READY


def test_rejected_ehlo_keeps_init_and_allows_helo() -> None:
    conn = client(smtp.State.INIT)
    conn.send(smtp.Ehlo("c.test"))
    conn.receive_data(b"502 5.5.1 no EHLO here\r\n")
    conn.next_event()
    assert conn.state is smtp.State.INIT and conn.peer_extensions == {}
    conn.send(smtp.Helo("c.test"))
    conn.receive_data(b"250 mx.example\r\n")
    conn.next_event()
    assert conn.state is smtp.State.READY


@pytest.mark.parametrize("step", [1, 2, 3, 7, 13])
def test_multiline_reply_split_across_reads(step: int) -> None:
    conn = client(smtp.State.READY)
    conn.send(smtp.Help())
    wire = b"214-2.0.0 first\r\n214-2.0.0 second\r\n214 2.0.0 end\r\n"
    events = []
    for i in range(0, len(wire), step):
        conn.receive_data(wire[i : i + step])
        while (event := conn.next_event()) is not smtp.NEED_DATA:
            events.append(event)
    assert events == [smtp.Reply(214, "2.0.0", "first\nsecond\nend")]
    assert conn.answered == smtp.Help()


def test_several_replies_in_one_read_are_settled_in_order() -> None:
    conn = client(smtp.State.READY)
    conn.peer_extensions = {"PIPELINING": ""}
    mail = smtp.MailFrom(smtp.NULL_PATH)
    rcpt = smtp.RcptTo(smtp.path_of("b@example.org"))
    conn.send(mail)
    conn.send(rcpt)
    conn.send(smtp.Data())
    conn.receive_data(b"250 2.1.0 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
    answered = []
    while (event := conn.next_event()) is not smtp.NEED_DATA:
        answered.append((conn.answered, event.code))  # type: ignore[union-attr]
    assert answered == [(mail, 250), (rcpt, 550), (smtp.Data(), 554)]
    assert conn.state is smtp.State.MAIL


def test_lf_only_replies_are_tolerated() -> None:
    conn = client()
    conn.receive_data(b"220-mx.example\n220 ready\n")
    assert conn.next_event() == smtp.Reply(220, "", "mx.example\nready")


@pytest.mark.parametrize(
    "wire",
    [
        b"hello\r\n",
        b"2x0 nope\r\n",
        b"25\r\n",
        b"250_bad separator\r\n",
        "²²0 unicode digits\r\n".encode(),
        "٢٥٠ arabic digits\r\n".encode(),
        b"099 too low\r\n",
        b"600 too high\r\n",
        b"220-first\r\n250 mismatched code\r\n",
    ],
    ids=repr,
)
def test_malformed_reply_raises_remote_protocol_error(wire: bytes) -> None:
    conn = client()
    conn.receive_data(wire)
    with pytest.raises(smtp.RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.fatal


def test_reply_with_nothing_pending_is_a_remote_error() -> None:
    conn = client(smtp.State.READY)
    conn.receive_data(b"250 2.0.0 unsolicited\r\n")
    with pytest.raises(smtp.RemoteProtocolError):
        conn.next_event()


def test_unsolicited_421_closes() -> None:
    conn = client(smtp.State.READY)
    conn.receive_data(R.TIMEOUT.to_bytes())
    assert conn.next_event() == R.TIMEOUT
    assert conn.state is smtp.State.CLOSED and conn.answered is None


def test_endless_reply_line_is_a_remote_error() -> None:
    conn = client()
    conn.receive_data(b"220 " + b"x" * 10_000)
    with pytest.raises(smtp.RemoteProtocolError):
        conn.next_event()


def test_endless_multiline_reply_is_a_remote_error() -> None:
    conn = client()
    conn.receive_data(b"220-x\r\n" * 200)
    with pytest.raises(smtp.RemoteProtocolError):
        conn.next_event()


def test_eof_closes_the_client() -> None:
    conn = client()
    conn.receive_data(b"220 partial")
    conn.receive_data(b"")
    assert conn.next_event() == smtp.ConnectionClosed()


def test_client_data_flow() -> None:
    conn = client(smtp.State.RCPT)
    with pytest.raises(smtp.LocalProtocolError):
        conn.send(smtp.BodyChunk(b"too early"))
    conn.send(smtp.Data())
    conn.receive_data(b"354 go ahead\r\n")
    assert conn.next_event() == R.START_INPUT.with_text("go ahead")
    assert conn.state is smtp.State.DATA
    assert conn.send(smtp.BodyChunk(b".hi\r\n")) == b"..hi\r\n"
    assert conn.send(smtp.EndOfData()) == b".\r\n"
    with pytest.raises(smtp.LocalProtocolError):
        conn.send(smtp.EndOfData())
    conn.receive_data(b"250 2.0.0 queued\r\n")
    conn.next_event()
    assert conn.answered == smtp.EndOfData() and conn.state is smtp.State.READY


def test_dot_stuff_helper() -> None:
    assert smtp.dot_stuff(b"") == b".\r\n"
    assert smtp.dot_stuff(b".a\r\nb") == b"..a\r\nb\r\n.\r\n"
