"""Memory of a `pochta serve` process: many idle connections, and one very large letter.

    .venv/bin/python bench/memory.py --idle 10000 --letter-mib 50

Idle: open N connections to a fresh node on 127.0.0.1 (each reads the 220 greeting and then
waits), and report the server's resident memory with them all open. Large letter: send one
letter of the given size over one connection and report how much the server's peak resident
memory (VmHWM) grew, against the letter's size. Bounded in count and time; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import smtplib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pochta.testing.node import NodeProcess

HOST = "127.0.0.1"


def status(pid: int, field: str) -> int:
    """A VmRSS/VmHWM value of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def make_node(workdir: Path, connections: int) -> NodeProcess:
    extra = (
        f"[limits]\nconnections = {connections + 100}\nconnections_per_ip = {connections + 100}\n"
    )
    extra += 'message_size = "200MiB"\ntext_line = 100000\n'
    node = NodeProcess.create(
        workdir,
        host=HOST,
        hostname="mx.bench.test",
        domains=["bench.test"],
        kinds=("mx",),
        extra_toml=extra,
    )
    node.cli("user", "add", "u1@bench.test", "--password-stdin", input="benchpass1\n")
    node.start()
    return node


async def hold_idle(port: int, count: int, timeout: float) -> list[asyncio.StreamWriter]:
    async def one() -> asyncio.StreamWriter:
        reader, writer = await asyncio.open_connection(HOST, port)
        line = await reader.readline()
        if not line.startswith(b"220"):
            raise RuntimeError(f"unexpected greeting {line!r}")
        return writer

    writers: list[asyncio.StreamWriter] = []
    async with asyncio.timeout(timeout):
        for start in range(0, count, 500):  # in batches: the listen backlog is finite
            writers += await asyncio.gather(*(one() for _ in range(min(500, count - start))))
    return writers


def idle(count: int) -> dict[str, object]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="pochta-mem-"))
    node = make_node(workdir, count)
    try:
        assert node.proc is not None
        base = status(node.proc.pid, "VmRSS")

        async def run() -> int:
            writers = await hold_idle(node.ports["mx"], count, timeout=120)
            await asyncio.sleep(1.0)
            assert node.proc is not None
            rss = status(node.proc.pid, "VmRSS")
            for w in writers:
                w.close()
            return rss

        rss = asyncio.run(run())
        return {
            "idle_connections": count,
            "rss_before_mib": round(base / 1024, 1),
            "rss_mib": round(rss / 1024, 1),
            "per_connection_kib": round((rss - base) / max(1, count), 2),
        }
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def big_letter(mib: int) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="pochta-mem-"))
    node = make_node(workdir, 10)
    try:
        assert node.proc is not None
        line = b"0123456789abcdef" * 4 + b"\r\n"  # 66-octet lines
        body = b"Subject: big\r\n\r\n" + line * (mib * 1024 * 1024 // len(line))
        before = status(node.proc.pid, "VmHWM")
        t0 = time.perf_counter()
        with smtplib.SMTP(HOST, node.ports["mx"], timeout=300) as client:
            client.sendmail("a@bench.test", ["u1@bench.test"], body)
        seconds = time.perf_counter() - t0
        after = status(node.proc.pid, "VmHWM")
        grown = (after - before) / 1024
        size = len(body) / 1024 / 1024
        return {
            "letter_mib": round(size, 1),
            "seconds": round(seconds, 2),
            "peak_before_mib": round(before / 1024, 1),
            "peak_after_mib": round(after / 1024, 1),
            "growth_mib": round(grown, 1),
            "growth_per_letter_size": round(grown / size, 2),
        }
    finally:
        node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=int, default=10000, help="idle connections to hold (0: skip)")
    ap.add_argument("--letter-mib", type=int, default=50, help="large letter size (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = ap.parse_args()
    result: dict[str, object] = {"date": time.strftime("%Y-%m-%d")}
    if args.idle:
        result["idle"] = idle(args.idle)
        print(json.dumps(result["idle"]))
    if args.letter_mib:
        result["letter"] = big_letter(args.letter_mib)
        print(json.dumps(result["letter"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
