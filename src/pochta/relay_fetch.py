"""The customer side of on-demand relay: connect to the provider, authenticate, send ATRN
(RFC 2645) or TURN (RFC 821 §4.1.1), and on 250 become the server on the same connection,
storing what arrives exactly as port 25 would (an `mx` Session: recipient checks, Received
header, durable store before 250). Imports `smtp`, `client`, `server`, `queue.policy`, `tls`,
`transport`, `errors` and `log`; never `config` (`app.py` and `cli/relay.py` pass plain values).

`fetch()` runs once (`pochta relay fetch`); `FetchSchedule` repeats the `[[relay.fetch]]` entries
of a running node.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pochta import log as maillog
from pochta import smtp
from pochta.client.session import SmtpClient, SmtpError, Timeouts
from pochta.dns.base import parse_hostport
from pochta.errors import ConfigError, MailError
from pochta.queue.policy import parse_duration
from pochta.server.listener import SmtpServer
from pochta.server.session import MX, Session
from pochta.smtp import Reply

log = logging.getLogger(__name__)

VERBS = ("ATRN", "TURN")
TLS_MODES = ("starttls", "implicit", "none")
# RFC 2645 §3: ODMR listens on 366; TURN needs AUTH, so it goes to submission (RFC 6409).
DEFAULT_PORTS = {"ATRN": 366, "TURN": 587}
IMPLICIT_PORT = 465  # RFC 8314
NO_STARTTLS = Reply(530, "5.7.0", "The server does not offer STARTTLS")
_ids = itertools.count(1)


@dataclass(frozen=True)
class FetchJob:
    """One pull from a provider. `tls="none"` is for tests on loopback only."""

    server: str  # host[:port]
    user: str
    password: str
    domains: tuple[str, ...] = ()  # ATRN arguments; () means every domain of the account
    verb: str = "ATRN"
    tls: str = "starttls"
    cafile: str | None = None
    insecure: bool = False  # do not verify the provider's certificate
    server_hostname: str | None = None  # the name to verify; default: the host of `server`

    def address(self) -> tuple[str, int]:
        host, port = parse_hostport(self.server)
        if port is None:
            port = IMPLICIT_PORT if self.tls == "implicit" else DEFAULT_PORTS[self.verb]
        return host, port


@dataclass(frozen=True)
class FetchResult:
    reply: Reply  # the provider's answer to ATRN/TURN
    letters: int = 0  # letters this node accepted during the hand-over
    complete: bool = True  # False when the connection broke during the hand-over

    @property
    def turned(self) -> bool:
        return self.reply.code == 250


def client_tls(job: FetchJob) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=job.cafile)
    if job.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def fetch(
    job: FetchJob, server: SmtpServer, *, helo_name: str, timeouts: Timeouts | None = None
) -> FetchResult:
    """Pull the mail waiting at the provider into this node's store.

    Raises:
        OSError, TimeoutError, ssl.SSLError: no usable connection. SmtpError: STARTTLS or AUTH
        was refused.
    """
    if job.verb not in VERBS or job.tls not in TLS_MODES:
        raise ConfigError(f"relay fetch: verb must be ATRN or TURN and tls one of {TLS_MODES}")
    host, port = job.address()
    tls_name = job.server_hostname or host
    context = client_tls(job) if job.tls != "none" else None
    implicit = context if job.tls == "implicit" else None
    client = await SmtpClient.connect(
        host,
        port,
        helo_name=helo_name,
        timeouts=timeouts,
        implicit_tls=implicit,
        server_hostname=tls_name,
    )
    try:
        if job.tls == "starttls":
            if not client.supports("STARTTLS"):
                raise SmtpError("STARTTLS", NO_STARTTLS)
            assert context is not None
            await client.starttls(context, tls_name)
        await client.auth(job.user, job.password)
        command = smtp.Atrn(job.domains) if job.verb == "ATRN" else smtp.Turn()
        reply = await client.command(command)
        if client.conn.state is not smtp.State.TURNED:
            await client.quit()
            return FetchResult(reply)
        before = server.ctx.delivered
        complete = await serve_turned(client, server)
        return FetchResult(reply, server.ctx.delivered - before, complete)
    finally:
        await client.close()


async def serve_turned(client: SmtpClient, server: SmtpServer) -> bool:
    """After a 250 to ATRN/TURN: run the normal server pump as an `mx` listener over the same
    stream (RFC 2645 §4.2: we send 220, the provider says EHLO). False if the connection broke."""
    conn = client.conn.turned()
    conn.limits = server.ctx.limits  # our own limits, as advertised in our EHLO reply
    stream = client.stream
    stream.label = "server"
    conn_id = f"fetch.{next(_ids)}"
    session = Session(server.ctx, MX, stream.peer[0], conn_id, tls=stream.tls)
    try:
        await server.serve_stream(stream, session, conn)
    except (OSError, TimeoutError, ssl.SSLError, smtp.ProtocolError) as exc:
        log.info("conn=%s relay fetch ended: %r", conn_id, exc)
        return False
    return True


# -- [[relay.fetch]] ------------------------------------------------------------------------------
_ENTRY_KEYS = {"server", "user", "password_file", "domain", "verb", "every", "tls", "cafile"}
_ENTRY_KEYS |= {"insecure", "server_hostname"}


@dataclass(frozen=True)
class FetchEntry:
    """One `[[relay.fetch]]` table: the job without its password, and how often to run it."""

    job: FetchJob  # password empty: read from `password_file` before every run
    password_file: Path
    every: float  # seconds


def parse_fetch_entry(entry: Mapping[str, Any], base: Path) -> FetchEntry:
    """Validate one `[[relay.fetch]]` table; relative paths are relative to `base`.

    Raises:
        ConfigError: unknown or missing keys, bad values.
    """
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"unknown key(s) in [[relay.fetch]]: {', '.join(sorted(unknown))}")
    missing = [k for k in ("server", "user", "password_file") if not entry.get(k)]
    if missing:
        raise ConfigError(f"[[relay.fetch]] needs {', '.join(missing)}")
    domains = entry.get("domain", ())
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    verb = str(entry.get("verb", "ATRN")).upper()
    tls = str(entry.get("tls", "starttls")).lower()
    if verb not in VERBS or tls not in TLS_MODES:
        raise ConfigError(f"[[relay.fetch]] verb must be ATRN or TURN, tls one of {TLS_MODES}")
    every = parse_duration(str(entry.get("every", "5m"))).total_seconds()
    if every <= 0:
        raise ConfigError("[[relay.fetch]] every must be positive")
    cafile = entry.get("cafile")
    job = FetchJob(
        server=str(entry["server"]),
        user=str(entry["user"]),
        password="",
        domains=tuple(d.lower() for d in domains),
        verb=verb,
        tls=tls,
        cafile=str(base / cafile) if cafile else None,
        insecure=bool(entry.get("insecure", False)),
        server_hostname=entry.get("server_hostname"),
    )
    return FetchEntry(job, base / str(entry["password_file"]), every)


class FetchSchedule:
    """Runs every `[[relay.fetch]]` entry now and then every `every` seconds."""

    def __init__(
        self,
        entries: Sequence[FetchEntry],
        server: SmtpServer,
        *,
        helo_name: str,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.entries = list(entries)
        self.server = server
        self.helo_name = helo_name
        self.timeouts = timeouts
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._loop(e)) for e in self.entries]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _loop(self, entry: FetchEntry) -> None:
        while True:
            await self.run_once(entry)
            await asyncio.sleep(entry.every)

    async def run_once(self, entry: FetchEntry) -> FetchResult | None:
        """One pull; failures are logged, never raised."""
        job = entry.job
        try:
            password = entry.password_file.read_text().strip("\r\n")
            result = await fetch(
                _with_password(job, password),
                self.server,
                helo_name=self.helo_name,
                timeouts=self.timeouts,
            )
        except (OSError, TimeoutError, ssl.SSLError, smtp.ProtocolError, MailError) as exc:
            log.warning("relay fetch from %s failed: %s", job.server, exc)
            return None
        except SmtpError as exc:
            log.warning("relay fetch from %s refused: %s", job.server, exc)
            return None
        maillog.event(
            "relay-fetch", server=job.server, reply=result.reply.code, letters=result.letters
        )
        return result


def _with_password(job: FetchJob, password: str) -> FetchJob:
    return replace(job, password=password)
