"""Shared fixtures of the end-to-end tests: real `pochta serve` processes on loopback addresses.
Imports `pochta.testing.node`, `pochta.store`, `pochta.config` and `pochta.auth.passwords`.

- `node_factory(**kwargs)`: `NodeProcess.create(...)` in tmp_path on its own 127.0.x.y address
  (free ports), started unless `start=False`; `domains`, `users` and `aliases` are written to its
  store in-process (faster than the CLI). Every node is stopped at teardown and its log printed
  (pytest shows it when the test fails). `module_node_factory`: the same, shared by a module.
- `mailbox(node, address, folder="INBOX")`: the mailbox's MessageInfo list, read from the node's
  store in this process (fast); `store_query(node, fn)` runs any `fn(store)` likewise (sync
  tests only).
- `raw_message(node, id)`: `pochta mail show ID --raw` as the exact stored bytes.
- `stored_parts(node, id)`: `split_trace` of the raw message: our Return-Path/Received fields at
  the top, and the rest (the bytes the client sent).
- `wire(node, kind)`: a raw socket speaking exact bytes (`Wire`), for hostile-client tests.
"""

from __future__ import annotations

import itertools
import os
import socket
import ssl
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pochta import config
from pochta.auth.passwords import hash_password
from pochta.store.api import MailStore, MessageInfo
from pochta.testing.node import NodeProcess, free_port, query_store_url

T = TypeVar("T")

# A different 127.0.x.y range per pytest process, so concurrent runs rarely share an address
# (ports are picked free anyway, so sharing one is harmless).
_HOSTS = itertools.count(os.getpid() % 200 * 250)


def next_host() -> str:
    n = next(_HOSTS) % (240 * 250)
    return f"127.0.{10 + n // 250}.{2 + n % 250}"


def start_with_free_ports(node: NodeProcess, attempts: int = 3) -> None:
    """`node.start()`; when a port picked free was taken meanwhile (other test runs share the
    machine), pick new ports and try again."""
    for attempt in range(attempts):
        try:
            node.start()
            return
        except AssertionError as exc:
            node.stop()
            if "already in use" not in str(exc) or attempt == attempts - 1:
                raise
            node.ports = {kind: free_port(node.host) for kind in node.ports}
            node.write_config()


class NodeFactory:
    """Creates NodeProcess nodes under one directory and stops them all at `close()`."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.nodes: list[NodeProcess] = []

    def __call__(
        self,
        name: str = "node",
        *,
        start: bool = True,
        domains: Iterable[str] = (),
        users: Mapping[str, str] | None = None,
        aliases: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> NodeProcess:
        """Create (and start) a node; domains, users and aliases are written to its store in this
        process, which is much faster than one `pochta` command each."""
        kwargs.setdefault("host", next_host())
        node = NodeProcess.create(self.base / f"{name}-{len(self.nodes)}", **kwargs)
        self.nodes.append(node)
        provision(node, domains, users or {}, aliases or {})
        if start:
            start_with_free_ports(node)
        return node

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
            tail = node.log_text()[-4000:]
            if tail:
                print(f"--- log of {node.hostname} ({node.host}) ---\n{tail}")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_node_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeFactory]:
    factory = NodeFactory(tmp_path_factory.mktemp("nodes"))
    yield factory
    factory.close()


def query_store(node: NodeProcess, fn: Callable[[MailStore], Awaitable[T]]) -> T:
    """Run `fn` against the node's store (its configured URL) opened in this process; the node
    may be running (SQLite in WAL mode lets a reader in while the server writes). For sync
    tests only: it runs its own event loop."""
    return query_store_url(config.load(str(node.config)).store_url, fn)


def provision(
    node: NodeProcess,
    domains: Iterable[str],
    users: Mapping[str, str],
    aliases: Mapping[str, str],
) -> None:
    """What `pochta domain add`, `user add` and `alias add` do, in one store session."""

    async def run(store: MailStore) -> None:
        for domain in domains:
            await store.add_domain(domain)
        for address, password in users.items():
            await store.add_user(address, *hash_password(password))
        for alias, address in aliases.items():
            await store.add_alias(alias, address)

    query_store(node, run)


def _mailbox(node: NodeProcess, address: str, folder: str = "INBOX") -> list[MessageInfo]:
    return query_store(node, lambda store: store.list_messages(address, folder))


def _raw_message(node: NodeProcess, message_id: int) -> bytes:
    result = subprocess.run(
        node.command("mail", "show", str(message_id), "--raw"),
        capture_output=True,
        timeout=60,
        env={**os.environ, **node.env},
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


@pytest.fixture
def mailbox() -> Callable[..., list[MessageInfo]]:
    return _mailbox


@pytest.fixture
def store_query() -> Callable[[NodeProcess, Callable[[MailStore], Awaitable[Any]]], Any]:
    return query_store


@pytest.fixture
def raw_message() -> Callable[[NodeProcess, int], bytes]:
    return _raw_message


def split_trace(raw: bytes) -> tuple[list[bytes], bytes]:
    """The Return-Path and Received header fields at the top of a stored message (each with its
    folded continuation lines), and the rest: the bytes as the client sent them."""
    fields: list[bytes] = []
    rest = raw
    while rest.startswith((b"Return-Path:", b"Received:")):
        end = rest.index(b"\r\n") + 2
        while rest[end : end + 1] in (b" ", b"\t"):  # RFC 5322 §2.2.3 folding
            end = rest.index(b"\r\n", end) + 2
        fields.append(rest[:end])
        rest = rest[end:]
    return fields, rest


@pytest.fixture
def stored_parts() -> Callable[[NodeProcess, int], tuple[list[bytes], bytes]]:
    return lambda node, message_id: split_trace(_raw_message(node, message_id))


class Wire:
    """A raw SMTP client socket: send exact bytes, read whole replies (code, text lines)."""

    def __init__(self, host: str, port: int, timeout: float = 10.0, source: str = "") -> None:
        self.sock = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _line(self) -> bytes | None:
        while b"\r\n" not in self._buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """The next reply: (code, text with lines joined by "\\n"); (0, "") at EOF."""
        texts: list[str] = []
        while True:
            line = self._line()
            if line is None:
                return 0, "\n".join(texts)
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(texts)

    def command(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, context: ssl.SSLContext, hostname: str) -> None:
        """Wrap the socket after a 220 to STARTTLS (RFC 3207)."""
        assert not self._buf, "bytes after the 220 to STARTTLS"
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)

    def closed(self, timeout: float = 5.0) -> bool:
        """True when the server has closed the connection (EOF, nothing more unread)."""
        self.sock.settimeout(timeout)
        try:
            return not self._buf and self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLEOFError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire() -> Iterator[Callable[..., Wire]]:
    """`wire(node, kind="mx", source="")`: a connected Wire (the 220 not yet read) from the
    `source` address (a 127.x.y.z to appear as another client); closed at teardown."""
    opened: list[Wire] = []

    def connect(
        node: NodeProcess, kind: str = "mx", timeout: float = 10.0, source: str = ""
    ) -> Wire:
        w = Wire(node.host, node.ports[kind], timeout, source)
        opened.append(w)
        return w

    yield connect
    for w in opened:
        w.close()
