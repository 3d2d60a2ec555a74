"""Limits a stranger must not be able to exceed, on a real `pochta serve`: connections per IP,
the command and data timeouts (RFC 5321 §4.5.3.2), and shutdown (SIGTERM) with clients connected.
Imports pytest, the stdlib and the e2e fixtures.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from pochta.testing.node import NodeProcess

RCPT = "postmaster@mail.test"  # exists with every domain; no user needed


def greeted(wire: Any, node: NodeProcess, source: str = "") -> Any:
    w = wire(node, source=source)
    code, text = w.reply()
    assert code == 220, text
    return w


def test_connections_per_ip(node_factory: Any, wire: Any) -> None:
    node = node_factory(domains=["mail.test"], extra_toml="[limits]\nconnections_per_ip = 3\n")
    # Our own source addresses: the probe of node.start() (from 127.0.0.1) cannot count here.
    a, b = node.host.rsplit(".", 1)[0] + ".250", node.host.rsplit(".", 1)[0] + ".251"
    first = [greeted(wire, node, a) for _ in range(3)]
    fourth = wire(node, source=a)
    code, text = fourth.reply()
    assert (code, text[:5]) == (421, "4.7.0"), text
    assert fourth.closed()
    other = greeted(wire, node, b)  # another address is not affected
    assert other.command("NOOP")[0] == 250
    # The others were not disturbed; closing one frees its slot.
    assert all(w.command("NOOP")[0] == 250 for w in first)
    first[0].command("QUIT")
    first[0].close()
    deadline = time.monotonic() + 5
    while True:
        w = wire(node, source=a)
        code, _ = w.reply()
        if code == 220 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert code == 220
    assert all(w.command("NOOP")[0] == 250 for w in first[1:])


@pytest.fixture(scope="module")
def slow_node(module_node_factory: Any) -> NodeProcess:
    node: NodeProcess = module_node_factory(
        domains=["mail.test"],
        extra_toml='[timeouts]\ncommand = "1s"\ndata = "1s"\n',
    )
    return node


def test_command_timeout(slow_node: NodeProcess, wire: Any) -> None:
    w = greeted(wire, slow_node)
    assert w.command("EHLO client.test")[0] == 250
    started = time.monotonic()
    code, text = w.reply()  # we say nothing more
    waited = time.monotonic() - started
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert 0.8 < waited < 5.0
    assert w.closed()


def test_silent_tls_handshake_times_out(slow_node: NodeProcess, wire: Any) -> None:
    # After STARTTLS (and on port 465) a client that never starts the handshake is dropped
    # within the command timeout too, not after asyncio's default 60 s.
    w = greeted(wire, slow_node)
    assert w.command("EHLO client.test")[0] == 250
    assert w.command("STARTTLS")[0] == 220
    implicit = wire(slow_node, "submissions")
    started = time.monotonic()
    assert w.closed(timeout=10)
    assert implicit.closed(timeout=10)
    assert time.monotonic() - started < 5


def test_timeout_is_per_command_not_per_connection(slow_node: NodeProcess, wire: Any) -> None:
    w = greeted(wire, slow_node)
    for _ in range(3):  # 1.5 s in all, each pause shorter than the 1 s timeout
        time.sleep(0.5)
        assert w.command("NOOP")[0] == 250


def test_data_timeout_stores_nothing(slow_node: NodeProcess, wire: Any, mailbox: Any) -> None:
    tag = uuid.uuid4().hex
    w = greeted(wire, slow_node)
    assert w.command("EHLO client.test")[0] == 250
    assert w.command("MAIL FROM:<s@outside.test>")[0] == 250
    assert w.command(f"RCPT TO:<{RCPT}>")[0] == 250
    assert w.command("DATA")[0] == 354
    w.send(f"Subject: {tag}\r\n\r\nhalf a letter\r\n".encode())
    code, text = w.reply()
    assert (code, text[:5]) == (421, "4.4.2"), text
    assert w.closed()
    assert mailbox(slow_node, RCPT) == []


def test_sigterm_tells_idle_clients(node_factory: Any, wire: Any, mailbox: Any) -> None:
    node = node_factory(domains=["mail.test"])
    idle = greeted(wire, node)
    assert idle.command("EHLO client.test")[0] == 250
    in_tx = greeted(wire, node)  # idle inside a transaction
    assert in_tx.command("EHLO client.test")[0] == 250
    assert in_tx.command("MAIL FROM:<s@outside.test>")[0] == 250
    assert in_tx.command(f"RCPT TO:<{RCPT}>")[0] == 250
    in_data = greeted(wire, node)  # half-way through a letter
    assert in_data.command("EHLO client.test")[0] == 250
    assert in_data.command("MAIL FROM:<s@outside.test>")[0] == 250
    assert in_data.command(f"RCPT TO:<{RCPT}>")[0] == 250
    assert in_data.command("DATA")[0] == 354
    in_data.send(b"Subject: cut short\r\n\r\nthe first half\r\n")
    unsaid = wire(node)  # the greeting not read yet
    started = time.monotonic()
    assert node.stop() == 0  # SIGTERM, then wait for the exit
    assert time.monotonic() - started < 8
    for w in (idle, in_tx, in_data):
        code, text = w.reply()
        assert (code, text[:5]) == (421, "4.3.2"), text  # RFC 5321 §3.8
        assert w.closed()
    assert unsaid.reply()[0] == 220
    assert unsaid.reply()[0] == 421
    with pytest.raises(OSError):
        wire(node)
    assert mailbox(node, RCPT) == []  # the half letter was not stored
