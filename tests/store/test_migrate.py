"""`pochta store migrate`: a populated SQLite store goes to PostgreSQL and back to SQLite and
arrives whole: the same rows (ids, UIDs, flags, leases, SCRAM), the same answers through the
MailStore API, ids continuing after the old high-water marks; a non-empty target is refused; a
copy that fails leaves the target empty; the CLI prints the verification."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pochta.errors import Conflict, NotFound
from pochta.store import open_store
from pochta.store.api import (
    SENT,
    MailStore,
    Outcome,
    OutcomeKind,
    ScramCredentials,
    Target,
)
from pochta.store.migrate import TABLES, migrate, store_checksums
from pochta.testing.storecheck import letter

BUSY = "\u0436\u043e\u0440\u0430@example.test"  # non-ASCII: text keys must sort alike everywhere


async def populate(url: str) -> None:
    """Domains, users (one with SCRAM, one removed: id gaps), aliases, a relay domain, letters
    with shared bodies, an expunged message (UID gap), and a queue in every state."""
    store = open_store(url)
    await store.open()
    try:
        await _accounts(store)
        await _mail(store)
        await _queue(store)
    finally:
        await store.close()


async def _accounts(store: MailStore) -> None:
    scram = ScramCredentials(b"salt\x00\xff", 4096, b"stored" * 5, b"server" * 5)
    for domain in ("example.test", "other.test", "zeta.test"):
        await store.add_domain(domain)
    await store.add_user("alice@example.test", "$argon2id$alice", scram)
    await store.add_user("bob@example.test", "$argon2id$bob")
    await store.add_user("gone@example.test", "x")
    await store.add_user("carol@other.test", "$argon2id$carol")
    await store.remove_user("gone@example.test")  # its ids are never handed out again
    await store.add_alias(BUSY, "alice@example.test")
    await store.add_alias("info@example.test", "bob@example.test")
    await store.add_alias("b@other.test", "carol@other.test")
    await store.add_relay_domain("customer.test", "carol@other.test")


async def _mail(store: MailStore) -> None:
    both = [Target("alice@example.test", return_path="x@remote.test"), Target("bob@example.test")]
    await store.deliver(letter(b"Subject: one\r\n\r\nfor two\r\n", targets=both, subject="one"))
    for i in range(3):
        body = f"Subject: n{i}\r\n\r\n{'x' * 3000 * i}\r\n".encode()
        await store.deliver(letter(body, targets=[Target("bob@example.test")], subject=f"n{i}"))
    expunged = (await store.list_messages("bob@example.test"))[1]
    await store.delete_message(expunged.id)  # type: ignore[attr-defined]
    sent = letter(
        b"Subject: out\r\n\r\n\xd0\xbf\xd1\x80\xd0\xb8\xd0\xb2\xd0\xb5\xd1\x82\r\n",
        sender="alice@example.test",
        targets=[Target("alice@example.test", SENT)],
        outbound=["r1@remote.test", "r2@remote.test", "h@customer.test"],
        subject="\u043f\u0440\u0438\u0432\u0435\u0442",
    )
    await store.deliver(sent)  # the Sent copy and the queue entry share one body


async def _queue(store: MailStore) -> None:
    for n in range(3):
        await store.deliver(
            letter(f"Subject: q{n}\r\n\r\nq\r\n".encode(), outbound=[f"a{n}@far.test"])
        )
    now = datetime.now(UTC)
    claims = await store.claim("node-a", now, timedelta(minutes=5), domains=["far.test"])
    rcpts = [r for c in claims for r in c.recipients]
    assert len(rcpts) == 3
    later = now + timedelta(minutes=10)
    await store.record_outcomes(
        "node-a",
        [
            Outcome(rcpts[0].id, OutcomeKind.DELIVERED, "250 ok"),
            Outcome(rcpts[1].id, OutcomeKind.TRANSIENT, "451 later", later, warned=True),
        ],
    )  # rcpts[2] stays leased to node-a
    entries = await store.list_queue()
    await store.bounce_queue_entry(entries[-1].id)


def flag_messages(db: Path) -> None:
    """IMAP flags have no store method yet: set some directly so they must travel too."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE messages SET flags = '\\Seen \\Flagged' WHERE id % 2 = 1")


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of a SQLite store (and its AUTOINCREMENT counters)."""
    with sqlite3.connect(db) as conn:
        found = {
            t.name: conn.execute(f"SELECT * FROM {t.name} ORDER BY {t.key}").fetchall()
            for t in TABLES
        }
        found["sqlite_sequence"] = conn.execute(
            "SELECT * FROM sqlite_sequence ORDER BY name"
        ).fetchall()
    return found


async def api_view(url: str) -> dict[str, Any]:
    """What the MailStore API answers about everything: it must not change by migrating."""
    store = open_store(url)
    await store.open()
    try:
        users = await store.list_users()
        boxes = {u.address: await store.list_mailboxes(u.address) for u in users}
        messages = {}
        for address, mailboxes in boxes.items():
            for box in mailboxes:
                infos = await store.list_messages(address, box.name)
                raws = [(await store.get_message(m.id)).raw for m in infos]
                messages[(address, box.name)] = (infos, raws)
        queue = await store.list_queue()
        return {
            "domains": await store.list_domains(),
            "users": users,
            "aliases": await store.list_aliases(),
            "relay": await store.list_relay_domains(),
            "boxes": boxes,
            "messages": messages,
            "queue": queue,
            "bodies": [await store.get_queue_body(e.id) for e in queue],
            "stats": await store.stats(),
        }
    finally:
        await store.close()


async def test_round_trip_sqlite_postgres_sqlite(
    tmp_path: Path, pg_schema: tuple[str, str, Any]
) -> None:
    pg_url, schema, admin = pg_schema
    first, back = tmp_path / "first.db", tmp_path / "back.db"
    await populate(f"sqlite:///{first}")
    flag_messages(first)
    progress: list[tuple[int, int, str]] = []

    there = await migrate(f"sqlite:///{first}", pg_url, progress=lambda *a: progress.append(a))
    assert there.ok, there.format()
    again = await migrate(pg_url, f"sqlite:///{back}", batch=2)  # many small batches
    assert again.ok, again.format()

    assert dump(back) == dump(first)
    view = await api_view(f"sqlite:///{first}")
    assert await api_view(pg_url) == view
    assert await api_view(f"sqlite:///{back}") == view
    sums = await store_checksums(f"sqlite:///{first}")
    assert await store_checksums(pg_url) == sums == await store_checksums(f"sqlite:///{back}")
    assert list(there.source) == sums

    # each body once: the letter to alice and bob, and the Sent copy with its queue entry
    assert await admin.fetchval(f"SELECT COUNT(*) FROM {schema}.bodies") == len(
        dump(first)["bodies"]
    )
    shared = await admin.fetchval(
        f"SELECT COUNT(*) FROM {schema}.messages m JOIN {schema}.queue q ON q.body_id = m.body_id"
    )
    assert shared == 1
    assert progress[-1] == (
        sum(len(v) for k, v in dump(first).items() if k != "sqlite_sequence"),
    ) * 2 + ("done",)
    assert max(p[0] for p in progress) == progress[-1][1]


async def test_the_target_goes_on_where_the_source_stopped(
    tmp_path: Path, pg_schema: tuple[str, str, Any]
) -> None:
    pg_url, _, _ = pg_schema
    db = tmp_path / "src.db"
    await populate(f"sqlite:///{db}")
    before = dump(db)
    assert (await migrate(f"sqlite:///{db}", pg_url)).ok
    store = open_store(pg_url)
    await store.open()
    try:
        user = await store.add_user("dave@example.test", "h")
        highest_user = max(r[1] for r in before["sqlite_sequence"] if r[0] == "users")
        assert user.id == highest_user + 1  # the removed user's id is not reused
        (box,) = [b for b in await store.list_mailboxes("bob@example.test") if b.name == "INBOX"]
        accepted = await store.deliver(letter(targets=[Target("bob@example.test")]))
        (new,) = [
            m for m in await store.list_messages("bob@example.test") if m.id in accepted.message_ids
        ]
        assert new.uid == box.uidnext  # RFC 3501 §2.3.1.1: UIDs continue, the gap stays a gap
        # the queue works on the new engine: the expired lease is taken, the held one is not
        claims = await store.claim(
            "node-b", datetime.now(UTC) + timedelta(hours=1), timedelta(minutes=1)
        )
        addresses = {r.address for c in claims for r in c.recipients}
        assert "h@customer.test" not in addresses
        # a0 was delivered, a1 is due again, a2's lease has run out
        assert addresses == {"a1@far.test", "a2@far.test", "r1@remote.test", "r2@remote.test"}
        held = await store.claim(
            "node-b", datetime.now(UTC), timedelta(minutes=1), domains=["customer.test"]
        )
        assert [r.address for c in held for r in c.recipients] == ["h@customer.test"]
    finally:
        await store.close()


async def test_a_non_empty_target_is_refused_unless_replaced(tmp_path: Path) -> None:
    source, target = tmp_path / "a.db", tmp_path / "b.db"
    await populate(f"sqlite:///{source}")
    store = open_store(f"sqlite:///{target}")
    await store.open()
    await store.add_domain("old.test")
    await store.close()
    before = dump(target)
    with pytest.raises(Conflict, match="not empty"):
        await migrate(f"sqlite:///{source}", f"sqlite:///{target}")
    assert dump(target) == before
    assert (await migrate(f"sqlite:///{source}", f"sqlite:///{target}", replace=True)).ok
    assert dump(target) == dump(source)


async def test_a_failed_copy_leaves_the_target_empty(
    tmp_path: Path, pg_schema: tuple[str, str, Any]
) -> None:
    pg_url, schema, admin = pg_schema
    db = tmp_path / "broken.db"
    await populate(f"sqlite:///{db}")
    with sqlite3.connect(db) as conn:  # a broken reference, which PostgreSQL will not take
        conn.execute("PRAGMA foreign_keys = OFF")
        conn.execute("UPDATE queue SET body_id = 99999 WHERE id = (SELECT MAX(id) FROM queue)")
    with pytest.raises(Conflict):
        await migrate(f"sqlite:///{db}", pg_url, batch=3)
    for table in TABLES:  # everything was one transaction: nothing stayed
        assert await admin.fetchval(f"SELECT COUNT(*) FROM {schema}.{table.name}") == 0


async def test_a_missing_source_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        await migrate(f"sqlite:///{tmp_path}/none.db", f"sqlite:///{tmp_path}/t.db")
    assert not (tmp_path / "none.db").exists()


async def test_the_spec_covers_every_column_of_both_engines(
    tmp_path: Path, pg_schema: tuple[str, str, Any]
) -> None:
    """A new migration that adds a table or column must teach `migrate.TABLES` about it."""
    pg_url, schema, admin = pg_schema
    for url in (f"sqlite:///{tmp_path}/s.db", pg_url):
        store = open_store(url)
        await store.open()
        await store.close()
    spec = {t.name: set(t.names) for t in TABLES}
    with sqlite3.connect(tmp_path / "s.db") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        lite = {n: {r[1] for r in conn.execute(f"PRAGMA table_info({n})")} for n in names}
    rows = await admin.fetch(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = $1",
        schema,
    )
    pg: dict[str, set[str]] = {}
    for r in rows:
        pg.setdefault(r["table_name"], set()).add(r["column_name"])
    for found in (lite, pg):
        found.pop("schema_version")
        found.pop("sqlite_sequence", None)
        assert found == spec


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pochta", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "POCHTA_CONFIG": ""},
    )


async def test_cli_migrate_prints_the_verification(
    tmp_path: Path, pg_schema: tuple[str, str, Any]
) -> None:
    pg_url, _, _ = pg_schema
    db = tmp_path / "cli.db"
    await populate(f"sqlite:///{db}")
    done = run_cli("store", "migrate", "--from", f"sqlite:///{db}", "--to", pg_url)
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines() if line.strip()}
    for name in [t.name for t in TABLES] + ["bodies.raw", "users.next_id"]:
        assert lines[name].endswith(" ok"), done.stdout
    assert lines["messages"].split()[1:3] == ["5", "5"]  # rows on both sides
    assert "all: verified, sha256 " in done.stdout
    assert "100%" in done.stderr and "[" + "#" * 30 + "]" in done.stderr

    again = run_cli("store", "migrate", "--from", f"sqlite:///{db}", "--to", pg_url)
    assert again.returncode == 1 and "not empty" in again.stderr and "--yes" in again.stderr
    forced = run_cli("store", "migrate", "--from", f"sqlite:///{db}", "--to", pg_url, "--yes")
    assert forced.returncode == 0, forced.stderr

    sums = run_cli("store", "checksum", pg_url)
    assert sums.returncode == 0, sums.stderr
    mine = {line.split()[0]: line.split()[2] for line in sums.stdout.splitlines()}
    theirs = {c.name: c.sha256 for c in await store_checksums(f"sqlite:///{db}")}
    assert mine == theirs


def test_progress_bar_on_a_pipe_writes_a_line_per_tenth() -> None:
    from pochta.cli.store import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(out, width=10)
    for done in range(0, 101, 5):
        bar(done, 100, "messages")
    bar(100, 100, "done")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[----------]   0%  0/100 rows")
    assert lines[5].startswith("[#####-----]  50%  50/100 rows  messages")
    assert lines[-1].startswith("[##########] 100%  100/100 rows  done")
    assert len(lines) == 12  # 0%, 10%, ..., 100%, and the final line
