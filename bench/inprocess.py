"""CPU per letter of the server's own code, without sockets: the listener's protocol, the SMTP
core, the session policy, the Received: and summary headers, the mail log and the SQLite store
(every letter committed, as in `pochta serve`), driven in one process by scripted clients.

    .venv/bin/python bench/inprocess.py --letters 5000 --sessions 5 [--size 1024] [--profile [SORT]]

What it leaves out is the kernel (sockets, epoll) and the load client, so it moves only when our
Python moves: a steadier guide for the hot path than a full run on a shared machine, where
letters/s drift by 20%. `--profile [SORT]` prints where the time goes (cProfile, slower; with
POCHTA_NATIVE=0, since it cannot see into the compiled modules).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pochta import log as maillog
from pochta import smtp
from pochta.server.listener import ServerLimits, SmtpServer
from pochta.server.session import ServerContext
from pochta.store import open_store

HEAD = (
    b"From: <u1@bench.test>\r\nTo: <u1@bench.test>\r\nSubject: bench\r\n"
    b"Message-ID: <bench@client.test>\r\n\r\n"
)


def body(size: int) -> bytes:
    """A letter of about `size` octets: the header block, then 72-octet lines."""
    line = b"x" * 70 + b"\r\n"
    return HEAD + line * max(1, (size - len(HEAD)) // len(line))


class _Transport:
    """What the listener's protocol asks of a transport; the bytes it writes are kept."""

    def __init__(self, peer: str) -> None:
        self.out: list[bytes] = []
        self.closing = False
        self.written: asyncio.Future[None] | None = None  # a client waiting for a reply
        self._peer = (peer, 40000)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if self.written is not None and not self.written.done():
            self.written.set_result(None)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _client(server: SmtpServer, letters: int, size: int) -> None:
    """A non-pipelining client: one command, then wait for its reply, like smtp-source."""
    lines = [
        b"EHLO client.test\r\n",
        b"MAIL FROM:<u1@bench.test>\r\n",
        b"RCPT TO:<u1@bench.test>\r\n",
        b"DATA\r\n",
        body(size) + b".\r\n",
        b"QUIT\r\n",
    ]
    loop = asyncio.get_running_loop()
    for _ in range(letters):
        transport = _Transport("127.0.0.1")
        protocol = server.protocol("mx")
        protocol.connection_made(transport)  # type: ignore[arg-type]
        for line in lines:
            replies = len(transport.out)
            transport.written = loop.create_future()
            protocol.data_received(line)
            if len(transport.out) == replies:  # the reply comes after a store round trip
                await transport.written
        if not transport.out[-1].startswith(b"221"):
            raise SystemExit(f"unexpected reply: {transport.out[-1]!r}")
        protocol.connection_lost(None)


async def run(letters: int, sessions: int, size: int, profile: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        maillog.batch_lines(asyncio.get_running_loop().call_soon)  # as `pochta serve` does
        store = open_store(f"sqlite:///{tmp}/pochta.db")
        await store.open()
        await store.add_domain("bench.test")
        await store.add_user("u1@bench.test", "unused-hash")
        ctx = ServerContext(store=store, hostname="mx.bench.test", limits=smtp.Limits())
        server = SmtpServer(ctx, ServerLimits(connections_per_ip=sessions + 1), None)
        await asyncio.gather(*(_client(server, 20, size) for _ in range(sessions)))  # warm up
        profiler = cProfile.Profile() if profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        each = letters // sessions
        await asyncio.gather(*(_client(server, each, size) for _ in range(sessions)))
        if profiler:
            profiler.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        done = letters // sessions * sessions
        stored = len(await store.list_messages("u1@bench.test"))
        await server.stop(grace=1)
        await store.close()
    print(
        f"{done} letters of {size} octets, {sessions} sessions: {1e6 * cpu / done:.0f} us CPU"
        " per letter"
        f" ({1e6 * wall / done:.0f} us wall), {stored} stored"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats(profile or "tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--letters", type=int, default=5000)
    parser.add_argument("--sessions", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="octets per letter")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="tottime",
        metavar="SORT",
        help="cProfile, sorted by SORT (tottime, cumulative...); compiled code is invisible to it: "
        "run with POCHTA_NATIVE=0",
    )
    args = parser.parse_args()
    maillog.setup("info")
    logging.getLogger().handlers[0].setStream(open("/dev/null", "w"))  # noqa: SIM115
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args.letters, args.sessions, args.size, args.profile))
    else:
        uvloop.run(run(args.letters, args.sessions, args.size, args.profile))


if __name__ == "__main__":
    main()
