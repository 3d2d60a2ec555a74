"""Helpers of the test_delivery_* tests: two real `pochta serve` nodes, mail.test on 127.0.0.2
and yandex.test on 127.0.0.3, sharing one MX port, resolving each other through a real UDP DNS
server started by the test."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pochta.client.session import SmtpClient
from pochta.testing.dnsserver import DnsServer
from pochta.testing.node import NodeProcess, free_port

MAIL_IP = "127.0.0.2"
YANDEX_IP = "127.0.0.3"
DEAD_IP = "127.0.0.9"  # nothing listens there

T = TypeVar("T")


def base_records() -> dict[tuple[str, str], list[str]]:
    return {
        ("mail.test", "MX"): ["10 mx.mail.test."],
        ("mx.mail.test", "A"): [MAIL_IP],
        ("yandex.test", "MX"): ["10 mx.yandex.test."],
        ("mx.yandex.test", "A"): [YANDEX_IP],
    }


def common_port(hosts: Sequence[str]) -> int:
    """A TCP port free on every one of `hosts` right now."""
    for _ in range(100):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no common free port")


def node_toml(dns: DnsServer, mx_port: int, **extra: str) -> str:
    """[dns]/[delivery]/[queue] for fast tests: 1 s retries, 0.5 s polls."""
    queue = {"retry": '["1s"]', "give_up_after": '"5d"', "warn_after": '""'}
    delivery = {"port": str(mx_port), "poll": "0.5", "lease": "30"}
    for key, value in extra.items():
        (queue if key in queue else delivery)[key] = value
    lines = [f'[dns]\nnameservers = ["{dns.host}:{dns.port}"]\ntimeout = 2\n', "[delivery]"]
    lines += [f"{k} = {v}" for k, v in delivery.items()]
    lines += ["", "[queue]", *(f"{k} = {v}" for k, v in queue.items())]
    lines += ["", '[timeouts]\nconnect = "2s"\n']
    return "\n".join(lines)


def wait_until(check: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.25)


def mailbox(node: NodeProcess, address: str, folder: str = "INBOX") -> list[dict[str, Any]]:
    out = node.cli("mail", "list", address, "--folder", folder, "--json").stdout
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def queue(node: NodeProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(node.cli("queue", "list", "--json").stdout)
    return rows


def raw(node: NodeProcess, message_id: int) -> bytes:
    import subprocess

    result = subprocess.run(
        node.command("mail", "show", str(message_id), "--raw"), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def letter(sender: str, rcpts: Sequence[str], subject: str) -> bytes:
    return (
        f"From: <{sender}>\r\nTo: {', '.join(f'<{r}>' for r in rcpts)}\r\n"
        f"Subject: {subject}\r\n\r\nbody of {subject}\r\n"
    ).encode()


async def _submit(
    node: NodeProcess, user: str, password: str, letters: Sequence[tuple[list[str], str]]
) -> list[list[bool]]:
    ctx = ssl.create_default_context(cafile=str(node.cafile))
    client = await SmtpClient.connect(node.host, node.ports["submission"], helo_name="mua.test")
    try:
        await client.starttls(ctx, node.hostname)
        await client.auth(user, password)
        accepted = []
        for rcpts, subject in letters:
            result = await client.send(user, rcpts, letter(user, rcpts, subject))
            accepted.append([r.accepted for r in result.recipients])
        return accepted
    finally:
        await client.quit()


def submit(
    node: NodeProcess, user: str, password: str, rcpts: list[str], subject: str, count: int = 1
) -> None:
    """Send through the node's 587 with STARTTLS and AUTH; every recipient must be accepted."""
    subjects = [subject] if count == 1 else [f"{subject} {i}" for i in range(count)]
    results = asyncio.run(_submit(node, user, password, [(rcpts, s) for s in subjects]))
    assert all(all(r) for r in results), results
