"""`workers = 2`: two server processes share the listening port (SO_REUSEPORT) and one SQLite
database; every letter is stored exactly once with its own UID, and SIGTERM stops them all."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import smtplib
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pochta.store.api import MailStore

LETTERS = 120


def _send(host: str, port: int, first: int, count: int) -> list[int]:
    accepted = []
    for n in range(first, first + count):
        with smtplib.SMTP(host, port, local_hostname="c.test", timeout=30) as smtp:
            body = f"Subject: worker-{n}\r\nMessage-ID: <w{n}@c.test>\r\n\r\nletter {n}\r\n"
            smtp.sendmail("s@outside.test", ["alice@mail.test"], body.encode())
            accepted.append(n)
    return accepted


def test_two_processes_share_the_port_and_the_store(node_factory: Any, store_query: Any) -> None:
    node = node_factory(start=False, domains=["mail.test"], users={"alice@mail.test": "pw-a1"})
    node.config.write_text("workers = 2\n" + node.config.read_text())  # a top-level key
    node.start()
    children = subprocess.run(
        ["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(children) == 2  # two serving processes under the parent

    def sockets(pid: str) -> set[str]:
        links = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a file the worker closed meanwhile
                links.add(os.readlink(fd))
        return {link for link in links if link.startswith("socket:")}

    # One listening socket per address, bound by the parent and shared (one accept queue),
    # not a socket of each worker's own (SO_REUSEPORT hashes connections, one worker idles).
    assert len(sockets(children[0]) & sockets(children[1])) >= 3  # mx, submission, submissions

    with ThreadPoolExecutor(max_workers=8) as pool:
        batches = pool.map(
            lambda i: _send(node.host, node.ports["mx"], i * 15, 15), range(LETTERS // 15)
        )
        accepted = sorted(n for batch in batches for n in batch)
    assert accepted == list(range(LETTERS))

    async def inbox(store: MailStore) -> list[tuple[int, str]]:
        return [(m.uid, m.subject) for m in await store.list_messages("alice@mail.test")]

    stored = store_query(node, inbox)
    assert sorted(s for _, s in stored) == sorted(f"worker-{n}" for n in range(LETTERS))
    uids = [uid for uid, _ in stored]
    assert len(set(uids)) == LETTERS  # no UID given twice by the two processes
    # Both processes served (connection ids start with the serving process's pid): 120
    # connections all hashed to one socket would be a 2**-119 chance, or a worker that died.
    log = node.log_text()
    served = {int(prefix, 16) for prefix in re.findall(r"event=accepted conn=([0-9a-f]+)\.", log)}
    assert served == {int(pid) for pid in children}
    assert "worker process failed" not in log

    assert node.stop() == 0
    left = subprocess.run(["pgrep", "-f", str(node.config)], capture_output=True, text=True)
    assert left.stdout.strip() == ""


def test_a_worker_that_dies_is_replaced(node_factory: Any) -> None:
    node = node_factory(start=False, domains=["mail.test"], users={"alice@mail.test": "pw-a1"})
    node.config.write_text("workers = 2\n" + node.config.read_text())
    node.start()

    def children() -> set[int]:
        out = subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True)
        return {int(pid) for pid in out.stdout.split()}

    first = children()
    assert len(first) == 2
    time.sleep(10.5)  # past the start-up grace: a later death is a crash to recover from
    victim = min(first)
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        now = children()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    now = children()
    assert victim not in now and len(now) == 2
    assert f"worker process {victim} exited (-{int(signal.SIGKILL)}); starting another" in (
        node.log_text()
    )
    _send(node.host, node.ports["mx"], 0, 6)  # still serving
    assert node.stop() == 0


def test_a_worker_that_cannot_start_stops_the_node(node_factory: Any) -> None:
    node = node_factory(start=False, domains=["mail.test"])
    node.config.write_text("workers = 2\n" + node.config.read_text())
    node.db.parent.mkdir(parents=True, exist_ok=True)
    node.db.write_bytes(b"this is not an SQLite database" * 100)
    proc = subprocess.Popen(node.command("serve"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert b"while starting; stopping the node" in out
