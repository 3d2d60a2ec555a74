"""Accept-rate benchmark: Postfix's `smtp-source` and pochta's own load client (bench/loadclient.py)
against pochta, Postfix and aiosmtpd+SQLite, side by side in one run, every letter durably stored
before its 250.

    .venv/bin/pip install -e '.[bench]'        # aiosmtpd, for the Python peer
    .venv/bin/python bench/run.py --targets pochta,postfix,aiosmtpd --sessions 10,50 \\
        --sizes 1024,102400 --messages 1024:2000,102400:1000 --rounds 3
    .venv/bin/python bench/run.py --client smtp-source,pochta --pipelining --reuse \\
        --sessions 1,10,50,200 --sizes 1024,10485760 --messages 1024:2000,10485760:20

Each round runs every target on every cell (body size x parallel sessions) in turn, so drift
hits all alike; each cell then reports the median letters/s per target and the ratios of pochta
to the others. Every target is checked afterwards: all letters must be in its store (Postfix:
delivered to the Maildir). Server CPU per letter is read from /proc; peak memory is the sum of
the VmHWM of the target's processes, reset (`clear_refs`) before each cell and sampled during it.
`--client pochta` (bench/loadclient.py) also measures the latency from the end of the data to the
250 (p50/p99) and can pipeline (`--pipelining`, RFC 2920); `--client smtp-source,pochta` drives
every cell with both. Results go to tables and bench/results/accept.json. Traffic stays on
loopback; every run is bounded by a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pochta.testing.node import NodeProcess, free_port, wait_port
from pochta.testing.postfix import PostfixInstance, missing_reason

HERE = Path(__file__).resolve().parent


def _stat_times(pid: int) -> tuple[int, int]:
    """(utime+stime, cutime+cstime) of a process in clock ticks; (0, 0) when it is gone. A
    zombie still shows its own times until its parent reaps it (then they move to the
    parent's cutime/cstime)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def cpu_seconds(pids: list[int]) -> float:
    """user+system CPU of processes and of their reaped children, from /proc.

    A consistent snapshot: a child reaped while the others are read (Postfix's master reaps
    its smtpd and cleanup processes all the time) would be counted twice or not at all, so
    the reads are repeated until no reaped-children total changed around one pass."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for _ in range(10):
        before = [_stat_times(pid)[1] for pid in pids]
        snapshot = [_stat_times(pid) for pid in pids]
        total = sum(own + reaped for own, reaped in snapshot)
        if [_stat_times(pid)[1] for pid in pids] == before:  # nobody reaped meanwhile
            break
    return total / ticks


def status_kib(pid: int, field: str) -> int:
    """A Vm* value (VmHWM, VmRSS) of /proc/PID/status in KiB; 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size of a process (shared pages divided among the processes sharing
    them, so a many-process server is not counted once per process), in KiB."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemoryWatch:
    """Peak resident memory of a target's processes during one cell. Each process's VmHWM is
    reset to its current RSS at the start (writing 5 to /proc/PID/clear_refs, Linux 4.0+) and
    read every `every` seconds, so processes that come and go (Postfix's smtpd, cleanup) count
    while they live; the peak is the sum of the per-process peaks (an upper bound when
    processes peak at different moments)."""

    def __init__(self, target: Target, every: float = 0.5) -> None:
        self.target = target
        self.every = every
        self.peaks: dict[int, int] = {}
        self.pss_kib = 0  # proportional set size at the end (shared pages split between users)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> MemoryWatch:
        for pid in self.target.pids():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as fh:
                    fh.write("5")
            except OSError:
                pass
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self._sample()
        self.pss_kib = sum(pss_kib(pid) for pid in self.target.pids())

    def _loop(self) -> None:
        while not self.done.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        for pid in self.target.pids():
            self.peaks[pid] = max(self.peaks.get(pid, 0), status_kib(pid, "VmHWM"))

    @property
    def peak_mib(self) -> float:
        return round(sum(self.peaks.values()) / 1024, 1)


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
        # Bench-only limits, set here rather than in testing/postfix.py: Postfix's default
        # message_size_limit (10240000 octets) refuses a 10 MiB body, and default_process_limit
        # (100 smtpd processes) would cap 200 sessions. The mailbox limits must not be smaller
        # than message_size_limit. `postfix reload` makes new daemons read them.
        self.instance.command(
            "postconf",
            "-e",
            "message_size_limit=209715200",
            "virtual_mailbox_limit=0",
            "mailbox_size_limit=0",
            "default_process_limit=300",
        )
        self.instance.command("postfix", "reload")
        time.sleep(1.0)  # daemons started before the reload finish and exit

    def stop(self) -> None:
        self.instance.stop()
        shutil.rmtree(self.instance.directory, ignore_errors=True)  # queue and Maildir

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
        # The master itself too: the CPU of the children it reaps moves to its cutime/cstime
        # (without it, a busy smtpd that exits during a cell took its CPU along: negative CPU).
        return sorted({*map(int, out), *map(int, children), *([master] if master else [])})


def run_smtp_source(
    target: Target, size: int, sessions: int, messages: int, reuse: bool, timeout: float
) -> dict[str, object]:
    """Postfix's C load generator (no latency figures; never pipelines)."""
    cmd = ["smtp-source", "-4", "-s", str(sessions), "-m", str(messages), "-l", str(size)]
    cmd += ["-f", "a@bench.test", "-t", "u1@bench.test"]
    if reuse:
        cmd.insert(1, "-d")
    cmd.append(f"{target.host}:{target.port}")
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, timeout=timeout, capture_output=True)
    elapsed = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime
    return {
        "seconds": elapsed,
        "accepted": messages,  # smtp-source exits non-zero when a letter is refused
        "p50_ms": None,
        "p99_ms": None,
        "pipelined": False,
        "client_cpu_ms_per_letter": round(cpu * 1000 / messages, 3),
    }


def run_pochta_client(
    target: Target,
    size: int,
    sessions: int,
    messages: int,
    reuse: bool,
    pipelining: bool,
    timeout: float,
) -> dict[str, object]:
    """bench/loadclient.py in its own process (uvloop when installed)."""
    cmd = [sys.executable, str(HERE / "loadclient.py"), "--json", "--host", target.host]
    cmd += ["--port", str(target.port), "--messages", str(messages), "--size", str(size)]
    cmd += ["--sessions", str(sessions), "--timeout", str(timeout)]
    cmd += ["--reuse"] if reuse else []
    cmd += ["--pipelining"] if pipelining else []
    t0 = time.perf_counter()
    out = subprocess.run(cmd, timeout=timeout + 30, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if not out.stdout.strip():
        raise RuntimeError(f"loadclient failed: {out.stderr[-2000:]}")
    rep = json.loads(out.stdout)
    if rep["errors"]:
        print(f"{target.name}: {rep['errors']}", file=sys.stderr)
    return {
        "seconds": rep["seconds"] or elapsed,
        "accepted": rep["accepted"],
        "p50_ms": rep["latency_ms"]["p50"],
        "p99_ms": rep["latency_ms"]["p99"],
        "pipelined": rep["pipelined_connections"] > 0 and rep["lockstep_connections"] == 0,
        "client_cpu_ms_per_letter": rep["client_cpu_ms_per_letter"],
    }


def drive(
    target: Target,
    size: int,
    sessions: int,
    messages: int,
    reuse: bool,
    timeout: float,
    client: str = "smtp-source",
    pipelining: bool = False,
) -> dict[str, object]:
    before = target.stored()
    # Each run starts with no dirty pages left by the one before (a 100 KiB cell leaves some
    # 100 MB to write back, whose writeback would slow the next target's fsyncs).
    os.sync()
    pids = target.pids()
    cpu0 = cpu_seconds(pids)
    with MemoryWatch(target) as memory:
        if client == "pochta":
            run = run_pochta_client(target, size, sessions, messages, reuse, pipelining, timeout)
        else:
            run = run_smtp_source(target, size, sessions, messages, reuse, timeout)
    cpu = cpu_seconds(target.pids()) - cpu0
    stored = target.stored() - before
    elapsed = float(str(run["seconds"]))
    accepted = int(str(run["accepted"]))
    return {
        "target": target.name,
        "client": client,
        "reuse": reuse,
        "pipelined": run["pipelined"],
        "size": size,
        "sessions": sessions,
        "messages": messages,
        "accepted": accepted,
        "seconds": round(elapsed, 3),
        "per_second": round(accepted / elapsed, 1),
        "p50_ms": run["p50_ms"],
        "p99_ms": run["p99_ms"],
        "cpu_ms_per_letter": round(cpu * 1000 / messages, 3),
        "peak_mib": memory.peak_mib,
        "pss_end_mib": round(memory.pss_kib / 1024, 1),
        "client_cpu_ms_per_letter": run["client_cpu_ms_per_letter"],
        "all_stored": stored == messages and accepted == messages,
    }


def build(names: list[str], workdir: Path, pochta_workers: list[int]) -> list[Target]:
    targets: list[Target] = []
    for i, name in enumerate(names):
        host = f"127.0.0.{60 + i}"
        if name == "pochta":
            for j, workers in enumerate(pochta_workers):  # one target per process count
                targets.append(Pochta(workdir, f"127.0.0.{80 + j}", workers))
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


DETAILS = (
    "p50_ms",
    "p99_ms",
    "cpu_ms_per_letter",
    "peak_mib",
    "pss_end_mib",
    "client_cpu_ms_per_letter",
)


def median_of(rows: list[dict[str, object]], key: str) -> float | None:
    values = [float(str(r[key])) for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def rate_table(
    rows: list[dict[str, object]], names: list[str], client: str
) -> list[dict[str, object]]:
    """The letters/s table of one client: medians per cell and target, and the ratio of each
    pochta target to each of the others."""
    cells: dict[tuple[int, int], dict[str, list[dict[str, object]]]] = {}
    for r in rows:
        key = (int(str(r["size"])), int(str(r["sessions"])))
        cells.setdefault(key, {}).setdefault(str(r["target"]), []).append(r)
    present = [n for n in names if any(n in c for c in cells.values())]
    header = f"{'size':>8} {'sessions':>8} " + " ".join(f"{n:>12}" for n in present)
    ours = [n for n in present if n.startswith("pochta")] or present[:1]
    pairs = [f"{a}/{b}" for a in ours for b in present if b not in ours]
    header += " " + " ".join(f"{pair:>20}" for pair in pairs)
    print(header)
    summary = []
    for (size, sessions), by in sorted(cells.items()):
        med = {n: median_of(v, "per_second") or 0.0 for n, v in by.items()}
        ok = {n: all(bool(r["all_stored"]) for r in v) for n, v in by.items()}
        line = f"{size:>8} {sessions:>8} " + " ".join(
            f"{med.get(n, 0):>11.0f}{'' if ok.get(n, False) else '!'}" for n in present
        )
        ratios: dict[str, float] = {}
        for pair in pairs:
            a, b = pair.split("/")
            if med.get(a) and med.get(b):
                ratios[pair] = round(med[a] / med[b], 2)
        line += " " + " ".join(f"{ratios.get(pair, 0):>20.2f}" for pair in pairs)
        print(line)
        details = {n: {k: median_of(v, k) for k in DETAILS} for n, v in by.items()}
        summary.append(
            {
                "client": client,
                "size": size,
                "sessions": sessions,
                "median_per_second": med,
                "ratios": ratios,
                "all_stored": ok,
                "medians": details,
            }
        )
    return summary


def detail_table(summary: list[dict[str, object]], names: list[str]) -> None:
    """Per cell and target: letters/s, latency to 250, server CPU and peak memory (medians)."""
    print(
        f"{'client':>11} {'size':>8} {'sessions':>8} {'target':>12} {'letters/s':>9} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'cpu ms':>7} {'peak MiB':>8} {'pss MiB':>7} "
        f"{'client ms':>9}"
    )

    def fmt(value: object, width: int, digits: int) -> str:
        return f"{'-':>{width}}" if value is None else f"{float(str(value)):>{width}.{digits}f}"

    for cell in summary:
        rates = cell["median_per_second"]
        medians = cell["medians"]
        assert isinstance(rates, dict) and isinstance(medians, dict)
        for name in names:
            if name not in rates:
                continue
            m = medians[name]
            print(
                f"{cell['client']!s:>11} {cell['size']!s:>8} {cell['sessions']!s:>8} "
                f"{name:>12} {rates[name]:>9.0f} {fmt(m['p50_ms'], 8, 2)} "
                f"{fmt(m['p99_ms'], 8, 2)} {fmt(m['cpu_ms_per_letter'], 7, 3)} "
                f"{fmt(m['peak_mib'], 8, 1)} {fmt(m.get('pss_end_mib'), 7, 1)} "
                f"{fmt(m['client_cpu_ms_per_letter'], 9, 3)}"
            )


def report(
    rows: list[dict[str, object]], names: list[str], clients: list[str] | None = None
) -> list[dict[str, object]]:
    clients = clients or ["smtp-source"]
    summary: list[dict[str, object]] = []
    for client in clients:
        mine = [r for r in rows if r.get("client", "smtp-source") == client]
        if clients != ["smtp-source"]:
            print(f"client: {client}")
        summary += rate_table(mine, names, client)
    print("(! = not every letter was stored)")
    print()
    detail_table(summary, names)
    print("(latency: end of data to 250, own client only; cpu: server CPU per letter;")
    print(" peak: sum of VmHWM of the target's processes; pss: their summed PSS at the end of")
    print(" the cell (shared pages split); client: load client CPU per letter)")
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
    ap.add_argument(
        "--client",
        default="smtp-source",
        help="load clients, comma-separated: smtp-source (Postfix's), pochta (bench/loadclient.py)",
    )
    ap.add_argument(
        "--pipelining",
        action="store_true",
        help="pochta client: MAIL/RCPT/DATA in one write where PIPELINING is offered (RFC 2920)",
    )
    ap.add_argument(
        "--pochta-workers",
        default="1",
        help="pochta server processes; a list (1,2) runs one pochta target per count",
    )
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(HERE / "results" / "accept.json"))
    ap.add_argument("--show", metavar="JSON", help="print the tables of a saved run and exit")
    args = ap.parse_args()
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        seen = [str(r["target"]) for r in saved["rows"]]
        used = [str(r.get("client", "smtp-source")) for r in saved["rows"]]
        report(saved["rows"], list(dict.fromkeys(seen)), list(dict.fromkeys(used)))
        return 0
    clients = args.client.split(",")
    if set(clients) - {"smtp-source", "pochta"}:
        raise SystemExit(f"unknown client in {args.client!r}: smtp-source, pochta")
    if "smtp-source" in clients and shutil.which("smtp-source") is None:
        print("smtp-source not found: install Debian's postfix package", file=sys.stderr)
        return 2
    names = args.targets.split(",")
    counts = {int(k): int(v) for k, v in (p.split(":") for p in args.messages.split(","))}
    sizes = [int(s) for s in args.sizes.split(",")]
    sessions = [int(s) for s in args.sessions.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="pochta-bench-"))
    targets = build(names, workdir, [int(w) for w in args.pochta_workers.split(",")])
    names = [t.name for t in targets]
    rows: list[dict[str, object]] = []
    try:
        for target in targets:
            target.start()
        for rnd in range(args.rounds):
            for size in sizes:
                for conc in sessions:
                    for client in clients:
                        for target in targets:
                            row = drive(
                                target,
                                size,
                                conc,
                                counts.get(size, 1000),
                                args.reuse,
                                args.timeout,
                                client,
                                args.pipelining,
                            )
                            row["round"] = rnd
                            rows.append(row)
                            print(json.dumps(row), file=sys.stderr, flush=True)
        summary = report(rows, names, clients)
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
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "command": sys.argv,
                "rows": rows,
                "summary": summary,
            },
            indent=2,
        )
    )
    return 0 if all(r["all_stored"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
