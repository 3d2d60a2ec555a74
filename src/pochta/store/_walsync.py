"""`WalSync`: make SQLite's WAL durable without a thread waiting in `fdatasync`.

The writer runs with `synchronous = NORMAL`: its COMMIT writes the transaction's frames to the
WAL file but does not sync it. SQLite's own documentation gives the only difference from
`synchronous = FULL` in WAL mode as the sync of the WAL after each commit (checkpoints and the
WAL header on reuse are synced in both). `WalSync.start()` makes that sync, and the writer
resolves its callers (the 250 after DATA) only when it completed: the same promise as FULL.

On Linux the sync is asynchronous I/O: one `io_submit` of an `IOCB_CMD_FDSYNC` (Linux 4.18+)
whose completion is signalled on an eventfd that the event loop watches. The loop never blocks
and no second thread takes the GIL back after an `fdatasync`: with a commit thread, waking it
and handing the GIL back and forth cost the loop thread about a tenth of its time under load
(`perf`: futex wakes from `drop_gil` and `SimpleQueue.put`). Where Linux AIO is missing (other
systems, architectures not listed, a seccomp filter, `io_setup` refused), the sync runs on a
thread of the loop's default executor instead; the promise is the same.

fsync flushes a file, not a descriptor: the descriptor opened here on `<database>-wal` syncs
what SQLite's own descriptor wrote. SQLite removes the WAL file only when its last connection
closes, and the writer's connection stays open as long as this object lives.

Imports stdlib only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import platform
import select
import struct
from collections.abc import Callable
from types import ModuleType

try:  # the two calls of every commit in C (scripts/build_native.py); else through ctypes
    from pochta.store import _aio as _native_aio

    NATIVE: ModuleType | None = _native_aio
except ImportError:
    NATIVE = None

Done = Callable[[BaseException | None], None]

# (io_setup, io_destroy, io_getevents, io_submit) by machine: the AIO system call numbers.
_SYSCALLS = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
}
_IOCB_CMD_FDSYNC = 3
_IOCB_FLAG_RESFD = 1  # signal the eventfd in aio_resfd on completion
_IOCB = struct.Struct("<QIiHhIQQqQII")  # struct iocb (64 octets, little-endian)
_EVENT = struct.Struct("<QQqq")  # struct io_event: data, obj, res, res2


class WalSync:
    """fdatasync of one WAL file, one at a time, its outcome handed to `done` on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        wal_path: str,
        *,
        aio: bool = True,
        native: ModuleType | None = NATIVE,
    ) -> None:
        self.loop = loop
        self.fd = os.open(wal_path, os.O_RDONLY | os.O_CLOEXEC)
        self._done: Done | None = None
        self._aio: _Aio | None = None
        if aio:
            try:
                self._aio = _Aio(self.fd, native)
            except OSError:
                self._aio = None
        if self._aio is not None:
            loop.add_reader(self._aio.eventfd, self._completed)

    @property
    def asynchronous(self) -> bool:
        """True when the kernel does the sync (Linux AIO), False when a thread does."""
        return self._aio is not None

    def start(self, done: Done) -> None:
        """Sync what was written to the WAL so far; `done(None)` (or `done(error)`) follows."""
        if self._done is not None:
            raise RuntimeError("a WAL sync is already running")
        self._done = done
        if self._aio is not None:
            try:
                self._aio.submit()
            except OSError as exc:
                self._finish(exc)
            return
        future = self.loop.run_in_executor(None, os.fdatasync, self.fd)
        future.add_done_callback(lambda f: self._finish(f.exception()))

    def _completed(self) -> None:
        assert self._aio is not None
        try:
            finished = self._aio.reap()
        except OSError as exc:
            self._finish(exc)
            return
        if finished:
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(exc)

    def close(self) -> None:
        if self._aio is not None:
            self.loop.remove_reader(self._aio.eventfd)
            self._aio.close()
            self._aio = None
        os.close(self.fd)


class _Aio:
    """One Linux AIO context with a prepared `IOCB_CMD_FDSYNC` for one descriptor; `native`
    (`pochta.store._aio`) makes the submit and reap calls in C, else ctypes does."""

    def __init__(self, fd: int, native: ModuleType | None = None) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None or not hasattr(os, "eventfd"):
            raise OSError("no Linux AIO here")
        # syscall() is variadic: every argument passed as a C long, none as a promoted int
        setup, self._destroy, self._getevents, self._submit = map(ctypes.c_long, numbers)
        self._one, self._none, self._slots = ctypes.c_long(1), ctypes.c_long(0), ctypes.c_long(4)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = self._libc.syscall
        self._syscall.restype = ctypes.c_long
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ctx = ctypes.c_ulong(0)
        if self._syscall(setup, self._slots, ctypes.byref(self._ctx)) != 0:
            err = ctypes.get_errno()
            os.close(self.eventfd)
            raise OSError(err, f"io_setup: {os.strerror(err)}")
        self._iocb = ctypes.create_string_buffer(_IOCB.size)
        _IOCB.pack_into(
            self._iocb, 0, 1, 0, 0, _IOCB_CMD_FDSYNC, 0, fd, 0, 0, 0, 0, _IOCB_FLAG_RESFD,
            self.eventfd,
        )  # fmt: skip
        self._iocbs = (ctypes.c_void_p * 1)(ctypes.addressof(self._iocb))
        self._events = ctypes.create_string_buffer(_EVENT.size * 4)
        self._no_wait = (ctypes.c_long * 2)(0, 0)
        self._fd = fd
        self._native = native
        try:  # an fdatasync right away: refused here means refused later (EINVAL before 4.18)
            self.submit()
            select.select([self.eventfd], [], [], 5.0)
            if not self.reap():
                raise OSError("io_getevents: no completion")
        except OSError:
            self.close()
            raise

    def submit(self) -> None:
        if self._native is not None:
            self._native.submit(self._ctx.value, self._fd, self.eventfd)
            return
        if self._syscall(self._submit, self._ctx, self._one, self._iocbs) != 1:
            err = ctypes.get_errno()
            raise OSError(err, f"io_submit: {os.strerror(err)}")

    def reap(self) -> bool:
        """Take the completion (if any) after the eventfd fired; raise for a failed sync."""
        if self._native is not None:
            return bool(self._native.reap(self._ctx.value, self.eventfd))
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.eventfd)
        n: int = self._syscall(
            self._getevents, self._ctx, self._none, self._slots, self._events, self._no_wait
        )
        if n < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_getevents: {os.strerror(err)}")
        for i in range(n):
            res = _EVENT.unpack_from(self._events, i * _EVENT.size)[2]
            if res < 0:
                raise OSError(-res, f"fdatasync of the WAL: {os.strerror(-res)}")
        return n > 0

    def close(self) -> None:
        self._syscall(self._destroy, self._ctx)
        os.close(self.eventfd)
