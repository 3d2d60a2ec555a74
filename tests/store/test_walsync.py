"""`WalSync`: the WAL's fdatasync as Linux AIO reaped on the event loop, or on a thread.
Real files, a real event loop; imports pytest, the stdlib and `pochta.store._walsync`."""

from __future__ import annotations

import asyncio
import os
import platform
from pathlib import Path
from typing import Any

import pytest

from pochta.store._walsync import NATIVE, WalSync

LINUX_AIO = platform.system() == "Linux" and platform.machine() in ("x86_64", "aarch64")
# The AIO calls through the C module when it is built, and through ctypes (running from source)
PATHS = [
    pytest.param(True, NATIVE, id="aio-c", marks=pytest.mark.skipif(NATIVE is None, reason="no C")),
    pytest.param(True, None, id="aio-ctypes"),
    pytest.param(False, None, id="thread"),
]


async def _sync(sync: WalSync) -> BaseException | None:
    done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    sync.start(done.set_result)
    return await asyncio.wait_for(done, 10)


@pytest.mark.parametrize(("aio", "native"), PATHS)
async def test_syncs_complete_on_the_loop(tmp_path: Path, aio: bool, native: Any) -> None:
    wal = tmp_path / "mail.db-wal"
    wal.write_bytes(b"")
    sync = WalSync(asyncio.get_running_loop(), str(wal), aio=aio, native=native)
    try:
        assert sync.asynchronous is (aio and LINUX_AIO)
        with wal.open("ab") as fh:
            for _ in range(20):  # one after another, each after more written
                fh.write(os.urandom(4096))
                fh.flush()
                assert await _sync(sync) is None
    finally:
        sync.close()


@pytest.mark.parametrize(("aio", "native"), PATHS)
async def test_a_file_that_cannot_be_synced_reports_the_error(aio: bool, native: Any) -> None:
    """/dev/null has no fsync (EINVAL): the AIO probe refuses it (io_submit fails, in C or
    through ctypes) and the thread reports it."""
    sync = WalSync(asyncio.get_running_loop(), "/dev/null", aio=aio, native=native)
    try:
        assert not sync.asynchronous
        exc = await _sync(sync)
        assert isinstance(exc, OSError) and exc.errno == 22
    finally:
        sync.close()


async def test_one_sync_at_a_time(tmp_path: Path) -> None:
    wal = tmp_path / "mail.db-wal"
    wal.write_bytes(b"x" * 4096)
    sync = WalSync(asyncio.get_running_loop(), str(wal))
    try:
        done: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        sync.start(done.set_result)
        with pytest.raises(RuntimeError):
            sync.start(done.set_result)
        assert await asyncio.wait_for(done, 10) is None
        assert await _sync(sync) is None  # free again
    finally:
        sync.close()


def test_a_missing_wal_file_is_an_error(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(FileNotFoundError):
            WalSync(loop, str(tmp_path / "none.db-wal"))
    finally:
        loop.close()
