"""Node configuration: frozen dataclasses with defaults, loaded from one TOML file. Stdlib only,
plus `errors` and the duration grammar and defaults of `queue.policy`. Only `app.py` and `cli/`
import this module (the composition root); everything else takes plain arguments. Every key is
documented in docs/configuration.md.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from pochta.errors import ConfigError
from pochta.queue import policy

_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1000, "KIB": 1024, "M": 1024**2, "MB": 1000**2}
_SIZE_UNITS |= {"MIB": 1024**2, "G": 1024**3, "GB": 1000**3, "GIB": 1024**3}
_SIZE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | str) -> int:
    """`25MiB`, `10M`, `512KiB` or a plain number of octets."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(value)
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ConfigError(f"not a size: {value!r} (use e.g. 25MiB)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]


def parse_duration(value: int | float | str) -> timedelta:
    """`30s`, `5m`, `1h30m`, `5d` (see `queue.policy.parse_duration`) or a number of seconds."""
    if isinstance(value, (int, float)):
        return timedelta(seconds=value)
    return policy.parse_duration(value)


@dataclass(frozen=True)
class Listen:
    mx: tuple[str, ...] = ()
    submission: tuple[str, ...] = ()
    submissions: tuple[str, ...] = ()
    odmr: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tls:
    cert: str = ""  # PEM file; "" = self-signed certificate made in data_dir
    key: str = ""


@dataclass(frozen=True)
class Dns:
    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; empty = the system resolver
    timeout: float = 5.0
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    message_size: int = 25 * 1024 * 1024
    recipients: int = 100
    command_line: int = 512
    text_line: int = 1000
    connections: int = 1000
    connections_per_ip: int = 20
    errors: int = 10  # protocol errors before 421 4.5.0


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2: a server waits at least 5 minutes for each command."""

    command: float = 300.0
    data: float = 180.0  # between two reads while receiving a body
    connect: float = 30.0  # outbound TCP connect
    greeting: float = 300.0  # client: 220 (§4.5.3.2.1)
    mail: float = 300.0  # client: MAIL and RCPT replies (§4.5.3.2.2-3)
    data_init: float = 120.0  # client: 354 (§4.5.3.2.4)
    data_block: float = 180.0  # client: each write of the body (§4.5.3.2.5)
    data_end: float = 600.0  # client: reply after "." (§4.5.3.2.6)


@dataclass(frozen=True)
class Auth:
    mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN")
    allow_plaintext: bool = False  # test-only: AUTH without TLS on 587
    delay_after: int = 3
    block_after: int = 10
    block_for: float = 900.0


@dataclass(frozen=True)
class Submission:
    messages_per_hour: int = 1000  # per user
    recipients_per_hour: int = 5000  # per user


@dataclass(frozen=True)
class Delivery:
    port: int = 25
    workers: int = 20  # concurrent outbound deliveries
    per_destination: int = 5  # connections at once to one destination domain
    poll: float = 5.0  # seconds between queue scans when idle
    lease: float = 600.0  # a claim expires after this; another worker may then take it
    require_tls: bool = False


@dataclass(frozen=True)
class Queue:
    retry: tuple[timedelta, ...] = policy.DEFAULT_RETRY  # then the last interval repeats
    give_up_after: timedelta = policy.DEFAULT_GIVE_UP
    warn_after: timedelta | None = policy.DEFAULT_WARN_AFTER


@dataclass(frozen=True)
class Relay:
    turn: bool = False  # TURN on the submission listeners (after AUTH only)
    etrn: bool = True
    etrn_access: str = "owner-or-dns"  # who may ETRN: "owner-or-dns", "owner" or "any"
    fetch: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Log:
    level: str = "info"
    trace: bool = False  # log every SMTP line (AUTH payloads redacted)
    mail_log: str = ""  # file for the key=value mail-event log; "" = the main log


@dataclass(frozen=True)
class Config:
    hostname: str = ""
    data_dir: str = "var"
    store_url: str = ""
    workers: int = 1  # server processes sharing the listening sockets (bound by the parent)
    listen: Listen = field(default_factory=Listen)
    tls: Tls = field(default_factory=Tls)
    dns: Dns = field(default_factory=Dns)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    auth: Auth = field(default_factory=Auth)
    submission: Submission = field(default_factory=Submission)
    delivery: Delivery = field(default_factory=Delivery)
    queue: Queue = field(default_factory=Queue)
    relay: Relay = field(default_factory=Relay)
    log: Log = field(default_factory=Log)
    source: str = ""  # the file this came from ("" = embedded default)

    def path(self, name: str) -> Path:
        """A path relative to data_dir (absolute paths stay as they are)."""
        p = Path(name)
        return p if p.is_absolute() else Path(self.data_dir) / p


def default_listen() -> Listen:
    """The embedded default: standard ports as root, high ports (2525/2587/2465/2366) otherwise."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    ports = (25, 587, 465, 366) if root else (2525, 2587, 2465, 2366)
    return Listen(
        mx=(f"0.0.0.0:{ports[0]}",),
        submission=(f"0.0.0.0:{ports[1]}",),
        submissions=(f"0.0.0.0:{ports[2]}",),
        odmr=(),
    )


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _strs(value: Any, key: str = "value") -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of strings")
    return tuple(value)


def _known(table: dict[str, Any], name: str, allowed: set[str]) -> None:
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"unknown key(s) in [{name}]: {', '.join(sorted(unknown))}")


def _fields(cls: type[Any], table: dict[str, Any], name: str, convert: dict[str, Any]) -> Any:
    allowed = {f for f in cls.__dataclass_fields__}
    _known(table, name, allowed | set(convert))
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        fn = convert.get(key)
        try:
            kwargs[key] = fn(value) if fn else value
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"[{name}] {key}: {exc}") from None
    return cls(**kwargs)


def load(path: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Read the node configuration.

    Args:
        path: a TOML file; None means the embedded default (or $POCHTA_CONFIG if set).
        overrides: top-level keys to replace after loading (used by `pochta demo` and tests).
    Raises:
        ConfigError: unreadable file, bad TOML, unknown keys or bad values.
    """
    path = path or os.environ.get("POCHTA_CONFIG") or None
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    cfg = from_dict(data, source=path or "")
    return replace(cfg, **overrides) if overrides else cfg


def from_dict(data: dict[str, Any], source: str = "") -> Config:
    top = {"hostname", "data_dir", "workers", "store", "listen", "tls", "dns", "limits"}
    top |= {"timeouts", "auth", "submission", "delivery", "queue", "relay", "log"}
    _known(data, "top level", top)
    base = Path(source).resolve().parent if source else Path.cwd()
    data_dir = str(base / data.get("data_dir", "var"))
    store = _table(data, "store")
    _known(store, "store", {"url"})
    store_url = store.get("url") or f"sqlite:///{data_dir}/pochta.db"
    listen_t = _table(data, "listen")
    listen = (
        _fields(
            Listen,
            listen_t,
            "listen",
            {k: _strs for k in ("mx", "submission", "submissions")} | {"odmr": _strs},
        )
        if "listen" in data
        else default_listen()
    )
    dns_t = dict(_table(data, "dns"))
    routes = {
        str(k).lower(): _strs(v, f"dns.routes.{k}") for k, v in dns_t.pop("routes", {}).items()
    }
    dns = _fields(Dns, dns_t, "dns", {"nameservers": _strs, "timeout": float})
    size = {"message_size": parse_size}
    secs = {k: lambda v: parse_duration(v).total_seconds() for k in Timeouts.__dataclass_fields__}
    queue_t = _table(data, "queue")
    queue = _fields(
        Queue,
        queue_t,
        "queue",
        {
            "retry": lambda v: tuple(parse_duration(x) for x in _strs(v, "queue.retry")),
            "give_up_after": parse_duration,
            "warn_after": lambda v: parse_duration(v) if v else None,
        },
    )
    if not queue.retry:
        raise ConfigError("[queue] retry must list at least one interval")
    relay_t = dict(_table(data, "relay"))
    fetch = tuple(relay_t.pop("fetch", ()))
    return Config(
        hostname=str(data.get("hostname") or socket.getfqdn()),
        data_dir=data_dir,
        store_url=_resolve_sqlite(store_url, base),
        workers=int(data.get("workers", 1)),
        listen=listen,
        tls=_fields(Tls, _table(data, "tls"), "tls", {}),
        dns=replace(dns, routes=routes),
        limits=_fields(Limits, _table(data, "limits"), "limits", size),
        timeouts=_fields(Timeouts, _table(data, "timeouts"), "timeouts", secs),
        auth=_fields(Auth, _table(data, "auth"), "auth", {"mechanisms": _strs}),
        submission=_fields(Submission, _table(data, "submission"), "submission", {}),
        delivery=_fields(
            Delivery,
            _table(data, "delivery"),
            "delivery",
            {
                "poll": lambda v: parse_duration(v).total_seconds(),
                "lease": lambda v: parse_duration(v).total_seconds(),
            },
        ),
        queue=queue,
        relay=replace(_fields(Relay, relay_t, "relay", {}), fetch=fetch),
        log=_fields(Log, _table(data, "log"), "log", {}),
        source=source,
    )


def _resolve_sqlite(url: str, base: Path) -> str:
    """Make a relative SQLite path relative to the configuration file's directory."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/"):
        rel = url[len(prefix) :]
        if not Path(rel).is_absolute():
            return prefix + str(base / rel)
    return url
