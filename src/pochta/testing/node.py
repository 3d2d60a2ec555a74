"""Run real `pochta serve` processes for tests: each node with its own config, data directory,
SQLite database and loopback address. Production code never imports this module.

    node = NodeProcess.create(tmp_path / "mail", host="127.0.0.2", hostname="mx.mail.test",
                              domains=["mail.test"], users={"alice@mail.test": "pw"})
    node.start()
    ... smtplib.SMTP(node.host, node.ports["mx"]) ...
    node.stop()
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pochta.store import open_store
from pochta.store.api import MailStore

KINDS = ("mx", "submission", "submissions", "odmr")
T = TypeVar("T")


def query_store_url(url: str, fn: Callable[[MailStore], Awaitable[T]]) -> T:
    """Open the store at `url` in this process, run `fn` on it, close it (sync tests: it runs
    its own event loop). A running node may share it: SQLite's WAL lets a reader in while the
    server writes, PostgreSQL is shared by design."""

    async def run() -> T:
        store = open_store(url)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class NodeProcess:
    """One pochta node run as `python -m pochta serve` in a subprocess."""

    directory: Path
    host: str
    hostname: str
    ports: dict[str, int]
    extra_toml: str = ""
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Path:
        return self.directory / "pochta.toml"

    @property
    def log(self) -> Path:
        return self.directory / "serve.log"

    @property
    def db(self) -> Path:
        return self.directory / "var" / "pochta.db"

    @property
    def cafile(self) -> Path:
        """The node's self-signed certificate (made by `start()`), for clients to trust."""
        return self.directory / "var" / "tls" / "cert.pem"

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        hostname: str = "mx.example.test",
        domains: Iterable[str] = (),
        users: Mapping[str, str] | None = None,
        kinds: Iterable[str] = ("mx", "submission", "submissions"),
        extra_toml: str = "",
        ports: Mapping[str, int] | None = None,
    ) -> NodeProcess:
        """Write a config (ports picked free on `host` unless given) and create domains/users."""
        directory.mkdir(parents=True, exist_ok=True)
        chosen = dict(ports or {})
        for kind in kinds:
            chosen.setdefault(kind, free_port(host))
        node = cls(directory, host, hostname, chosen, extra_toml)
        node.write_config()
        for domain in domains:
            node.cli("domain", "add", domain)
        for address, password in (users or {}).items():
            node.cli("user", "add", address, "--password-stdin", input=password + "\n")
        return node

    def write_config(self) -> None:
        bracket = f"[{self.host}]" if ":" in self.host else self.host
        listen = "\n".join(f'{k} = ["{bracket}:{p}"]' for k, p in self.ports.items())
        text = (
            f'hostname = "{self.hostname}"\ndata_dir = "var"\n\n[listen]\n{listen}\n\n'
            f"{self.extra_toml}\n"
        )
        if "[dns]" not in self.extra_toml:
            # A test node never asks the machine's resolver (which may be off this host): a
            # loopback port where nothing answers makes every lookup fail fast and locally.
            text += '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 1\n'
        self.config.write_text(text)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pochta", "-c", str(self.config), *args]

    def cli(
        self, *args: str, input: str | bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a `pochta` command against this node's config; raises on failure if `check`."""
        data = input.decode() if isinstance(input, bytes) else input
        result = subprocess.run(
            self.command(*args),
            input=data,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **self.env},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"pochta {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def start(self, wait: bool = True) -> None:
        log = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.command("serve"),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
        )
        log.close()
        if wait:
            for kind, port in self.ports.items():
                try:
                    wait_port(self.host, port)
                except OSError:
                    raise AssertionError(
                        f"node {self.hostname} did not open {kind}:{port}:\n{self.log_text()}"
                    ) from None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL: the crash that durability must survive."""
        return self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: int, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.proc = None
        return code

    def __enter__(self) -> NodeProcess:
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
