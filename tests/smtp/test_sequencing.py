"""Command sequencing (RFC 5321 §4.1.4, §3.3) and PIPELINING (RFC 2920)."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.smtp import replies as R
from pochta.testing.pair import ConnectionPair, commands_of, ehlo_reply, hints, replies_of

SENDER = smtp.MailFrom(smtp.path_of("a@example.org"))
RCPT_B = smtp.RcptTo(smtp.path_of("b@example.org"))
RCPT_C = smtp.RcptTo(smtp.path_of("c@example.org"))


def test_greeting_moves_both_sides_to_init() -> None:
    pair = ConnectionPair()
    assert pair.server.state is pair.client.state is smtp.State.START
    pair.greet()
    assert pair.server.state is pair.client.state is smtp.State.INIT


def test_mail_before_ehlo_is_503() -> None:
    pair = ConnectionPair()
    pair.greet()
    [err] = pair.client_send(SENDER)
    assert hints([err]) == [R.HELO_FIRST]
    [reply] = pair.answer_hint(err)
    assert reply == R.HELO_FIRST and pair.client.answered == SENDER
    assert pair.server.state is pair.client.state is smtp.State.INIT


def test_rcpt_before_mail_is_503(pair: ConnectionPair) -> None:
    [err] = pair.client_send(RCPT_B)
    assert hints([err]) == [R.NEED_MAIL_FIRST]
    assert (R.NEED_MAIL_FIRST.code, R.NEED_MAIL_FIRST.enhanced) == (503, "5.5.1")
    pair.answer_hint(err)
    assert pair.server.state is pair.client.state is smtp.State.READY


def test_data_before_mail_is_503(pair: ConnectionPair) -> None:
    assert hints(pair.client_send(smtp.Data())) == [R.NEED_MAIL_FIRST]


def test_data_before_rcpt_is_503(pair: ConnectionPair) -> None:
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    [err] = pair.client_send(smtp.Data())
    assert hints([err]) == [R.NEED_RCPT_FIRST]
    pair.answer_hint(err)
    assert pair.server.state is pair.client.state is smtp.State.MAIL


def test_nested_mail_is_503(pair: ConnectionPair) -> None:
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    assert hints(pair.client_send(SENDER)) == [R.NESTED_MAIL]


def test_rejected_mail_leaves_no_transaction(pair: ConnectionPair) -> None:
    pair.client_send(SENDER)
    pair.server_send(smtp.Reply(550, "5.7.1", "no"))
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.mail is None
    assert hints(pair.client_send(RCPT_B)) == [R.NEED_MAIL_FIRST]


def test_rset_resets_the_transaction(pair: ConnectionPair) -> None:
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    pair.client_send(RCPT_B)
    pair.server_send(R.RECIPIENT_OK)
    assert pair.server.mail == SENDER
    assert pair.client_send(smtp.Rset()) == [smtp.Rset()]
    pair.server_send(R.RESET_OK)
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.mail is None
    assert hints(pair.client_send(RCPT_B)) == [R.NEED_MAIL_FIRST]


def test_rset_before_ehlo_stays_in_init() -> None:
    pair = ConnectionPair()
    pair.greet()
    pair.client_send(smtp.Rset())
    pair.server_send(R.RESET_OK)
    assert pair.server.state is pair.client.state is smtp.State.INIT


def test_ehlo_resets_a_transaction(pair: ConnectionPair) -> None:
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    pair.client_send(RCPT_B)
    pair.server_send(R.RECIPIENT_OK)
    pair.client_send(smtp.Ehlo("again.test"))
    pair.server_send(ehlo_reply(smtp.ALL_EXTENSIONS))
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.mail is None
    assert hints(pair.client_send(smtp.Data())) == [R.NEED_MAIL_FIRST]


def test_noop_help_vrfy_are_allowed_inside_a_transaction(pair: ConnectionPair) -> None:
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    for cmd in (smtp.Noop(), smtp.Help(), smtp.Vrfy("x")):
        assert pair.client_send(cmd) == [cmd]
        pair.server_send(R.OK)
        assert pair.server.state is smtp.State.MAIL


@pytest.mark.parametrize("cmd", [smtp.StartTLS(), smtp.Auth("PLAIN"), smtp.Turn()])
def test_session_commands_inside_a_transaction_are_503(
    pair: ConnectionPair, cmd: smtp.Command
) -> None:
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    assert hints(pair.client_send(cmd)) == [R.BAD_SEQUENCE]


def test_recipients_limit_is_452_4_5_3() -> None:
    pair = ConnectionPair.ready(smtp.Limits(recipients=2))
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    for n in range(2):
        pair.client_send(smtp.RcptTo(smtp.path_of(f"r{n}@example.org")))
        pair.server_send(R.RECIPIENT_OK)
    [err] = pair.client_send(RCPT_B)
    assert hints([err]) == [R.TOO_MANY_RECIPIENTS]
    assert (R.TOO_MANY_RECIPIENTS.code, R.TOO_MANY_RECIPIENTS.enhanced) == (452, "4.5.3")
    pair.answer_hint(err)
    assert pair.client_send(smtp.Data()) == [smtp.Data()]  # the transaction goes on


def test_rejected_recipients_do_not_count_towards_the_limit() -> None:
    pair = ConnectionPair.ready(smtp.Limits(recipients=1))
    pair.client_send(SENDER)
    pair.server_send(R.SENDER_OK)
    pair.client_send(RCPT_B)
    pair.server_send(smtp.Reply(550, "5.1.1", "no such user"))
    assert pair.client_send(RCPT_C) == [RCPT_C]


def test_recipient_count_restarts_with_each_transaction() -> None:
    pair = ConnectionPair.ready(smtp.Limits(recipients=1))
    for _ in range(2):
        pair.client_send(SENDER)
        pair.server_send(R.SENDER_OK)
        assert pair.client_send(RCPT_B) == [RCPT_B]
        pair.server_send(R.RECIPIENT_OK)
        pair.client_send(smtp.Rset())
        pair.server_send(R.RESET_OK)


def test_quit_closes_both_sides(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Quit())
    pair.server_send(R.BYE)
    assert pair.server.state is pair.client.state is smtp.State.CLOSED
    assert pair.server.next_event() == smtp.ConnectionClosed()
    assert pair.client.next_event() == smtp.ConnectionClosed()
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(smtp.Noop())


def test_421_closes_both_sides_even_unsolicited(pair: ConnectionPair) -> None:
    pair.server_send(R.SHUTTING_DOWN)
    assert pair.server.state is pair.client.state is smtp.State.CLOSED


def test_eof_closes_the_server() -> None:
    server = smtp.Connection(smtp.SERVER, state=smtp.State.READY)
    server.receive_data(b"NOOP")
    server.receive_data(b"")
    assert server.next_event() == smtp.ConnectionClosed()
    assert server.state is smtp.State.CLOSED
    assert server.trailing_data == (b"NOOP", True)


def test_reply_with_nothing_to_answer_is_a_local_error(pair: ConnectionPair) -> None:
    with pytest.raises(smtp.LocalProtocolError):
        pair.server.send(R.OK)


def test_next_event_before_replying_is_a_local_error(pair: ConnectionPair) -> None:
    pair.feed_server(b"NOOP\r\nNOOP\r\n")
    with pytest.raises(smtp.LocalProtocolError):
        pair.server.next_event()


def test_roles_cannot_send_each_others_events(pair: ConnectionPair) -> None:
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(R.OK)
    with pytest.raises(smtp.LocalProtocolError):
        pair.server.send(smtp.Noop())


# -- PIPELINING (RFC 2920) -----------------------------------------------------------------------


def test_pipelined_group_gives_events_in_order_and_replies_settle_in_order(
    pair: ConnectionPair,
) -> None:
    wire = b"".join(pair.client.send(c) for c in (SENDER, RCPT_B, RCPT_C, smtp.Data()))
    pair.server.receive_data(wire)  # one read holds the whole group
    answers = [R.SENDER_OK, smtp.Reply(550, "5.1.1", "no such user"), R.RECIPIENT_OK]
    seen: list[object] = []
    for expected, reply in zip((SENDER, RCPT_B, RCPT_C), answers, strict=True):
        event = pair.server.next_event()
        assert event == expected
        seen.append(event)
        [got] = pair.server_send(reply)
        assert got == reply and pair.client.answered == expected
    assert pair.server.next_event() == smtp.Data()
    [got] = pair.server_send(R.START_INPUT)
    assert got == R.START_INPUT and pair.client.answered == smtp.Data()
    assert pair.server.state is pair.client.state is smtp.State.DATA


def test_pipelined_replies_in_one_read_settle_in_order(pair: ConnectionPair) -> None:
    wire = b"".join(pair.client.send(c) for c in (SENDER, RCPT_B, smtp.Data()))
    pair.server.receive_data(wire)
    out = b""
    for reply in (R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT):
        pair.server.next_event()
        out += pair.server.send(reply)
    pair.client.receive_data(out)
    for command, reply in zip(
        (SENDER, RCPT_B, smtp.Data()), (R.SENDER_OK, R.RECIPIENT_OK, R.START_INPUT), strict=True
    ):
        assert pair.client.next_event() == reply
        assert pair.client.answered == command
    assert pair.client.state is smtp.State.DATA


def test_pipelined_errors_settle_their_own_line(pair: ConnectionPair) -> None:
    pair.server.receive_data(b"MAIL FROM:<a@example.org>\r\nBOGUS\r\nRCPT TO:<b@example.org>\r\n")
    assert pair.server.next_event() == SENDER
    pair.server.send(R.SENDER_OK)
    with pytest.raises(smtp.RemoteProtocolError) as info:
        pair.server.next_event()
    assert info.value.reply_hint == R.UNRECOGNIZED
    pair.server.send(R.UNRECOGNIZED)
    assert pair.server.next_event() == RCPT_B


def test_pipelining_without_advertisement_is_a_local_error() -> None:
    pair = ConnectionPair.ready(extensions=smtp.ALL_EXTENSIONS - {"PIPELINING"})
    assert "PIPELINING" not in pair.client.peer_extensions
    pair.client.send(SENDER)
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(RCPT_B)


@pytest.mark.parametrize(
    "ender",
    [smtp.Data(), smtp.Ehlo("x"), smtp.Noop(), smtp.Vrfy("x"), smtp.Quit(), smtp.StartTLS()],
)
def test_client_cannot_pipeline_after_a_group_ending_command(
    pair: ConnectionPair, ender: smtp.Command
) -> None:
    pair.client.send(ender)
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(smtp.Rset())


def test_client_may_send_again_once_the_group_is_answered(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Noop())
    pair.server_send(R.NOOP_OK)
    assert pair.client_send(smtp.Rset()) == [smtp.Rset()]


def test_mail_may_be_pipelined_after_end_of_data(pair: ConnectionPair) -> None:
    pair.server.receive_data(b"".join(pair.client.send(c) for c in (SENDER, RCPT_B, smtp.Data())))
    pair.serve()
    wire = pair.client.send(smtp.BodyChunk(b"hi\r\n"))
    wire += pair.client.send(smtp.EndOfData()) + pair.client.send(SENDER)
    assert pair.feed_server(wire) == [smtp.BodyChunk(b"hi\r\n"), smtp.EndOfData()]
    pair.server_send(R.OK)
    assert pair.client.answered == smtp.EndOfData()
    assert pair.server_events() == [SENDER]


def test_helo_gives_no_extensions_to_the_client() -> None:
    pair = ConnectionPair()
    pair.greet()
    pair.client_send(smtp.Helo("c.test"))
    pair.server_send(smtp.Reply(250, "", "server.test"))
    assert pair.client.peer_extensions == {}
    pair.client.send(SENDER)
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(RCPT_B)


def test_serve_answers_a_whole_pipelined_group(pair: ConnectionPair) -> None:
    group = (SENDER, RCPT_B, RCPT_C, smtp.Data())
    pair.server.receive_data(b"".join(pair.client.send(c) for c in group))
    seen, got = pair.serve()
    assert commands_of(seen) == list(group)
    assert replies_of(got) == [R.SENDER_OK, R.RECIPIENT_OK, R.RECIPIENT_OK, R.START_INPUT]
