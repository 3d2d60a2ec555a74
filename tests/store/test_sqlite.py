"""SQLite-engine specifics: group commit, file handling, migrations, lock errors."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pochta.errors import NotFound, StoreUnavailable
from pochta.store._common import load_migrations
from pochta.store._sqlite_writer import CHECKPOINT_BYTES, HEAVY_BODY, LOOP_COMMIT, WAL_LIMIT
from pochta.store._walsync import WalSync
from pochta.store.api import Target
from pochta.store.sqlite import SqliteStore
from pochta.testing.storecheck import letter


async def _opened(path: Path, **kwargs: int) -> SqliteStore:
    store = SqliteStore(path, **kwargs)
    await store.open()
    await store.add_domain("example.test")
    await store.add_user("bob@example.test", "h")
    return store


async def test_concurrent_delivers_share_commits(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "mail.db")
    try:
        before = store.commits
        mail = letter(targets=[Target("bob@example.test")])
        results = await asyncio.gather(*(store.deliver(mail) for _ in range(200)))
        used = store.commits - before
        assert len({r.message_ids[0] for r in results}) == 200
        assert 1 <= used < 200, f"{used} commits for 200 deliveries: no group commit"
    finally:
        await store.close()


async def test_a_failing_write_in_a_group_commit_fails_alone(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "mail.db")
    try:
        mail = letter(targets=[Target("bob@example.test")])
        lost = letter(targets=[Target("nobody@example.test")])  # no such mailbox
        before = store.commits
        results = await asyncio.gather(
            *(store.deliver(mail) for _ in range(5)),
            store.deliver(lost),
            *(store.deliver(mail) for _ in range(5)),
            return_exceptions=True,
        )
        assert isinstance(results[5], NotFound)
        delivered = [r for i, r in enumerate(results) if i != 5]
        assert all(not isinstance(r, BaseException) for r in delivered), delivered
        assert len(await store.list_messages("bob@example.test")) == 10
        assert store.commits - before >= 2  # the batch was rolled back and run again
        again = await store.deliver(mail)  # and the writer goes on batching
        assert again.message_ids
    finally:
        await store.close()


async def test_directory_created_and_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "mail.db"
    store = await _opened(path)
    accepted = await store.deliver(letter(b"kept", targets=[Target("bob@example.test")]))
    await store.close()
    again = SqliteStore(path)
    await again.open()
    try:
        assert (await again.get_message(accepted.message_ids[0])).raw == b"kept"
        assert await again.schema_version() == max(v for v, _, _ in load_migrations("sqlite"))
    finally:
        await again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = conn.execute("SELECT version FROM schema_version").fetchall()
    assert versions == [(v,) for v, _, _ in load_migrations("sqlite")]  # applied once each


async def test_locked_database_is_store_unavailable_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "mail.db"
    store = await _opened(path, busy_timeout_ms=100)
    try:
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(StoreUnavailable):
            await store.deliver(letter(targets=[Target("bob@example.test")]))
        blocker.execute("ROLLBACK")
        blocker.close()
        await store.deliver(letter(targets=[Target("bob@example.test")]))
        assert len(await store.list_messages("bob@example.test")) == 1
    finally:
        await store.close()


async def test_closed_store_is_unavailable(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "mail.db")
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.list_domains()
    with pytest.raises(StoreUnavailable):
        await store.add_domain("other.test")


async def test_pending_writes_commit_before_close(tmp_path: Path) -> None:
    store = await _opened(tmp_path / "mail.db")
    mail = letter(targets=[Target("bob@example.test")])
    pending = [asyncio.ensure_future(store.deliver(mail)) for _ in range(50)]
    await asyncio.sleep(0)  # let them reach the writer queue
    await store.close()
    assert all(f.done() and not f.cancelled() and f.exception() is None for f in pending)
    again = SqliteStore(tmp_path / "mail.db")
    await again.open()
    try:
        assert len(await again.list_messages("bob@example.test")) == 50
    finally:
        await again.close()


async def test_a_write_resolves_only_after_a_wal_sync_begun_after_its_commit(
    tmp_path: Path,
) -> None:
    """A letter's future resolves only after a sync of the WAL completed that started when its
    row was already committed (seen by another connection when the sync started); then it is
    on disk. On this Linux machine the sync is the kernel's (Linux AIO), not a thread's."""
    db = tmp_path / "mail.db"
    store = await _opened(db)
    writer = store._writer
    assert writer is not None and writer._sync is not None
    assert writer._sync.asynchronous
    start = writer._sync.start
    synced_up_to = 0  # the highest message id committed before a sync that completed
    syncs = 0

    def recorded_start(done: Callable[[BaseException | None], None]) -> None:
        with contextlib.closing(sqlite3.connect(db)) as other:
            covered = other.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]

        def finished(exc: BaseException | None) -> None:
            nonlocal synced_up_to, syncs
            assert exc is None
            synced_up_to, syncs = max(synced_up_to, covered), syncs + 1
            done(exc)

        start(finished)

    writer._sync.start = recorded_start  # type: ignore[method-assign]
    before = writer.commits
    try:
        mail = letter(targets=[Target("bob@example.test")])

        async def deliver() -> int:
            accepted = await store.deliver(mail)
            assert accepted.message_ids[0] <= synced_up_to
            return accepted.message_ids[0]

        ids = await asyncio.gather(*(deliver() for _ in range(60)))
        assert len(set(ids)) == 60
    finally:
        await store.close()
    assert syncs == writer.commits - before
    assert syncs < 60  # letters shared commits


async def test_a_failed_wal_sync_refuses_every_later_write(tmp_path: Path) -> None:
    """A sync that fails (here a real EINVAL: /dev/null cannot be synced) is never reported as
    success, and the writer refuses every later write: SQLite's recovery stops at the first bad
    WAL frame, so a commit synced on top of a lost one could be lost too. Reads go on."""
    store = await _opened(tmp_path / "mail.db")
    writer = store._writer
    assert writer is not None and writer._sync is not None
    real = writer._sync
    writer._sync = WalSync(writer.loop, "/dev/null")
    try:
        with pytest.raises(StoreUnavailable, match="could not be synced"):
            await store.deliver(letter(targets=[Target("bob@example.test")]))
        with pytest.raises(StoreUnavailable, match="could not be synced"):
            await store.add_domain("later.test")
        assert [d.name for d in await store.list_domains()] == ["example.test"]
    finally:
        writer._sync.close()
        writer._sync = real
        await store.close()


@pytest.mark.parametrize(
    ("size", "thread"),
    [(1024, "MainThread"), (100 * 1024, "pochta-sqlite-jobs"), (300 * 1024, "pochta-sqlite-jobs")],
)
async def test_where_a_letter_is_written_depends_on_its_size(
    tmp_path: Path, size: int, thread: str
) -> None:
    """Small letters are written by the event loop (statements and COMMIT: microseconds);
    a batch with more than LOOP_COMMIT octets of letter writes the WAL (COMMIT) on the job
    thread, and one with a letter over HEAVY_BODY runs there whole. Each stored intact."""
    seen: list[tuple[str, str]] = []

    def traced(statement: str) -> None:
        if statement.startswith(("INSERT INTO bodies", "COMMIT")):
            seen.append((statement.split()[0], threading.current_thread().name))

    store = await _opened(tmp_path / "mail.db")
    assert store._writer is not None
    store._writer._conn.set_trace_callback(traced)
    body = b"Subject: big\r\n\r\n" + bytes(range(256)) * (size // 256)
    try:
        accepted = await store.deliver(letter(body, targets=[Target("bob@example.test")]))
        stored = await store.get_message(accepted.message_ids[0])
    finally:
        await store.close()
    assert stored.raw.endswith(body)
    insert_thread = "MainThread" if size <= HEAVY_BODY else "pochta-sqlite-jobs"
    assert seen == [("INSERT", insert_thread), ("COMMIT", thread)]
    assert (size > LOOP_COMMIT) is (thread != "MainThread")


async def test_the_embedded_store_resolves_a_recipient_at_once(tmp_path: Path) -> None:
    """SQLite answers `resolve_now` on the calling thread (the SMTP server then needs no task
    for RCPT); a removed user is unknown at once, as to `resolve`."""
    store = await _opened(tmp_path / "mail.db")
    try:
        assert store.resolve_now("Bob@Example.test") == (True, "bob@example.test")
        assert store.resolve_now("nobody@example.test") == (True, None)
        await store.remove_user("bob@example.test")
        assert store.resolve_now("bob@example.test") == (True, None)
    finally:
        await store.close()
    assert store.resolve_now("bob@example.test") == (False, None)  # closed: ask resolve()


async def test_a_recipient_is_looked_up_on_the_writers_connection_between_batches(
    tmp_path: Path,
) -> None:
    """`resolve_now` reads on the writer's connection (its page cache survives its own
    commits) while that is free, on the loop's read connection while the job thread has it
    (a large letter being written); a user another process removes is unknown at once."""
    db = tmp_path / "mail.db"
    store = await _opened(db)
    assert store._writer is not None and store._readers is not None
    where: list[str] = []
    lookup = "SELECT address FROM users"  # the recipient lookup (not the letter's own reads)
    store._writer._conn.set_trace_callback(
        lambda sql: where.append("writer") if sql.startswith(lookup) else None
    )
    store._readers._inline().set_trace_callback(
        lambda sql: where.append("reader") if sql.startswith(lookup) else None
    )
    body = b"Subject: big\r\n\r\n" + b"x" * (HEAVY_BODY + 1024)
    try:
        assert store.resolve_now("bob@example.test") == (True, "bob@example.test")
        assert where == ["writer"]
        heavy = asyncio.ensure_future(
            store.deliver(letter(body, targets=[Target("bob@example.test")]))
        )
        for _ in range(100):
            if store._writer._away:
                break
            await asyncio.sleep(0)
        assert store._writer._away  # the batch is on the job thread
        assert store.resolve_now("bob@example.test") == (True, "bob@example.test")
        assert where == ["writer", "reader"]
        await heavy
        with contextlib.closing(sqlite3.connect(db)) as other:  # `pochta user remove` elsewhere
            other.execute("PRAGMA foreign_keys = ON")
            other.execute("DELETE FROM users WHERE address = 'bob@example.test'")
            other.commit()
        assert store.resolve_now("bob@example.test") == (True, None)
        assert where[-1] == "writer"
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_by_size_too(tmp_path: Path) -> None:
    """The writer has the WAL checkpointed itself, after CHECKPOINT_EVERY commits or
    CHECKPOINT_BYTES of letters, aside (on a connection of its own while batches commit). Under
    steady writes those never leave the WAL wholly copied, so it never starts over by itself:
    at WAL_LIMIT a checkpoint runs between batches, and the WAL file (reused from its start)
    stays bounded when letters are large and keep coming."""
    db = tmp_path / "mail.db"
    store = await _opened(db)
    body = b"Subject: big\r\n\r\n" + b"x" * (100 * 1024)
    rounds = 3 * WAL_LIMIT // (4 * len(body))  # three times WAL_LIMIT of letters, 4 at a time
    try:
        for _ in range(rounds):
            group = [letter(body, targets=[Target("bob@example.test")]) for _ in range(4)]
            await asyncio.gather(*(store.deliver(m) for m in group))
        assert len(await store.list_messages("bob@example.test")) == 4 * rounds
        wal = Path(f"{db}-wal").stat().st_size  # (the last connection's close removes it)
        copied = db.stat().st_size  # the database file itself: what checkpoints copied
    finally:
        await store.close()
    assert wal < WAL_LIMIT + CHECKPOINT_BYTES + 2 * 1024 * 1024
    assert copied > 2 * WAL_LIMIT
