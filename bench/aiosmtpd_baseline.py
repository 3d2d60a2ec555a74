"""The Python peer pochta is compared with: aiosmtpd storing each letter in SQLite.

One transaction per letter (WAL, synchronous=FULL), committed before aiosmtpd's 250, the way an
aiosmtpd user would write it. Run by bench/run.py; needs `pip install aiosmtpd` (the `bench`
extra). Listens on loopback only.

    python bench/aiosmtpd_baseline.py --host 127.0.0.1 --port 12026 --db /tmp/base.db
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
from typing import Any

from aiosmtpd.controller import Controller  # type: ignore[import-not-found,unused-ignore]


class SqliteHandler:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY, sender TEXT,"
            " recipients TEXT, raw BLOB)"
        )

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.db.execute("BEGIN")
        self.db.execute(
            "INSERT INTO messages (sender, recipients, raw) VALUES (?, ?, ?)",
            (envelope.mail_from, ",".join(envelope.rcpt_tos), envelope.original_content),
        )
        self.db.execute("COMMIT")
        return "250 2.0.0 OK"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=12026)
    ap.add_argument("--db", required=True)
    args = ap.parse_args()
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    controller = Controller(
        SqliteHandler(args.db), hostname=args.host, port=args.port, data_size_limit=200 << 20
    )
    controller.start()
    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    asyncio.run(wait())
    controller.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
