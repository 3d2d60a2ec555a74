"""Recipients on the mx port: several in one transaction, unknown ones (550 5.1.1), foreign
domains (550 5.7.1, no relay), postmaster (RFC 5321 §4.5.1). Real `pochta serve` and smtplib.
Imports pytest, the stdlib and the e2e fixtures.
"""

from __future__ import annotations

import json
import smtplib
import uuid
from typing import Any

import pytest

from pochta.testing.node import NodeProcess

USERS = {f"{name}@mail.test": f"pw-{name}" for name in ("alice", "bob", "carol")}


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    node: NodeProcess = module_node_factory(
        "mx",
        hostname="mx.mail.test",
        domains=["mail.test", "other.test"],
        users=USERS,
        aliases={"info@mail.test": "alice@mail.test"},
    )
    return node


def letter(tag: str) -> bytes:
    head = f"From: <s@outside.test>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@o.test>\r\n"
    return (head + "\r\nhi\r\n").encode()


def connect(node: NodeProcess) -> smtplib.SMTP:
    client = smtplib.SMTP(node.host, node.ports["mx"], local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def copies(mailbox: Any, node: NodeProcess, address: str, tag: str) -> int:
    return sum(1 for m in mailbox(node, address) if m.subject == tag)


def test_several_recipients_stored_once_per_mailbox(node: NodeProcess, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    # alice three times: by address, in other case, and through her alias
    rcpts = ["alice@mail.test", "bob@mail.test", "ALICE@Mail.Test", "info@mail.test"]
    rcpts.append("carol@mail.test")
    with connect(node) as client:
        assert client.sendmail("s@outside.test", rcpts, letter(tag)) == {}
    for address in USERS:
        assert copies(mailbox, node, address, tag) == 1, address
    # The same via the CLI's stable JSON (docs/cli.md).
    rows = json.loads(node.cli("mail", "list", "bob@mail.test", "--json").stdout)
    assert [r["message_id"] for r in rows if r["subject"] == tag] == [f"<{tag}@o.test>"]


def test_unknown_recipients_refused_one_by_one(node: NodeProcess, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    with connect(node) as client:
        assert client.mail("s@outside.test")[0] == 250
        assert client.rcpt("alice@mail.test") == (250, b"2.1.5 Recipient OK")
        code, text = client.rcpt("nobody@mail.test")
        assert (code, text[:5]) == (550, b"5.1.1")  # RFC 3463 §3.2: bad destination mailbox
        assert client.rcpt("bob@mail.test")[0] == 250
        assert client.rcpt("ghost@other.test")[:1] == (550,)
        code, text = client.data(letter(tag))
        assert code == 250 and text.startswith(b"2.0.0"), text
    assert copies(mailbox, node, "alice@mail.test", tag) == 1
    assert copies(mailbox, node, "bob@mail.test", tag) == 1
    assert copies(mailbox, node, "carol@mail.test", tag) == 0
    assert copies(mailbox, node, "postmaster@other.test", tag) == 0


def test_smtplib_reports_refused_recipients(node: NodeProcess, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    with connect(node) as client:
        refused = client.sendmail("s@outside.test", ["carol@mail.test", "x@mail.test"], letter(tag))
    assert set(refused) == {"x@mail.test"} and refused["x@mail.test"][0] == 550
    assert copies(mailbox, node, "carol@mail.test", tag) == 1


def test_foreign_domain_is_not_relayed(node: NodeProcess, mailbox: Any, store_query: Any) -> None:
    tag = uuid.uuid4().hex
    with connect(node) as client:
        assert client.mail("s@outside.test")[0] == 250
        code, text = client.rcpt("victim@foreign.test")
        assert (code, text[:5]) == (550, b"5.7.1")  # relaying denied
        code, _ = client.rcpt("victim@mail.test.foreign.test")
        assert code == 550
        # No recipient was accepted: DATA is out of sequence (RFC 5321 §3.3).
        assert client.docmd("DATA")[0] == 503
        assert client.rset()[0] == 250
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            client.sendmail("s@outside.test", ["victim@foreign.test"], letter(tag))
    assert store_query(node, lambda s: s.count_queued()) == 0
    assert store_query(node, lambda s: s.list_queue()) == []
    for address in [*USERS, "postmaster@mail.test"]:
        assert copies(mailbox, node, address, tag) == 0


@pytest.mark.parametrize("domain", ["mail.test", "other.test"])
def test_postmaster_exists_for_every_domain(node: NodeProcess, mailbox: Any, domain: str) -> None:
    tag = uuid.uuid4().hex
    address = f"postmaster@{domain}"
    with connect(node) as client:
        assert client.sendmail("", [address.upper()], letter(tag)) == {}  # null sender too
    assert copies(mailbox, node, address, tag) == 1


@pytest.mark.parametrize("path", ["<postmaster>", "<Postmaster>", "<POSTMASTER>"])
def test_bare_postmaster_reaches_our_postmaster(node: NodeProcess, mailbox: Any, path: str) -> None:
    # RFC 5321 §4.1.1.3: RCPT TO:<Postmaster> (case-insensitive) must be accepted; our hostname
    # is in mail.test, so it is postmaster@mail.test.
    tag = uuid.uuid4().hex
    with connect(node) as client:
        assert client.mail("s@outside.test")[0] == 250
        assert client.docmd(f"RCPT TO:{path}")[0] == 250
        assert client.data(letter(tag))[0] == 250
    assert copies(mailbox, node, "postmaster@mail.test", tag) == 1
    assert copies(mailbox, node, "postmaster@other.test", tag) == 0
