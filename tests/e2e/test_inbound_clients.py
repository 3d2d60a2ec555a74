"""pochta receives mail from clients we did not write: Python's smtplib, aiosmtplib, swaks and
curl deliver to the mx port, in plaintext and over STARTTLS (RFC 3207), and the stored message is
the sent bytes exactly, below our Return-Path (RFC 5321 §4.4) and Received (§4.4) fields.
Imports pytest, aiosmtplib, the stdlib and the e2e fixtures.
"""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from pochta.testing.node import NodeProcess

SENDER = "sender@outside.test"
RCPT = "alice@mail.test"


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    node: NodeProcess = module_node_factory(
        "mx", hostname="mx.mail.test", domains=["mail.test"], users={RCPT: "pw-alice"}
    )
    return node


def letter(tag: str) -> bytes:
    """CRLF lines, lines that need dot-stuffing (RFC 5321 §4.5.2), 8-bit UTF-8 and a 998-octet
    line (the longest allowed, §4.5.3.1.6): what every client must carry unchanged."""
    return (
        f"From: Sender <{SENDER}>\r\nTo: {RCPT}\r\nSubject: {tag}\r\n"
        f"Message-ID: <{tag}@outside.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        ".a line that starts with a dot\r\n..two dots\r\n.\r\n \r\n"
        "Grüße, почта\r\n" + "x" * 998 + "\r\nlast line\r\n"
    ).encode()


def tls_context(node: NodeProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(node.cafile))


def send_smtplib(node: NodeProcess, data: bytes, path: Path, tls: bool) -> None:
    with smtplib.SMTP(node.host, node.ports["mx"], local_hostname="client.test", timeout=10) as c:
        if tls:
            c._host = node.hostname  # type: ignore[attr-defined]  # verify the name, not the IP
            c.starttls(context=tls_context(node))
            assert c.sock is not None and isinstance(c.sock, ssl.SSLSocket)
        refused = c.sendmail(SENDER, [RCPT], data)
        assert refused == {}


def send_aiosmtplib(node: NodeProcess, data: bytes, path: Path, tls: bool) -> None:
    import asyncio

    async def run() -> None:
        client = aiosmtplib.SMTP(
            hostname=node.host, port=node.ports["mx"], start_tls=False, local_hostname="a.test"
        )
        await client.connect()
        if tls:
            await client.starttls(server_hostname=node.hostname, tls_context=tls_context(node))
            assert client.get_transport_info("ssl_object") is not None
        errors, reply = await client.sendmail(SENDER, [RCPT], data)
        assert errors == {} and reply.startswith("2.0.0 OK"), (errors, reply)
        await client.quit()

    asyncio.run(run())


def send_swaks(node: NodeProcess, data: bytes, path: Path, tls: bool) -> None:
    if shutil.which("swaks") is None:
        pytest.skip("swaks is not installed (scripts/setup.sh installs it)")
    # With the closing "." in the file swaks sends the data as it is (no added line end).
    path.write_bytes(data + b".\r\n")
    cmd = ["swaks", "--server", node.host, "--port", str(node.ports["mx"]), "--helo", "s.test"]
    cmd += ["--from", SENDER, "--to", RCPT, "--data", f"@{path}", "--timeout", "10"]
    if tls:
        cmd += ["-tls", "--tls-verify", "--tls-ca-path", str(node.cafile)]
        cmd += ["--tls-sni", node.hostname]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if "requires Net::SSLeay" in result.stdout + result.stderr:
        pytest.skip("swaks STARTTLS needs the Debian package libnet-ssleay-perl")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    if tls:
        assert "TLS started" in result.stdout


def send_curl(node: NodeProcess, data: bytes, path: Path, tls: bool) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (scripts/setup.sh installs it)")
    path.write_bytes(data)
    port = node.ports["mx"]
    cmd = ["curl", "-sS", "--max-time", "20", f"smtp://{node.hostname}:{port}/c.test"]
    cmd += ["--resolve", f"{node.hostname}:{port}:{node.host}"]  # loopback only, no DNS
    cmd += ["--mail-from", SENDER, "--mail-rcpt", RCPT, "--upload-file", str(path)]
    if tls:
        cmd += ["--ssl-reqd", "--cacert", str(node.cafile)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]


CLIENTS: dict[str, Callable[[NodeProcess, bytes, Path, bool], None]] = {
    "smtplib": send_smtplib,
    "aiosmtplib": send_aiosmtplib,
    "swaks": send_swaks,
    "curl": send_curl,
}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_delivers_exact_bytes(
    node: NodeProcess,
    client: str,
    tls: bool,
    tmp_path: Path,
    mailbox: Any,
    stored_parts: Any,
) -> None:
    tag = f"{client}-{'tls' if tls else 'plain'}-{uuid.uuid4().hex[:12]}"
    data = letter(tag)
    CLIENTS[client](node, data, tmp_path / "letter.eml", tls)

    rows = [m for m in mailbox(node, RCPT) if m.subject == tag]
    assert len(rows) == 1, f"expected one stored copy of {tag}"
    assert rows[0].message_id == f"<{tag}@outside.test>"
    trace, rest = stored_parts(node, rows[0].id)  # `pochta mail show ID --raw`
    assert rest == data
    assert trace[0] == f"Return-Path: <{SENDER}>\r\n".encode()
    assert len(trace) == 2 and trace[1].startswith(b"Received: from ")
    received = b" ".join(trace[1].split())
    assert f"by {node.hostname}".encode() in received
    assert (b"with ESMTPS" in received) is tls  # RFC 3848
    if tls:
        assert b"using TLS1." in received
