"""The command line: `pochta COMMAND ...`. Imports `config`, `app` and the command modules.

Every command takes `-c/--config FILE` (or $POCHTA_CONFIG). Errors are one line on stderr and a
non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pochta import __version__
from pochta.cli import admin, demo, queue, relay, send, store
from pochta.errors import MailError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pochta", description="pochta mail system")
    parser.add_argument("--version", action="version", version=f"pochta {__version__}")
    parser.add_argument("-c", "--config", help="node configuration file (or $POCHTA_CONFIG)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help="node configuration file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    admin.register(sub, common)
    demo.register(sub, common)
    queue.register(sub, common)
    relay.register(sub, common)
    send.register(sub, common)
    store.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except MailError as exc:
        print(f"pochta: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
