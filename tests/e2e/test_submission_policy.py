"""Submission policy of a real node on 587/465: AUTH is mandatory (RFC 6409 §4.3) and only over
TLS (RFC 4954 §4), a user sends only as itself or its aliases (RFC 6409 §8.1), SCRAM-SHA-256 works
with a third-party SASL client, the MSA completes Message-ID and Date (RFC 6409 §8.2-8.3), and the
Sent copy is the very letter the recipient got."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import smtplib
import ssl
import subprocess
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import scramp

from pochta.store import open_store
from pochta.testing.node import NodeProcess

HOSTNAME = "mx.mail.test"
ALICE, BOB, CAROL = "alice@mail.test", "bob@mail.test", "carol@mail.test"
SALES = "sales@mail.test"  # an alias of alice
PASSWORDS = {ALICE: "alice-secret-1", BOB: "bob-secret-2", CAROL: "carol-secret-3"}
SAFE_DNS = '[dns]\nnameservers = ["127.0.0.1:9"]\n\n[dns.routes]\n"*" = ["127.0.0.1:9"]\n'
KINDS = ("submission", "submissions")


def mail_list(node: NodeProcess, address: str, folder: str = "INBOX") -> list[dict[str, Any]]:
    """`pochta mail list ADDRESS --folder F --json`."""
    rows: list[dict[str, Any]] = json.loads(
        node.cli("mail", "list", address, "--folder", folder, "--json").stdout
    )
    return rows


def raw_message(node: NodeProcess, message_id: int) -> bytes:
    """`pochta mail show ID --raw`: the exact stored bytes."""
    result = subprocess.run(
        node.command("mail", "show", str(message_id), "--raw"), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    n: NodeProcess = module_node_factory(
        "policy", hostname=HOSTNAME, domains=["mail.test"], users=PASSWORDS, extra_toml=SAFE_DNS
    )
    n.cli("alias", "add", SALES, ALICE)
    return n


def connect(node: NodeProcess, kind: str, *, tls: bool = True) -> smtplib.SMTP:
    """smtplib on the node's address, verifying the certificate for HOSTNAME."""
    context = ssl.create_default_context(cafile=str(node.cafile))
    client = (
        smtplib.SMTP_SSL(local_hostname="client.test", context=context, timeout=30)
        if kind == "submissions"
        else smtplib.SMTP(local_hostname="client.test", timeout=30)
    )
    client._host = HOSTNAME  # the name smtplib gives TLS to verify
    client.connect(node.host, node.ports[kind])
    if kind == "submission" and tls:
        client.starttls(context=context)
    client.ehlo()
    return client


@pytest.fixture
def session(node: NodeProcess) -> Iterator[Callable[..., smtplib.SMTP]]:
    opened: list[smtplib.SMTP] = []

    def open_(kind: str = "submission", user: str | None = None, tls: bool = True) -> smtplib.SMTP:
        client = connect(node, kind, tls=tls)
        opened.append(client)
        if user is not None:
            client.login(user, PASSWORDS[user])
        return client

    yield open_
    for client in opened:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()


def letter(subject: str, sender: str = ALICE, to: str = BOB, extra: str = "") -> bytes:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}\r\nHello.\r\n".encode()


def subject_of(test: str) -> str:
    return f"{test} {uuid.uuid4().hex[:8]}"


def find(node: NodeProcess, subject: str, who: str, folder: str = "INBOX") -> Any:
    rows = [m for m in mail_list(node, who, folder) if m["subject"] == subject]
    assert len(rows) <= 1
    return rows[0] if rows else None


# -- AUTH is mandatory, and only over TLS -------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_mail_without_auth_is_refused(session: Any, node: NodeProcess, kind: str) -> None:
    client = session(kind)
    assert client.mail(ALICE) == (530, b"5.7.0 Authentication required")
    code, _ = client.rcpt(BOB)
    assert code == 503  # RFC 5321 §4.1.4: RCPT needs a MAIL that succeeded


def test_mail_before_starttls_is_refused(session: Any) -> None:
    client = session("submission", tls=False)
    assert client.mail(ALICE)[0] == 530


def test_auth_before_starttls_is_not_offered_and_refused(session: Any) -> None:
    client = session("submission", tls=False)
    assert client.has_extn("starttls")
    assert not client.has_extn("auth")  # RFC 4954 §4: no AUTH over plaintext
    token = base64.b64encode(f"\0{ALICE}\0{PASSWORDS[ALICE]}".encode()).decode()
    code, text = client.docmd("AUTH", f"PLAIN {token}")
    assert (code, text[:6]) == (538, b"5.7.11")
    assert client.mail(ALICE)[0] == 530  # and it did not authenticate anyone


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_password(session: Any, kind: str) -> None:
    client = session(kind)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        client.login(CAROL, "not-the-password")
    assert err.value.smtp_code == 535
    assert err.value.smtp_error.startswith(b"5.7.8")


def test_unknown_user_gets_the_same_answer(session: Any) -> None:
    client = session("submissions")
    token = base64.b64encode(b"\0nobody@mail.test\0whatever").decode()
    assert client.docmd("AUTH", f"PLAIN {token}") == (
        535,
        b"5.7.8 Authentication credentials invalid",
    )


# -- whose address ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_cannot_send_as_another_user(session: Any, kind: str) -> None:
    client = session(kind, user=BOB)
    code, text = client.mail(ALICE)
    assert (code, text[:5]) == (553, b"5.7.1")


def test_from_header_of_another_user_is_refused(session: Any, node: NodeProcess) -> None:
    subject = subject_of("forged from")
    client = session("submission", user=BOB)
    with pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(BOB, [CAROL], letter(subject, sender=f"Alice <{ALICE}>", to=CAROL))
    assert err.value.smtp_code == 553
    assert err.value.smtp_error.startswith(b"5.7.1")
    assert find(node, subject, CAROL) is None
    assert find(node, subject, BOB, "Sent") is None


def test_own_alias_is_allowed(session: Any, node: NodeProcess) -> None:
    subject = subject_of("alias")
    client = session("submissions", user=ALICE)
    assert client.sendmail(SALES, [BOB], letter(subject, sender=f"Sales <{SALES}>")) == {}
    got = find(node, subject, BOB)
    assert got is not None and got["from"] == f"Sales <{SALES}>"
    assert find(node, subject, ALICE, "Sent") is not None  # the owner's Sent


def test_someone_elses_alias_is_refused(session: Any) -> None:
    client = session("submission", user=BOB)
    assert client.mail(SALES)[0] == 553


# -- SCRAM-SHA-256 with a third-party SASL client ----------------------------------------------


def scram_login(client: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    """RFC 5802 / RFC 7677 over RFC 4954, driven by `scramp` through raw SMTP commands."""
    scram = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    first = base64.b64encode(scram.get_client_first().encode()).decode()
    code, challenge = client.docmd("AUTH", f"SCRAM-SHA-256 {first}")
    assert code == 334, challenge
    scram.set_server_first(base64.b64decode(challenge).decode())
    code, challenge = client.docmd(base64.b64encode(scram.get_client_final().encode()).decode())
    if code != 334:
        return code, challenge
    scram.set_server_final(base64.b64decode(challenge).decode())  # verifies the server's proof
    return client.docmd("")


def test_scram_sha_256_with_scramp(session: Any, node: NodeProcess) -> None:
    client = session("submission")
    assert "SCRAM-SHA-256" in client.esmtp_features["auth"].split()
    assert scram_login(client, CAROL, PASSWORDS[CAROL])[0] == 235
    subject = subject_of("scram")
    assert client.sendmail(CAROL, [BOB], letter(subject, sender=CAROL)) == {}
    assert find(node, subject, BOB) is not None


def test_scram_wrong_password(session: Any) -> None:
    client = session("submissions")
    code, text = scram_login(client, CAROL, "wrong")
    assert (code, text[:5]) == (535, b"5.7.8")
    assert client.mail(CAROL)[0] == 530


# -- what the MSA adds, and where the letter goes ----------------------------------------------


def test_message_id_and_date_are_added(
    session: Any,
    node: NodeProcess,
) -> None:
    subject = subject_of("bare")
    client = session("submission", user=ALICE)
    client.sendmail(ALICE, [BOB], letter(subject))
    got = find(node, subject, BOB)
    assert got["message_id"].endswith(f"@{HOSTNAME}>")
    parsed = email.message_from_bytes(raw_message(node, got["id"]), policy=email.policy.default)
    assert parsed["Message-ID"] == got["message_id"]
    assert parsed["Date"].datetime is not None  # RFC 5322 §3.3 date-time that parses
    assert len(parsed.get_all("Message-ID")) == 1 and len(parsed.get_all("Date")) == 1


def test_client_message_id_and_date_are_kept(
    session: Any,
    node: NodeProcess,
) -> None:
    subject = subject_of("complete")
    extra = "Message-ID: <own.1@client.test>\r\nDate: Mon, 01 Jan 2024 10:00:00 +0100\r\n"
    client = session("submissions", user=ALICE)
    client.sendmail(ALICE, [BOB], letter(subject, extra=extra))
    got = find(node, subject, BOB)
    parsed = email.message_from_bytes(raw_message(node, got["id"]), policy=email.policy.default)
    assert parsed.get_all("Message-ID") == ["<own.1@client.test>"]
    assert parsed.get_all("Date") == ["Mon, 01 Jan 2024 10:00:00 +0100"]


def test_sent_copy_is_the_inbox_copy(
    session: Any,
    node: NodeProcess,
) -> None:
    subject = subject_of("same")
    client = session("submission", user=ALICE)
    client.sendmail(ALICE, [BOB], letter(subject))
    inbox = raw_message(node, find(node, subject, BOB)["id"])
    sent = raw_message(node, find(node, subject, ALICE, "Sent")["id"])
    # Only the Return-Path of final delivery (RFC 5321 §4.4) sets the INBOX copy apart.
    assert inbox == f"Return-Path: <{ALICE}>\r\n".encode() + sent
    assert sent.startswith(b"Received: ")
    assert b"Hello.\r\n" in sent


def test_remote_recipient_is_queued(session: Any, node: NodeProcess) -> None:
    subject = subject_of("remote")
    remote = f"someone-{uuid.uuid4().hex[:6]}@remote.test"
    client = session("submissions", user=ALICE)
    assert client.sendmail(ALICE, [BOB, remote], letter(subject, to=f"{BOB}, {remote}")) == {}
    assert find(node, subject, BOB) is not None
    assert find(node, subject, ALICE, "Sent") is not None

    async def queued() -> list[tuple[str, list[str]]]:
        store = open_store(f"sqlite:///{node.db}")
        await store.open()
        try:
            return [(e.sender, [r.address for r in e.recipients]) for e in await store.list_queue()]
        finally:
            await store.close()

    assert (ALICE, [remote]) in asyncio.run(queued())


# -- policy gaps: quoted local parts, AUTH= where AUTH is not offered, From:/Sender: --------------


def test_quoted_local_part_reaches_the_same_mailbox(node: NodeProcess, wire: Any) -> None:
    """RFC 5321 §4.1.2: `"bob"` and `bob` are one mailbox (and `"b\\ob"` too)."""
    subject = subject_of("quoted")
    w = wire(node, "mx")
    assert w.reply()[0] == 220
    assert w.command("EHLO client.test")[0] == 250
    assert w.command("MAIL FROM:<someone@far.test>")[0] == 250
    assert w.command('RCPT TO:<"bob"@mail.test>')[0] == 250
    assert w.command('RCPT TO:<"car\\ol"@MAIL.test>')[0] == 250
    assert w.command('RCPT TO:<"no body"@mail.test>')[0] == 550  # a different, unknown mailbox
    assert w.command("DATA")[0] == 354
    w.send(f"Subject: {subject}\r\n\r\nquoted\r\n.\r\n".encode())
    assert w.reply()[0] == 250
    assert find(node, subject, BOB) is not None
    assert find(node, subject, CAROL) is not None


def test_auth_parameter_where_auth_is_not_offered(
    node: NodeProcess, wire: Any, session: Any
) -> None:
    """RFC 4954 §5: MAIL ... AUTH= belongs to AUTH; port 25 does not advertise it -> 555."""
    w = wire(node, "mx")
    assert w.reply()[0] == 220
    code, text = w.command("EHLO client.test")
    assert code == 250 and "AUTH" not in text
    code, text = w.command("MAIL FROM:<a@far.test> AUTH=<>")
    assert (code, text[:5]) == (555, "5.5.4")
    assert w.command("MAIL FROM:<a@far.test>")[0] == 250  # the session goes on
    client = session("submission", user=ALICE)  # AUTH offered: the parameter is fine
    assert client.mail(ALICE, [f"AUTH={ALICE}"])[0] == 250


def test_a_letter_without_from_gets_the_envelope_sender(session: Any, node: NodeProcess) -> None:
    """RFC 6409 §8.1: the MSA may add From:; it uses the (owned) envelope sender."""
    subject = subject_of("no from")
    client = session("submission", user=ALICE)
    body = f"To: {BOB}\r\nSubject: {subject}\r\n\r\nWho sent this?\r\n".encode()
    assert client.sendmail(SALES, [BOB], body) == {}
    got = find(node, subject, BOB)
    assert got is not None and got["from"] == f"<{SALES}>"
    raw = raw_message(node, got["id"])
    assert raw.count(b"\nFrom: ") == 1 and f"\nFrom: <{SALES}>\r\n".encode() in raw


def test_client_from_is_not_duplicated(session: Any, node: NodeProcess) -> None:
    subject = subject_of("own from")
    client = session("submission", user=ALICE)
    client.sendmail(ALICE, [BOB], letter(subject, sender=f"Alice <{ALICE}>"))
    got = find(node, subject, BOB)
    raw = raw_message(node, got["id"])
    assert raw.count(b"\nFrom: ") == 1 and f"\nFrom: Alice <{ALICE}>\r\n".encode() in raw


def test_sender_header_of_another_user_is_refused(session: Any, node: NodeProcess) -> None:
    subject = subject_of("forged sender")
    client = session("submissions", user=BOB)
    body = letter(subject, sender=BOB, to=CAROL, extra=f"Sender: Alice <{ALICE}>\r\n")
    with pytest.raises(smtplib.SMTPDataError) as err:
        client.sendmail(BOB, [CAROL], body)
    assert err.value.smtp_code == 553
    assert err.value.smtp_error.startswith(b"5.7.1") and b"Sender:" in err.value.smtp_error
    assert find(node, subject, CAROL) is None


def test_own_alias_in_sender_is_allowed(session: Any, node: NodeProcess) -> None:
    subject = subject_of("own sender")
    client = session("submission", user=ALICE)
    body = letter(subject, to=BOB, extra=f"Sender: Sales <{SALES}>\r\n")
    assert client.sendmail(ALICE, [BOB], body) == {}
    assert find(node, subject, BOB) is not None
