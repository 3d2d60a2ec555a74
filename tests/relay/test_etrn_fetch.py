"""ETRN (RFC 1985) dialogs and deliveries, and the customer side (`relay_fetch`) against an
in-process provider: the pulled letters land in the customer's own store as port 25 would
store them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from relayhelp import (
    CUSTOMER_IP,
    PASSWORD,
    PROVIDER_IP,
    Provider,
    Raw,
    add_user,
    eventually,
    now,
    open_sqlite,
    start_provider,
)

from pochta import smtp
from pochta.client.session import SmtpError
from pochta.dns import DnsResolver
from pochta.queue.worker import QueueWorker
from pochta.relay_fetch import FetchEntry, FetchJob, FetchSchedule, fetch, parse_fetch_entry
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.session import ServerContext
from pochta.store.api import MailStore


@pytest.fixture
async def customer(tmp_path: Path) -> AsyncIterator[SmtpServer]:
    """branch.test's own node: its store and an mx listener on CUSTOMER_IP."""
    store = await open_sqlite(tmp_path / "customer.db")
    await store.add_domain("branch.test")
    await add_user(store, "bob@branch.test")
    await add_user(store, "carol@branch.test")
    ctx = ServerContext(store=store, hostname="mx.branch.test", limits=smtp.Limits())
    server = SmtpServer(ctx, ServerLimits(command_timeout=10), None)
    await server.listen("mx", f"{CUSTOMER_IP}:0")
    try:
        yield server
    finally:
        await server.stop(grace=1.0)
        await store.close()


def _port(server: SmtpServer) -> int:
    return server.bound[0][1]


async def _inbox(server: SmtpServer, user: str = "bob@branch.test") -> list[bytes]:
    store = server.ctx.store
    return [(await store.get_message(m.id)).raw for m in await store.list_messages(user)]


@pytest.fixture
async def routed(provider_store: MailStore, customer: SmtpServer) -> AsyncIterator[Provider]:
    """A provider whose static route sends branch.test and remote.test to the customer."""
    route = [f"{CUSTOMER_IP}:{_port(customer)}"]
    p = await start_provider(provider_store, {"branch.test": route, "remote.test": route})
    try:
        yield p
    finally:
        await p.server.stop(grace=1.0)
        await p.relay.stop()


async def _etrn(
    provider: Provider, arg: str, *, local: str | None = CUSTOMER_IP
) -> tuple[int, str]:
    raw = await Raw.open(provider.ports["mx"], local=local)
    code, text = await raw.cmd("EHLO branch.test")
    assert code == 250 and "ETRN" in text.split("\n")
    reply = await raw.cmd(f"ETRN {arg}")
    await raw.close()
    return reply


async def test_etrn_replies(routed: Provider) -> None:
    assert (await _etrn(routed, "branch.test"))[0] == 251  # allowed, nothing waiting
    code, text = await _etrn(routed, "#branch")
    assert code == 458 and "#branch" in text
    assert (await _etrn(routed, "bad_domain!"))[0] == 501
    assert (await _etrn(routed, "[127.0.0.22]"))[0] == 501
    code, text = await _etrn(routed, "branch.test", local=PROVIDER_IP)  # not its address
    assert code == 459 and "branch.test" in text
    assert (await _etrn(routed, "unrouted.test"))[0] == 459


async def test_etrn_by_the_authenticated_owner(routed: Provider) -> None:
    await routed.hold()
    raw = await Raw.open(routed.ports["submission"], local=PROVIDER_IP)
    await raw.login("other@mail.test")
    assert (await raw.cmd("ETRN branch.test"))[0] == 459
    await raw.close()
    raw = await Raw.open(routed.ports["submission"], local=PROVIDER_IP)
    await raw.login("cust@mail.test")
    code, text = await raw.cmd("ETRN branch.test")
    assert code == 253 and "1 pending" in text
    await raw.close()


async def test_etrn_releases_held_mail_to_the_domain_route(
    routed: Provider, customer: SmtpServer
) -> None:
    await routed.hold(subject="one")
    await routed.hold(rcpt="carol@branch.test", subject="two")
    code, text = await _etrn(routed, "branch.test")
    assert code == 253 and "2 pending" in text
    await eventually(lambda: _count(customer, 1, "bob@branch.test"))
    await eventually(lambda: _count(customer, 1, "carol@branch.test"))
    await eventually(lambda: _provider_empty(routed))
    [raw] = await _inbox(customer)
    assert b"by mx.branch.test" in raw and b"one body" in raw


async def test_etrn_at_domain_covers_subdomains(routed: Provider) -> None:
    await routed.hold(rcpt="x@remote.test")
    await routed.hold(rcpt="y@a.remote.test")
    code, text = await _etrn(routed, "@remote.test")
    assert code == 253 and "2 pending" in text
    assert routed.woken  # non-held mail: made due now and the queue worker woken


async def _count(server: SmtpServer, n: int, user: str) -> bool:
    return len(await _inbox(server, user)) == n


async def _provider_empty(provider: Provider) -> bool:
    return await provider.store.list_queue() == []


# -- the customer side ------------------------------------------------------------------------
def _job(provider: Provider, verb: str = "ATRN", **kw: object) -> FetchJob:
    kind = "odmr" if verb == "ATRN" else "submission"
    base: dict[str, object] = {
        "server": f"{PROVIDER_IP}:{provider.ports[kind]}",
        "user": "cust@mail.test",
        "password": PASSWORD,
        "domains": ("branch.test",) if verb == "ATRN" else (),
        "verb": verb,
        "tls": "none",
    }
    base.update(kw)
    return FetchJob(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("verb", ["ATRN", "TURN"])
async def test_fetch_stores_into_the_customer_store(
    provider: Provider, customer: SmtpServer, verb: str
) -> None:
    await provider.hold(subject="pulled")
    await provider.hold(rcpt="carol@branch.test", subject="pulled too")
    result = await fetch(_job(provider, verb), customer, helo_name="mx.branch.test")
    assert result.turned and result.complete and result.letters == 2
    [raw] = await _inbox(customer)
    assert raw.startswith(b"Return-Path: <alice@far.test>")
    assert b"from mx.mail.test" in raw and b"by mx.branch.test" in raw  # our Received header
    assert len(await _inbox(customer, "carol@branch.test")) == 1
    await eventually(lambda: _provider_empty(provider))


async def test_fetch_for_an_unknown_user_refuses_and_the_provider_bounces(
    provider: Provider, customer: SmtpServer
) -> None:
    await provider.hold(rcpt="nobody@branch.test", subject="x")
    result = await fetch(_job(provider), customer, helo_name="mx.branch.test")
    assert result.turned and result.letters == 0
    await eventually(lambda: _bounce_only(provider))


async def _bounce_only(provider: Provider) -> bool:
    entries = await provider.store.list_queue()
    return [e.sender for e in entries] == [""] and await provider.queued() == 0


async def test_fetch_with_nothing_waiting_and_with_a_wrong_password(
    provider: Provider, customer: SmtpServer
) -> None:
    result = await fetch(_job(provider), customer, helo_name="mx.branch.test")
    assert result.reply.code == 453 and not result.turned
    with pytest.raises(SmtpError):
        await fetch(_job(provider, password="wrong"), customer, helo_name="mx.branch.test")


async def test_schedule_runs_an_entry(
    provider: Provider, customer: SmtpServer, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    entry = parse_fetch_entry(
        {
            "server": f"{PROVIDER_IP}:{provider.ports['odmr']}",
            "user": "cust@mail.test",
            "password_file": "secret",
            "domain": "branch.test",
            "tls": "none",
            "every": "1s",
        },
        tmp_path,
    )
    assert isinstance(entry, FetchEntry) and entry.every == 1.0
    schedule = FetchSchedule([entry], customer, helo_name="mx.branch.test")
    schedule.start()
    try:
        await provider.hold(subject="scheduled")
        await eventually(lambda: _count(customer, 1, "bob@branch.test"))
    finally:
        await schedule.stop()


def test_fetch_entry_validation(tmp_path: Path) -> None:
    from pochta.errors import ConfigError

    good = {"server": "h", "user": "u@x.test", "password_file": "p"}
    assert parse_fetch_entry(good, tmp_path).job.address() == ("h", 366)
    assert parse_fetch_entry({**good, "verb": "turn"}, tmp_path).job.address() == ("h", 587)
    for bad in ({**good, "color": "red"}, {"server": "h"}, {**good, "verb": "POP"}):
        with pytest.raises(ConfigError):
            parse_fetch_entry(bad, tmp_path)


# -- ETRN deliveries go through the queue worker ------------------------------------------------
async def test_etrn_refusals_bounce_like_the_queue(routed: Provider, customer: SmtpServer) -> None:
    """The customer refuses one recipient: the queue worker's path records it and bounces it
    to the (remote) sender with the null reverse-path; the other one is delivered."""
    await routed.hold(rcpt="nobody@branch.test", subject="refused")
    await routed.hold(subject="taken")
    assert (await _etrn(routed, "branch.test"))[0] == 253
    await eventually(lambda: _count(customer, 1, "bob@branch.test"))
    await eventually(lambda: _bounce_only(routed))
    (bounce,) = await routed.store.list_queue()
    assert [r.address for r in bounce.recipients] == ["alice@far.test"]
    body = await routed.store.get_queue_body(bounce.id)
    assert b"Final-Recipient: rfc822; nobody@branch.test" in body and b"Status: 5.1.1" in body


async def test_etrn_to_a_dead_route_keeps_the_mail_held(provider: Provider) -> None:
    """No answer at the domain's destination: one transient attempt, still held, no lease left
    (ATRN can take it at once)."""
    await provider.hold()
    raw = await Raw.open(provider.ports["submission"])
    await raw.login("cust@mail.test")
    assert (await raw.cmd("ETRN branch.test"))[0] == 253
    await raw.close()
    await eventually(lambda: _attempted(provider))
    (entry,) = await provider.store.list_queue()
    (rcpt,) = entry.recipients
    assert rcpt.held and rcpt.attempts == 1 and rcpt.last_reply.startswith("4.4.1 connect to")
    await eventually(lambda: _claimable(provider))


async def _attempted(provider: Provider) -> bool:
    entries = await provider.store.list_queue()
    return bool(entries) and entries[0].recipients[0].attempts == 1 and not provider.relay._tasks


async def _claimable(provider: Provider) -> bool:
    claims = await provider.store.claim(
        "atrn-test", now(), timedelta(seconds=5), domains=["branch.test"]
    )
    return len(claims) == 1


async def test_etrn_uses_the_attached_node_worker(provider: Provider, customer: SmtpServer) -> None:
    """The relay's own resolver has no route for branch.test (its "*" route is dead): the
    letter can only arrive through the attached worker, whose resolver knows the customer."""
    worker = QueueWorker(
        provider.store,
        DnsResolver(routes={"branch.test": [f"{CUSTOMER_IP}:{_port(customer)}"]}),
        hostname="mx.mail.test",
        owner="node-worker",
    )
    provider.relay.worker = worker
    try:
        await provider.hold(subject="via the node")
        raw = await Raw.open(provider.ports["submission"])
        await raw.login("cust@mail.test")
        assert (await raw.cmd("ETRN branch.test"))[0] == 253
        await raw.close()
        await eventually(lambda: _count(customer, 1, "bob@branch.test"))
        await eventually(lambda: _provider_empty(provider))
    finally:
        await worker.stop()
