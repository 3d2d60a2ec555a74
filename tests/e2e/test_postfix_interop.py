"""Interop with a real Postfix 3.x over port 25 with STARTTLS, both directions: a private Postfix
instance (postfix.test, user carol, on 127.0.0.4:25; `pochta.testing.postfix`) and a pochta node
(mail.test, user alice, mx on 127.0.0.5:25) route to each other by static routes (Postfix's
transport map, pochta's `[dns.routes]`); no DNS and nothing beyond loopback. Needs root (port 25,
Postfix's master). Skipped when Postfix is not installed, except in CI (env CI), where it fails.

One Postfix and one pochta node serve the whole module; each test uses its own subjects and
recipients, so the tests do not depend on each other or on their order.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_delivery_support import mailbox, node_toml, queue, raw, submit, wait_until

from pochta.testing.dnsserver import DnsServer
from pochta.testing.node import NodeProcess
from pochta.testing.postfix import PostfixInstance, missing_reason

_MISSING = missing_reason()
if _MISSING is not None:
    if os.environ.get("CI"):
        pytest.fail(f"{_MISSING}; CI is set, so the Postfix interop tests must run", pytrace=False)
    pytest.skip(_MISSING, allow_module_level=True)

POSTFIX_IP, POCHTA_IP, SMTP_PORT = "127.0.0.4", "127.0.0.5", 25
ALICE = ("alice@mail.test", "pw-alice")
CAROL = "carol@postfix.test"
WAIT = 60.0  # seconds; both MTAs deliver within a second or two unless something is wrong


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    # Not tmp_path: the postfix user must traverse every parent directory (see PostfixInstance).
    base = Path(tempfile.mkdtemp(prefix="pochta-postfix-"))
    instance = PostfixInstance(
        base,  # start() makes it mode 0755; /tmp itself is world-searchable
        address=POSTFIX_IP,
        port=SMTP_PORT,
        hostname="mx.postfix.test",
        domain="postfix.test",
        users=("carol",),
        relay_routes={"mail.test": f"[{POCHTA_IP}]:{SMTP_PORT}"},
    )
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        print(f"--- Postfix maillog ---\n{instance.log_text()[-6000:]}")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pochta(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    # A DNS server of our own with no records: the node must never ask the system resolver.
    with DnsServer({}) as dns:
        toml = node_toml(dns, SMTP_PORT)
        toml += f'\n[dns.routes]\n"postfix.test" = ["{POSTFIX_IP}:{SMTP_PORT}"]\n'
        node = NodeProcess.create(
            tmp_path_factory.mktemp("pochta"),
            host=POCHTA_IP,
            hostname="mx.mail.test",
            domains=["mail.test"],
            users=dict([ALICE]),
            ports={"mx": SMTP_PORT},
            extra_toml=toml,
        )
        try:
            node.start()
            yield node
        finally:
            node.stop()
            print(f"--- log of {node.hostname} ---\n{node.log_text()[-6000:]}")


def letter(sender: str, rcpt: str, subject: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@interop.test>\r\n\r\nbody of {subject}\r\n"
    ).encode()


def unfolded_headers(raw_message: bytes) -> list[str]:
    """The header fields of a message, each unfolded to one line (RFC 5322 §2.2.3)."""
    head = raw_message.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("utf-8", "replace")
    return [re.sub(r"\n[ \t]+", " ", field) for field in re.split(r"\n(?![ \t])", head)]


def subject_of(raw_message: bytes) -> str:
    for field in unfolded_headers(raw_message):
        if field.lower().startswith("subject:"):
            return field.split(":", 1)[1].strip()
    return ""


def carol_letters(postfix: PostfixInstance, subject: str) -> list[bytes]:
    return [m for m in postfix.maildir_messages("carol") if subject_of(m) == subject]


def smtpd_session(log: str, queue_id: str) -> list[str]:
    """The Postfix smtpd log lines of the connection that received `queue_id`: from that smtpd
    process's last "connect from" up to the "QUEUEID: client=" line."""
    lines = log.splitlines()
    for index, line in enumerate(lines):
        match = re.search(r"postfix/smtpd\[(\d+)\]: " + re.escape(queue_id) + ": client=", line)
        if match:
            tag = f"postfix/smtpd[{match.group(1)}]: "
            own = [text for text in lines[: index + 1] if tag in text]
            starts = [i for i, text in enumerate(own) if "]: connect from " in text]
            return own[starts[-1] :] if starts else own
    raise AssertionError(f"no smtpd line for queue id {queue_id} in the Postfix log")


def test_postfix_relays_to_pochta_over_starttls(
    postfix: PostfixInstance, pochta: NodeProcess
) -> None:
    subject = "carol to alice via postfix"
    with smtplib.SMTP(POSTFIX_IP, SMTP_PORT, timeout=30) as client:
        refused = client.sendmail(CAROL, [ALICE[0]], letter(CAROL, ALICE[0], subject))
    assert refused == {}

    def arrived() -> list[dict[str, object]]:
        return [m for m in mailbox(pochta, ALICE[0]) if m["subject"] == subject]

    (message,) = wait_until(arrived, timeout=WAIT, what=f"{subject!r} in alice's INBOX")
    stored = raw(pochta, int(str(message["id"])))
    assert stored.startswith(f"Return-Path: <{CAROL}>\r\n".encode())
    ours = unfolded_headers(stored)[1]  # the Received: pochta wrote, right below Return-Path
    assert ours.startswith("Received: from mx.postfix.test "), ours
    assert f"[{POSTFIX_IP}]" in ours  # Postfix connected from its smtp_bind_address
    assert "by mx.mail.test" in ours and "with ESMTPS" in ours, ours  # RFC 3848: TLS was used
    assert re.search(r"\(using TLS1\.[23] ", ours), ours
    assert b"by mx.postfix.test (Postfix)" in stored  # Postfix's own trace below ours

    log = postfix.log_text()
    relay = rf"\S*\[{re.escape(POCHTA_IP)}\]:{SMTP_PORT}"
    assert re.search(rf"TLS connection established to {relay}: TLSv1\.[23]", log), log
    assert re.search(rf"to=<{re.escape(ALICE[0])}>, relay={relay},.* status=sent \(250 ", log)


def test_pochta_delivers_to_postfix_over_starttls(
    postfix: PostfixInstance, pochta: NodeProcess
) -> None:
    subject = "alice to carol via pochta"
    submit(pochta, *ALICE, [CAROL], subject)
    (delivered,) = wait_until(
        lambda: carol_letters(postfix, subject),
        timeout=WAIT,
        what=f"{subject!r} in carol's Maildir",
    )
    received = [f for f in unfolded_headers(delivered) if f.startswith("Received:")]
    postfix_trace = received[0]  # the newest: Postfix's own, for the connection from pochta
    assert postfix_trace.startswith("Received: from mx.mail.test "), postfix_trace
    assert "(using TLSv1." in postfix_trace and "with ESMTPS" in postfix_trace, postfix_trace
    queue_id = re.search(r"with ESMTPS id (\w+)", postfix_trace)
    assert queue_id is not None, postfix_trace
    session = smtpd_session(postfix.log_text(), queue_id.group(1))
    assert any("Anonymous TLS connection established from" in line for line in session), session

    sent = [
        line
        for line in pochta.log_text().splitlines()
        if "event=sent " in line and f"rcpt={CAROL} " in line
    ]
    assert sent, pochta.log_text()[-3000:]
    assert re.search(r'tls="?TLS1\.[23]', sent[-1]), sent[-1]
    assert f"{POSTFIX_IP}" in sent[-1], sent[-1]
    wait_until(lambda: queue(pochta) == [], timeout=WAIT, what="an empty queue on mail.test")


def test_unknown_postfix_user_bounces_to_alice(
    postfix: PostfixInstance, pochta: NodeProcess
) -> None:
    nobody = "nobody@postfix.test"
    submit(pochta, *ALICE, [nobody], "to nobody at postfix")

    def bounces() -> list[bytes]:
        rows = mailbox(pochta, ALICE[0])
        dsns = [raw(pochta, int(m["id"])) for m in rows if m["subject"].startswith("Undelivered")]
        return [d for d in dsns if f"Final-Recipient: rfc822; {nobody}".encode() in d]

    (dsn,) = wait_until(bounces, timeout=WAIT, what="the bounce in alice's INBOX")
    assert dsn.startswith(b"Return-Path: <>\r\n")
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn
    assert b"Status: 5.1.1" in dsn and b"Action: failed" in dsn
    assert re.search(rb"Diagnostic-Code: smtp; 550 5\.1\.1 <nobody@postfix\.test>", dsn), dsn
    assert b"Subject: to nobody at postfix" in dsn  # the original header block is attached
    log = postfix.log_text()
    assert re.search(r"NOQUEUE: reject: RCPT from .*: 550 5\.1\.1 <nobody@postfix\.test>", log)
    assert carol_letters(postfix, "to nobody at postfix") == []
    wait_until(lambda: queue(pochta) == [], timeout=WAIT, what="an empty queue on mail.test")


def test_the_instance_only_routes_to_loopback(tmp_path: Path) -> None:
    """The safety rule of PostfixInstance itself: a route beyond loopback is refused up front."""
    with pytest.raises(ValueError, match="not a loopback"):
        PostfixInstance(tmp_path, relay_routes={"example.com": "[192.0.2.1]:25"})
    with pytest.raises(ValueError, match="bracketed"):
        PostfixInstance(tmp_path, relay_routes={"example.com": "mx.example.com:25"})
    with pytest.raises(ValueError, match="not a loopback"):
        PostfixInstance(tmp_path, address="192.0.2.1")
    settings = PostfixInstance(tmp_path).settings()
    assert settings["relayhost"] == ""
    assert settings["default_transport"].startswith("error:")
    assert settings["relay_transport"].startswith("error:")


def test_postfix_refuses_what_has_no_loopback_route(postfix: PostfixInstance) -> None:
    """Anything not routed to loopback resolves to `default_transport = error:`, which Postfix's
    smtpd already refuses at RCPT; nothing is looked up or sent anywhere."""
    with (
        smtplib.SMTP(POSTFIX_IP, SMTP_PORT, timeout=30) as client,
        pytest.raises(smtplib.SMTPRecipientsRefused) as refused,
    ):
        client.sendmail(CAROL, ["someone@example.com"], letter(CAROL, "x", "out"))
    code, text = refused.value.recipients["someone@example.com"]
    assert code == 550 and b"no delivery beyond loopback" in text, (code, text)
    log = postfix.log_text()
    assert re.search(r"reject: RCPT from .*<someone@example\.com>: Recipient address rejected", log)
    assert "example.com[" not in log  # no connection was even attempted
