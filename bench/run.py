"""Accept-rate benchmark: Postfix's `smtp-source` against a fresh `pochta serve` on loopback.

    .venv/bin/python bench/run.py --sessions 10,50 --sizes 1024,102400 --messages 2000

For each (size, sessions) cell: a new data directory, a node hosting bench.test, smtp-source
sending MESSAGES letters (new connection per letter unless --reuse), then a check that every
letter is in the store. Reports letters/s, server CPU seconds per 1000 letters and peak RSS, as a
table and as JSON (bench/results/). Traffic stays on 127.0.0.1; every run is bounded by a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pochta.testing.node import NodeProcess

HOST = "127.0.0.1"


def proc_stats(pid: int) -> tuple[float, int]:
    """CPU seconds (user+system) and peak RSS in KiB of a process."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cpu, peak


def stored(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from messages").fetchone()[0])


def run_cell(
    size: int, sessions: int, messages: int, reuse: bool, timeout: float
) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="pochta-bench-"))
    try:
        node = NodeProcess.create(
            workdir,
            host=HOST,
            hostname="mx.bench.test",
            domains=["bench.test"],
            kinds=("mx",),
            extra_toml="[limits]\nconnections_per_ip = 10000\n",
        )
        node.cli("user", "add", "u1@bench.test", "--password-stdin", input="benchpass1\n")
        node.start()
        assert node.proc is not None
        cpu0, _ = proc_stats(node.proc.pid)
        cmd = [
            "smtp-source",
            "-4",
            "-s",
            str(sessions),
            "-m",
            str(messages),
            "-l",
            str(size),
            "-f",
            "a@bench.test",
            "-t",
            "u1@bench.test",
        ]
        if reuse:
            cmd.insert(1, "-d")
        cmd.append(f"{HOST}:{node.ports['mx']}")
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
        elapsed = time.perf_counter() - t0
        cpu1, peak = proc_stats(node.proc.pid)
        node.stop()
        count = stored(node.db)
        return {
            "size": size,
            "sessions": sessions,
            "messages": messages,
            "reuse": reuse,
            "seconds": round(elapsed, 3),
            "per_second": round(messages / elapsed, 1),
            "stored": count,
            "all_stored": count == messages,
            "server_cpu_ms_per_letter": round((cpu1 - cpu0) * 1000 / messages, 3),
            "peak_rss_mib": round(peak / 1024, 1),
        }
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="10,50")
    ap.add_argument("--sizes", default="1024,102400")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--reuse", action="store_true", help="reuse connections (smtp-source -d)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "accept.json"))
    args = ap.parse_args()
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: install Debian's postfix package", file=sys.stderr)
        return 2
    rows = []
    print(f"{'size':>8} {'sessions':>8} {'letters/s':>10} {'cpu ms/letter':>14} {'rss MiB':>8} ok")
    for size in (int(s) for s in args.sizes.split(",")):
        for sessions in (int(s) for s in args.sessions.split(",")):
            row = run_cell(size, sessions, args.messages, args.reuse, args.timeout)
            rows.append(row)
            print(
                f"{size:>8} {sessions:>8} {row['per_second']:>10} "
                f"{row['server_cpu_ms_per_letter']:>14} {row['peak_rss_mib']:>8} "
                f"{row['all_stored']}",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    return 0 if all(r["all_stored"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
