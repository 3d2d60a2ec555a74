"""The retry policy: durations, schedule, deadlines, outcome classification."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pochta.dns import DnsError
from pochta.errors import ConfigError, DeliveryError
from pochta.queue.policy import (
    DEFAULT_GIVE_UP,
    DEFAULT_RETRY,
    classify,
    next_attempt,
    parse_duration,
    parse_schedule,
    should_give_up,
    should_warn,
)
from pochta.store.api import OutcomeKind

NOW = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("2d", 172800),
        ("1w", 604800),
        ("1h30m", 5400),
        ("1d2h3m4s", 93784),
        (" 90 ", 90),
        ("0s", 0),
        ("5M", 300),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "m", "5x", "-5m", "1.5h", "30m1h", "1h1h", "1h 30m", "h1"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


@given(st.integers(0, 99), st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_parse_duration_roundtrip(d: int, h: int, m: int, s: int) -> None:
    assert parse_duration(f"{d}d{h}h{m}m{s}s") == timedelta(days=d, hours=h, minutes=m, seconds=s)


def test_parse_schedule() -> None:
    assert parse_schedule("1m, 5m 1h") == (
        timedelta(minutes=1),
        timedelta(minutes=5),
        timedelta(hours=1),
    )
    for bad in ("", "0s", ["1m", "nope"]):
        with pytest.raises(ConfigError):
            parse_schedule(bad)


def test_default_schedule_backs_off_to_an_hour_and_gives_up_after_5_days() -> None:
    assert DEFAULT_RETRY[0] <= timedelta(minutes=5)
    assert list(DEFAULT_RETRY) == sorted(DEFAULT_RETRY)
    assert DEFAULT_RETRY[-1] == timedelta(hours=1)
    assert timedelta(days=5) == DEFAULT_GIVE_UP


def test_next_attempt_follows_schedule_and_repeats_the_last_step() -> None:
    schedule = (timedelta(minutes=1), timedelta(minutes=5), timedelta(hours=1))
    assert next_attempt(1, NOW, schedule) == NOW + timedelta(minutes=1)
    assert next_attempt(2, NOW, schedule) == NOW + timedelta(minutes=5)
    assert next_attempt(3, NOW, schedule) == NOW + timedelta(hours=1)
    assert next_attempt(50, NOW, schedule) == NOW + timedelta(hours=1)
    assert next_attempt(0, NOW, schedule) == NOW + timedelta(minutes=1)
    with pytest.raises(ConfigError):
        next_attempt(1, NOW, ())


def test_next_attempt_jitter_is_bounded_and_never_early() -> None:
    rng = random.Random(7)
    step = timedelta(minutes=10)
    times = {next_attempt(1, NOW, (step,), rng) for _ in range(50)}
    assert len(times) > 1
    assert all(NOW + step <= t <= NOW + step * 1.1 for t in times)


def test_should_give_up() -> None:
    created = NOW - timedelta(days=5)
    assert should_give_up(created, NOW, DEFAULT_GIVE_UP)
    assert not should_give_up(created + timedelta(seconds=1), NOW, DEFAULT_GIVE_UP)


def test_should_warn() -> None:
    created = NOW - timedelta(hours=4)
    assert should_warn(created, NOW, timedelta(hours=4), already_warned=False)
    assert not should_warn(created, NOW, timedelta(hours=4), already_warned=True)
    assert not should_warn(created, NOW, timedelta(hours=5), already_warned=False)
    assert not should_warn(created, NOW, None, already_warned=False)
    assert not should_warn(created, NOW, timedelta(0), already_warned=False)


@pytest.mark.parametrize(
    ("code", "enhanced", "text", "kind"),
    [
        (250, "2.0.0", "ok", OutcomeKind.DELIVERED),
        (251, None, "will forward", OutcomeKind.DELIVERED),
        (421, "4.3.0", "try later", OutcomeKind.TRANSIENT),
        (450, None, "greylisted", OutcomeKind.TRANSIENT),
        (550, "5.1.1", "no such user", OutcomeKind.PERMANENT),
        (554, None, "rejected", OutcomeKind.PERMANENT),
        (552, "5.5.3", "too many recipients", OutcomeKind.TRANSIENT),
        (552, "5.2.2", "mailbox full", OutcomeKind.PERMANENT),
        (354, None, "go ahead", OutcomeKind.TRANSIENT),
        (None, None, "550 5.1.1 no such user", OutcomeKind.PERMANENT),
        (None, None, "451-4.3.0 busy", OutcomeKind.TRANSIENT),
        (None, "5.7.1", "", OutcomeKind.PERMANENT),
        (None, "4.7.1", "", OutcomeKind.TRANSIENT),
        (None, None, "garbage", OutcomeKind.TRANSIENT),
    ],
)
def test_classify_replies(
    code: int | None, enhanced: str | None, text: str, kind: OutcomeKind
) -> None:
    assert classify(code, enhanced, text) is kind


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(), OutcomeKind.TRANSIENT),
        (ConnectionResetError(), OutcomeKind.TRANSIENT),
        (TimeoutError(), OutcomeKind.TRANSIENT),
        (OSError("no route"), OutcomeKind.TRANSIENT),
        (DnsError("null MX", permanent=True, enhanced="5.1.10"), OutcomeKind.PERMANENT),
        (DnsError("servfail", permanent=False, enhanced="4.4.3"), OutcomeKind.TRANSIENT),
        (DeliveryError("bad", permanent=True), OutcomeKind.PERMANENT),
    ],
)
def test_classify_exceptions(exc: BaseException, kind: OutcomeKind) -> None:
    # the exception decides, even if a reply code was also seen
    assert classify(250, None, "", exc=exc) is kind
