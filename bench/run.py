"""Accept-rate benchmark: Postfix's `smtp-source` against pochta, Postfix and aiosmtpd+SQLite,
side by side in one run, every letter durably stored before its 250.

    .venv/bin/pip install -e '.[bench]'        # aiosmtpd, for the Python peer
    .venv/bin/python bench/run.py --targets pochta,postfix,aiosmtpd --sessions 10,50 \\
        --sizes 1024,102400 --messages 1024:2000,102400:1000 --rounds 3

Each round runs every target on every cell (body size x parallel sessions) in turn, so drift
hits all alike; each cell then reports the median letters/s per target and the ratios of pochta
to the others. Every target is checked afterwards: all letters must be in its store (Postfix:
delivered to the Maildir). Server CPU per letter is read from /proc. Results go to a table and
bench/results/accept.json. Traffic stays on loopback; every run is bounded by a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pochta.testing.node import NodeProcess, free_port, wait_port
from pochta.testing.postfix import PostfixInstance, missing_reason

HERE = Path(__file__).resolve().parent


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU of processes (and their reaped children), from /proc."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / ticks
    return total


class Target(Protocol):
    name: str
    host: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stored(self) -> int: ...
    def pids(self) -> list[int]: ...


class Pochta:
    def __init__(self, workdir: Path, host: str, workers: int) -> None:
        self.name = "pochta" if workers == 1 else f"pochta-{workers}p"
        self.host = host
        extra = "[limits]\nconnections_per_ip = 100000\n"
        extra += 'message_size = "200MiB"\n'
        self.node = NodeProcess.create(
            workdir / self.name,
            host=host,
            hostname="mx.bench.test",
            domains=["bench.test"],
            kinds=("mx",),
            extra_toml=extra,
        )
        self.node.cli("user", "add", "u1@bench.test", "--password-stdin", input="benchpass1\n")
        config = self.node.config
        config.write_text(f"workers = {workers}\n" + config.read_text())  # a top-level key
        self.port = self.node.ports["mx"]

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        self.node.stop()

    def stored(self) -> int:
        with sqlite3.connect(self.node.db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def pids(self) -> list[int]:
        if self.node.proc is None:
            return []
        out = subprocess.run(
            ["pgrep", "-P", str(self.node.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        return [self.node.proc.pid, *map(int, out)]


class Aiosmtpd:
    name = "aiosmtpd"

    def __init__(self, workdir: Path, host: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.db = workdir / "aiosmtpd.db"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "aiosmtpd_baseline.py"),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--db",
                str(self.db),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.host, self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
            self.proc = None

    def stored(self) -> int:
        with sqlite3.connect(self.db) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def pids(self) -> list[int]:
        return [] if self.proc is None else [self.proc.pid]


class Postfix:
    name = "postfix"

    def __init__(self, workdir: Path, host: str) -> None:
        self.host = host
        self.port = free_port(host)
        self.instance = PostfixInstance(
            Path(tempfile.mkdtemp(prefix="pochta-bench-postfix-")),
            address=host,
            port=self.port,
            hostname="mx.bench.test",
            domain="bench.test",
            users=("u1",),
            relay_routes={},
        )

    def start(self) -> None:
        self.instance.start()

    def stop(self) -> None:
        self.instance.stop()

    def stored(self, wait: float = 120.0) -> int:
        """Letters delivered into the Maildir (Postfix's 250 comes at queue-file fsync)."""
        deadline = time.monotonic() + wait
        last, steady = -1, 0
        while time.monotonic() < deadline:
            count = sum(
                len(list((self.instance.maildir("u1") / sub).glob("*")))
                for sub in ("new", "cur")
                if (self.instance.maildir("u1") / sub).is_dir()
            )
            steady = steady + 1 if count == last else 0
            if steady >= 10 and not self.instance.queue_text().strip().startswith("-Queue ID"):
                return count
            last = count
            time.sleep(0.2)
        return last

    def pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-f", str(self.instance.config_directory)], capture_output=True, text=True
        ).stdout.split()
        master = self.instance.master_pid()
        children = (
            subprocess.run(
                ["pgrep", "-P", str(master)], capture_output=True, text=True
            ).stdout.split()
            if master
            else []
        )
        return sorted({*map(int, out), *map(int, children)})


def drive(
    target: Target, size: int, sessions: int, messages: int, reuse: bool, timeout: float
) -> dict[str, object]:
    before = target.stored()
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
    cmd.append(f"{target.host}:{target.port}")
    pids = target.pids()
    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(target.pids()) - cpu0
    stored = target.stored() - before
    return {
        "target": target.name,
        "size": size,
        "sessions": sessions,
        "messages": messages,
        "seconds": round(elapsed, 3),
        "per_second": round(messages / elapsed, 1),
        "cpu_ms_per_letter": round(cpu * 1000 / messages, 3),
        "all_stored": stored == messages,
    }


def build(names: list[str], workdir: Path, pochta_workers: int) -> list[Target]:
    targets: list[Target] = []
    for i, name in enumerate(names):
        host = f"127.0.0.{60 + i}"
        if name == "pochta":
            targets.append(Pochta(workdir, host, pochta_workers))
        elif name == "aiosmtpd":
            targets.append(Aiosmtpd(workdir, host))
        elif name == "postfix":
            reason = missing_reason()
            if reason:
                print(f"skipping postfix: {reason}", file=sys.stderr)
                continue
            targets.append(Postfix(workdir, host))
        else:
            raise SystemExit(f"unknown target {name}")
    return targets


def report(rows: list[dict[str, object]], names: list[str]) -> list[dict[str, object]]:
    cells: dict[tuple[int, int], dict[str, list[float]]] = {}
    ok: dict[tuple[int, int, str], bool] = {}
    for r in rows:
        key = (int(str(r["size"])), int(str(r["sessions"])))
        cells.setdefault(key, {}).setdefault(str(r["target"]), []).append(
            float(str(r["per_second"]))
        )
        ok[(*key, str(r["target"]))] = ok.get((*key, str(r["target"])), True) and bool(
            r["all_stored"]
        )
    present = [n for n in names if any(n in c for c in cells.values())]
    header = f"{'size':>8} {'sessions':>8} " + " ".join(f"{n:>12}" for n in present)
    others = [n for n in present if n != present[0]]
    header += " " + " ".join(f"{present[0] + '/' + n:>20}" for n in others)
    print(header)
    summary = []
    for (size, sessions), by in sorted(cells.items()):
        med = {n: statistics.median(v) for n, v in by.items()}
        line = f"{size:>8} {sessions:>8} " + " ".join(
            f"{med.get(n, 0):>11.0f}{'' if ok.get((size, sessions, n), False) else '!'}"
            for n in present
        )
        ratios = {n: round(med[present[0]] / med[n], 2) for n in others if med.get(n)}
        line += " " + " ".join(f"{ratios.get(n, 0):>20.2f}" for n in others)
        print(line)
        summary.append(
            {"size": size, "sessions": sessions, "median_per_second": med, "ratios": ratios}
        )
    print("(! = not every letter was stored)")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", default="pochta,postfix,aiosmtpd")
    ap.add_argument("--sessions", default="10,50")
    ap.add_argument("--sizes", default="1024,102400")
    ap.add_argument(
        "--messages",
        default="1024:2000,102400:1000",
        help="letters per run, per size (SIZE:COUNT,...)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reuse", action="store_true", help="reuse connections (smtp-source -d)")
    ap.add_argument("--pochta-workers", type=int, default=1, help="pochta server processes")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(HERE / "results" / "accept.json"))
    args = ap.parse_args()
    if shutil.which("smtp-source") is None:
        print("smtp-source not found: install Debian's postfix package", file=sys.stderr)
        return 2
    names = args.targets.split(",")
    counts = {int(k): int(v) for k, v in (p.split(":") for p in args.messages.split(","))}
    sizes = [int(s) for s in args.sizes.split(",")]
    sessions = [int(s) for s in args.sessions.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="pochta-bench-"))
    targets = build(names, workdir, args.pochta_workers)
    names = [t.name for t in targets]
    rows: list[dict[str, object]] = []
    try:
        for target in targets:
            target.start()
        for rnd in range(args.rounds):
            for size in sizes:
                for conc in sessions:
                    for target in targets:
                        row = drive(
                            target, size, conc, counts.get(size, 1000), args.reuse, args.timeout
                        )
                        row["round"] = rnd
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
        summary = report(rows, names)
    finally:
        for target in targets:
            try:
                target.stop()
            except Exception as exc:  # keep stopping the others
                print(f"stopping {target.name}: {exc!r}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}, indent=2)
    )
    return 0 if all(r["all_stored"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
