"""The sending node is SIGKILLed while it delivers many letters, then restarted: with a 3 s lease
every letter still arrives. A letter may arrive twice only when the kill fell between the remote
250 and our commit (RFC 5321 §6.1: a duplicate rather than a loss); the test prints how many."""

from __future__ import annotations

import collections
import time
from pathlib import Path

from test_delivery_support import (
    MAIL_IP,
    YANDEX_IP,
    base_records,
    common_port,
    mailbox,
    node_toml,
    queue,
    submit,
    wait_until,
)

from pochta.testing.dnsserver import DnsServer
from pochta.testing.node import NodeProcess

LETTERS = 300


def accepted_count(node: NodeProcess) -> int:
    """Letters the node has accepted so far, from its mail-event log (cheap to poll)."""
    return node.log_text().count("event=accepted")


def test_kill_during_delivery_loses_nothing(tmp_path: Path) -> None:
    port = common_port([MAIL_IP, YANDEX_IP])
    with DnsServer(base_records()) as dns:
        # One connection to yandex.test, so the duplicate bound below is exact.
        toml = node_toml(dns, port, lease="3", retry='["1s"]', per_destination="1")
        mail = NodeProcess.create(
            tmp_path / "mail",
            host=MAIL_IP,
            hostname="mx.mail.test",
            domains=["mail.test"],
            users={"alice@mail.test": "pw-alice"},
            ports={"mx": port},
            extra_toml=toml,
        )
        yandex = NodeProcess.create(
            tmp_path / "yandex",
            host=YANDEX_IP,
            hostname="mx.yandex.test",
            domains=["yandex.test"],
            users={"bob@yandex.test": "pw-bob"},
            ports={"mx": port},
            extra_toml=node_toml(dns, port),
        )
        try:
            mail.start()
            # queue everything while yandex.test is down, then let the worker go
            submit(mail, "alice@mail.test", "pw-alice", ["bob@yandex.test"], "crash", LETTERS)
            assert len(queue(mail)) == LETTERS
            yandex.start()
            before = accepted_count(yandex)
            # Poll tightly: the whole queue can arrive within a quarter of a second.
            deadline = time.monotonic() + 60
            while accepted_count(yandex) - before < LETTERS // 10:
                assert time.monotonic() < deadline, "deliveries did not start"
                time.sleep(0.002)
            mail.kill()
            arrived_at_kill = accepted_count(yandex) - before
            mail.start()
            wait_until(lambda: queue(mail) == [], timeout=90, what="an empty queue")
            subjects = [m["subject"] for m in mailbox(yandex, "bob@yandex.test")]
        finally:
            mail.stop()
            yandex.stop()
            print(f"--- mail.test ---\n{mail.log_text()[-3000:]}")
    counts = collections.Counter(subjects)
    expected = {f"crash {i}" for i in range(LETTERS)}
    assert set(counts) == expected, sorted(expected - set(counts))
    duplicates = sum(n - 1 for n in counts.values())
    print(
        f"\nkill after {arrived_at_kill}/{LETTERS} arrivals: all {LETTERS} letters arrived, "
        f"{duplicates} of them twice"
    )
    assert arrived_at_kill < LETTERS, "the kill came after the last delivery; test nothing"
    # A duplicate needs a kill between the remote 250 and our commit: at most one letter per open
    # connection (each letter's outcome is committed before the next is sent), and the worker
    # keeps one connection per destination (claims for a busy domain join its running task), so
    # all the letters to yandex.test share one connection: at most one duplicate.
    assert duplicates <= 1
