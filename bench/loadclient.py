"""pochta's own SMTP load client: N letters of a given size over C concurrent sessions, a new
connection per letter or reused connections, optionally PIPELINING MAIL/RCPT/DATA (RFC 2920),
with the latency from the end of the data to the server's 250 for every letter.

    .venv/bin/python bench/loadclient.py --host 127.0.0.60 --port 2525 --messages 2000 \\
        --size 1024 --sessions 10 [--reuse] [--pipelining] [--auth user:password] --json

Prints one JSON object: letters accepted, letters/s, p50/p99/max latency to 250 (ms), the
client's own CPU per letter and what went wrong. Used by bench/run.py (`--client pochta`) and
bench/delivery.py (injection); imports the standard library only (uvloop when installed), so the
client costs as little CPU as it can on a machine it shares with the server. It speaks plain SMTP
over raw sockets with a small reply parser: no TLS, AUTH PLAIN only (RFC 4954, RFC 4616),
loopback addresses only. Every run is bounded by `--timeout`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import resource
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import cast


class Refused(Exception):
    """The server answered a step with something other than the expected reply."""

    def __init__(self, stage: str, code: int, text: bytes) -> None:
        super().__init__(f"{stage}: {code} {text[:200]!r}")
        self.stage = stage
        self.code = code


@dataclass(frozen=True)
class Options:
    host: str
    port: int
    messages: int
    size: int
    sessions: int
    reuse: bool = False
    pipelining: bool = False
    sender: str = "a@bench.test"
    recipient: str = "u1@bench.test"
    auth: tuple[str, str] | None = None
    helo: str = "loadclient.bench.test"
    timeout: float = 300.0


@dataclass
class Report:
    host: str
    port: int
    messages: int
    size: int
    sessions: int
    reuse: bool
    pipelining: bool
    accepted: int = 0
    failed: int = 0
    seconds: float = 0.0
    per_second: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    client_cpu_ms_per_letter: float = 0.0
    pipelined_connections: int = 0  # connections where PIPELINING was offered and used
    lockstep_connections: int = 0  # connections without it (not offered, or not asked for)
    errors: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0  # wall clock (time.time()) when the first connection was opened


def make_letter(size: int, sender: str, recipient: str) -> bytes:
    """A letter of exactly `size` octets (at least its header block): a header block, then
    76-character lines of 'x' (never a leading dot, so no dot-stuffing is needed, RFC 5321
    §4.5.2), lines under the 998-octet limit of RFC 5322 §2.1.1."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench\r\n"
        "Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <bench@loadclient.bench.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    full, rest = divmod(max(0, size - len(head)), len(line))
    if rest == 1 and full:  # one octet more than whole lines: a 77-character line
        return head + line * (full - 1) + b"x" * 77 + b"\r\n"
    last = b"y" * (rest - 2) + b"\r\n" if rest >= 2 else b""
    return head + line * full + last


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of sorted `values` (0 when empty)."""
    if not values:
        return 0.0
    rank = max(1, min(len(values), round(p / 100 * len(values) + 0.5)))
    return values[rank - 1]


class ReplyProtocol(asyncio.Protocol):
    """Reads SMTP replies (RFC 5321 §4.2: `ddd-text` continuation lines, `ddd text` the last)
    into a queue; writes with flow control."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lines: list[bytes] = []
        self.replies: deque[tuple[int, bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed: Exception | None = None
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        start = 0
        while (end := self.buffer.find(b"\n", start)) >= 0:
            line = bytes(self.buffer[start : end + 1])
            start = end + 1
            self.lines.append(line)
            if line[3:4] != b"-":  # the last line of a reply
                try:
                    code = int(line[:3])
                except ValueError:
                    code = 0
                self.replies.append((code, b"".join(self.lines)))
                self.lines = []
        del self.buffer[:start]
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or ConnectionResetError("connection closed by the server")
        self.writable.set()
        self._wake()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def reply(self) -> tuple[int, bytes]:
        while not self.replies:
            if self.closed is not None:
                raise self.closed
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.replies.popleft()

    async def expect(self, stage: str, *codes: int) -> bytes:
        code, text = await self.reply()
        if code not in codes:
            raise Refused(stage, code, text)
        return text

    async def send(self, data: bytes) -> None:
        """Write and wait until the transport's buffer is below its high-water mark."""
        if self.closed is not None or self.transport is None:
            raise self.closed or ConnectionResetError("not connected")
        self.transport.write(data)
        await self.writable.wait()


class Connection:
    """One client connection: greeting, EHLO, optional AUTH PLAIN, then transactions."""

    def __init__(self, proto: ReplyProtocol, opts: Options, commands: bytes) -> None:
        self.proto = proto
        self.opts = opts
        self.commands = commands  # MAIL FROM, RCPT TO and DATA lines
        self.pipelining = False

    @classmethod
    async def open(cls, opts: Options, commands: bytes) -> Connection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(ReplyProtocol, opts.host, opts.port)
        conn = cls(proto, opts, commands)
        try:
            await proto.expect("greeting", 220)
            await proto.send(f"EHLO {opts.helo}\r\n".encode())
            ehlo = await proto.expect("EHLO", 250)
            keywords = {ln[4:].split(b" ")[0].strip().upper() for ln in ehlo.split(b"\n")[1:]}
            # RFC 2920 §3.1: pipeline only when the server offers PIPELINING.
            conn.pipelining = opts.pipelining and b"PIPELINING" in keywords
            if opts.auth is not None:
                user, password = opts.auth
                token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
                await proto.send(f"AUTH PLAIN {token}\r\n".encode())  # RFC 4954 §4, RFC 4616
                await proto.expect("AUTH", 235)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def transaction(self, letter: bytes) -> float:
        """Send one letter; the seconds from the end of its data to the 250."""
        proto = self.proto
        if self.pipelining:  # RFC 2920 §3.1: DATA is the last command of the group
            await proto.send(self.commands)
            mail, rcpt, data = [await proto.reply() for _ in range(3)]
            if data[0] != 354:
                refused = mail if mail[0] != 250 else rcpt if rcpt[0] not in (250, 251) else data
                raise Refused("MAIL/RCPT/DATA", *refused)
            if mail[0] != 250 or rcpt[0] not in (250, 251):  # DATA was opened anyway: end it
                await proto.send(b".\r\n")
                await proto.reply()
                raise Refused("MAIL/RCPT", *(mail if mail[0] != 250 else rcpt))
        else:
            mail_line, rcpt_line, data_line = self.commands.splitlines(keepends=True)
            await proto.send(mail_line)
            await proto.expect("MAIL", 250)
            await proto.send(rcpt_line)
            await proto.expect("RCPT", 250, 251)
            await proto.send(data_line)
            await proto.expect("DATA", 354)
        await proto.send(letter + b".\r\n")  # RFC 5321 §4.1.1.4 end of mail data
        start = time.perf_counter()
        await proto.expect("end of data", 250)
        return time.perf_counter() - start

    async def quit(self) -> None:
        try:
            await self.proto.send(b"QUIT\r\n")
            await asyncio.wait_for(self.proto.reply(), 10)
        except (OSError, TimeoutError, Refused):
            pass
        self.abort()

    def abort(self) -> None:
        if self.proto.transport is not None:
            self.proto.transport.close()


class Load:
    """Shared state of one run: letters left, latencies, failures."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.left = opts.messages
        self.latencies: list[float] = []
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.pipelined = 0
        self.lockstep = 0
        self.letter = make_letter(opts.size, opts.sender, opts.recipient)
        self.commands = (
            f"MAIL FROM:<{opts.sender}> SIZE={len(self.letter)}\r\n"
            f"RCPT TO:<{opts.recipient}>\r\nDATA\r\n"
        ).encode()

    def take(self) -> bool:
        if self.left <= 0 or self.failed > self.opts.messages // 2 + 10:
            return False  # done, or the server keeps failing: stop rather than spin
        self.left -= 1
        return True

    def error(self, exc: BaseException) -> None:
        self.failed += 1
        key = f"{type(exc).__name__}: {exc}"[:120]
        self.errors[key] = self.errors.get(key, 0) + 1

    async def connect(self) -> Connection:
        conn = await Connection.open(self.opts, self.commands)
        if conn.pipelining:
            self.pipelined += 1
        else:
            self.lockstep += 1
        return conn

    async def session(self) -> None:
        conn: Connection | None = None
        while self.take():
            try:
                if conn is None:
                    conn = await self.connect()
                self.latencies.append(await conn.transaction(self.letter))
            except (OSError, Refused) as exc:
                self.error(exc)
                if conn is not None:
                    conn.abort()
                conn = None
                continue
            if not self.opts.reuse:
                await conn.quit()
                conn = None
        if conn is not None:
            await conn.quit()


async def run(opts: Options) -> Report:
    """Send `opts.messages` letters over `opts.sessions` sessions; the report."""
    if not ipaddress.ip_address(opts.host).is_loopback:
        raise ValueError(f"{opts.host} is not a loopback address")
    load = Load(opts)
    cpu0 = _cpu()
    started_at = time.time()
    t0 = time.perf_counter()
    async with asyncio.timeout(opts.timeout):
        await asyncio.gather(*(load.session() for _ in range(max(1, opts.sessions))))
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    lat = sorted(load.latencies)
    accepted = len(lat)
    return Report(
        host=opts.host,
        port=opts.port,
        messages=opts.messages,
        size=opts.size,
        sessions=opts.sessions,
        reuse=opts.reuse,
        pipelining=opts.pipelining,
        accepted=accepted,
        failed=load.failed,
        seconds=round(elapsed, 3),
        per_second=round(accepted / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms={
            "p50": round(percentile(lat, 50) * 1000, 3),
            "p99": round(percentile(lat, 99) * 1000, 3),
            "max": round(lat[-1] * 1000, 3) if lat else 0.0,
        },
        client_cpu_ms_per_letter=round(cpu * 1000 / max(1, accepted), 3),
        pipelined_connections=load.pipelined,
        lockstep_connections=load.lockstep,
        errors=load.errors,
        started_at=started_at,
    )


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--host", required=True, help="a loopback address")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1024, help="octets per letter")
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--reuse", action="store_true", help="many letters per connection")
    ap.add_argument("--pipelining", action="store_true", help="MAIL/RCPT/DATA in one write")
    ap.add_argument("--sender", default="a@bench.test")
    ap.add_argument("--recipient", default="u1@bench.test")
    ap.add_argument("--auth", default="", help="USER:PASSWORD for AUTH PLAIN (submission)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    return Options(
        host=args.host,
        port=args.port,
        messages=args.messages,
        size=args.size,
        sessions=args.sessions,
        reuse=args.reuse,
        pipelining=args.pipelining,
        sender=args.sender,
        recipient=args.recipient,
        auth=(auth[0], auth[1]) if auth and len(auth) == 2 else None,
        timeout=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    except ImportError:
        pass
    opts = parse_args(argv)
    report = asyncio.run(run(opts))
    if "--json" in (argv if argv is not None else sys.argv[1:]):
        print(json.dumps(asdict(report)))
    else:
        lat = report.latency_ms
        print(
            f"{report.accepted}/{report.messages} letters in {report.seconds} s: "
            f"{report.per_second} letters/s, latency to 250 p50 {lat['p50']} ms, "
            f"p99 {lat['p99']} ms; client CPU {report.client_cpu_ms_per_letter} ms/letter"
        )
        for err, count in report.errors.items():
            print(f"  {count} x {err}", file=sys.stderr)
    return 0 if report.accepted == report.messages else 1


if __name__ == "__main__":
    raise SystemExit(main())
