"""STARTTLS (RFC 3207), AUTH (RFC 4954) and TURN/ATRN (RFC 821 §4.1.1, RFC 2645)."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.smtp import replies as R
from pochta.testing.pair import (
    AUTH_GO_ON,
    AUTH_OK,
    GREETING,
    TURN_OK,
    ConnectionPair,
    commands_of,
    ehlo_reply,
    hints,
)

SENDER = smtp.MailFrom(smtp.path_of("a@example.org"))

# -- STARTTLS ------------------------------------------------------------------------------------


def test_starttls_then_start_tls_gives_a_fresh_init_connection(pair: ConnectionPair) -> None:
    assert pair.client_send(smtp.StartTLS()) == [smtp.StartTLS()]
    pair.server_send(R.READY_FOR_TLS)
    assert pair.server.state is pair.client.state is smtp.State.TLS_PENDING
    server, client = pair.server.start_tls(), pair.client.start_tls()
    assert server.state is client.state is smtp.State.INIT
    assert server.tls and client.tls and not server.authenticated
    assert client.peer_extensions == {}  # RFC 3207 §4.2: forget what EHLO said
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(smtp.Noop())  # the old connection is done


def test_after_start_tls_mail_needs_ehlo_again(pair: ConnectionPair) -> None:
    pair.client_send(smtp.StartTLS())
    pair.server_send(R.READY_FOR_TLS)
    tls = ConnectionPair()
    tls.server, tls.client = pair.server.start_tls(), pair.client.start_tls()
    assert hints(tls.client_send(SENDER)) == [R.HELO_FIRST]
    tls.server.send(R.HELO_FIRST)
    tls.client.receive_data(R.HELO_FIRST.to_bytes())
    assert tls.client.next_event() == R.HELO_FIRST
    tls.client_send(smtp.Ehlo("c.test"))
    tls.server_send(ehlo_reply(smtp.ALL_EXTENSIONS))
    assert tls.client_send(SENDER) == [SENDER]


def test_plaintext_pipelined_after_starttls_is_fatal_554(pair: ConnectionPair) -> None:
    items = pair.feed_server(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\n")
    assert commands_of(items) == []
    [err] = items
    assert isinstance(err, smtp.RemoteProtocolError) and err.fatal
    assert err.reply_hint == R.PIPELINED_STARTTLS
    assert (R.PIPELINED_STARTTLS.code, R.PIPELINED_STARTTLS.enhanced) == (554, "5.5.1")
    assert pair.server.trailing_data[0] == b""  # the injected bytes are gone


def test_plaintext_arriving_before_start_tls_is_fatal(pair: ConnectionPair) -> None:
    pair.client_send(smtp.StartTLS())
    pair.server_send(R.READY_FOR_TLS)
    pair.server.receive_data(b"RSET\r\n")
    with pytest.raises(smtp.RemoteProtocolError) as info:
        pair.server.start_tls()
    assert info.value.fatal and info.value.reply_hint == R.PIPELINED_STARTTLS


def test_starttls_refused_keeps_the_session(pair: ConnectionPair) -> None:
    pair.client_send(smtp.StartTLS())
    pair.server_send(smtp.Reply(454, "4.7.0", "TLS not available"))
    assert pair.server.state is pair.client.state is smtp.State.READY
    with pytest.raises(smtp.LocalProtocolError):
        pair.server.start_tls()


def test_starttls_twice_is_503() -> None:
    server = smtp.Connection(smtp.SERVER, state=smtp.State.READY, tls=True)
    server.receive_data(b"STARTTLS\r\n")
    with pytest.raises(smtp.RemoteProtocolError) as info:
        server.next_event()
    assert info.value.reply_hint == R.ALREADY_TLS


def test_starttls_before_ehlo_is_503() -> None:
    pair = ConnectionPair()
    pair.greet()
    assert hints(pair.client_send(smtp.StartTLS())) == [R.HELO_FIRST]


# -- AUTH ----------------------------------------------------------------------------------------


def test_auth_334_keeps_auth_pending_and_235_authenticates(pair: ConnectionPair) -> None:
    assert pair.client_send(smtp.Auth("LOGIN")) == [smtp.Auth("LOGIN")]
    [reply] = pair.server_send(smtp.Reply(334, "", "VXNlcm5hbWU6"))
    assert isinstance(reply, smtp.Reply) and reply.code == 334
    assert pair.client.answered == smtp.Auth("LOGIN")
    assert pair.server.state is pair.client.state is smtp.State.AUTH
    assert pair.client_send(smtp.AuthResponse(b"alice")) == [smtp.AuthResponse(b"alice")]
    pair.server_send(smtp.Reply(334, "", "UGFzc3dvcmQ6"))
    assert pair.server.state is pair.client.state is smtp.State.AUTH
    assert pair.client_send(smtp.AuthResponse(b"secret")) == [smtp.AuthResponse(b"secret")]
    [reply] = pair.server_send(AUTH_OK)
    assert reply == AUTH_OK and pair.client.answered == smtp.Auth("LOGIN")
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert pair.server.authenticated and pair.client.authenticated


def test_auth_with_initial_response(pair: ConnectionPair) -> None:
    cmd = smtp.Auth("PLAIN", b"\x00alice\x00secret")
    assert pair.client_send(cmd) == [cmd]
    pair.server_send(AUTH_OK)
    assert pair.server.authenticated and pair.client.authenticated


def test_auth_failure_returns_to_ready_unauthenticated(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Auth("PLAIN"))
    pair.server_send(AUTH_GO_ON)
    pair.client_send(smtp.AuthResponse(b"\x00alice\x00wrong"))
    pair.server_send(smtp.Reply(535, "5.7.8", "Authentication credentials invalid"))
    assert pair.server.state is pair.client.state is smtp.State.READY
    assert not pair.server.authenticated and not pair.client.authenticated
    assert pair.client_send(smtp.Auth("PLAIN")) == [smtp.Auth("PLAIN")]  # may try again


def test_auth_star_cancels(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Auth("PLAIN"))
    pair.server_send(AUTH_GO_ON)
    assert pair.client.send(smtp.AuthResponse(b"", cancelled=True)) == b"*\r\n"
    assert pair.feed_server(b"*\r\n") == [smtp.AuthResponse(b"", cancelled=True)]
    pair.server_send(R.AUTH_CANCELLED)
    assert pair.server.state is pair.client.state is smtp.State.READY


def test_auth_bad_base64_is_501_5_5_2_and_ends_the_exchange(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Auth("PLAIN"))
    pair.server_send(AUTH_GO_ON)
    [err] = pair.feed_server(b"not base64!\r\n")
    assert hints([err]) == [R.AUTH_BAD_BASE64]
    assert (R.AUTH_BAD_BASE64.code, R.AUTH_BAD_BASE64.enhanced) == (501, "5.5.2")
    [reply] = pair.answer_hint(err)
    assert reply == R.AUTH_BAD_BASE64
    assert pair.server.state is pair.client.state is smtp.State.READY


def test_auth_line_too_long_is_500_5_5_6() -> None:
    pair = ConnectionPair.ready(smtp.Limits(auth_line=100))
    pair.client_send(smtp.Auth("PLAIN"))
    pair.server_send(AUTH_GO_ON)
    [err] = pair.feed_server(b"QUFB" * 50 + b"\r\nNOOP\r\n")
    assert hints([err]) == [R.AUTH_LINE_TOO_LONG]
    pair.answer_hint(err)
    assert pair.server.state is smtp.State.READY
    assert pair.server_events() == [smtp.Noop()]


def test_auth_lines_need_a_reply_each(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Auth("LOGIN"))
    pair.server_send(AUTH_GO_ON)
    pair.feed_server(b"YQ==\r\nYg==\r\n")
    with pytest.raises(smtp.LocalProtocolError):
        pair.server.next_event()


def test_second_auth_is_503(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Auth("PLAIN", b"\x00a\x00b"))
    pair.server_send(AUTH_OK)
    assert hints(pair.client_send(smtp.Auth("PLAIN"))) == [R.ALREADY_AUTHENTICATED]


def test_auth_response_outside_auth_is_a_local_error(pair: ConnectionPair) -> None:
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.send(smtp.AuthResponse(b"x"))


def test_auth_lines_are_not_commands(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Auth("LOGIN"))
    pair.server_send(AUTH_GO_ON)
    [err] = pair.feed_server(b"MAIL FROM:<a@example.org>\r\n")
    assert hints([err]) == [R.AUTH_BAD_BASE64]


# -- TURN / ATRN ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [smtp.Turn(), smtp.Atrn(("example.org",))])
def test_turn_swaps_roles(pair: ConnectionPair, cmd: smtp.Command) -> None:
    assert pair.client_send(cmd) == [cmd]
    assert pair.server_send(TURN_OK) == [TURN_OK, smtp.Turned()]
    assert pair.client.answered == cmd
    assert pair.server.next_event() == smtp.Turned()
    assert pair.client.next_event() == smtp.Turned()
    new_server, new_client = pair.client.turned(), pair.server.turned()
    assert new_server.our_role is smtp.SERVER and new_client.our_role is smtp.CLIENT
    assert new_server.state is new_client.state is smtp.State.START
    assert pair.client.state is pair.server.state is smtp.State.CLOSED
    # RFC 821 §4.1.1: the new server greets, then the new client says EHLO
    swapped = ConnectionPair()
    swapped.server, swapped.client = new_server, new_client
    assert swapped.greet() == [GREETING]
    assert swapped.client_send(smtp.Ehlo("old-server.test")) == [smtp.Ehlo("old-server.test")]


def test_turn_passes_on_bytes_already_buffered(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Turn())
    pair.server_send(TURN_OK)
    new_server = pair.client.turned()
    # the greeting reaches the old server before it has called turned()
    pair.server.receive_data(new_server.send(GREETING))
    assert pair.server.next_event() == smtp.Turned()
    new_client = pair.server.turned()
    assert new_client.next_event() == GREETING
    assert new_client.state is smtp.State.INIT


def test_turn_refused_keeps_the_roles(pair: ConnectionPair) -> None:
    pair.client_send(smtp.Turn())
    pair.server_send(smtp.Reply(502, "5.5.1", "TURN disabled"))
    assert pair.server.state is pair.client.state is smtp.State.READY
    with pytest.raises(smtp.LocalProtocolError):
        pair.server.turned()


def test_turn_inside_a_transaction_is_503(pair: ConnectionPair) -> None:
    pair.run(SENDER)
    assert hints(pair.client_send(smtp.Turn())) == [R.BAD_SEQUENCE]


def test_etrn_is_answered_and_changes_nothing(pair: ConnectionPair) -> None:
    assert pair.client_send(smtp.Etrn("#queue")) == [smtp.Etrn("#queue")]
    pair.server_send(smtp.Reply(250, "2.0.0", "Queue run started"))
    assert pair.server.state is pair.client.state is smtp.State.READY
