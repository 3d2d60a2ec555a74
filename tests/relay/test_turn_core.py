"""The sans-IO role swap of TURN/ATRN (RFC 821 §4.1.1, RFC 2645 §4.2): after a 250 each side's
connection becomes the other role in its initial state, carrying the bytes already received."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.testing.pair import GREETING, ConnectionPair, ehlo_reply

TURNING = smtp.Reply(250, "2.0.0", "OK, now reversing the connection")


def _swap(pair: ConnectionPair, command: smtp.Command) -> tuple[smtp.Connection, smtp.Connection]:
    """Provider (old server) and customer (old client) after a 250 to `command`."""
    assert pair.client_send(command) == [command]
    got = pair.server_send(TURNING)
    assert got == [TURNING, smtp.Turned()]
    assert pair.server.state is smtp.State.TURNED
    assert pair.client.state is smtp.State.TURNED
    assert pair.server.next_event() == smtp.Turned()
    return pair.server.turned(), pair.client.turned()


@pytest.mark.parametrize("command", [smtp.Atrn(("branch.test",)), smtp.Atrn(), smtp.Turn()])
def test_swap_gives_each_side_the_others_initial_state(command: smtp.Command) -> None:
    pair = ConnectionPair.ready()
    old_server, old_client = pair.server, pair.client
    provider, customer = _swap(pair, command)
    assert provider.our_role is smtp.CLIENT and customer.our_role is smtp.SERVER
    for conn in (provider, customer):
        fresh = smtp.Connection(conn.our_role)
        assert conn.state is fresh.state is smtp.State.START
        assert conn.greeted is fresh.greeted is False
        assert conn.authenticated is False
        assert conn.peer_extensions == {}
        assert conn.mail is None
        assert conn.trailing_data == (b"", False)
    # the old connections are finished: nothing more may be sent on them
    assert old_server.state is smtp.State.CLOSED and old_client.state is smtp.State.CLOSED
    with pytest.raises(smtp.LocalProtocolError):
        old_client.send(smtp.Noop())


def test_bytes_received_before_the_swap_are_passed_on() -> None:
    pair = ConnectionPair.ready()
    pair.client_send(smtp.Atrn(("branch.test",)))
    pair.server_send(TURNING)
    # the customer's greeting reaches the provider before it called turned(), and the
    # provider's EHLO reaches the customer before it did
    pair.server.receive_data(GREETING.to_bytes())
    pair.client.receive_data(b"EHLO mx.mail.test\r\n")
    provider, customer = pair.server.turned(), pair.client.turned()
    assert provider.next_event() == GREETING
    assert provider.state is smtp.State.INIT
    customer.send(GREETING)  # the customer greets, then sees the buffered command
    assert customer.next_event() == smtp.Ehlo("mx.mail.test")


def test_eof_before_the_swap_is_passed_on() -> None:
    pair = ConnectionPair.ready()
    pair.client_send(smtp.Turn())
    pair.server_send(TURNING)
    pair.server.receive_data(b"")
    provider = pair.server.turned()
    assert provider.next_event() == smtp.ConnectionClosed()


def test_a_whole_letter_flows_the_other_way_after_the_swap() -> None:
    pair = ConnectionPair.ready()
    provider, customer = _swap(pair, smtp.Atrn(("branch.test",)))
    swapped = ConnectionPair()
    swapped.server, swapped.client = customer, provider
    swapped.greet()
    swapped.client_send(smtp.Ehlo("mx.mail.test"))
    swapped.server_send(ehlo_reply(smtp.ALL_EXTENSIONS))
    seen, got = swapped.run(
        smtp.MailFrom(smtp.path_of("alice@mail.test")),
        smtp.RcptTo(smtp.path_of("bob@branch.test")),
        smtp.Data(),
    )
    assert [r.code for r in got if isinstance(r, smtp.Reply)] == [250, 250, 354]
    swapped.client_send(smtp.BodyChunk(b"Subject: hi\r\n\r\nbody\r\n"))
    seen, got = swapped.run(smtp.EndOfData())
    assert any(isinstance(e, smtp.EndOfData) for e in seen)
    assert customer.state is smtp.State.READY and provider.state is smtp.State.READY


@pytest.mark.parametrize("code", [450, 453, 530, 502])
def test_refused_atrn_does_not_swap(code: int) -> None:
    pair = ConnectionPair.ready()
    pair.client_send(smtp.Atrn(("branch.test",)))
    reply = smtp.Reply(code, f"{code // 100}.0.0", "no")
    assert pair.server_send(reply) == [reply]
    assert pair.server.state is smtp.State.READY and pair.client.state is smtp.State.READY
    with pytest.raises(smtp.LocalProtocolError):
        pair.client.turned()
