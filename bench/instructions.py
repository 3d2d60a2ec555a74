"""Instructions a letter of the server's own code, counted by valgrind's callgrind: a measure that
does not drift with the machine (letters/s and CPU time on these shared machines move 10-20%
from run to run, more than most single changes are worth).

    .venv/bin/python bench/instructions.py [--size 1024] [--functions 30]

It runs `bench/inprocess.py` (the listener's protocol, the SMTP core, the session, the headers,
the mail log and the SQLite store, driven in one process, no sockets) under callgrind twice, with
a small and a larger number of letters, and divides the difference by the extra letters, so the
start-up (imports, the schema) drops out. `--functions N` also prints the N functions that cost
the most instructions a letter, their callees included. Needs valgrind (`apt-get install
valgrind`); about a minute for 1 KiB letters. The in-process clients and the final listing of
the mailbox are counted too (the same in every run), so compare runs, not absolute figures.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
_LINE = re.compile(r"\s*([\d,]+) \([^)]*\)\s+(\S+)")


def count(letters: int, size: int, out: Path) -> dict[str, int]:
    """Run inprocess.py under callgrind; inclusive instructions by function name."""
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(HERE / "inprocess.py"),
            "--letters",
            str(letters),
            "--sessions",
            "5",
            "--size",
            str(size),
        ],
        check=True,
        capture_output=True,
    )
    text = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found: dict[str, int] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            name = match.group(2).split(":")[-1]
            found[name] = max(found.get(name, 0), int(match.group(1).replace(",", "")))
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="body octets (default 1024)")
    ap.add_argument("--functions", type=int, default=0, help="also list the N costliest")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    small, large = (100, 300) if args.size > 16 * 1024 else (200, 1200)
    with tempfile.TemporaryDirectory() as tmp:
        low = count(small, args.size, Path(tmp) / "low.out")
        high = count(large, args.size, Path(tmp) / "high.out")
    extra = large - small
    per = {name: (high.get(name, 0) - low.get(name, 0)) / extra for name in high}
    print(f"{per.get('PROGRAM', 0):,.0f} instructions a letter ({args.size} octets)")
    if args.functions:
        ours = sorted(
            ((v, k) for k, v in per.items() if k.startswith(("CPyDef_", "sqlite3_step"))),
            reverse=True,
        )
        for value, name in ours[: args.functions]:
            print(f"{value:12,.0f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
