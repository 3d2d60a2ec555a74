"""Limits of the submission listeners on a real node: the AUTH brute-force throttle (slower
answers, then 421 and a block, fail2ban-readable log lines) and the per-user hourly message rate
(451 4.7.1)."""

from __future__ import annotations

import base64
import json
import re
import smtplib
import socket
import ssl
import time
import uuid
from typing import Any

import pytest

from pochta.auth.throttle import FAIL2BAN_FAILREGEX
from pochta.testing.node import NodeProcess

HOSTNAME = "mx.mail.test"
DAVE, ERIN, FRANK = "dave@mail.test", "erin@mail.test", "frank@mail.test"
PASSWORDS = {DAVE: "dave-secret-1", ERIN: "erin-secret-2", FRANK: "frank-secret-3"}
LIMITS = """
[auth]
delay_after = 2
block_after = 4

[submission]
messages_per_hour = 2

[dns]
nameservers = ["127.0.0.1:9"]

[dns.routes]
"*" = ["127.0.0.1:9"]
"""


def mail_list(node: NodeProcess, address: str, folder: str = "INBOX") -> list[dict[str, Any]]:
    """`pochta mail list ADDRESS --folder F --json`."""
    rows: list[dict[str, Any]] = json.loads(
        node.cli("mail", "list", address, "--folder", folder, "--json").stdout
    )
    return rows


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    n: NodeProcess = module_node_factory(
        "limits", hostname=HOSTNAME, domains=["mail.test"], users=PASSWORDS, extra_toml=LIMITS
    )
    return n


class TlsLines:
    """A tiny implicit-TLS SMTP client from a chosen source address (the throttle's key)."""

    def __init__(self, node: NodeProcess, source: str) -> None:
        context = ssl.create_default_context(cafile=str(node.cafile))
        raw = socket.create_connection(
            (node.host, node.ports["submissions"]), timeout=30, source_address=(source, 0)
        )
        self.sock = context.wrap_socket(raw, server_hostname=HOSTNAME)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            line = self.file.readline()
            if not line:
                return 0, "\n".join(lines)  # EOF
            lines.append(line[4:].decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def command(self, text: str) -> tuple[int, str]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        try:
            return self.file.read(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_brute_force_is_slowed_then_blocked(node: NodeProcess) -> None:
    source = node.host  # a client address of this test alone
    conn = TlsLines(node, source)
    assert conn.reply()[0] == 220
    assert conn.command("EHLO attacker.test")[0] == 250
    answers: list[tuple[int, str, float]] = []
    for attempt in range(4):
        started = time.monotonic()
        code, text = conn.command(plain(FRANK, f"guess-{attempt}"))
        answers.append((code, text, time.monotonic() - started))
    codes = [code for code, _, _ in answers]
    assert codes == [535, 535, 535, 421], answers
    waits = [wait for _, _, wait in answers]
    # delay_after = 2: the 2nd failure waits 1 s, then 2 s, then 4 s (doubling)
    assert waits[0] < 0.9
    assert waits[1] >= 0.9 and waits[2] >= 1.9 and waits[3] >= 3.9
    assert waits[1] < waits[2] < waits[3]
    assert answers[3][1].startswith("4.7.0")
    assert conn.closed()  # RFC 5321 §3.8: 421 and the connection is cut
    conn.close()

    again = TlsLines(node, source)  # a new connection is still blocked, even with the password
    assert again.reply()[0] == 220
    assert again.command("EHLO attacker.test")[0] == 250
    assert again.command(plain(FRANK, PASSWORDS[FRANK]))[0] == 421
    again.close()

    failregex = re.compile(FAIL2BAN_FAILREGEX.replace("<HOST>", r"(?P<host>\S+)"))
    hosts = [m["host"] for line in node.log_text().splitlines() if (m := failregex.search(line))]
    assert hosts.count(source) == 4
    assert f'user="{FRANK}"' in node.log_text()


def test_other_clients_are_not_blocked(node: NodeProcess) -> None:
    conn = TlsLines(node, "127.0.0.1")
    assert conn.reply()[0] == 220
    conn.command("EHLO client.test")
    assert conn.command(plain(DAVE, PASSWORDS[DAVE]))[0] == 235
    conn.command("QUIT")
    conn.close()


def send(node: NodeProcess, user: str, subject: str) -> None:
    context = ssl.create_default_context(cafile=str(node.cafile))
    client = smtplib.SMTP(local_hostname="client.test", timeout=30)
    client._host = HOSTNAME  # the name STARTTLS verifies
    client.connect(node.host, node.ports["submission"], source_address=("127.0.0.1", 0))
    try:
        client.starttls(context=context)
        client.login(user, PASSWORDS[user])
        body = f"From: {user}\r\nTo: {ERIN}\r\nSubject: {subject}\r\n\r\nhi\r\n"
        client.sendmail(user, [ERIN], body.encode())
    finally:
        client.quit()


def test_rate_limit_per_user(node: NodeProcess) -> None:
    tag = uuid.uuid4().hex[:8]
    send(node, DAVE, f"rate 1 {tag}")
    send(node, DAVE, f"rate 2 {tag}")
    with pytest.raises(smtplib.SMTPDataError) as err:
        send(node, DAVE, f"rate 3 {tag}")
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (451, b"4.7.1")
    subjects = [m["subject"] for m in mail_list(node, ERIN)]
    assert f"rate 2 {tag}" in subjects and f"rate 3 {tag}" not in subjects
    assert f"rate 3 {tag}" not in [m["subject"] for m in mail_list(node, DAVE, "Sent")]
    send(node, ERIN, f"other user {tag}")  # the limit is per user
    assert f"other user {tag}" in [m["subject"] for m in mail_list(node, ERIN)]
