"""Accepted letters per second: one, two and three `pochta serve` nodes sharing one PostgreSQL,
next to one node on SQLite, measured in one run with Postfix's `smtp-source`.

    .venv/bin/python bench/pg_nodes.py [--messages 2000] [--sessions 10] [--size 1024]

For each setup: fresh nodes (127.0.0.51/.52/.53, mx listener only) hosting bench.test; one
`smtp-source` per node, all at once, each with `--sessions` sessions and a new connection per
letter, the letters split evenly over the nodes; then a check that every letter is stored.
Reported per setup: letters/s, server CPU ms per letter (all nodes), PostgreSQL CPU ms per letter
(the backends serving the nodes, and every postgres process: what `ps -C postgres` shows, read
from /proc in clock ticks), transaction commits/s in the bench database and WAL fsyncs/s.
The PostgreSQL setups use a database of their own (created and dropped here), so its commit
counter is not mixed with other users of the server; the WAL and "all postgres" figures are
server-wide. Output: a table, and JSON in bench/results/pg_nodes.json. Traffic stays on loopback;
every step has a timeout (the whole run takes well under 3 minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pochta.auth.passwords import hash_password
from pochta.store import open_store
from pochta.testing.node import NodeProcess

HOSTS = ("127.0.0.51", "127.0.0.52", "127.0.0.53")
ADMIN_DSN = os.environ.get("POCHTA_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BENCH_DB = f"pochta_bench_{os.getpid()}"
USER = "u1@bench.test"
TICK = os.sysconf("SC_CLK_TCK")


# -- measuring ----------------------------------------------------------------------------------


def cpu_of(pid: int) -> float:
    """CPU seconds (user + system) of a live process; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def postgres_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "postgres":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def cpu_snapshot(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_of(pid) for pid in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU spent between two snapshots by the processes alive at the second one."""
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


async def pg(dsn: str, sql: str, *args: Any) -> Any:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def pg_sync(dsn: str, sql: str, *args: Any) -> Any:
    return asyncio.run(pg(dsn, sql, *args))


def bench_dsn() -> str:
    base, _, _ = ADMIN_DSN.partition("?")
    return base.rsplit("/", 1)[0] + "/" + BENCH_DB


def pg_counters() -> tuple[int, int]:
    """(commits in the bench database, WAL fsyncs of the whole server) so far."""
    rows = pg_sync(
        ADMIN_DSN,
        "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = $1),"
        " (SELECT wal_sync FROM pg_stat_wal)",
        BENCH_DB,
    )
    return int(rows[0][0] or 0), int(rows[0][1] or 0)


def backend_pids() -> list[int]:
    rows = pg_sync(ADMIN_DSN, "SELECT pid FROM pg_stat_activity WHERE datname = $1", BENCH_DB)
    return [int(r[0]) for r in rows]


# -- one setup ----------------------------------------------------------------------------------


def provision(url: str) -> None:
    async def run() -> None:
        store = open_store(url)
        await store.open()
        try:
            await store.add_domain("bench.test")
            await store.add_user(USER, *hash_password("benchpass1"))
        finally:
            await store.close()

    asyncio.run(run())


def start_nodes(workdir: Path, engine: str, count: int) -> tuple[list[NodeProcess], str]:
    if engine == "postgres":
        url = f"{bench_dsn()}?schema=nodes{count}"
        store = f'[store]\nurl = "{url}"\n'
    else:
        url, store = "", ""
    nodes = []
    for n, host in enumerate(HOSTS[:count], 1):
        node = NodeProcess.create(
            workdir / f"{engine}{count}-{n}",
            host=host,
            hostname=f"mx{n}.bench.test",
            kinds=("mx",),
            extra_toml=f"{store}[limits]\nconnections_per_ip = 10000\n",
        )
        nodes.append(node)
    url = url or f"sqlite:///{nodes[0].db}"
    provision(url)
    for node in nodes:
        node.start()
    return nodes, url


def stored(url: str) -> int:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    schema = url.rpartition("schema=")[2]
    return int(pg_sync(bench_dsn(), f"SELECT COUNT(*) FROM {schema}.messages")[0][0])


def drive(
    nodes: list[NodeProcess], messages: int, sessions: int, size: int, timeout: float
) -> float:
    """One smtp-source per node, all at once; returns the wall-clock seconds until all finished."""
    share = [
        messages // len(nodes) + (1 if i < messages % len(nodes) else 0) for i in range(len(nodes))
    ]
    procs = []
    t0 = time.perf_counter()
    for node, count in zip(nodes, share, strict=True):
        cmd = ["smtp-source", "-4", "-s", str(sessions), "-m", str(count), "-l", str(size),
               "-f", "a@bench.test", "-t", USER, f"{node.host}:{node.ports['mx']}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {err.decode(errors='replace')}")
    return time.perf_counter() - t0


def run_setup(engine: str, count: int, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="pochta-pgbench-"))
    nodes: list[NodeProcess] = []
    try:
        nodes, url = start_nodes(workdir, engine, count)
        pids = [n.proc.pid for n in nodes if n.proc is not None]
        is_pg = engine == "postgres"
        node_cpu0, pg_all0 = cpu_snapshot(pids), cpu_snapshot(postgres_pids())
        counters0 = pg_counters() if is_pg else (0, 0)
        seconds = drive(nodes, args.messages, args.sessions, args.size, args.timeout)
        node_cpu = cpu_delta(node_cpu0, cpu_snapshot(pids))
        pg_all = cpu_delta(pg_all0, cpu_snapshot(postgres_pids()))
        pg_backends = cpu_delta(pg_all0, cpu_snapshot(backend_pids())) if is_pg else 0.0
        for node in nodes:
            node.stop()
        time.sleep(0.5 if is_pg else 0)  # exiting backends flush their statistics
        counters1 = pg_counters() if is_pg else (0, 0)
        count_stored = stored(url)
        per = 1000 / args.messages
        return {
            "setup": f"{count} node{'s' if count > 1 else ''} on {engine}",
            "engine": engine,
            "nodes": count,
            "messages": args.messages,
            "seconds": round(seconds, 3),
            "per_second": round(args.messages / seconds, 1),
            "stored": count_stored,
            "all_stored": count_stored == args.messages,
            "server_cpu_ms_per_letter": round(node_cpu * per, 3),
            "pg_backend_cpu_ms_per_letter": round(pg_backends * per, 3) if is_pg else None,
            "pg_all_cpu_ms_per_letter": round(pg_all * per, 3) if is_pg else None,
            "commits_per_second": round((counters1[0] - counters0[0]) / seconds, 1)
            if is_pg
            else None,
            "wal_syncs_per_second": round((counters1[1] - counters0[1]) / seconds, 1)
            if is_pg
            else None,
        }
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


# -- main ---------------------------------------------------------------------------------------


def show(value: object) -> str:
    return "-" if value is None else str(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10, help="smtp-source sessions per node")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per smtp-source run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "pg_nodes.json"))
    args = ap.parse_args()
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: install Debian's postfix package", file=sys.stderr)
        return 2
    pg_sync(ADMIN_DSN, f"DROP DATABASE IF EXISTS {BENCH_DB}")
    pg_sync(ADMIN_DSN, f"CREATE DATABASE {BENCH_DB}")
    rows = []
    head = (
        "setup",
        "letters/s",
        "node ms/l",
        "pg be ms/l",
        "pg all ms/l",
        "commits/s",
        "wal fsync/s",
    )
    print(f"{head[0]:<22}" + "".join(f"{h:>12}" for h in head[1:]) + "  all stored")
    try:
        for engine, count in (("sqlite", 1), ("postgres", 1), ("postgres", 2), ("postgres", 3)):
            row = run_setup(engine, count, args)
            rows.append(row)
            cells = [row["per_second"], row["server_cpu_ms_per_letter"],
                     row["pg_backend_cpu_ms_per_letter"], row["pg_all_cpu_ms_per_letter"],
                     row["commits_per_second"], row["wal_syncs_per_second"]]  # fmt: skip
            print(f"{row['setup']:<22}" + "".join(f"{show(c):>12}" for c in cells)
                  + f"  {row['all_stored']}", flush=True)  # fmt: skip
    finally:
        pg_sync(ADMIN_DSN, f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "size": args.size,
        "sessions_per_node": args.sessions,
    }
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0 if all(r["all_stored"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
