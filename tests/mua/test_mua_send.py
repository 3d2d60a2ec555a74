"""`pochta send` and `pochta.mua.submit` against a real `pochta serve` node: letters with a UTF-8
subject and attachments arrive intact, Bcc stays out of the headers, per-recipient outcomes and
exit codes, and one-line errors (connection, TLS verification, AUTH) without a traceback."""

from __future__ import annotations

import asyncio
import email
import email.policy
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from mua_helpers import (
    ALICE,
    BOB,
    CAROL,
    HOSTNAME,
    PASSWORDS,
    SALES,
    find_raw,
    mail_list,
    pochta_send,
)

from pochta import mua
from pochta.testing.node import NodeProcess, free_port

SUBJECT = "Привет, мир ✉"


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def tagged(subject: str) -> str:
    return f"{subject} {uuid.uuid4().hex[:8]}"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, bytes]:
    """Two attachments: every byte value, and UTF-8 text with CRLF and LF line ends."""
    contents = {
        "all-bytes.bin": bytes(range(256)) * 4,
        "заметка.txt": "first line\r\nвторая строка\nthird ✉\n".encode(),
    }
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    return contents


def attachments_of(msg: EmailMessage) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for part in msg.iter_attachments():
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out[str(part.get_filename())] = payload
    return out


def body_text(msg: EmailMessage) -> str:
    part = msg.get_body(("plain",))
    assert part is not None
    return str(part.get_content()).replace("\r\n", "\n")


@pytest.mark.parametrize("kind", ["submission", "submissions"])
def test_send_utf8_subject_and_attachments(
    node: NodeProcess, tmp_path: Path, files: dict[str, bytes], kind: str
) -> None:
    subject = tagged(SUBJECT)
    attach = [arg for name in files for arg in ("--attach", str(tmp_path / name))]
    body = "Здравствуй, Боб!\nВо вложении два файла.\n"
    sent = pochta_send(
        node, "--to", f"Bob <{BOB}>", "--subject", subject, *attach, stdin=body.encode(), kind=kind
    )
    assert sent.code == 0, sent.stderr
    assert sent.stdout.startswith(f"{BOB}: 250 2.0.0 OK queued as ")
    raw = find_raw(node, BOB, subject)
    assert raw is not None
    msg = parse(raw)
    assert msg["Subject"] == subject
    assert msg["From"] == ALICE
    assert attachments_of(msg) == files
    assert body_text(msg) == body
    copy = find_raw(node, ALICE, subject, "Sent")
    assert copy is not None and raw.endswith(copy)


def test_bcc_gets_the_letter_but_is_not_in_the_headers(node: NodeProcess) -> None:
    subject = tagged("bcc")
    sent = pochta_send(
        node, "--to", BOB, "--cc", SALES, "--bcc", CAROL, "--subject", subject, "--body", "hi"
    )
    assert sent.code == 0, sent.stderr
    outcomes = [line.split(": ", 1) for line in sent.stdout.splitlines()]
    assert [who for who, _ in outcomes] == [BOB, SALES, CAROL]
    assert all(reply.startswith("250 2.0.0 ") for _, reply in outcomes)
    for who in (BOB, CAROL, ALICE):  # SALES is alice's alias: her INBOX gets the Cc copy
        raw = find_raw(node, who, subject)
        assert raw is not None, who
        for name, value in parse(raw).items():
            if name not in ("Received", "Return-Path"):  # trace fields are the MSA's
                assert CAROL not in str(value), (name, value)
        assert parse(raw)["Bcc"] is None
        assert parse(raw)["Cc"] == SALES


def test_body_from_file_and_from_alias(node: NodeProcess, tmp_path: Path) -> None:
    subject = tagged("alias")
    text = tmp_path / "body.txt"
    text.write_text("from a file\n")
    sent = pochta_send(
        node, "--from", f"Sales Team <{SALES}>", "--to", BOB,
        "--subject", subject, "--body-file", str(text),
    )  # fmt: skip
    assert sent.code == 0, sent.stderr
    raw = find_raw(node, BOB, subject)
    assert raw is not None
    msg = parse(raw)
    assert msg["From"].addresses[0].addr_spec == SALES
    assert msg["From"].addresses[0].display_name == "Sales Team"
    assert raw.startswith(f"Return-Path: <{SALES}>".encode())  # the envelope sender
    assert body_text(msg) == "from a file\n"


def test_password_from_stdin(node: NodeProcess) -> None:
    subject = tagged("pw stdin")
    sent = pochta_send(
        node, "--to", BOB, "--subject", subject, "--body", "x", "--password-stdin",
        password=None, stdin=f"{PASSWORDS[ALICE]}\n".encode(),
    )  # fmt: skip
    assert sent.code == 0, sent.stderr
    assert find_raw(node, BOB, subject) is not None


def test_password_stdin_and_body_stdin_conflict(node: NodeProcess) -> None:
    sent = pochta_send(
        node, "--to", BOB, "--subject", "s", "--password-stdin", password=None, stdin=b"pw\nbody"
    )
    assert sent.code == 2
    assert "--password-stdin" in sent.stderr and "--body" in sent.stderr
    assert len(sent.stderr.splitlines()) == 1


def test_no_password_without_terminal(node: NodeProcess) -> None:
    sent = pochta_send(node, "--to", BOB, "--subject", "s", "--body", "b", password=None)
    assert sent.code == 2
    assert "POCHTA_PASSWORD" in sent.stderr


def test_some_refused_exits_1(node: NodeProcess) -> None:
    sent = pochta_send(node, "--to", BOB, "nobody@mua.test", "--subject", "s", "--body", "b")
    assert sent.code == 1
    lines = sent.stdout.splitlines()
    assert lines[0].startswith(f"{BOB}: 250 ")
    assert lines[1] == "nobody@mua.test: 550 5.1.1 No such user here"


def test_all_refused_exits_2(node: NodeProcess) -> None:
    sent = pochta_send(node, "--to", "nobody@mua.test", "--subject", "s", "--body", "b")
    assert sent.code == 2
    assert sent.stdout.startswith("nobody@mua.test: 550 5.1.1")


def test_sending_as_someone_else_is_refused(node: NodeProcess) -> None:
    sent = pochta_send(node, "--from", BOB, "--to", CAROL, "--subject", "s", "--body", "b")
    assert sent.code == 2
    assert sent.stdout == f"{CAROL}: 553 5.7.1 Sender address not owned by authenticated user\n"


def one_line_error(sent: object) -> str:
    from mua_helpers import Sent

    assert isinstance(sent, Sent)
    assert sent.code == 2
    assert sent.stdout == ""
    assert "Traceback" not in sent.stderr
    lines = sent.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pochta send: error: ")
    return lines[0]


def test_wrong_password(node: NodeProcess) -> None:
    line = one_line_error(
        pochta_send(node, "--to", BOB, "--subject", "s", "--body", "b", password="nope")
    )
    assert "AUTH refused: 535 5.7.8" in line


def test_untrusted_certificate(node: NodeProcess) -> None:
    sent = pochta_send(
        node, "--to", BOB, "--subject", "s", "--body", "b", trust=("--server-name", HOSTNAME)
    )
    assert "certificate verification failed" in one_line_error(sent)


def test_wrong_host_name(node: NodeProcess) -> None:
    trust = ("--cafile", str(node.cafile), "--server-name", "other.mua.test")
    sent = pochta_send(node, "--to", BOB, "--subject", "s", "--body", "b", trust=trust)
    line = one_line_error(sent)
    assert "certificate verification failed" in line and "other.mua.test" in line


def test_insecure_skips_verification(node: NodeProcess) -> None:
    subject = tagged("insecure")
    sent = pochta_send(
        node, "--to", BOB, "--subject", subject, "--body", "b", trust=("--insecure",)
    )
    assert sent.code == 0, sent.stderr
    assert find_raw(node, BOB, subject) is not None


def test_connection_refused(node: NodeProcess) -> None:
    node2 = NodeProcess(node.directory, node.host, HOSTNAME, {"submission": free_port(node.host)})
    sent = pochta_send(node2, "--to", BOB, "--subject", "s", "--body", "b")
    assert "connection refused" in one_line_error(sent)


def test_implicit_tls_on_starttls_port(node: NodeProcess) -> None:
    node2 = NodeProcess(node.directory, node.host, HOSTNAME, dict(node.ports))
    node2.ports["submissions"] = node.ports["submission"]  # speak TLS first to port 587
    sent = pochta_send(node2, "--to", BOB, "--subject", "s", "--body", "b", kind="submissions")
    assert "TLS" in one_line_error(sent)


def test_missing_attachment(node: NodeProcess, tmp_path: Path) -> None:
    sent = pochta_send(
        node, "--to", BOB, "--subject", "s", "--body", "b", "--attach", str(tmp_path / "nope")
    )
    assert "nope" in one_line_error(sent)


def test_no_recipients(node: NodeProcess) -> None:
    assert "no recipients" in one_line_error(pochta_send(node, "--subject", "s", "--body", "b"))


# -- the library ------------------------------------------------------------------------------


async def test_library_build_and_submit(
    node: NodeProcess, tmp_path: Path, files: dict[str, bytes]
) -> None:
    subject = tagged(SUBJECT)
    message = mua.build_message(
        sender=ALICE,
        to=[BOB],
        cc=[],
        subject=subject,
        body="библиотека\n",
        attachments=[tmp_path / name for name in files],
        hostname="mua.test",
    )
    result = await mua.submit(
        message,
        server=node.host,
        port=node.ports["submissions"],
        user=ALICE,
        password=PASSWORDS[ALICE],
        sender=ALICE,
        recipients=[BOB, CAROL],  # CAROL as Bcc
        tls="implicit",
        cafile=str(node.cafile),
        insecure=False,
        server_hostname=HOSTNAME,
    )
    assert result.accepted == [BOB, CAROL]
    assert result.data_reply is not None and result.data_reply.code == 250
    for who in (BOB, CAROL):
        raw = await asyncio.to_thread(find_raw, node, who, subject)
        assert raw is not None
        msg = parse(raw)
        assert msg["Subject"] == subject
        assert attachments_of(msg) == files
        assert body_text(msg) == "библиотека\n"
        assert msg["Message-ID"].endswith("@mua.test>")  # ours, not added by the MSA
    sent = await asyncio.to_thread(mail_list, node, ALICE, "Sent")
    assert subject in [m.subject for m in sent]


async def test_library_errors(node: NodeProcess) -> None:
    common = {
        "server": node.host,
        "user": ALICE,
        "sender": ALICE,
        "recipients": [BOB],
        "cafile": str(node.cafile),
        "insecure": False,
        "server_hostname": HOSTNAME,
    }
    with pytest.raises(mua.SubmitError) as err:
        await mua.submit(
            b"x", port=node.ports["submission"], password="bad", tls="starttls", **common
        )  # type: ignore[arg-type]
    assert err.value.stage == "auth"
    with pytest.raises(mua.SubmitError) as err:
        await mua.submit(b"x", port=free_port(node.host), password="p", tls="starttls", **common)  # type: ignore[arg-type]
    assert err.value.stage == "connect"
    with pytest.raises(ValueError):
        await mua.submit(b"x", port=1, password="p", tls="plain", **common)  # type: ignore[arg-type]
