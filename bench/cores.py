"""What a second process can add on this machine: one pochta node alone, against two independent
nodes (each its own process, data directory and loopback address: nothing shared, not even the
SQLite file) driven at the same time.

    .venv/bin/python bench/cores.py [--sessions 10] [--messages 6000] [--size 1024] [--rounds 3]

Each round runs `smtp-source` with `--sessions` sessions against one node, then with half as
many against each of the two at once (the same total concurrency). If the machine's cores added
up, the pair would accept close to twice the letters a second of the single node at half the
concurrency, and each node's CPU a letter would stay the same; the ratios printed say how far
from that the machine is. This is the ceiling for `workers = 2`, which shares one database on
top. Every letter is checked to be stored; traffic stays on loopback; every run has a timeout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import Pochta, cpu_seconds, run_smtp_source


def measure(
    nodes: list[Pochta], sessions: int, messages: int, size: int, timeout: float
) -> tuple[float, list[float]]:
    """Drive every node at once; (letters/s of all together, CPU ms a letter of each node)."""
    cpu0 = [cpu_seconds(n.pids()) for n in nodes]
    threads = [
        threading.Thread(target=run_smtp_source, args=(n, size, sessions, messages, False, timeout))
        for n in nodes
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    cpu = [(cpu_seconds(n.pids()) - c) * 1000 / messages for n, c in zip(nodes, cpu0, strict=True)]
    return len(nodes) * messages / elapsed, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10, help="for the single node; half each")
    ap.add_argument("--messages", type=int, default=6000, help="letters per node per run")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    half = max(1, args.sessions // 2)
    with tempfile.TemporaryDirectory(prefix="pochta-cores-") as tmp:
        a = Pochta(Path(tmp), "127.0.0.61", 1)
        b = Pochta(Path(tmp) / "b", "127.0.0.62", 1)
        a.start()
        b.start()
        try:
            sent = {id(a): 0, id(b): 0}
            rows: dict[str, list[tuple[float, list[float]]]] = {"one": [], "half": [], "two": []}
            for _ in range(args.rounds):
                for name, nodes, sessions in (
                    ("one", [a], args.sessions),
                    ("half", [a], half),
                    ("two", [a, b], half),
                ):
                    rows[name].append(
                        measure(nodes, sessions, args.messages, args.size, args.timeout)
                    )
                    for n in nodes:
                        sent[id(n)] += args.messages
            stored = a.stored() == sent[id(a)] and b.stored() == sent[id(b)]
        finally:
            a.stop()
            b.stop()

    def med(name: str) -> tuple[float, float]:
        rate = statistics.median(r for r, _ in rows[name])
        cpu = statistics.median(c for _, cpus in rows[name] for c in cpus)
        return rate, cpu

    (one, one_cpu), (alone, alone_cpu), (two, two_cpu) = med("one"), med("half"), med("two")
    lines = [
        (f"one node, {args.sessions} sessions", one, f"{one_cpu:.3f} ms a letter"),
        (f"one node, {half} sessions", alone, f"{alone_cpu:.3f} ms a letter"),
        (f"two nodes, {half} sessions each", two, f"{two_cpu:.3f} ms a letter each"),
    ]
    print(f"{args.size}-octet letters, medians of {args.rounds} rounds; all stored: {stored}")
    for label, rate, cpu in lines:
        print(f"{label:32s} {rate:7.0f} letters/s  {cpu}")
    print(
        f"two nodes against one at {half} sessions: {two / alone:.2f}x the letters a second,"
        f" {two_cpu / alone_cpu:.2f}x the CPU a letter; against one at {args.sessions}:"
        f" {two / one:.2f}x the letters a second"
    )


if __name__ == "__main__":
    main()
