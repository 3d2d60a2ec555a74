"""Raw-socket dialogs with the provider: ATRN (RFC 2645) and TURN (RFC 821 §4.1.1) replies, the
role swap on the same connection, concurrent takers and a connection cut mid-transfer."""

from __future__ import annotations

import asyncio
from pathlib import Path

from relayhelp import (
    CUSTOMER_IP,
    Customer,
    Provider,
    Raw,
    eventually,
    open_sqlite,
    start_provider,
)

from pochta.store.api import RcptState


async def _atrn(provider: Provider, user: str | None, arg: str = "branch.test") -> Raw:
    raw = await Raw.open(provider.ports["odmr"], local=CUSTOMER_IP)
    if user is None:
        assert (await raw.cmd("EHLO branch.test"))[0] == 250
    else:
        await raw.login(user)
    return raw


async def test_odmr_ehlo_offers_atrn_and_auth(provider: Provider) -> None:
    raw = await Raw.open(provider.ports["odmr"])
    code, text = await raw.cmd("EHLO branch.test")
    assert code == 250
    assert "ATRN" in text.split("\n") and any(x.startswith("AUTH ") for x in text.split("\n"))
    await raw.close()


async def test_atrn_without_auth_is_530(provider: Provider) -> None:
    await provider.hold()
    raw = await _atrn(provider, None)
    code, text = await raw.cmd("ATRN branch.test")
    assert (code, text.split()[0]) == (530, "5.7.0")
    assert (await raw.cmd("ATRN"))[0] == 530
    await raw.close()
    assert await provider.queued() == 1


async def test_atrn_for_a_domain_of_someone_else_is_530(provider: Provider) -> None:
    await provider.hold()
    raw = await _atrn(provider, "other@mail.test")
    code, text = await raw.cmd("ATRN branch.test")
    assert code == 530 and "branch.test" in text
    code, _ = await raw.cmd("ATRN")  # other@ owns no relay domain at all
    assert code == 530
    await raw.close()
    raw = await _atrn(provider, "cust@mail.test")
    code, text = await raw.cmd("ATRN branch.test,elsewhere.test")
    assert code == 530 and "elsewhere.test" in text
    await raw.close()
    assert await provider.queued() == 1


async def test_atrn_bad_syntax_is_501(provider: Provider) -> None:
    raw = await _atrn(provider, "cust@mail.test")
    assert (await raw.cmd("ATRN branch.test,,x.test"))[0] == 501
    assert (await raw.cmd("ATRN bad_domain!"))[0] == 501
    await raw.close()


async def test_atrn_with_no_mail_is_453(provider: Provider) -> None:
    raw = await _atrn(provider, "cust@mail.test")
    assert (await raw.cmd("ATRN branch.test"))[0] == 453
    assert (await raw.cmd("ATRN"))[0] == 453
    assert (await raw.cmd("NOOP"))[0] == 250  # the session goes on after a refusal
    await raw.close()


async def test_atrn_not_on_the_mx_port(provider: Provider) -> None:
    await provider.hold()
    raw = await Raw.open(provider.ports["mx"])
    assert (await raw.cmd("EHLO branch.test"))[0] == 250
    assert (await raw.cmd("ATRN branch.test"))[0] == 502
    await raw.close()


async def test_atrn_hands_every_held_letter_over_on_the_same_connection(
    provider: Provider,
) -> None:
    await provider.hold(subject="first")
    await provider.hold(subject="second")
    await provider.hold(rcpt="carol@branch.test", subject="third")
    raw = await _atrn(provider, "cust@mail.test")
    code, _ = await raw.cmd("ATRN")  # no argument: every domain of the account
    assert code == 250
    customer = Customer()
    letters = await customer.serve(raw)
    assert len(letters) == 3
    assert [b"first" in letters[0], b"second" in letters[1], b"third" in letters[2]] == [True] * 3
    assert customer.commands[0] == "EHLO mx.mail.test"  # the provider speaks first after 220
    assert customer.commands[-1] == "QUIT"
    await eventually(lambda: _empty(provider))


async def _empty(provider: Provider) -> bool:
    return await provider.queued() == 0 and await provider.store.list_queue() == []


async def test_letters_arriving_on_port_25_are_held_not_delivered(provider: Provider) -> None:
    raw = await Raw.open(provider.ports["mx"])
    await raw.cmd("EHLO far.test")
    assert (await raw.cmd("MAIL FROM:<alice@far.test>"))[0] == 250
    assert (await raw.cmd("RCPT TO:<bob@branch.test>"))[0] == 250
    assert (await raw.cmd("RCPT TO:<bob@unrelated.test>"))[0] == 550  # no open relay
    assert (await raw.cmd("DATA"))[0] == 354
    assert (await raw.cmd("Subject: held\r\n\r\nbody\r\n."))[0] == 250
    await raw.close()
    [entry] = await provider.store.list_queue()
    [rcpt] = entry.recipients
    assert rcpt.held and rcpt.address == "bob@branch.test"
    assert provider.woken  # the queue worker is told, but it never delivers held mail


async def test_two_concurrent_takers_second_gets_450(provider: Provider) -> None:
    await provider.hold()
    first = await _atrn(provider, "cust@mail.test")
    assert (await first.cmd("ATRN branch.test"))[0] == 250
    second = await _atrn(provider, "cust@mail.test")
    assert (await second.cmd("ATRN branch.test"))[0] == 450
    assert (await second.cmd("ATRN"))[0] == 450
    letters = await Customer().serve(first)  # the first one goes on undisturbed
    assert len(letters) == 1
    await eventually(lambda: _empty(provider))
    assert (await second.cmd("ATRN branch.test"))[0] == 453
    await second.close()


async def test_a_taker_on_another_node_gets_450_from_the_store_lease(
    provider: Provider, tmp_path: Path
) -> None:
    await provider.hold()
    other_store = await open_sqlite(tmp_path / "provider.db")  # same database, another node
    other = await start_provider(other_store)
    try:
        first = await _atrn(provider, "cust@mail.test")
        assert (await first.cmd("ATRN branch.test"))[0] == 250
        second = await _atrn(other, "cust@mail.test")
        assert (await second.cmd("ATRN branch.test"))[0] == 450
        assert len(await Customer().serve(first)) == 1
        await eventually(lambda: _empty(provider))
        assert (await second.cmd("ATRN branch.test"))[0] == 453
        await second.close()
    finally:
        await other.server.stop(grace=1.0)
        await other_store.close()


async def test_cut_mid_transfer_loses_nothing_and_sends_nothing_twice(provider: Provider) -> None:
    await provider.hold(subject="first")
    await provider.hold(subject="second")
    await provider.hold(subject="third")
    raw = await _atrn(provider, "cust@mail.test")
    assert (await raw.cmd("ATRN branch.test"))[0] == 250
    letters = await Customer(cut_in_letter=2).serve(raw)
    assert len(letters) == 1 and b"first" in letters[0]

    async def settled() -> bool:
        entries = await provider.store.list_queue()
        rcpts = [r for e in entries for r in e.recipients]
        return len(rcpts) == 2 and all(r.attempts == 1 for r in rcpts)

    await eventually(settled)
    for entry in await provider.store.list_queue():
        for rcpt in entry.recipients:
            assert rcpt.held and rcpt.state is RcptState.QUEUED
    raw = await _atrn(provider, "cust@mail.test")
    assert (await raw.cmd("ATRN branch.test"))[0] == 250
    rest = await Customer().serve(raw)
    assert len(rest) == 2 and b"second" in rest[0] and b"third" in rest[1]
    await eventually(lambda: _empty(provider))


async def test_customer_refusal_is_permanent_and_bounces(provider: Provider) -> None:
    await provider.hold(rcpt="nobody@branch.test", subject="lost")
    await provider.hold(subject="kept")
    raw = await _atrn(provider, "cust@mail.test")
    assert (await raw.cmd("ATRN branch.test"))[0] == 250
    letters = await Customer(reject={"nobody@branch.test"}).serve(raw)
    assert len(letters) == 1 and b"kept" in letters[0]
    await eventually(lambda: _only_bounce_left(provider))


async def _only_bounce_left(provider: Provider) -> bool:
    entries = await provider.store.list_queue()
    if await provider.queued() != 0 or len(entries) != 1:
        return False
    [bounce] = entries
    return bounce.sender == "" and [r.address for r in bounce.recipients] == ["alice@far.test"]


# -- TURN -----------------------------------------------------------------------------------------
async def _submission(provider: Provider, user: str | None) -> Raw:
    raw = await Raw.open(provider.ports["submission"])
    if user is None:
        await raw.cmd("EHLO branch.test")
    else:
        await raw.login(user)
    return raw


async def test_turn_replies(provider: Provider) -> None:
    await provider.hold()
    raw = await _submission(provider, None)
    assert (await raw.cmd("TURN"))[:1] == (530,)
    await raw.close()
    raw = await _submission(provider, "other@mail.test")
    code, text = await raw.cmd("TURN")
    assert (code, text.split()[0]) == (502, "5.7.0")
    await raw.close()
    provider.ctx.turn_enabled = False
    raw = await _submission(provider, "cust@mail.test")
    code, text = await raw.cmd("TURN")
    assert (code, text.split()[0]) == (502, "5.5.1")
    await raw.close()
    assert await provider.queued() == 1


async def test_turn_hands_the_mail_over(provider: Provider) -> None:
    await provider.hold(subject="turned")
    raw = await _submission(provider, "cust@mail.test")
    ehlo = await raw.cmd("EHLO branch.test")
    assert "TURN" in ehlo[1].split("\n")
    assert (await raw.cmd("TURN"))[0] == 250
    letters = await Customer().serve(raw)
    assert len(letters) == 1 and b"turned" in letters[0]
    await eventually(lambda: _empty(provider))


async def test_turn_with_nothing_waiting_turns_and_quits(provider: Provider) -> None:
    raw = await _submission(provider, "cust@mail.test")
    assert (await raw.cmd("TURN"))[0] == 250  # RFC 821 has no "no mail" reply for TURN
    customer = Customer()
    assert await asyncio.wait_for(customer.serve(raw), 10) == []
    assert customer.commands == ["EHLO mx.mail.test", "QUIT"]
