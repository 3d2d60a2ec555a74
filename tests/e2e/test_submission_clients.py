"""Third-party clients submit through a real `pochta serve` on 587 (STARTTLS) and 465 (implicit
TLS, RFC 8314): swaks, curl, msmtp and Python's smtplib authenticate, send, and the letter lands in
the recipient's INBOX and in the sender's Sent folder."""

from __future__ import annotations

import json
import smtplib
import ssl
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from pochta.testing.node import NodeProcess

HOSTNAME = "mx.mail.test"
ALICE, BOB = "alice@mail.test", "bob@mail.test"
PASSWORDS = {ALICE: "alice-secret-1", BOB: "bob-secret-2"}
# Static routes and a dead loopback name server: nothing may leave 127.0.0.0/8.
SAFE_DNS = '[dns]\nnameservers = ["127.0.0.1:9"]\n\n[dns.routes]\n"*" = ["127.0.0.1:9"]\n'
PORTS = {"587": "submission", "465": "submissions"}


def mail_list(node: NodeProcess, address: str, folder: str = "INBOX") -> list[dict[str, Any]]:
    """`pochta mail list ADDRESS --folder F --json`."""
    rows: list[dict[str, Any]] = json.loads(
        node.cli("mail", "list", address, "--folder", folder, "--json").stdout
    )
    return rows


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    n: NodeProcess = module_node_factory(
        "clients",
        hostname=HOSTNAME,
        domains=["mail.test"],
        users=PASSWORDS,
        extra_toml=SAFE_DNS,
    )
    return n


def letter(subject: str, sender: str = ALICE, to: str = BOB) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nHello from a client.\r\n"
    ).encode()


def assert_delivered(node: NodeProcess, subject: str) -> None:
    inbox = [m for m in mail_list(node, BOB) if m["subject"] == subject]
    sent = [m for m in mail_list(node, ALICE, "Sent") if m["subject"] == subject]
    assert len(inbox) == 1, f"{subject!r} not in {BOB}'s INBOX"
    assert len(sent) == 1, f"{subject!r} not in {ALICE}'s Sent"
    assert inbox[0]["message_id"] and inbox[0]["message_id"] == sent[0]["message_id"]
    assert inbox[0]["from"] == ALICE


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(cmd, capture_output=True, timeout=60, **kwargs)
    out = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}):\n{out[-3000:]}"
    return result


@pytest.mark.parametrize("port", PORTS)
def test_swaks(node: NodeProcess, port: str) -> None:
    subject = f"swaks {port} {uuid.uuid4().hex[:8]}"
    tls = ["--tls"] if port == "587" else ["--tls-on-connect"]
    run(
        [
            "swaks",
            "--server", node.host,
            "--port", str(node.ports[PORTS[port]]),
            *tls,
            "--tls-verify", "--tls-ca-path", str(node.cafile), "--tls-sni", HOSTNAME,
            "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORDS[ALICE],
            "--from", ALICE, "--to", BOB,
            "--header", f"Subject: {subject}",
            "--helo", "client.test",
        ]
    )  # fmt: skip
    assert_delivered(node, subject)


@pytest.mark.parametrize("port", PORTS)
def test_curl(node: NodeProcess, tmp_path: Path, port: str) -> None:
    subject = f"curl {port} {uuid.uuid4().hex[:8]}"
    eml = tmp_path / "letter.eml"
    eml.write_bytes(letter(subject))
    number = node.ports[PORTS[port]]
    scheme, tls = ("smtp", ["--ssl-reqd"]) if port == "587" else ("smtps", [])
    run(
        [
            "curl", "--silent", "--show-error", *tls,
            "--cacert", str(node.cafile),
            "--resolve", f"{HOSTNAME}:{number}:{node.host}",
            "--url", f"{scheme}://{HOSTNAME}:{number}/client.test",
            "--user", f"{ALICE}:{PASSWORDS[ALICE]}",
            "--mail-from", ALICE, "--mail-rcpt", BOB,
            "--upload-file", str(eml),
        ]
    )  # fmt: skip
    assert_delivered(node, subject)


@pytest.mark.parametrize("port", PORTS)
def test_msmtp(node: NodeProcess, tmp_path: Path, port: str) -> None:
    subject = f"msmtp {port} {uuid.uuid4().hex[:8]}"
    rc = tmp_path / "msmtprc"
    rc.write_text(
        "defaults\nauth on\ntls on\n"
        f"tls_trust_file {node.cafile}\nlogfile {tmp_path / 'msmtp.log'}\n\n"
        f"account pochta\nhost {node.host}\nport {node.ports[PORTS[port]]}\n"
        f"tls_starttls {'on' if port == '587' else 'off'}\n"
        f"tls_host_override {HOSTNAME}\ndomain client.test\n"
        f"from {ALICE}\nuser {ALICE}\npassword {PASSWORDS[ALICE]}\n"
    )
    rc.chmod(0o600)  # msmtp refuses a readable file that holds a password
    run(
        ["msmtp", "-C", str(rc), "-a", "pochta", BOB], input=letter(subject).replace(b"\r\n", b"\n")
    )
    assert "smtpstatus=250" in (tmp_path / "msmtp.log").read_text()
    assert_delivered(node, subject)


def smtplib_client(node: NodeProcess, port: str) -> smtplib.SMTP:
    """Connected to the node's address, verifying the certificate for HOSTNAME."""
    context = ssl.create_default_context(cafile=str(node.cafile))
    client = (
        smtplib.SMTP_SSL(local_hostname="client.test", context=context, timeout=30)
        if port == "465"
        else smtplib.SMTP(local_hostname="client.test", timeout=30)
    )
    client._host = HOSTNAME  # the name smtplib gives TLS to verify (it has no separate option)
    client.connect(node.host, node.ports[PORTS[port]])
    if port == "587":
        client.starttls(context=context)
    return client


@pytest.mark.parametrize("port", PORTS)
def test_smtplib(node: NodeProcess, port: str) -> None:
    subject = f"smtplib {port} {uuid.uuid4().hex[:8]}"
    client = smtplib_client(node, port)
    try:
        client.ehlo()
        assert "SCRAM-SHA-256" in client.esmtp_features["auth"]
        client.login(ALICE, PASSWORDS[ALICE])
        refused = client.sendmail(ALICE, [BOB], letter(subject))
        assert refused == {}
    finally:
        client.quit()
    assert_delivered(node, subject)
