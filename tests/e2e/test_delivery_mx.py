"""Servers talk to each other: two real `pochta serve` processes (mail.test on 127.0.0.2,
yandex.test on 127.0.0.3) find each other through a real DNS server and deliver over SMTP:
MX delivery and a reply, bounces, the implicit MX, null MX, MX fallback, retries and give-up."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_delivery_support import (
    DEAD_IP,
    MAIL_IP,
    YANDEX_IP,
    base_records,
    common_port,
    mailbox,
    node_toml,
    queue,
    raw,
    submit,
    wait_until,
)

from pochta.testing.dnsserver import DnsServer
from pochta.testing.node import NodeProcess

ALICE, BOB = ("alice@mail.test", "pw-alice"), ("bob@yandex.test", "pw-bob")


class Pair:
    """mail.test and yandex.test, created on demand (so each test can pick its settings)."""

    def __init__(self, base: Path, dns: DnsServer) -> None:
        self.base = base
        self.dns = dns
        self.port = common_port([MAIL_IP, YANDEX_IP])
        self.nodes: list[NodeProcess] = []

    def node(self, name: str, ip: str, user: tuple[str, str], **toml: str) -> NodeProcess:
        domain = user[0].split("@")[1]
        node = NodeProcess.create(
            self.base / name,
            host=ip,
            hostname=f"mx.{domain}",
            domains=[domain],
            users=dict([user]),
            ports={"mx": self.port},
            extra_toml=node_toml(self.dns, self.port, **toml),
        )
        self.nodes.append(node)
        return node

    def mail(self, **toml: str) -> NodeProcess:
        return self.node("mail", MAIL_IP, ALICE, **toml)

    def yandex(self, **toml: str) -> NodeProcess:
        return self.node("yandex", YANDEX_IP, BOB, **toml)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
            print(f"--- log of {node.hostname} ---\n{node.log_text()[-3000:]}")


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    with DnsServer(base_records()) as dns:
        p = Pair(tmp_path, dns)
        try:
            yield p
        finally:
            p.close()


def subjects(node: NodeProcess, address: str, folder: str = "INBOX") -> list[str]:
    return [m["subject"] for m in mailbox(node, address, folder)]


def test_mx_delivery_and_the_reply(pair: Pair) -> None:
    mail, yandex = pair.mail(), pair.yandex()
    mail.start()
    yandex.start()
    submit(mail, *ALICE, [BOB[0]], "hello bob")
    assert subjects(mail, ALICE[0], "Sent") == ["hello bob"]
    wait_until(lambda: subjects(yandex, BOB[0]) == ["hello bob"], what="bob's copy")
    wait_until(lambda: queue(mail) == [], what="an empty queue on mail.test")
    (message,) = mailbox(yandex, BOB[0])
    stored = raw(yandex, message["id"])
    assert stored.startswith(b"Return-Path: <alice@mail.test>\r\n")
    assert b"by mx.yandex.test" in stored and b"(using TLS" in stored

    submit(yandex, *BOB, [ALICE[0]], "Re: hello bob")
    wait_until(lambda: subjects(mail, ALICE[0]) == ["Re: hello bob"], what="bob's reply")
    wait_until(lambda: queue(yandex) == [], what="an empty queue on yandex.test")


def test_unknown_remote_user_bounces_to_the_sender(pair: Pair) -> None:
    mail, yandex = pair.mail(), pair.yandex()
    mail.start()
    yandex.start()
    submit(mail, *ALICE, ["nobody@yandex.test"], "lost")
    (bounce,) = wait_until(lambda: mailbox(mail, ALICE[0]), what="the bounce")
    dsn = raw(mail, bounce["id"])
    assert dsn.startswith(b"Return-Path: <>\r\n")
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn
    assert b"Final-Recipient: rfc822; nobody@yandex.test" in dsn
    assert b"Status: 5.1.1" in dsn
    assert re.search(rb"Diagnostic-Code: smtp; 550 5\.1\.1", dsn)
    assert b"Subject: lost" in dsn  # the original header block is attached
    assert queue(mail) == []


def test_a_record_fallback_without_mx(pair: Pair) -> None:
    pair.dns.remove("yandex.test", "MX")
    pair.dns.set_records("yandex.test", "A", [YANDEX_IP])
    mail, yandex = pair.mail(), pair.yandex()
    mail.start()
    yandex.start()
    submit(mail, *ALICE, [BOB[0]], "via A")
    wait_until(lambda: subjects(yandex, BOB[0]) == ["via A"], what="delivery by the A record")
    assert ("yandex.test", "A") in pair.dns.queries


def test_null_mx_bounces_without_trying(pair: Pair) -> None:
    pair.dns.set_records("yandex.test", "MX", ["0 ."])
    mail = pair.mail()
    mail.start()  # yandex.test is not even running
    submit(mail, *ALICE, [BOB[0]], "to a null MX")
    (bounce,) = wait_until(lambda: mailbox(mail, ALICE[0]), what="the bounce")
    dsn = raw(mail, bounce["id"])
    assert b"Status: 5.1.10" in dsn and b"null MX" in dsn
    assert ("mx.yandex.test", "A") not in pair.dns.queries
    assert ("yandex.test", "A") not in pair.dns.queries
    assert queue(mail) == []


def test_second_mx_takes_over(pair: Pair) -> None:
    pair.dns.set_records("yandex.test", "MX", ["10 mx1.yandex.test.", "20 mx2.yandex.test."])
    pair.dns.set_records("mx1.yandex.test", "A", [DEAD_IP])
    pair.dns.set_records("mx2.yandex.test", "A", [YANDEX_IP])
    mail, yandex = pair.mail(), pair.yandex()
    mail.start()
    yandex.start()
    submit(mail, *ALICE, [BOB[0]], "via the backup MX")
    wait_until(lambda: subjects(yandex, BOB[0]) == ["via the backup MX"], what="delivery")
    assert "connect to mx1.yandex.test[127.0.0.9]" in mail.log_text()
    assert queue(mail) == []


def test_retries_until_the_destination_is_back(pair: Pair) -> None:
    mail, yandex = pair.mail(), pair.yandex()
    mail.start()
    submit(mail, *ALICE, [BOB[0]], "patience")

    def retried() -> bool:
        entries = queue(mail)
        rcpt = entries[0]["recipients"][0] if entries else {}
        return rcpt.get("attempts", 0) >= 2 and "connect to" in rcpt["last_reply"]

    wait_until(retried, what="two failed attempts")
    (entry,) = queue(mail)
    assert entry["sender"] == ALICE[0] and entry["recipients"][0]["state"] == "queued"
    assert entry["recipients"][0]["next_attempt"] is not None
    yandex.start()
    wait_until(lambda: subjects(yandex, BOB[0]) == ["patience"], what="the late delivery")
    wait_until(lambda: queue(mail) == [], what="an empty queue")
    assert mailbox(mail, ALICE[0]) == []  # no bounce, and no delay warning (disabled)


def test_give_up_and_bounce(pair: Pair) -> None:
    mail = pair.mail(give_up_after='"3s"')
    mail.start()  # yandex.test never comes up
    submit(mail, *ALICE, [BOB[0]], "too late")
    (bounce,) = wait_until(lambda: mailbox(mail, ALICE[0]), timeout=30, what="the bounce")
    dsn = raw(mail, bounce["id"])
    assert b"Status: 5.4.7" in dsn and b"Action: failed" in dsn
    assert b"connect to mx.yandex.test[127.0.0.3]" in dsn  # the last reason is reported
    assert queue(mail) == []


def test_queue_cli_flush_retry_bounce_delete(pair: Pair) -> None:
    mail = pair.mail(retry='["1h"]')
    mail.start()  # yandex.test is down: entries stay queued for an hour
    submit(mail, *ALICE, [BOB[0]], "first")
    submit(mail, *ALICE, [BOB[0]], "second")

    def attempted(n: int) -> list[dict[str, object]]:
        entries = queue(mail)
        done = len(entries) == 2 and all(e["recipients"][0]["attempts"] == n for e in entries)
        return entries if done else []

    entries = wait_until(lambda: attempted(1), what="first attempts")
    first, second = (e["id"] for e in entries)
    assert "first" in mail.cli("queue", "show", str(first)).stdout
    assert "mail.test" in mail.cli("queue", "list").stdout
    assert "2 recipient(s) due now" in mail.cli("queue", "flush", "yandex.test").stdout
    wait_until(lambda: attempted(2), what="a flush")
    mail.cli("queue", "retry", str(first))
    wait_until(lambda: queue(mail)[0]["recipients"][0]["attempts"] == 3, what="a retry")
    mail.cli("queue", "delete", str(second))
    mail.cli("queue", "bounce", str(first))
    (bounce,) = wait_until(lambda: mailbox(mail, ALICE[0]), what="the bounce")
    assert b"Status: 5.0.0" in raw(mail, bounce["id"])
    wait_until(lambda: queue(mail) == [], what="an empty queue")
    gone = mail.cli("queue", "show", str(second), check=False)
    assert gone.returncode == 1 and "error" in gone.stderr
