"""Helpers of the MUA tests: run `pochta send` against a node and read its mailboxes through
the node's SQLite store opened in this process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pochta.store.api import MailStore, MessageInfo
from pochta.testing.node import NodeProcess, query_store_url

T = TypeVar("T")

HOSTNAME = "mx.mua.test"
ALICE, BOB, CAROL = "alice@mua.test", "bob@mua.test", "carol@mua.test"
SALES = "sales@mua.test"  # alias of alice
PASSWORDS = {ALICE: "alice-pw-1", BOB: "bob-pw-2", CAROL: "carol-pw-3"}
# Nothing may leave loopback: a dead loopback name server and a catch-all route.
SAFE_DNS = '[dns]\nnameservers = ["127.0.0.1:9"]\n\n[dns.routes]\n"*" = ["127.0.0.1:9"]\n'


@dataclass
class Sent:
    code: int
    stdout: str
    stderr: str


def pochta_send(
    node: NodeProcess,
    *args: str,
    kind: str = "submission",
    password: str | None = PASSWORDS[ALICE],
    stdin: bytes = b"",
    user: str = ALICE,
    trust: tuple[str, ...] | None = None,
) -> Sent:
    """Run `pochta send` against the node (as `user`, password in $POCHTA_PASSWORD)."""
    env = {k: v for k, v in os.environ.items() if k != "POCHTA_PASSWORD"}
    if password is not None:
        env["POCHTA_PASSWORD"] = password
    if trust is None:
        trust = ("--cafile", str(node.cafile), "--server-name", HOSTNAME)
    tls = ("--tls", "implicit") if kind == "submissions" else ()
    cmd = [sys.executable, "-m", "pochta", "send", "--server", f"{node.host}:{node.ports[kind]}"]
    cmd += ["--user", user, *tls, *trust, *args]
    result = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, env=env)
    return Sent(result.returncode, result.stdout.decode(), result.stderr.decode())


def _query(node: NodeProcess, fn: Callable[[MailStore], Awaitable[T]]) -> T:
    """Run `fn` on the node's SQLite store in this process (WAL lets a reader in while the server
    writes); much faster than one `pochta` command per look."""

    return query_store_url(f"sqlite:///{node.db}", fn)


def mail_list(node: NodeProcess, address: str, folder: str = "INBOX") -> list[MessageInfo]:
    return _query(node, lambda store: store.list_messages(address, folder))


def find_raw(node: NodeProcess, address: str, subject: str, folder: str = "INBOX") -> bytes | None:
    """The stored bytes of the one letter with `subject` in a mailbox; None if there is none."""

    async def look(store: MailStore) -> bytes | None:
        rows = [m for m in await store.list_messages(address, folder) if m.subject == subject]
        assert len(rows) <= 1, rows
        return (await store.get_message(rows[0].id)).raw if rows else None

    return _query(node, look)
