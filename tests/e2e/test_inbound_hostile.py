"""Hostile and broken clients on the mx port, over real sockets with exact bytes: SMTP smuggling,
STARTTLS command injection, over-long lines, over-size letters, NUL bytes, 8-bit garbage, commands
out of order, too many errors, AUTH on port 25, VRFY, HELP.
Imports pytest, the stdlib and the e2e fixtures (`wire`: a raw socket client).
"""

from __future__ import annotations

import ssl
import time
import uuid
from typing import Any

import pytest

from pochta.testing.node import NodeProcess

RCPT = "alice@mail.test"
MAX_SIZE = 64 * 1024


@pytest.fixture(scope="module")
def node(module_node_factory: Any) -> NodeProcess:
    node: NodeProcess = module_node_factory(
        "mx",
        hostname="mx.mail.test",
        domains=["mail.test"],
        users={RCPT: "pw-alice"},
        extra_toml='[limits]\nmessage_size = "64KiB"\n',
    )
    return node


def stored(mailbox: Any, node: NodeProcess, tag: str) -> list[str]:
    """Subjects in alice's INBOX that contain `tag`."""
    return [m.subject for m in mailbox(node, RCPT) if tag in m.subject]


def ready(wire: Any, node: NodeProcess) -> Any:
    """A connection past the greeting and EHLO."""
    w = wire(node)
    assert w.reply()[0] == 220
    code, text = w.command("EHLO client.test")
    assert code == 250, text
    return w


def open_data(w: Any, sender: str = "s@outside.test") -> None:
    assert w.command(f"MAIL FROM:<{sender}>")[0] == 250
    assert w.command(f"RCPT TO:<{RCPT}>")[0] == 250
    assert w.command("DATA")[0] == 354


def good_letter(w: Any, subject: str) -> tuple[int, str]:
    open_data(w)
    w.send(f"Subject: {subject}\r\n\r\nfine\r\n.\r\n".encode())
    return w.reply()


# RFC 5321 §2.3.8 and §4.1.1.4: only <CRLF>.<CRLF> ends DATA. Each of these "almost
# terminators" is taken as the end of a letter by some MTA, so a letter can carry a second,
# smuggled letter past a relay (SMTP smuggling, 2023).
SMUGGLING = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CR.CR": b"\r.\r",
    "CRLF.LF": b"\r\n.\n",
    "CR.CRLF": b"\r.\r\n",
    "CRLF.CR": b"\r\n.\r",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "CRLF.NUL.CRLF": b"\r\n.\x00\r\n",
}


@pytest.mark.parametrize("split", [False, True], ids=["one-packet", "byte-by-byte"])
@pytest.mark.parametrize("variant", list(SMUGGLING))
def test_smuggling_stores_nothing(
    node: NodeProcess, wire: Any, mailbox: Any, variant: str, split: bool
) -> None:
    tag = uuid.uuid4().hex
    real = f"From: <s@outside.test>\r\nSubject: real-{tag}\r\n\r\nreal body".encode()
    smuggled = (
        f"MAIL FROM:<admin@mail.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n"
        f"From: <admin@mail.test>\r\nSubject: smuggled-{tag}\r\n\r\nevil\r\n"
    ).encode()
    w = ready(wire, node)
    open_data(w)
    head = real + SMUGGLING[variant]
    if split:  # every byte of the fake terminator in its own TCP segment
        w.send(real)
        for i in range(len(SMUGGLING[variant]) + 6):
            time.sleep(0.003)
            w.send((head + smuggled)[len(real) + i : len(real) + i + 1])
        time.sleep(0.003)
        w.send((head + smuggled)[len(real) + len(SMUGGLING[variant]) + 6 :])
    else:
        w.send(head + smuggled)
    w.send(b".\r\n")  # the real terminator (the smuggled text ended with CRLF)
    code, text = w.reply()
    assert (code, text[:5]) == (550, "5.6.0"), text
    # Nothing of the smuggled MAIL/RCPT/DATA was run: the next reply answers our NOOP.
    assert w.command("NOOP") == (250, "2.0.0 OK")
    assert good_letter(w, f"after-{tag}")[0] == 250
    assert stored(mailbox, node, tag) == [f"after-{tag}"]


def test_dot_stuffing_across_segments(
    node: NodeProcess, wire: Any, mailbox: Any, store_query: Any
) -> None:
    # Every CR, LF and dot in its own TCP segment: the decoder must keep its place across reads
    # (RFC 5321 §4.5.2: a leading dot is removed, only a lone "." line ends the data).
    tag = uuid.uuid4().hex
    body = f"Subject: seg-{tag}\r\n\r\n.\r\n..\r\n...x\r\n.a\r\n\r\n.\r\nend\r\n".encode()
    stuffed = body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    w = ready(wire, node)
    open_data(w)
    for i in range(len(stuffed)):
        w.send(stuffed[i : i + 1])
        if stuffed[i : i + 1] in (b"\r", b"\n", b"."):
            time.sleep(0.002)
    code, text = w.reply()
    assert code == 250, text
    (message,) = [m for m in mailbox(node, RCPT) if tag in m.subject]
    raw = store_query(node, lambda s: s.get_message(message.id)).raw
    assert raw.endswith(b"\r\n" + body)
    assert w.command("NOOP")[0] == 250


def test_recipient_limit(node: NodeProcess, wire: Any, mailbox: Any) -> None:
    # RFC 5321 §4.5.3.1.8: at least 100 recipients; the 101st gets 452 4.5.3 (try later).
    tag = uuid.uuid4().hex
    w = ready(wire, node)
    assert w.command("MAIL FROM:<s@outside.test>")[0] == 250
    w.send(f"RCPT TO:<{RCPT}>\r\n".encode() * 101)
    codes = [w.reply() for _ in range(101)]
    assert [c for c, _ in codes[:100]] == [250] * 100
    assert (codes[100][0], codes[100][1][:5]) == (452, "4.5.3")
    assert w.command("DATA")[0] == 354
    w.send(f"Subject: many-{tag}\r\n\r\nx\r\n.\r\n".encode())
    assert w.reply()[0] == 250
    assert stored(mailbox, node, tag) == [f"many-{tag}"]  # one mailbox, one copy


def test_starttls_with_pipelined_plaintext_is_refused(
    node: NodeProcess, wire: Any, mailbox: Any
) -> None:
    # RFC 3207 §4.2 / CVE-2011-0411: commands after STARTTLS in the same packet must not run
    # (in the TLS session they would appear to come from the client).
    tag = uuid.uuid4().hex
    w = ready(wire, node)
    w.send(f"STARTTLS\r\nMAIL FROM:<a@outside.test>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n".encode())
    code, text = w.reply()
    assert (code, text[:5]) == (554, "5.5.1"), text
    assert w.closed()
    assert stored(mailbox, node, tag) == []


def test_plaintext_after_starttls_reply_is_no_command(node: NodeProcess, wire: Any) -> None:
    w = ready(wire, node)
    assert w.command("STARTTLS")[0] == 220
    w.send(b"MAIL FROM:<a@outside.test>\r\n")  # not a TLS ClientHello: the handshake fails
    w.sock.settimeout(5)
    received = b""
    while chunk := w.sock.recv(4096):
        received += chunk
    assert b"250" not in received


def test_starttls_then_mail_over_tls(node: NodeProcess, wire: Any, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    w = ready(wire, node)
    assert w.command("STARTTLS")[0] == 220
    w.starttls(ssl.create_default_context(cafile=str(node.cafile)), node.hostname)
    assert w.command("MAIL FROM:<a@outside.test>")[0] == 503  # EHLO again (RFC 3207 §4.2)
    code, text = w.command("EHLO client.test")
    assert code == 250 and "STARTTLS" not in text.split("\n")
    assert "AUTH" not in text  # never on port 25, not even over TLS
    assert w.command("AUTH PLAIN AGFsaWNlAHB3LWFsaWNl")[:1] == (502,)
    assert good_letter(w, f"tls-{tag}")[0] == 250
    assert stored(mailbox, node, tag) == [f"tls-{tag}"]


@pytest.mark.parametrize(
    "line",
    [b"NOOP " + b"x" * 600, b"X" * 512 + b"QUIT", b"MAIL FROM:<" + b"a" * 1000 + b"@b.test>"],
    ids=["noop", "quit-at-512", "mail"],
)
def test_overlong_command_line(node: NodeProcess, wire: Any, line: bytes) -> None:
    # RFC 5321 §4.5.3.1.4: 512 octets with CRLF; no part of the long line runs as a command.
    w = ready(wire, node)
    code, text = w.command(line)
    assert (code, text[:5]) == (500, "5.5.2"), text
    assert w.command("NOOP") == (250, "2.0.0 OK")
    assert w.command("MAIL FROM:<ok@outside.test>")[0] == 250  # no transaction was begun


def test_oversize_message_then_next_letter(node: NodeProcess, wire: Any, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    w = ready(wire, node)
    code, text = w.command(f"MAIL FROM:<s@outside.test> SIZE={MAX_SIZE + 1}")
    assert (code, text[:5]) == (552, "5.3.4"), text  # RFC 1870 §6.2
    open_data(w)
    line = b"y" * 900 + b"\r\n"
    w.send(f"Subject: big-{tag}\r\n\r\n".encode() + line * (MAX_SIZE // len(line) + 10))
    w.send(b".\r\n")
    code, text = w.reply()
    assert (code, text[:5]) == (552, "5.3.4"), text  # RFC 5321 §4.5.3.1.10
    assert good_letter(w, f"small-{tag}")[0] == 250  # the same connection goes on
    assert stored(mailbox, node, tag) == [f"small-{tag}"]


def test_nul_bytes(node: NodeProcess, wire: Any, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    w = ready(wire, node)
    code, text = w.command(b"NOOP\x00")
    assert (code, text[:5]) == (500, "5.5.2"), text
    code, text = w.command(b"MAIL FROM:<a\x00b@outside.test>")
    assert code == 500, text
    open_data(w)
    w.send(f"Subject: nul-{tag}\r\n\r\nbefore\x00after\r\n.\r\n".encode())
    code, text = w.reply()
    assert (code, text[:5]) == (550, "5.6.0"), text
    assert stored(mailbox, node, tag) == []


def test_commands_out_of_order(node: NodeProcess, wire: Any) -> None:
    w = wire(node)
    assert w.reply()[0] == 220
    for command in ("MAIL FROM:<a@outside.test>", f"RCPT TO:<{RCPT}>", "DATA"):
        code, text = w.command(command)  # RFC 5321 §4.1.4: EHLO/HELO first
        assert (code, text[:5]) == (503, "5.5.1"), (command, text)
    assert w.command("HELO client.test")[0] == 250
    for command in (f"RCPT TO:<{RCPT}>", "DATA"):
        assert w.command(command)[:1] == (503,), command
    assert w.command("MAIL FROM:<a@outside.test>")[0] == 250
    assert w.command("MAIL FROM:<a@outside.test>")[:1] == (503,)  # nested MAIL
    assert w.command("DATA")[:1] == (503,)  # no recipient yet
    assert w.command("STARTTLS")[:1] == (503,)  # not inside a transaction
    assert w.command("RSET")[0] == 250
    assert w.command("DATA")[:1] == (503,)


def test_eight_bit_garbage(node: NodeProcess, wire: Any, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    w = wire(node)
    assert w.reply()[0] == 220
    code, text = w.command(b"\xff\xfe\x80\x81 garbage \xc3")
    assert (code, text[:5]) == (500, "5.5.2"), text
    assert w.command("EHLO client.test")[0] == 250
    assert w.command(b"MAIL FROM:<caf\xe9@outside.test>")[0] == 500  # Latin-1, not UTF-8
    # 8-bit bytes in a body are data, not garbage (RFC 6152): stored as they came.
    open_data(w)
    w.send(f"Subject: 8bit-{tag}\r\n\r\n".encode() + bytes(range(128, 256)) + b"\r\n.\r\n")
    assert w.reply()[0] == 250
    assert stored(mailbox, node, tag) == [f"8bit-{tag}"]


def test_too_many_errors_closes(node: NodeProcess, wire: Any) -> None:
    w = ready(wire, node)
    w.send(b"BOGUS\r\n" * 15)
    codes = []
    while (code := w.reply()[0]) != 0:
        codes.append(code)
    assert codes == [500] * 9 + [421]  # [limits] errors = 10
    assert w.closed()


def test_auth_refused_on_port_25(node: NodeProcess, wire: Any) -> None:
    w = wire(node)
    assert w.reply()[0] == 220
    code, text = w.command("EHLO client.test")
    assert code == 250 and "AUTH" not in text
    code, text = w.command("AUTH PLAIN AGFsaWNlAHB3LWFsaWNl")  # alice's real password
    assert (code, text[:5]) == (502, "5.5.1"), text
    assert w.command("AUTH LOGIN")[:1] == (502,)


def test_vrfy_expn_help(node: NodeProcess, wire: Any) -> None:
    w = ready(wire, node)
    for target in (RCPT, "nobody@mail.test"):  # RFC 5321 §3.5.3: no user enumeration
        code, text = w.command(f"VRFY {target}")
        assert (code, text[:5]) == (252, "2.5.0"), text
    assert w.command("EXPN staff")[:1] == (502,)
    code, text = w.command("HELP")
    assert code == 214 and "MAIL" in text
    assert w.command("QUIT")[0] == 221
    assert w.closed()
