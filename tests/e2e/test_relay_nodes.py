"""Two real `pochta serve` nodes: the provider mx.mail.test holds mail for branch.test while the
customer mx.branch.test is offline; the customer pulls it with ATRN (`pochta relay fetch`), with
TURN (a `[[relay.fetch]]` schedule of the running customer node), or the provider pushes it to
the customer's port 25 after ETRN. The letters end up in the customer's database and nowhere
else. Provider on 127.0.0.31, customer on 127.0.0.32, free ports."""

from __future__ import annotations

import json
import smtplib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pochta.testing.node import NodeProcess, free_port

PROVIDER, CUSTOMER = "127.0.0.31", "127.0.0.32"
CUST_PW = "cust-secret-1"


@dataclass
class Pair:
    provider: NodeProcess
    customer: NodeProcess


def _make(tmp_path: Path, customer_toml: str = "") -> Pair:
    customer_ports = {"mx": free_port(CUSTOMER)}
    customer = NodeProcess.create(
        tmp_path / "branch",
        host=CUSTOMER,
        hostname="mx.branch.test",
        domains=["branch.test"],
        users={"bob@branch.test": "bob-pw-1", "carol@branch.test": "carol-pw-1"},
        kinds=("mx",),
        ports=customer_ports,
        extra_toml=customer_toml,
    )
    provider = NodeProcess.create(
        tmp_path / "mail",
        host=PROVIDER,
        hostname="mx.mail.test",
        domains=["mail.test"],
        users={"cust@mail.test": CUST_PW},
        kinds=("mx", "submission", "odmr"),
        extra_toml=(
            "[relay]\nturn = true\n\n[dns.routes]\n"
            f'"branch.test" = ["{CUSTOMER}:{customer_ports["mx"]}"]\n'
            '"*" = ["127.0.0.254:9"]\n'
        ),
    )
    provider.cli("relay", "add", "branch.test", "--owner", "cust@mail.test")
    return Pair(provider, customer)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = _make(tmp_path)
    p.provider.start()
    try:
        yield p
    finally:
        p.customer.stop()
        p.provider.stop()


def _send_to_provider(node: NodeProcess, rcpts: list[str], subject: str) -> None:
    body = f"From: alice@far.test\r\nTo: {rcpts[0]}\r\nSubject: {subject}\r\n\r\nhello\r\n"
    with smtplib.SMTP(node.host, node.ports["mx"], local_hostname="far.test", timeout=15) as s:
        s.sendmail("alice@far.test", rcpts, body.encode())


def _inbox(node: NodeProcess, user: str) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = json.loads(node.cli("mail", "list", user, "--json").stdout)
    return rows


def _queue_states(node: NodeProcess) -> list[tuple[str, str, int]]:
    with sqlite3.connect(f"file:{node.db}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute("SELECT address, state, held FROM queue_rcpts ORDER BY id").fetchall()
    return [(str(a), str(s), int(h)) for a, s, h in rows]


def _held_for_branch(node: NodeProcess) -> list[tuple[str, str, int]]:
    return [r for r in _queue_states(node) if r[0].endswith("@branch.test") and r[1] == "queued"]


def _wait(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.2)


def _only_customer_has_the_mail(p: Pair, subjects: dict[str, list[str]]) -> None:
    for user, expected in subjects.items():
        got = sorted(str(m["subject"]) for m in _inbox(p.customer, user))
        assert got == sorted(expected), (user, got)
    assert _held_for_branch(p.provider) == []
    assert _inbox(p.provider, "cust@mail.test") == []
    assert _inbox(p.provider, "postmaster@mail.test") == []


def test_atrn_pull_with_the_cli(pair: Pair) -> None:
    _send_to_provider(pair.provider, ["bob@branch.test"], "first")
    _send_to_provider(pair.provider, ["bob@branch.test", "carol@branch.test"], "second")
    held = _held_for_branch(pair.provider)
    assert len(held) == 3 and all(h[2] == 1 for h in held)  # held, not MX-delivered
    pair.customer.env["POCHTA_PASSWORD"] = CUST_PW
    args = ["relay", "fetch", "--server", f"{PROVIDER}:{pair.provider.ports['odmr']}"]
    args += ["--user", "cust@mail.test", "--domain", "branch.test"]
    args += ["--cafile", str(pair.provider.cafile), "--server-hostname", "mx.mail.test"]
    out = pair.customer.cli(*args)
    assert "2 letter(s) received" in out.stdout
    _only_customer_has_the_mail(
        pair, {"bob@branch.test": ["first", "second"], "carol@branch.test": ["second"]}
    )
    [stored] = [m for m in _inbox(pair.customer, "bob@branch.test") if m["subject"] == "first"]
    raw = pair.customer.cli("mail", "show", str(stored["id"]), "--raw").stdout
    assert "by mx.branch.test" in raw and "by mx.mail.test" in raw
    again = pair.customer.cli(*args)  # nothing twice
    assert "no mail waiting" in again.stdout
    assert len(_inbox(pair.customer, "bob@branch.test")) == 2


def test_atrn_pull_refused_for_a_wrong_password(pair: Pair) -> None:
    _send_to_provider(pair.provider, ["bob@branch.test"], "kept")
    pair.customer.env["POCHTA_PASSWORD"] = "wrong-password"
    result = pair.customer.cli(
        "relay", "fetch", "--server", f"{PROVIDER}:{pair.provider.ports['odmr']}",
        "--user", "cust@mail.test", "--cafile", str(pair.provider.cafile),
        "--server-hostname", "mx.mail.test", check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "AUTH" in result.stderr
    assert len(_held_for_branch(pair.provider)) == 1


def test_turn_pull_on_the_customer_schedule(tmp_path: Path) -> None:
    (tmp_path / "branch").mkdir()
    (tmp_path / "branch" / "provider.pw").write_text(CUST_PW + "\n")
    p = _make(tmp_path)
    p.provider.start()
    try:
        _send_to_provider(p.provider, ["bob@branch.test"], "turned")
        p.customer.extra_toml = (
            f'[[relay.fetch]]\nserver = "{PROVIDER}:{p.provider.ports["submission"]}"\n'
            'user = "cust@mail.test"\npassword_file = "provider.pw"\nverb = "TURN"\n'
            f'every = "1s"\ncafile = "{p.provider.cafile}"\nserver_hostname = "mx.mail.test"\n'
        )
        p.customer.write_config()
        p.customer.start()
        _wait(lambda: len(_inbox(p.customer, "bob@branch.test")) == 1)
        _send_to_provider(p.provider, ["carol@branch.test"], "later")  # the next run gets it
        _wait(lambda: len(_inbox(p.customer, "carol@branch.test")) == 1)
        time.sleep(1.5)  # a few more runs: nothing arrives twice
        _only_customer_has_the_mail(
            p, {"bob@branch.test": ["turned"], "carol@branch.test": ["later"]}
        )
    finally:
        p.customer.stop()
        p.provider.stop()
    assert "Traceback" not in p.customer.log_text() + p.provider.log_text()


def test_etrn_makes_the_provider_deliver_to_the_customer_port_25(pair: Pair) -> None:
    _send_to_provider(pair.provider, ["bob@branch.test"], "pushed")
    pair.customer.start()
    with smtplib.SMTP(
        PROVIDER, pair.provider.ports["mx"], local_hostname="mx.branch.test",
        source_address=(CUSTOMER, 0), timeout=15,
    ) as s:  # fmt: skip
        s.ehlo()
        assert s.has_extn("etrn")
        code, text = s.docmd("ETRN", "branch.test")
        assert code == 253, text
    _wait(lambda: len(_inbox(pair.customer, "bob@branch.test")) == 1)
    _wait(lambda: _held_for_branch(pair.provider) == [])
    _only_customer_has_the_mail(pair, {"bob@branch.test": ["pushed"]})
    with smtplib.SMTP(PROVIDER, pair.provider.ports["mx"], timeout=15) as s:
        s.ehlo("stranger.test")
        code, _ = s.docmd("ETRN", "branch.test")  # not from the domain's address
        assert code == 459
