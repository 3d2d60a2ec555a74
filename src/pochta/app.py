"""The composition root: builds a node from a `Config` and runs it. May import anything.

A node is: the store, the TLS material, the SMTP listeners sharing one ServerContext, the
outbound queue worker, and the relay (TURN/ETRN/ATRN) hooks. `pochta serve` runs one node;
`pochta demo` runs two in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import secrets
import signal
import socket
import ssl
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from pochta import log as maillog
from pochta import running_native, smtp
from pochta import tls as tlsmod
from pochta.auth.throttle import FailureThrottle
from pochta.client.session import Timeouts as ClientTimeouts
from pochta.config import Config
from pochta.dns import DnsResolver, is_ip, parse_hostport
from pochta.errors import ConfigError
from pochta.queue.worker import QueueWorker, make_owner
from pochta.relay_fetch import FetchSchedule, parse_fetch_entry
from pochta.server.listener import LISTEN_BACKLOG, ServerLimits, SmtpServer, split_address
from pochta.server.relay import RelayService, RelaySettings
from pochta.server.session import RateLimiter, ServerContext
from pochta.store import open_store
from pochta.store.api import MailStore

log = logging.getLogger(__name__)


def tls_paths(cfg: Config) -> tuple[Path, Path]:
    """The certificate and key: configured, or the self-signed pair in data_dir."""
    if cfg.tls.cert or cfg.tls.key:
        if not (cfg.tls.cert and cfg.tls.key):
            raise ConfigError("[tls] needs both cert and key")
        return cfg.path(cfg.tls.cert), cfg.path(cfg.tls.key)
    return cfg.path("tls/cert.pem"), cfg.path("tls/key.pem")


def load_tls(cfg: Config) -> ssl.SSLContext:
    cert, key = tls_paths(cfg)
    if not (cfg.tls.cert or cfg.tls.key):
        tlsmod.ensure_self_signed(cert, key, cfg.hostname)
    try:
        return tlsmod.server_context(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert}: {exc}") from None


def scram_secret(cfg: Config) -> bytes:
    """A per-node secret for SCRAM's fake salts of unknown users; made on first start."""
    path = cfg.path("scram.secret")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def smtp_limits(cfg: Config) -> smtp.Limits:
    lim = cfg.limits
    return smtp.Limits(
        command_line=lim.command_line,
        text_line=lim.text_line,
        recipients=lim.recipients,
        message_size=lim.message_size,
    )


async def open_node_store(cfg: Config) -> MailStore:
    if cfg.store_url.startswith("sqlite:"):
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.store_url)
    await store.open()
    return store


def resolver(cfg: Config) -> DnsResolver:
    """The outbound resolver from [dns]: "ip" / "ip:port" name servers (none: the system's)."""
    servers: list[tuple[str, int]] = []
    for entry in cfg.dns.nameservers:
        try:
            host, port = parse_hostport(entry)
        except ValueError as exc:
            raise ConfigError(f"[dns] nameservers: {exc}") from None
        servers.append((host, port or 53))
    routes = {domain: list(hosts) for domain, hosts in cfg.dns.routes.items()}
    return DnsResolver(servers or None, routes, cfg.dns.timeout)


def queue_worker(cfg: Config, store: MailStore) -> QueueWorker:
    """The outbound queue worker from [delivery], [queue] and [timeouts]."""
    return QueueWorker(
        store,
        resolver(cfg),
        hostname=cfg.hostname,
        owner=make_owner(cfg.hostname),
        port=cfg.delivery.port,
        concurrency=cfg.delivery.workers,
        per_destination=cfg.delivery.per_destination,
        lease=cfg.delivery.lease,
        poll=cfg.delivery.poll,
        schedule=cfg.queue.retry,
        give_up_after=cfg.queue.give_up_after,
        warn_after=cfg.queue.warn_after,
        timeouts=client_timeouts(cfg),
        require_tls=cfg.delivery.require_tls,
        local_address=source_address(cfg),
    )


def source_address(cfg: Config) -> str | None:
    """Outbound connections leave from the MX listener's address when it is one specific IP
    (a node bound to 127.0.0.2 also sends from it); None (the kernel's choice) otherwise."""
    for address in cfg.listen.mx:
        host = address.rpartition(":")[0].strip("[]")
        if is_ip(host) and not ipaddress.ip_address(host).is_unspecified:
            return host
    return None


def server_context(cfg: Config, store: MailStore, *, tls_available: bool) -> ServerContext:
    """What every SMTP session of this node shares."""
    return ServerContext(
        store=store,
        hostname=cfg.hostname,
        limits=smtp_limits(cfg),
        auth_mechanisms=cfg.auth.mechanisms,
        allow_plaintext_auth=cfg.auth.allow_plaintext,
        throttle=FailureThrottle(
            delay_after=cfg.auth.delay_after,
            block_after=cfg.auth.block_after,
            block_for=cfg.auth.block_for,
        ),
        rates=RateLimiter(cfg.submission.messages_per_hour, cfg.submission.recipients_per_hour),
        scram_secret=scram_secret(cfg),
        tls_available=tls_available,
        max_errors=cfg.limits.errors,
        turn_enabled=cfg.relay.turn,
        etrn_enabled=cfg.relay.etrn,
    )


def server_limits(cfg: Config) -> ServerLimits:
    return ServerLimits(
        connections=cfg.limits.connections,
        connections_per_ip=cfg.limits.connections_per_ip,
        command_timeout=cfg.timeouts.command,
        data_timeout=cfg.timeouts.data,
    )


def client_timeouts(cfg: Config) -> ClientTimeouts:
    t = cfg.timeouts
    return ClientTimeouts(
        connect=t.connect,
        greeting=t.greeting,
        command=t.mail,
        data_init=t.data_init,
        data_block=t.data_block,
        data_end=t.data_end,
    )


def relay_service(cfg: Config, store: MailStore) -> RelayService:
    """The provider side of TURN/ETRN/ATRN (server/relay.py)."""
    settings = RelaySettings(
        hostname=cfg.hostname,
        timeouts=client_timeouts(cfg),
        lease=timedelta(seconds=cfg.delivery.lease),
        delivery_port=cfg.delivery.port,
        retry=cfg.queue.retry,
        etrn_access=cfg.relay.etrn_access,
    )
    return RelayService(store, settings, resolver(cfg))


def fetch_server(cfg: Config, store: MailStore) -> SmtpServer:
    """An SmtpServer without listeners, for `pochta relay fetch` (the customer side)."""
    return SmtpServer(server_context(cfg, store, tls_available=False), server_limits(cfg), None)


def fetch_schedule(cfg: Config, server: SmtpServer) -> FetchSchedule:
    """The `[[relay.fetch]]` entries; relative paths are relative to the config file."""
    base = Path(cfg.source).resolve().parent if cfg.source else Path.cwd()
    entries = [parse_fetch_entry(entry, base) for entry in cfg.relay.fetch]
    return FetchSchedule(entries, server, helo_name=cfg.hostname, timeouts=client_timeouts(cfg))


@dataclass
class Node:
    """One running pochta node."""

    cfg: Config
    store: MailStore | None = None
    server: SmtpServer | None = None
    services: list[Any] = field(default_factory=list)

    async def start(self) -> None:
        cfg = self.cfg
        self.store = await open_node_store(cfg)
        tls_context = load_tls(cfg)
        ctx = server_context(cfg, self.store, tls_available=True)
        relay = relay_service(cfg, self.store)
        ctx.relay = relay
        self.services.append(relay)
        self.server = SmtpServer(ctx, server_limits(cfg), tls_context, on_turn=relay.on_turn)
        for kind in LISTENER_KINDS:
            for address in getattr(cfg.listen, kind):
                inherited = _SHARED_SOCKETS.get((kind, address))
                if inherited is None:
                    await self.server.listen(kind, address)
                for sock in inherited or ():
                    await self.server.listen(kind, address, sock=sock)
        worker = queue_worker(cfg, self.store)
        relay.worker = worker  # ETRN delivers through the node's own worker
        ctx.wake_queue = worker.wake
        worker.start()
        self.services.append(worker)
        if cfg.relay.fetch:  # the customer side: pull held mail on a schedule
            schedule = fetch_schedule(cfg, self.server)
            schedule.start()
            self.services.append(schedule)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        for service in reversed(self.services):
            await service.stop()
        if self.store is not None:
            await self.store.close()


async def serve(cfg: Config) -> None:
    """Run one node until SIGINT/SIGTERM."""
    node = Node(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    maillog.batch_lines(loop.call_soon)
    try:
        await node.start()
        assert node.server is not None
        addresses = ", ".join(f"{h}:{p}" for h, p in node.server.bound)
        native = running_native()
        log.info(
            "pochta %s serving on %s (store %s, %s)",
            cfg.hostname,
            addresses,
            _safe(cfg),
            f"{len(native)} modules compiled" if native else "from source",
        )
        await stop.wait()
        log.info("shutting down")
    finally:
        await node.stop()
        maillog.batch_lines(None)


def raise_file_limit() -> None:
    """Allow as many open sockets as the hard limit permits ([limits] connections needs them)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


LISTENER_KINDS = ("mx", "submission", "submissions", "odmr")
# Listening sockets the parent bound before forking its workers: (kind, address) -> sockets
_SHARED_SOCKETS: dict[tuple[str, str], list[socket.socket]] = {}


def bind_listeners(cfg: Config) -> dict[tuple[str, str], list[socket.socket]]:
    """Bind and listen on every configured address once, for all worker processes.

    The workers share each socket's one accept queue, so whichever worker is free takes the
    next connection. (SO_REUSEPORT, used before, gives each worker its own queue and hashes
    connections to them: at 10 concurrent sessions one worker had a queue while the other sat
    idle, 11% of the machine; sharing: 2,500-2,630 -> 3,030 letters/s.) Every address a name
    resolves to gets its socket, as asyncio's create_server does.

    Raises:
        OSError: an address cannot be bound (in use, not ours, no permission).
    """
    bound: dict[tuple[str, str], list[socket.socket]] = {}
    try:
        for kind in LISTENER_KINDS:
            for address in getattr(cfg.listen, kind):
                host, port = split_address(address)
                socks = bound[(kind, address)] = []
                infos = socket.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                for family, kind_, proto, _, sockaddr in dict.fromkeys(infos):
                    sock = socket.socket(family, kind_, proto)
                    socks.append(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sock.bind(sockaddr)
                    sock.listen(LISTEN_BACKLOG)
                    sock.setblocking(False)
    except OSError:
        for socks in bound.values():
            for sock in socks:
                sock.close()
        raise
    return bound


STARTUP_GRACE = 10.0  # a worker that dies sooner than this after its start stops the node


def serve_processes(cfg: Config) -> int:
    """Run the node in `cfg.workers` processes sharing the listening sockets (bound once, here,
    before the fork), so every core works. The parent forwards SIGINT/SIGTERM and supervises:
    a worker that fails while starting stops the whole node (exit status 1: a configuration or
    environment fault that another try would repeat); a worker that dies later is logged and
    started again, on the same sockets."""
    raise_file_limit()
    if cfg.workers <= 1:
        run(serve(cfg))
        return 0
    load_tls(cfg)  # make the self-signed certificate once, before the children race for it
    scram_secret(cfg)
    _SHARED_SOCKETS.update(bind_listeners(cfg))
    children: dict[int, float] = {}  # pid -> when it started
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:  # the child runs one node and never returns into the parent's code
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # until its loop takes them over
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 0
            try:
                run(serve(cfg))
            except BaseException:
                log.exception("worker process failed")
                code = 1
            os._exit(code)
        children[pid] = time.monotonic()

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    for _ in range(cfg.workers):
        spawn()
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None or stopping:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if time.monotonic() - started < STARTUP_GRACE:
            log.error("worker process %d exited (%d) while starting; stopping the node", pid, code)
            status = 1
            forward(signal.SIGTERM, None)
        else:
            log.error("worker process %d exited (%d); starting another", pid, code)
            time.sleep(1.0)
            if not stopping:
                spawn()
    return status


def _safe(cfg: Config) -> str:
    url = cfg.store_url
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://...@{rest.rsplit('@', 1)[1]}"
    return url


def run(coro: Any) -> Any:
    """asyncio.run with uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
