"""`pochta queue list|show|flush|retry|delete|bounce`: the outbound queue, in the manner of
Postfix's mailq/postqueue/postsuper. Imports `app`, `cli.admin` (config loading), `errors` and
`store.api`.

The commands change the store only; a running node sees due entries at its next poll
(`[delivery] poll`). `queue list --json` prints a list of entries with these stable fields:

    {"id": 12, "sender": "alice@mail.test" ("" for <>), "created_at": ISO 8601 (UTC),
     "size": octets,
     "recipients": [{"address": "bob@yandex.test", "state": "queued"|"delivered"|"failed",
                     "attempts": 2, "next_attempt": ISO 8601 or null,
                     "last_reply": "451 4.3.0 ..." ("" before the first attempt)}]}
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pochta.cli.admin import store_command
from pochta.store.api import MailStore, QueueEntry, QueueRecipient

StoreFn = Callable[[MailStore, argparse.Namespace], Awaitable[int]]


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    queue = sub.add_parser("queue", help="the outbound queue").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    q = queue.add_parser("list", parents=[common], help="entries still waiting (like mailq)")
    q.add_argument("--json", action="store_true", help="machine-readable (stable fields)")
    q.set_defaults(func=store_command(_list))
    q = queue.add_parser("show", parents=[common], help="one entry and its letter")
    q.add_argument("id", type=int)
    q.add_argument("--json", action="store_true", help="the entry only, as in `list --json`")
    q.set_defaults(func=store_command(_show))
    q = queue.add_parser("flush", parents=[common], help="make everything (in DOMAIN) due now")
    q.add_argument("domain", nargs="?")
    q.set_defaults(func=store_command(_flush))
    for action, fn, helptext in (
        ("retry", _retry, "make one entry due now"),
        ("delete", _delete, "drop one entry without a bounce (like postsuper -d)"),
        ("bounce", _bounce, "return one entry to its sender with a DSN"),
    ):
        q = queue.add_parser(action, parents=[common], help=helptext)
        q.add_argument("id", type=int)
        q.set_defaults(func=store_command(fn))


def entry_json(entry: QueueEntry) -> dict[str, Any]:
    """The stable JSON form of one queue entry (see the module docstring)."""
    return {
        "id": entry.id,
        "sender": entry.sender,
        "created_at": entry.created_at.isoformat(),
        "size": entry.size,
        "recipients": [_recipient_json(r) for r in entry.recipients],
    }


def _recipient_json(r: QueueRecipient) -> dict[str, Any]:
    return {
        "address": r.address,
        "state": str(r.state),
        "attempts": r.attempts,
        "next_attempt": r.next_attempt.isoformat() if r.next_attempt else None,
        "last_reply": r.last_reply,
    }


def _print_entry(entry: QueueEntry) -> None:
    when = entry.created_at.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{entry.id:<10} {entry.size:>9} {when}  {entry.sender or '<>'}")
    for r in entry.recipients:
        extra = " (held)" if r.held else ""
        if r.last_reply:
            print(f"{'':10} ({r.last_reply[:110]})")
        retry = r.next_attempt.strftime("%H:%M:%S") if r.next_attempt else "-"
        print(f"{'':10} {r.address}  {r.state} attempts={r.attempts} next={retry}{extra}")


async def _list(store: MailStore, args: argparse.Namespace) -> int:
    entries = await store.list_queue()
    if args.json:
        print(json.dumps([entry_json(e) for e in entries], ensure_ascii=False))
        return 0
    if not entries:
        print("Mail queue is empty")
        return 0
    print(f"{'-Queue ID-':<10} {'--Size--':>9} {'----Arrival Time---':<20} -Sender/Recipient-")
    for entry in entries:
        _print_entry(entry)
        print()
    count = sum(len(e.recipients) for e in entries)
    print(f"-- {len(entries)} letter(s), {count} recipient(s)")
    return 0


async def _show(store: MailStore, args: argparse.Namespace) -> int:
    entry = await store.get_queue_entry(args.id)
    if args.json:
        print(json.dumps(entry_json(entry), ensure_ascii=False))
        return 0
    _print_entry(entry)
    print()
    sys.stdout.flush()
    sys.stdout.buffer.write(await store.get_queue_body(args.id))
    sys.stdout.buffer.flush()
    return 0


async def _flush(store: MailStore, args: argparse.Namespace) -> int:
    count = await store.flush(args.domain.lower() if args.domain else None)
    print(f"{count} recipient(s) due now")
    return 0


async def _retry(store: MailStore, args: argparse.Namespace) -> int:
    count = await store.retry(args.id)
    print(f"entry {args.id}: {count} recipient(s) due now")
    return 0


async def _delete(store: MailStore, args: argparse.Namespace) -> int:
    await store.delete_queue_entry(args.id)
    print(f"entry {args.id} deleted")
    return 0


async def _bounce(store: MailStore, args: argparse.Namespace) -> int:
    count = await store.bounce_queue_entry(args.id)
    print(f"entry {args.id}: {count} recipient(s) will be returned to the sender")
    return 0
