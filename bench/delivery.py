"""End-to-end delivery rate between two servers: two pochta nodes next to two Postfix instances,
measured in one run.

    .venv/bin/python bench/delivery.py [--messages 1000] [--size 1024] [--rounds 3] \\
        [--pairs pochta,postfix] [--pochta-per-destination 1,10]

A pair is a sender and a receiver on loopback addresses of their own. The sender relays every
letter to the receiver over SMTP; what is measured is the time from the first injection into the
sender until the receiver has stored all N letters (letters/s end to end), next to the injection
rate alone. Per pair also the CPU per letter of both servers together.

- pochta: sender node (127.0.0.80) with only a submission listener; `[dns.routes]` sends
  bench.test to the receiver node's mx port (127.0.0.81), `[delivery] port` is that port and
  `[delivery] poll` is short (the queue worker is woken by each accepted letter anyway). Letters
  are injected through the sender's submission port with AUTH PLAIN (`[auth] allow_plaintext`,
  the hourly sending limits raised): pochta's mx refuses relaying for strangers, and submission
  is how mail for other domains enters a pochta node, the same SMTP front door as Postfix's.
  The sender keeps a Sent copy of each letter (what submission does). `[delivery]
  per_destination` (connections at once to the receiver) is pochta's default 1 unless
  `--pochta-per-destination` lists other values (one pair per value: pochta-pd10, ...).
  Both nodes ask a DNS server of this script (empty, on loopback) for anything not routed, so
  no query leaves the machine.
- Postfix: sender instance (127.0.0.82) with `relay_routes` (transport map) bench.test ->
  the receiver instance (127.0.0.83); letters are injected at the sender's port 25 (127.0.0.0/8 is
  in its mynetworks, so it relays). Postfix's defaults otherwise: up to 20 connections per
  destination, connection caching.
Both senders use opportunistic STARTTLS towards their receiver (RFC 3207), both receivers fsync
before their 250. Injection uses bench/loadclient.py (10 sessions, reused connections). Counted
at the receiver: pochta rows in `messages`, Postfix files in the Maildir. Each round runs every
pair once, in turn, on the same running servers. Output: a table, and JSON in
bench/results/delivery.json. Bounded by `--timeout` per round; loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import cpu_seconds  # bench/run.py

from pochta.testing.dnsserver import DnsServer
from pochta.testing.node import NodeProcess, free_port
from pochta.testing.postfix import PostfixInstance, missing_reason

HERE = Path(__file__).resolve().parent
RECIPIENT = "u1@bench.test"
SENDER, SENDER_PASSWORD = "s1@send.test", "benchpass1"


def node_pids(node: NodeProcess) -> list[int]:
    if node.proc is None:
        return []
    out = subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True)
    return [node.proc.pid, *map(int, out.stdout.split())]


class PochtaPair:
    def __init__(
        self, workdir: Path, hosts: tuple[str, str], dns: DnsServer, per_destination: int
    ) -> None:
        self.name = "pochta" if per_destination == 1 else f"pochta-pd{per_destination}"
        send_host, recv_host = hosts
        resolver = f'[dns]\nnameservers = ["{dns.host}:{dns.port}"]\ntimeout = 2\n'
        limits = "[limits]\nconnections_per_ip = 100000\n"
        self.receiver = NodeProcess.create(
            workdir / f"{self.name}-recv",
            host=recv_host,
            hostname="mx.bench.test",
            domains=["bench.test"],
            users={RECIPIENT: "benchpass1"},
            kinds=("mx",),
            extra_toml=resolver + limits,
        )
        port = self.receiver.ports["mx"]
        sender_toml = (
            f'{resolver}\n[dns.routes]\n"bench.test" = ["{recv_host}:{port}"]\n\n'
            f"[delivery]\nport = {port}\npoll = 0.2\nper_destination = {per_destination}\n\n"
            "[auth]\nallow_plaintext = true\n\n"
            "[submission]\nmessages_per_hour = 10000000\nrecipients_per_hour = 10000000\n\n"
            f"{limits}"
        )
        self.sender = NodeProcess.create(
            workdir / f"{self.name}-send",
            host=send_host,
            hostname="mx.send.test",
            domains=["send.test"],
            users={SENDER: SENDER_PASSWORD},
            kinds=("submission",),
            extra_toml=sender_toml,
        )

    def start(self) -> None:
        self.receiver.start()
        self.sender.start()

    def stop(self) -> None:
        self.sender.stop()
        self.receiver.stop()

    def inject_args(self) -> list[str]:
        port = str(self.sender.ports["submission"])
        return ["--host", self.sender.host, "--port", port, "--sender", SENDER]

    def auth(self) -> list[str]:
        return ["--auth", f"{SENDER}:{SENDER_PASSWORD}"]

    def delivered(self) -> int:
        with sqlite3.connect(f"file:{self.receiver.db}?mode=ro", uri=True) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    def pids(self) -> list[int]:
        return node_pids(self.sender) + node_pids(self.receiver)

    def pending(self) -> str:
        return self.sender.cli("queue", "list", "--json", check=False).stdout[-2000:]


class PostfixPair:
    name = "postfix"

    def __init__(self, hosts: tuple[str, str]) -> None:
        send_host, recv_host = hosts
        recv_port = free_port(recv_host)
        self.receiver = PostfixInstance(
            Path(tempfile.mkdtemp(prefix="pochta-bench-pf-recv-")),
            address=recv_host,
            port=recv_port,
            hostname="mx.bench.test",
            domain="bench.test",
            users=("u1",),
            relay_routes={},
        )
        self.sender = PostfixInstance(
            Path(tempfile.mkdtemp(prefix="pochta-bench-pf-send-")),
            address=send_host,
            port=free_port(send_host),
            hostname="mx.send.test",
            domain="send.test",
            users=("s1",),
            relay_routes={"bench.test": f"[{recv_host}]:{recv_port}"},
        )

    def start(self) -> None:
        self.receiver.start()
        self.sender.start()

    def stop(self) -> None:
        for instance in (self.sender, self.receiver):
            instance.stop()
            shutil.rmtree(instance.directory, ignore_errors=True)

    def inject_args(self) -> list[str]:
        return ["--host", self.sender.address, "--port", str(self.sender.port), "--sender", SENDER]

    def auth(self) -> list[str]:
        return []

    def delivered(self) -> int:
        folder = self.receiver.maildir("u1") / "new"
        return len(os.listdir(folder)) if folder.is_dir() else 0

    def pids(self) -> list[int]:
        pids: set[int] = set()
        for instance in (self.sender, self.receiver):
            found = subprocess.run(
                ["pgrep", "-f", str(instance.config_directory)], capture_output=True, text=True
            ).stdout.split()
            master = instance.master_pid()
            if master:
                found += subprocess.run(
                    ["pgrep", "-P", str(master)], capture_output=True, text=True
                ).stdout.split()
            pids.update(map(int, found))
        return sorted(pids)

    def pending(self) -> str:
        return self.sender.queue_text()[-2000:]


AnyPair = PochtaPair | PostfixPair


def measure(pair: AnyPair, messages: int, size: int, timeout: float) -> dict[str, object]:
    """Inject `messages` letters into the pair's sender; wait until its receiver has them all."""
    before = pair.delivered()
    cpu0 = cpu_seconds(pair.pids())
    cmd = [sys.executable, str(HERE / "loadclient.py"), "--json", *pair.inject_args()]
    cmd += [*pair.auth(), "--recipient", RECIPIENT, "--messages", str(messages)]
    cmd += ["--size", str(size), "--sessions", "10", "--reuse", "--timeout", str(timeout)]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        count = pair.delivered() - before
        if count >= messages:
            break
        time.sleep(0.02)
    done = time.time()
    out, err = client.communicate(timeout=max(1.0, deadline - time.monotonic()) + 30)
    cpu = cpu_seconds(pair.pids()) - cpu0
    if not out.strip():
        raise RuntimeError(f"{pair.name}: injection failed: {err[-2000:]}")
    inject = json.loads(out)
    if inject["errors"]:
        print(f"{pair.name}: injection errors {inject['errors']}", file=sys.stderr)
    seconds = done - float(inject["started_at"])
    row: dict[str, object] = {
        "pair": pair.name,
        "messages": messages,
        "size": size,
        "injected": inject["accepted"],
        "inject_per_second": inject["per_second"],
        "delivered": count,
        "seconds": round(seconds, 3),
        "per_second": round(count / seconds, 1),
        "cpu_ms_per_letter": round(cpu * 1000 / messages, 3),
        "all_delivered": count == messages and inject["accepted"] == messages,
    }
    if count < messages:
        row["pending"] = pair.pending()
    return row


def report(rows: list[dict[str, object]], names: list[str]) -> dict[str, object]:
    rates = {
        n: statistics.median(float(str(r["per_second"])) for r in rows if r["pair"] == n)
        for n in names
    }
    inject = {
        n: statistics.median(float(str(r["inject_per_second"])) for r in rows if r["pair"] == n)
        for n in names
    }
    cpu = {
        n: statistics.median(float(str(r["cpu_ms_per_letter"])) for r in rows if r["pair"] == n)
        for n in names
    }
    ok = {n: all(bool(r["all_delivered"]) for r in rows if r["pair"] == n) for n in names}
    base = rates.get("postfix")
    print(f"{'pair':>14} {'end-to-end/s':>12} {'injected/s':>10} {'cpu ms':>7} {'x postfix':>9}")
    for n in names:
        ratio = f"{rates[n] / base:>9.2f}" if base else f"{'-':>9}"
        mark = "" if ok[n] else "!"
        print(f"{n:>14} {rates[n]:>11.0f}{mark:1} {inject[n]:>10.0f} {cpu[n]:>7.2f} {ratio}")
    print("(! = not every letter reached the receiver in time; cpu: sender + receiver per letter)")
    ratios = {n: round(rates[n] / base, 2) for n in names} if base else {}
    return {"median_per_second": rates, "inject_per_second": inject, "cpu": cpu, "ratios": ratios}


def build(
    args: argparse.Namespace, workdir: Path, dns: DnsServer
) -> list[PochtaPair | PostfixPair]:
    pairs: list[PochtaPair | PostfixPair] = []
    for name in args.pairs.split(","):
        if name == "pochta":
            for i, pd in enumerate(int(v) for v in args.pochta_per_destination.split(",")):
                hosts = (f"127.0.0.{80 + 4 * i}", f"127.0.0.{81 + 4 * i}")
                pairs.append(PochtaPair(workdir, hosts, dns, pd))
        elif name == "postfix":
            reason = missing_reason()
            if reason:
                print(f"skipping postfix: {reason}", file=sys.stderr)
                continue
            pairs.append(PostfixPair(("127.0.0.82", "127.0.0.83")))
        else:
            raise SystemExit(f"unknown pair {name}")
    return pairs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--pairs", default="pochta,postfix")
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--pochta-per-destination",
        default="1",
        help="comma-separated [delivery] per_destination values, one pochta pair each",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per pair and round")
    ap.add_argument("--out", default=str(HERE / "results" / "delivery.json"))
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pochta-bench-delivery-"))
    rows: list[dict[str, object]] = []
    with DnsServer({}, host="127.0.0.80") as dns:  # knows no names: every query gets NXDOMAIN
        pairs = build(args, workdir, dns)
        try:
            for pair in pairs:
                pair.start()
            for rnd in range(args.rounds):
                for pair in pairs:
                    row = measure(pair, args.messages, args.size, args.timeout)
                    row["round"] = rnd
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            summary = report(rows, [p.name for p in pairs])
        finally:
            for pair in pairs:
                try:
                    pair.stop()
                except Exception as exc:  # keep stopping the others
                    print(f"stopping {pair.name}: {exc!r}", file=sys.stderr)
            shutil.rmtree(workdir, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"date": time.strftime("%Y-%m-%d"), "command": sys.argv, "rows": rows}
    out.write_text(json.dumps({**result, "summary": summary}, indent=2))
    return 0 if all(r["all_delivered"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
