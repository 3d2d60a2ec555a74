"""`pochta store migrate|checksum`: moving a whole store between engines, and verifying one.
Imports `app` (the event loop runner), `cli.admin` (config loading) and `store.migrate`.

    pochta store migrate --from sqlite:////var/lib/pochta/pochta.db \\
                         --to "postgresql://pochta@db:5432/mail?schema=pochta" [--yes]

copies everything (see `store/migrate.py`), with a progress bar on stderr, then prints the row
counts and sha256 per table of both sides and exits 0 only when they agree. Stop the nodes that
write to the source first: the copy reads one snapshot, later letters would not be in it.
`pochta store checksum [URL]` prints the same figures for one store (default: the node's).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from pochta import app
from pochta.cli.admin import load_config
from pochta.store import migrate as mg


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    store = sub.add_parser("store", help="the store as a whole (engines)").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = store.add_parser("migrate", parents=[common], help="copy a store to another engine")
    p.add_argument("--from", dest="source", required=True, metavar="URL", help="source store")
    p.add_argument("--to", dest="target", required=True, metavar="URL", help="target store")
    p.add_argument("--yes", action="store_true", help="replace a target that is not empty")
    p.add_argument("--batch", type=int, default=mg.DEFAULT_BATCH, help="rows per batch")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_migrate)
    p = store.add_parser("checksum", parents=[common], help="row counts and sha256 per table")
    p.add_argument("url", nargs="?", help="store URL (default: the node's [store] url)")
    p.set_defaults(func=_checksum)


class ProgressBar:
    """`[#####-----]  50%  1200/2400 rows  messages` on one line of a terminal (redrawn at most
    ten times a second); on a pipe or file one line per tenth of the way."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._last_draw = 0.0
        self._last_tenth = -1

    def __call__(self, done: int, total: int, label: str) -> None:
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        final = label == "done"
        now = time.monotonic()
        if self.tty:
            if not final and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            self.stream.write("\r" + self.render(done, total, label) + ("\n" if final else ""))
        else:
            tenth = int(fraction * 10)
            if tenth == self._last_tenth and not final:
                return
            self._last_tenth = tenth
            self.stream.write(self.render(done, total, label) + "\n")
        self.stream.flush()

    def render(self, done: int, total: int, label: str) -> str:
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"[{bar}] {fraction * 100:3.0f}%  {done}/{total} rows  {label:<12}"


def _migrate(args: argparse.Namespace) -> int:
    progress = None if args.quiet else ProgressBar(sys.stderr)
    source, target = mg.redact_url(args.source), mg.redact_url(args.target)
    print(f"copying {source} -> {target}", file=sys.stderr)
    result: mg.Verification = app.run(
        mg.migrate(
            args.source, args.target, replace=args.yes, batch=max(args.batch, 1), progress=progress
        )
    )
    print(result.format())
    if not result.ok:
        print(f"pochta: error: verification failed: {', '.join(result.mismatches())}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _checksum(args: argparse.Namespace) -> int:
    url = args.url or load_config(args).store_url
    found: list[mg.Checksum] = app.run(mg.store_checksums(url))
    for item in found:
        print(f"{item.name:<22} {item.rows:>8}  {item.sha256}")
    return 0
