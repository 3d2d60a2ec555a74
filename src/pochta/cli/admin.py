"""`pochta serve`, `domain`, `user`, `alias` and `mail`: running a node and managing its store."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pochta import app, config
from pochta.auth.passwords import hash_password
from pochta.errors import ConfigError, MailError, UsageError
from pochta.store.api import MailStore, MessageInfo, normalize_address


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("serve", parents=[common], help="run the node (SMTP listeners, queue)")
    p.set_defaults(func=cmd_serve)

    domain = sub.add_parser("domain", help="hosted domains").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for action, helptext in (("add", "host a domain"), ("remove", "stop hosting a domain")):
        d = domain.add_parser(action, parents=[common], help=helptext)
        d.add_argument("name")
        d.set_defaults(func=store_command(_domain_add if action == "add" else _domain_remove))
    d = domain.add_parser("list", parents=[common], help="list hosted domains")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=store_command(_domain_list))

    user = sub.add_parser("user", help="user accounts").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    for action, fn, helptext in (
        ("add", _user_add, "create a user (password from stdin or a prompt)"),
        ("passwd", _user_passwd, "set a user's password"),
    ):
        u = user.add_parser(action, parents=[common], help=helptext)
        u.add_argument("address")
        u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        u.set_defaults(func=store_command(fn))
    u = user.add_parser("remove", parents=[common], help="remove a user and its mail")
    u.add_argument("address")
    u.set_defaults(func=store_command(_user_remove))
    u = user.add_parser("list", parents=[common], help="list users")
    u.add_argument("domain", nargs="?")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=store_command(_user_list))

    alias = sub.add_parser("alias", help="aliases (deliver to and send as a user)").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    a = alias.add_parser("add", parents=[common], help="add ALIAS for user ADDRESS")
    a.add_argument("alias")
    a.add_argument("address")
    a.set_defaults(func=store_command(_alias_add))
    a = alias.add_parser("remove", parents=[common], help="remove an alias")
    a.add_argument("alias")
    a.set_defaults(func=store_command(_alias_remove))
    a = alias.add_parser("list", parents=[common], help="list aliases")
    a.add_argument("address", nargs="?")
    a.set_defaults(func=store_command(_alias_list))

    mail = sub.add_parser("mail", help="stored mail").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    m = mail.add_parser("list", parents=[common], help="list a mailbox")
    m.add_argument("address")
    m.add_argument("--folder", default="INBOX", help="INBOX (default) or Sent")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=store_command(_mail_list))
    m = mail.add_parser("show", parents=[common], help="show one message")
    m.add_argument("id", type=int)
    m.add_argument("--raw", action="store_true", help="the stored bytes, exactly")
    m.set_defaults(func=store_command(_mail_show))


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from pochta import log

    log.setup(cfg.log.level if not cfg.log.trace else "trace", cfg.log.mail_log)
    try:
        return app.serve_processes(cfg)
    except OSError as exc:
        raise ConfigError(f"cannot start: {exc}") from None


StoreFn = Callable[[MailStore, argparse.Namespace], Awaitable[int]]


def store_command(fn: StoreFn) -> Callable[[argparse.Namespace], int]:
    """Run `fn` against the node's store (opened and closed around it)."""

    def run(args: argparse.Namespace) -> int:
        cfg = load_config(args)

        async def body() -> int:
            store = await app.open_node_store(cfg)
            try:
                return await fn(store, args)
            finally:
                await store.close()

        result: int = app.run(body())
        return result

    return run


PASSWORD_ENV = "POCHTA_PASSWORD"


def client_password(args: argparse.Namespace) -> str:
    """For commands that log in somewhere (`send`, `relay fetch`): $POCHTA_PASSWORD,
    `--password-stdin` or a prompt; never the command line."""
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif os.environ.get(PASSWORD_ENV):
        password = os.environ[PASSWORD_ENV]
    elif sys.stdin.isatty():
        password = getpass.getpass(f"Password for {args.user}: ")
    else:
        raise UsageError(f"no password: set ${PASSWORD_ENV}, use --password-stdin or a terminal")
    if not password:
        raise UsageError("empty password")
    return password


def read_password(args: argparse.Namespace) -> str:
    """From stdin (`--password-stdin`) or an interactive prompt, never the command line."""
    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise UsageError("passwords do not match")
    else:
        raise UsageError("no terminal to prompt for a password; use --password-stdin")
    if not password:
        raise UsageError("empty password")
    return password


async def _domain_add(store: MailStore, args: argparse.Namespace) -> int:
    d = await store.add_domain(args.name.lower())
    print(f"domain {d.name} added (postmaster@{d.name} exists)")
    return 0


async def _domain_remove(store: MailStore, args: argparse.Namespace) -> int:
    await store.remove_domain(args.name.lower())
    print(f"domain {args.name.lower()} removed")
    return 0


async def _domain_list(store: MailStore, args: argparse.Namespace) -> int:
    domains = await store.list_domains()
    if args.json:
        print(
            json.dumps([{"name": d.name, "created_at": d.created_at.isoformat()} for d in domains])
        )
    else:
        for d in domains:
            print(d.name)
    return 0


def _hash(args: argparse.Namespace) -> tuple[str, Any]:
    try:
        return hash_password(read_password(args))
    except ValueError as exc:
        raise UsageError(f"unusable password: {exc}") from None


async def _user_add(store: MailStore, args: argparse.Namespace) -> int:
    address = _address(args.address)
    encoded, scram = _hash(args)
    user = await store.add_user(address, encoded, scram)
    print(f"user {user.address} added")
    return 0


async def _user_passwd(store: MailStore, args: argparse.Namespace) -> int:
    address = _address(args.address)
    encoded, scram = _hash(args)
    await store.set_password(address, encoded, scram)
    print(f"password of {address} changed")
    return 0


async def _user_remove(store: MailStore, args: argparse.Namespace) -> int:
    await store.remove_user(_address(args.address))
    print(f"user {_address(args.address)} removed")
    return 0


async def _user_list(store: MailStore, args: argparse.Namespace) -> int:
    users = await store.list_users(args.domain.lower() if args.domain else None)
    if args.json:
        rows = [
            {
                "address": u.address,
                "domain": u.domain,
                "can_login": bool(u.password_hash),
                "created_at": u.created_at.isoformat(),
            }
            for u in users
        ]
        print(json.dumps(rows))
    else:
        for u in users:
            print(u.address + ("" if u.password_hash else "  (no login)"))
    return 0


async def _alias_add(store: MailStore, args: argparse.Namespace) -> int:
    a = await store.add_alias(_address(args.alias), _address(args.address))
    print(f"alias {a.alias} -> {a.address} added")
    return 0


async def _alias_remove(store: MailStore, args: argparse.Namespace) -> int:
    await store.remove_alias(_address(args.alias))
    print(f"alias {_address(args.alias)} removed")
    return 0


async def _alias_list(store: MailStore, args: argparse.Namespace) -> int:
    for a in await store.list_aliases(_address(args.address) if args.address else None):
        print(f"{a.alias} -> {a.address}")
    return 0


def _address(text: str) -> str:
    address = normalize_address(text)
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise UsageError(f"not an address: {text!r} (use local@domain)")
    return address


def message_json(m: MessageInfo) -> dict[str, Any]:
    """The stable JSON fields of `mail list` (docs/cli.md)."""
    return {
        "id": m.id,
        "folder": m.folder,
        "from": m.from_,
        "to": m.to,
        "subject": m.subject,
        "message_id": m.message_id,
        "size": m.size,
        "received_at": m.received_at.isoformat(),
        "uid": m.uid,
        "date": m.date,
        "flags": list(m.flags),
    }


async def _mail_list(store: MailStore, args: argparse.Namespace) -> int:
    messages = await store.list_messages(_address(args.address), args.folder)
    if args.json:
        print(json.dumps([message_json(m) for m in messages], ensure_ascii=False))
        return 0
    for m in messages:
        when = m.received_at.strftime("%Y-%m-%d %H:%M")
        print(f"{m.id:>6}  {when}  {m.size:>8}  {m.from_[:30]:<30}  {m.subject[:50]}")
    if not messages:
        print(f"{args.folder} of {_address(args.address)} is empty", file=sys.stderr)
    return 0


async def _mail_show(store: MailStore, args: argparse.Namespace) -> int:
    stored = await store.get_message(args.id)
    if args.raw:
        sys.stdout.buffer.write(stored.raw)
        sys.stdout.buffer.flush()
        return 0
    info = stored.info
    print(f"Id: {info.id}  Mailbox: {info.address}/{info.folder}  UID: {info.uid}")
    print(f"Received: {info.received_at.isoformat()}  Size: {info.size}")
    print()
    sys.stdout.flush()
    sys.stdout.buffer.write(stored.raw)
    sys.stdout.buffer.flush()
    return 0


__all__ = [
    "MailError",
    "client_password",
    "load_config",
    "message_json",
    "read_password",
    "register",
    "store_command",
]
