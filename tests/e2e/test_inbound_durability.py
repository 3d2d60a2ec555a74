"""Durability: a 250 after DATA means the letter survives a crash (RFC 5321 §4.1.1.4: "the
receiver-SMTP ... MUST have taken responsibility for delivering the message"). Four concurrent
smtplib clients send letters; the node is SIGKILLed in the middle and restarted; every letter that
got a 250 is stored exactly once, whole, and nothing else is. Imports pytest, the stdlib and the
e2e fixtures.
"""

from __future__ import annotations

import itertools
import queue
import smtplib
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pochta.store.api import MailStore, StoredMessage
from pochta.testing.node import NodeProcess

RCPT = "alice@mail.test"
LETTERS = 300
CLIENTS = 4
KILL_AFTER = 120  # accepted letters before the SIGKILL


def letter(n: int) -> bytes:
    body = "".join(f"line {i} of letter {n}\r\n" for i in range(40))
    return (
        f"From: <s@outside.test>\r\nTo: <{RCPT}>\r\nSubject: durable-{n}\r\n"
        f"Message-ID: <durable-{n}@outside.test>\r\n\r\n{body}end-of-letter-{n}\r\n"
    ).encode()


@dataclass
class Ledger:
    """What the clients saw, per letter number."""

    todo: queue.SimpleQueue[int] = field(default_factory=queue.SimpleQueue)
    accepted: set[int] = field(default_factory=set)
    in_flight: set[int] = field(default_factory=set)  # sent, no reply: either outcome is fine
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(node: NodeProcess, ledger: Ledger) -> None:
    """Send letters from the queue on one connection until the queue is empty or the node dies."""
    try:
        smtp = smtplib.SMTP(node.host, node.ports["mx"], local_hostname="c.test", timeout=15)
    except OSError:
        return
    with smtp:
        while True:
            try:
                n = ledger.todo.get_nowait()
            except queue.Empty:
                return
            try:
                refused = smtp.sendmail("s@outside.test", [RCPT], letter(n))
            except (smtplib.SMTPException, OSError):
                with ledger.lock:
                    ledger.in_flight.add(n)
                return
            assert refused == {}
            with ledger.lock:
                ledger.accepted.add(n)


def run_clients(node: NodeProcess, ledger: Ledger) -> list[threading.Thread]:
    threads = [threading.Thread(target=client, args=(node, ledger)) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    return threads


def test_every_accepted_letter_survives_sigkill(
    node_factory: Any, store_query: Any, record_property: Any
) -> None:
    node: NodeProcess = node_factory(hostname="mx.mail.test", domains=["mail.test"])
    store_query(node, lambda s: s.add_user(RCPT, ""))  # a mailbox; no login needed
    ledger = Ledger()
    for n in range(LETTERS):
        ledger.todo.put(n)

    threads = run_clients(node, ledger)
    deadline = time.monotonic() + 60
    while len(ledger.accepted) < KILL_AFTER and time.monotonic() < deadline:
        time.sleep(0.005)
    node.kill()
    for t in threads:
        t.join(30)
    accepted_before = len(ledger.accepted)
    in_flight = sorted(ledger.in_flight)
    assert accepted_before >= KILL_AFTER and in_flight, "the kill did not hit mid-stream"

    node.start()  # the same store, the same ports
    for t in run_clients(node, ledger):
        t.join(60)
    assert ledger.todo.empty()

    async def stored_letters(store: MailStore) -> list[StoredMessage]:
        return [await store.get_message(m.id) for m in await store.list_messages(RCPT)]

    counts: dict[int, int] = {}
    for message in store_query(node, stored_letters):
        n = int(message.info.subject.removeprefix("durable-"))
        counts[n] = counts.get(n, 0) + 1
        assert message.raw.endswith(letter(n)), f"letter {n} stored damaged"
    kept = [n for n in in_flight if n in counts]
    print(f"{accepted_before} letters accepted before the SIGKILL; {len(in_flight)} in flight")
    print(f"(sent, no reply): {in_flight}, of which stored: {kept}")
    record_property("in_flight", len(in_flight))
    record_property("in_flight_stored", len(kept))
    assert len(ledger.accepted) + len(in_flight) == LETTERS
    lost = ledger.accepted - set(counts)
    assert not lost, f"accepted with 250 but lost: {sorted(lost)}"
    assert {n for n, c in counts.items() if c > 1} == set()
    assert set(counts) - ledger.accepted <= set(in_flight)  # nothing that was never sent


SYNC_LETTERS = 5


def _syscalls(log: str) -> list[tuple[str, str, str]]:
    """(name, arguments, result) of each finished system call in an `strace -f` log, in the
    order they returned (a call split as `<unfinished ...>` counts where it resumed)."""
    calls: list[tuple[str, str, str]] = []
    started: dict[str, tuple[str, str]] = {}
    for line in log.splitlines():
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.endswith("<unfinished ...>"):
            name, _, args = rest.partition("(")
            started[pid] = (name, args.removesuffix("<unfinished ...>"))
        elif rest.startswith("<... "):
            name, args = started.pop(pid, (rest[5:].split(" ", 1)[0], ""))
            tail, _, result = rest.rpartition(" = ")
            calls.append((name, args + tail, result.split(" ", 1)[0]))
        elif "(" in rest and " = " in rest:
            name, _, tail = rest.partition("(")
            args, _, result = tail.rpartition(" = ")
            calls.append((name, args, result.split(" ", 1)[0]))
    return calls


def test_the_250_after_data_follows_a_sync_of_the_wal(
    node_factory: Any, store_query: Any, tmp_path: Any
) -> None:
    """The promise behind a 250 after DATA, in the serving process's own system calls
    (`strace -f`): between the 354 and the 250 of each letter its transaction is written to
    the WAL, then a sync of the WAL starts (io_submit, or fdatasync on the WAL file) and
    completes (io_getevents reaping it, or fdatasync returning 0), and only then is the 250
    written. (A crash test cannot show this: a killed process's writes survive in the page
    cache; only a sync makes them survive the machine.)"""
    node: NodeProcess = node_factory(hostname="mx.mail.test", domains=["mail.test"])
    store_query(node, lambda s: s.add_user(RCPT, ""))
    assert node.proc is not None
    log = tmp_path / "strace.log"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-y", "-s", "40", "-o", str(log), "-p", str(node.proc.pid),
         "-e", "trace=pwrite64,io_submit,io_getevents,fdatasync,write,writev,sendmsg,sendto"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10  # attached once the kernel names a tracer
        while "TracerPid:\t0" in Path(f"/proc/{node.proc.pid}/status").read_text():
            assert time.monotonic() < deadline, "strace did not attach"
            time.sleep(0.05)
        with smtplib.SMTP(node.host, node.ports["mx"], local_hostname="c.test", timeout=30) as s:
            for n in range(SYNC_LETTERS):
                assert s.sendmail("s@outside.test", [RCPT], letter(n)) == {}
    finally:
        tracer.terminate()
        tracer.wait(10)
    calls = _syscalls(log.read_text())
    replies = [
        i for i, (name, args, _) in enumerate(calls)
        if name in ("write", "writev", "sendmsg", "sendto") and "socket:" in args
        and ('"354 ' in args or '"250 2.0.0 OK queued' in args)
    ]  # fmt: skip
    seen = 0
    for start, end in itertools.pairwise(replies):
        if '"354 ' not in calls[start][1] or '"250 ' not in calls[end][1]:
            continue
        seen += 1
        between = calls[start + 1 : end]
        wal = [
            i for i, (name, args, _) in enumerate(between) if name == "pwrite64" and "-wal>" in args
        ]
        assert wal, "no write to the WAL between the 354 and the 250"
        after = between[wal[-1] + 1 :]
        submitted = [
            i for i, (name, args, res) in enumerate(after)
            if name == "io_submit" and "IOCB_CMD_FDSYNC" in args and "-wal>" in args and res == "1"
        ]  # fmt: skip
        reaped = submitted and any(
            name == "io_getevents" and res not in ("0", "-1")
            for name, _, res in after[submitted[0] :]
        )
        synced = any(
            name == "fdatasync" and "-wal>" in args and res == "0" for name, args, res in after
        )
        assert reaped or synced, f"the 250 was written before a sync of the WAL completed: {after}"
    assert seen == SYNC_LETTERS
