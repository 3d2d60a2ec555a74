"""Brute-force defence for AUTH: a per-client failure throttle and a fail2ban-friendly log line.

Imports stdlib only.

`FailureThrottle` counts failed authentications per client address (IPv6 clients per /64, since
one host usually owns a whole /64). After `delay_after` failures within `window` seconds every
further attempt waits `base_delay * 2**(n - delay_after)` seconds (at most `max_delay`) before it
is answered; after `block_after` failures the address is blocked for `block_for` seconds (the
SMTP server answers AUTH with 454 4.7.0 or drops the connection). Memory is bounded: entries
expire, and at most `max_tracked` addresses are remembered (the least recently failing go first).

`auth_failure_log_line` writes one stable line per failure. A fail2ban filter for it
(e.g. /etc/fail2ban/filter.d/pochta.conf):

    [Definition]
    failregex = auth failed: ip=<HOST> user="[^"]*" mechanism=[A-Z0-9_-]+$
    ignoreregex =

The username is sanitised (printable ASCII, no quotes or backslashes, at most 64 characters), so
a client cannot forge a second `ip=` that the filter would pick up.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

FAIL2BAN_FAILREGEX = r'auth failed: ip=<HOST> user="[^"]*" mechanism=[A-Z0-9_-]+$'
USERNAME_MAX = 64


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0
    last: float = 0.0


def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    """The throttle key of an address: IPv4 (and IPv4-mapped IPv6) as is, IPv6 per prefix."""
    try:
        addr = ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, ipv6_prefix), strict=False))
    return str(addr)


class FailureThrottle:
    """Failed-authentication bookkeeping per client address; see the module docstring."""

    def __init__(
        self,
        delay_after: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        block_after: int = 10,
        window: float = 900.0,
        block_for: float = 900.0,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 100_000,
        ipv6_prefix: int = 64,
    ) -> None:
        if delay_after < 1 or block_after < 1 or max_tracked < 1:
            raise ValueError("delay_after, block_after and max_tracked must be positive")
        self.delay_after = delay_after
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.block_after = block_after
        self.window = window
        self.block_for = block_for
        self.max_tracked = max_tracked
        self.ipv6_prefix = ipv6_prefix
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest last failure first

    def __len__(self) -> int:
        """How many addresses are tracked."""
        return len(self._entries)

    def record_failure(self, ip: str) -> None:
        now = self._clock()
        key = client_key(ip, self.ipv6_prefix)
        entry = self._entries.pop(key, None) or _Entry()
        self._expire(entry, now)
        entry.failures.append(now)
        while len(entry.failures) > self.block_after:
            entry.failures.popleft()
        entry.last = now
        if len(entry.failures) >= self.block_after:
            entry.blocked_until = now + self.block_for
        self._entries[key] = entry  # re-inserted at the end: most recent
        self._prune(now)

    def record_success(self, ip: str) -> None:
        """Forget the address's failures (an active block stays)."""
        key = client_key(ip, self.ipv6_prefix)
        entry = self._entries.get(key)
        if entry is None:
            return
        if entry.blocked_until > self._clock():
            entry.failures.clear()
        else:
            del self._entries[key]

    def failures(self, ip: str) -> int:
        """Failures of the address within the window."""
        entry = self._entries.get(client_key(ip, self.ipv6_prefix))
        if entry is None:
            return 0
        self._expire(entry, self._clock())
        return len(entry.failures)

    def delay(self, ip: str) -> float:
        """Seconds to wait before answering this address's next attempt (0.0: none)."""
        count = self.failures(ip)
        if count < self.delay_after:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2.0 ** (count - self.delay_after)))

    def blocked(self, ip: str) -> bool:
        entry = self._entries.get(client_key(ip, self.ipv6_prefix))
        return entry is not None and entry.blocked_until > self._clock()

    def _expire(self, entry: _Entry, now: float) -> None:
        while entry.failures and entry.failures[0] <= now - self.window:
            entry.failures.popleft()

    def _stale(self, entry: _Entry, now: float) -> bool:
        return entry.last <= now - self.window and entry.blocked_until <= now

    def _prune(self, now: float) -> None:
        # Entries are ordered by last failure, so stale ones collect at the front.
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if not self._stale(entry, now) and len(self._entries) <= self.max_tracked:
                break
            del self._entries[key]


_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')
_MECHANISM_UNSAFE = re.compile(r"[^A-Z0-9_-]")


def sanitize_username(username: str) -> str:
    """Printable ASCII only (others, quotes and backslashes become "?"), at most 64 chars."""
    return _UNSAFE.sub("?", username[: USERNAME_MAX * 4])[:USERNAME_MAX]


def auth_failure_log_line(ip: str, username: str, mechanism: str) -> str:
    """`auth failed: ip=203.0.113.5 user="x@y" mechanism=PLAIN`: one line, matched by
    FAIL2BAN_FAILREGEX."""
    try:
        address = str(ipaddress.ip_address(ip.strip("[]")))
    except ValueError:
        address = "invalid"
    mech = _MECHANISM_UNSAFE.sub("_", mechanism.upper()[:20]) or "_"
    return f'auth failed: ip={address} user="{sanitize_username(username)}" mechanism={mech}'
