"""`pochta relay add|list|remove|fetch`: held domains of on-demand relay customers (ETRN, ATRN,
TURN) on the provider, and pulling held mail from a provider on the customer. Imports `app`,
`cli.admin` (config loading), `relay_fetch`, `client`, `store.api` and `errors`.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from pochta import app, relay_fetch, smtp
from pochta.cli.admin import client_password, load_config, store_command
from pochta.client.session import SmtpError
from pochta.errors import UsageError
from pochta.store.api import MailStore, normalize_address


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    relay = sub.add_parser("relay", help="on-demand relay (ETRN, ATRN, TURN)").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    p = relay.add_parser("add", parents=[common], help="hold mail for DOMAIN for user --owner")
    p.add_argument("domain")
    p.add_argument("--owner", required=True, help="the account that may take the mail")
    p.set_defaults(func=store_command(_add))
    p = relay.add_parser("remove", parents=[common], help="stop holding DOMAIN")
    p.add_argument("domain")
    p.set_defaults(func=store_command(_remove))
    p = relay.add_parser("list", parents=[common], help="list held domains")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=store_command(_list))
    _register_fetch(relay, common)


def _register_fetch(relay: Any, common: argparse.ArgumentParser) -> None:
    f = relay.add_parser(
        "fetch", parents=[common], help="pull held mail from a provider into this node (ATRN/TURN)"
    )
    f.add_argument("--server", required=True, help="HOST[:PORT] (default port 366, TURN 587)")
    f.add_argument("--user", required=True, help="the account at the provider")
    f.add_argument("--domain", action="append", default=[], help="domain to pull (repeatable)")
    f.add_argument("--verb", choices=relay_fetch.VERBS, default="ATRN", type=str.upper)
    f.add_argument(
        "--tls",
        choices=relay_fetch.TLS_MODES,
        default="starttls",
        help="starttls (default), implicit (port 465) or none (loopback tests only)",
    )
    f.add_argument("--cafile", help="trust this CA file for the provider's certificate")
    f.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    f.add_argument("--server-hostname", help="the name to verify (default: the host)")
    f.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    f.set_defaults(func=cmd_fetch)


StoreFn = Callable[[MailStore, argparse.Namespace], Awaitable[int]]


def _domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if not domain or not smtp.valid_domain(domain) or domain.startswith("["):
        raise UsageError(f"not a domain: {text!r}")
    return domain


async def _add(store: MailStore, args: argparse.Namespace) -> int:
    owner = normalize_address(args.owner)
    relay = await store.add_relay_domain(_domain(args.domain), owner)
    print(f"relay domain {relay.domain} added (owner {relay.owner})")
    return 0


async def _remove(store: MailStore, args: argparse.Namespace) -> int:
    await store.remove_relay_domain(_domain(args.domain))
    print(f"relay domain {_domain(args.domain)} removed (its queued mail goes out by MX now)")
    return 0


async def _list(store: MailStore, args: argparse.Namespace) -> int:
    relays = await store.list_relay_domains()
    waiting = {r.domain: await store.count_queued([r.domain]) for r in relays}
    if args.json:
        rows = [{"domain": r.domain, "owner": r.owner, "queued": waiting[r.domain]} for r in relays]
        print(json.dumps(rows))
        return 0
    for r in relays:
        print(f"{r.domain}  owner={r.owner}  queued={waiting[r.domain]}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    job = relay_fetch.FetchJob(
        server=args.server,
        user=args.user,
        password=client_password(args),
        domains=tuple(_domain(d) for d in args.domain),
        verb=args.verb,
        tls=args.tls,
        cafile=args.cafile,
        insecure=args.insecure,
        server_hostname=args.server_hostname,
    )

    async def body() -> relay_fetch.FetchResult:
        store = await app.open_node_store(cfg)
        try:
            server = app.fetch_server(cfg, store)
            timeouts = app.client_timeouts(cfg)
            return await relay_fetch.fetch(job, server, helo_name=cfg.hostname, timeouts=timeouts)
        finally:
            await store.close()

    try:
        result: relay_fetch.FetchResult = app.run(body())
    except SmtpError as exc:
        print(f"pochta: error: the provider refused {exc}", file=sys.stderr)
        return 1
    except (OSError, TimeoutError, ssl.SSLError, smtp.ProtocolError) as exc:
        print(f"pochta: error: cannot fetch from {args.server}: {exc}", file=sys.stderr)
        return 1
    return _report(result)


def _report(result: relay_fetch.FetchResult) -> int:
    if result.reply.code == 453:  # RFC 2645 §5: nothing waiting is not an error
        print(f"no mail waiting ({result.reply})")
        return 0
    if not result.turned:
        print(f"pochta: error: {result.reply}", file=sys.stderr)
        return 1
    state = "" if result.complete else " (connection lost; the rest stays held)"
    print(f"{result.letters} letter(s) received{state}")
    return 0 if result.complete else 1
