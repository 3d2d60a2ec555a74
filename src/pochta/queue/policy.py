"""Retry policy of the outbound queue: durations, the back-off schedule, give-up and warning
deadlines, and the classification of attempt results. Pure functions; imports stdlib, `errors`
and `store.api` records only.

The default schedule (`DEFAULT_RETRY`) waits 1m, 5m, 10m, 20m, 40m and then 1h between attempts,
repeating the last interval until `DEFAULT_GIVE_UP` (5 days, Postfix's maximal_queue_lifetime).
Why these numbers:
- 1 minute first: most transient failures are short (a peer restarting, a brief overload), and
  one early retry is cheap.
- 5 minutes second: greylisting (e.g. postgrey's default 300 s delay) accepts a retry after a few
  minutes, so the second attempt clears the common greylisters.
- then doubling, as Postfix does between minimal_backoff_time (300 s) and maximal_backoff_time
  (4000 s), capped at one hour, so a host that is down for days costs ~one attempt an hour.
Retries get up to 10% positive jitter (when an rng is given) so that a backlog for one domain
does not hit it in lock-step.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from datetime import datetime, timedelta

from pochta.errors import ConfigError
from pochta.store.api import OutcomeKind

_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(\d+)([wdhms])")
_REPLY = re.compile(r"^\s*([2-5]\d\d)(?:[ -]+([245]\.\d{1,3}\.\d{1,3}))?")
_ENHANCED = re.compile(r"^\s*([245])\.\d{1,3}\.\d{1,3}\s*$")


def parse_duration(text: str) -> timedelta:
    """ "30s", "5m", "1h", "2d", "1w", "1h30m", or a bare number of seconds -> timedelta.

    Units must appear at most once, largest first. Raises ConfigError otherwise.
    """
    value = text.strip().lower()
    if value.isdigit():
        return timedelta(seconds=int(value))
    total = 0
    pos = 0
    last_rank = -1
    order = list(_UNITS)
    for match in _DURATION.finditer(value):
        rank = order.index(match.group(2))
        if match.start() != pos or rank <= last_rank:
            raise ConfigError(f"bad duration {text!r}")
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos, last_rank = match.end(), rank
    if pos == 0 or pos != len(value):
        raise ConfigError(f"bad duration {text!r} (use e.g. 30s, 5m, 1h30m, 2d)")
    return timedelta(seconds=total)


def parse_schedule(items: Sequence[str] | str) -> tuple[timedelta, ...]:
    """A retry schedule from durations ("1m, 5m, 1h" or a list); ConfigError if empty or zero."""
    if isinstance(items, str):
        items = [item for item in re.split(r"[,\s]+", items) if item]
    schedule = tuple(parse_duration(item) for item in items)
    if not schedule or any(step <= timedelta(0) for step in schedule):
        raise ConfigError("a retry schedule needs at least one positive interval")
    return schedule


DEFAULT_RETRY: tuple[timedelta, ...] = parse_schedule(("1m", "5m", "10m", "20m", "40m", "1h"))
DEFAULT_GIVE_UP = timedelta(days=5)
DEFAULT_WARN_AFTER = timedelta(hours=4)  # sendmail's Timeout.queuewarn default
JITTER = 0.1


def next_attempt(
    attempts: int,
    now: datetime,
    schedule: Sequence[timedelta] = DEFAULT_RETRY,
    rng: random.Random | None = None,
) -> datetime:
    """When to try again after `attempts` failed attempts (1 after the first failure).

    Uses schedule[attempts - 1]; past the end the last interval repeats. With `rng`, adds up to
    10% of the interval (never less than the interval, so retries are not early).
    """
    if not schedule:
        raise ConfigError("empty retry schedule")
    step = schedule[min(max(attempts, 1), len(schedule)) - 1]
    if rng is not None:
        step += step * (rng.random() * JITTER)
    return now + step


def should_give_up(created_at: datetime, now: datetime, give_up_after: timedelta) -> bool:
    """True once the message has been queued for `give_up_after`; the caller then bounces the
    remaining recipients (RFC 3463 X.4.7 "delivery time expired", reported as 5.4.7)."""
    return now - created_at >= give_up_after


def should_warn(
    created_at: datetime, now: datetime, warn_after: timedelta | None, already_warned: bool
) -> bool:
    """True when a "delayed" DSN (RFC 3464 Action: delayed) is due: warnings are enabled, none
    was sent yet, and the message has waited `warn_after`."""
    if already_warned or warn_after is None or warn_after <= timedelta(0):
        return False
    return now - created_at >= warn_after


def classify(
    code: int | None,
    enhanced: str | None,
    text: str,
    *,
    exc: BaseException | None = None,
) -> OutcomeKind:
    """The outcome of one attempt for one recipient.

    - An exception decides first: one with a boolean `.permanent` (DeliveryError, DnsError) by
      that flag; anything else (connection refused/reset, timeouts, TLS errors) is transient.
    - Otherwise the reply code (RFC 5321 §4.2.1): 2xx delivered, 4xx transient, 5xx permanent;
      when `code` is None it is read from the start of `text`, then from the enhanced code's
      class (RFC 3463 §3.1). No usable code at all is transient.
    - RFC 5321 §4.5.3.1.10: "552 5.5.3 too many recipients" is treated as temporary.
    """
    if exc is not None:
        permanent = getattr(exc, "permanent", None)
        if isinstance(permanent, bool):
            return OutcomeKind.PERMANENT if permanent else OutcomeKind.TRANSIENT
        return OutcomeKind.TRANSIENT
    if code is None:
        match = _REPLY.match(text)
        if match:
            code = int(match.group(1))
            enhanced = enhanced or match.group(2)
    if code is None and enhanced is not None:
        klass = _ENHANCED.match(enhanced)
        if klass:
            code = int(klass.group(1)) * 100
    if code is None:
        return OutcomeKind.TRANSIENT
    if code == 552 and (enhanced or "").strip() == "5.5.3":
        return OutcomeKind.TRANSIENT
    if 200 <= code < 300:
        return OutcomeKind.DELIVERED
    if 500 <= code < 600:
        return OutcomeKind.PERMANENT
    return OutcomeKind.TRANSIENT  # 4xx, and 1xx/3xx where a final reply was due
