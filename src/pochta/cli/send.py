"""`pochta send`: compose a letter and submit it through an MSA with AUTH. Imports `mua`, `errors`
and `store.api` (address helpers); needs no node configuration.

Exit status: 0 when every recipient was accepted, 1 when some were refused, 2 when none was
(including every failure before the transaction: usage, connection, TLS, AUTH). Errors are one
line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from pochta import mua
from pochta.cli.admin import PASSWORD_ENV, client_password
from pochta.errors import MailError, UsageError
from pochta.store.api import domain_of

EXIT_ALL, EXIT_SOME, EXIT_NONE = 0, 1, 2


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "send",
        help="send a letter through a submission server (AUTH, TLS)",
        description="Compose a letter and submit it (RFC 6409). The password comes from "
        f"${PASSWORD_ENV}, --password-stdin or a prompt.",
    )
    p.add_argument("--server", required=True, metavar="HOST[:PORT]", help="the MSA")
    p.add_argument("--user", required=True, metavar="ADDRESS", help="login name")
    p.add_argument("--from", dest="from_", metavar="ADDR", help="sender (default: --user)")
    for flag, helptext in (("--to", "To:"), ("--cc", "Cc:"), ("--bcc", "envelope only")):
        p.add_argument(flag, action="extend", nargs="+", default=[], metavar="ADDR", help=helptext)
    p.add_argument("--subject", required=True, metavar="S")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="TEXT", help="the text (default: read stdin)")
    body.add_argument("--body-file", type=Path, metavar="F", help="read the text from a file")
    p.add_argument("--attach", action="append", type=Path, default=[], metavar="FILE")
    p.add_argument("--tls", choices=mua.TLS_MODES, default="starttls", help="default starttls")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--cafile", metavar="F", help="trust the certificates in F")
    trust.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    p.add_argument("--server-name", metavar="NAME", help="name the certificate must carry")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password (first line) from stdin"
    )
    p.set_defaults(func=cmd_send)


def cmd_send(args: argparse.Namespace) -> int:
    try:
        return _send(args)
    except (MailError, ValueError, OSError) as exc:
        print(f"pochta send: error: {_describe(exc)}", file=sys.stderr)
        return EXIT_NONE


def _describe(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


def _send(args: argparse.Namespace) -> int:
    tls: mua.TlsMode = args.tls
    host, port = mua.parse_server(args.server, tls)
    sender = mua.envelope_address(args.from_ or args.user)
    recipients = _recipients(args)
    text = _body(args)
    password = client_password(args)
    message = mua.build_message(
        sender=sender,
        to=args.to,
        cc=args.cc,
        subject=args.subject,
        body=text,
        attachments=args.attach,
        from_header=args.from_,
        hostname=domain_of(sender) or "localhost",
    )
    result = asyncio.run(
        mua.submit(
            message,
            server=host,
            port=port,
            user=args.user,
            password=password,
            sender=sender,
            recipients=recipients,
            tls=tls,
            cafile=args.cafile,
            insecure=args.insecure,
            server_hostname=args.server_name,
        )
    )
    for r in result.recipients:
        print(f"{r.address}: {r.reply}")
    accepted = len(result.accepted)
    if accepted == len(result.recipients):
        return EXIT_ALL
    return EXIT_SOME if accepted else EXIT_NONE


def _recipients(args: argparse.Namespace) -> list[str]:
    """Envelope recipients: To, Cc and Bcc, each once (RFC 5322 §3.6.3: Bcc stays out of the
    header)."""
    out: list[str] = []
    for text in [*args.to, *args.cc, *args.bcc]:
        address = mua.envelope_address(text)
        if address.lower() not in (a.lower() for a in out):
            out.append(address)
    if not out:
        raise UsageError("no recipients: give --to, --cc or --bcc")
    return out


def _body(args: argparse.Namespace) -> str:
    if args.body is not None:
        return str(args.body)
    if args.body_file is not None:
        data = Path(args.body_file).read_bytes()
        source = str(args.body_file)
    else:
        if args.password_stdin:
            raise UsageError(
                "--password-stdin reads the password from stdin, so the body cannot come from "
                "stdin: give it with --body or --body-file"
            )
        if sys.stdin.isatty():
            print("Type the text; end it with Ctrl-D on a line of its own.", file=sys.stderr)
        data = sys.stdin.buffer.read()
        source = "stdin"
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the body from {source} is not UTF-8 text") from None
