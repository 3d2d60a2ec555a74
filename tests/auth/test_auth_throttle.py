"""The failure throttle (with an injected clock) and the fail2ban log line."""

from __future__ import annotations

import re

import pytest

from pochta.auth.throttle import (
    FAIL2BAN_FAILREGEX,
    FailureThrottle,
    auth_failure_log_line,
    client_key,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_delay_grows_after_threshold(clock: Clock) -> None:
    throttle = FailureThrottle(delay_after=3, base_delay=1.0, max_delay=8.0, clock=clock)
    delays = []
    for _ in range(8):
        delays.append(throttle.delay("192.0.2.1"))
        throttle.record_failure("192.0.2.1")
        clock.now += 1
    assert delays == [0.0, 0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert throttle.delay("192.0.2.2") == 0.0  # other addresses are unaffected


def test_block_after_failures_in_window(clock: Clock) -> None:
    throttle = FailureThrottle(block_after=5, window=100.0, block_for=300.0, clock=clock)
    for _ in range(4):
        throttle.record_failure("192.0.2.1")
        clock.now += 10
    assert not throttle.blocked("192.0.2.1")
    throttle.record_failure("192.0.2.1")
    assert throttle.blocked("192.0.2.1")
    assert not throttle.blocked("192.0.2.9")
    clock.now += 299
    assert throttle.blocked("192.0.2.1")
    clock.now += 2
    assert not throttle.blocked("192.0.2.1")


def test_failures_outside_the_window_do_not_count(clock: Clock) -> None:
    throttle = FailureThrottle(delay_after=2, block_after=3, window=60.0, clock=clock)
    for _ in range(10):
        throttle.record_failure("192.0.2.1")
        clock.now += 31  # never three within 60 s
    assert not throttle.blocked("192.0.2.1")
    assert throttle.failures("192.0.2.1") == 1  # the one 31 s ago
    clock.now += 30
    assert throttle.failures("192.0.2.1") == 0
    assert throttle.delay("192.0.2.1") == 0.0


def test_success_resets(clock: Clock) -> None:
    throttle = FailureThrottle(delay_after=2, clock=clock)
    for _ in range(3):
        throttle.record_failure("192.0.2.1")
    assert throttle.delay("192.0.2.1") > 0
    throttle.record_success("192.0.2.1")
    assert throttle.delay("192.0.2.1") == 0.0
    assert len(throttle) == 0


def test_success_does_not_lift_a_block(clock: Clock) -> None:
    throttle = FailureThrottle(block_after=2, clock=clock)
    throttle.record_failure("192.0.2.1")
    throttle.record_failure("192.0.2.1")
    throttle.record_success("192.0.2.1")
    assert throttle.blocked("192.0.2.1")


def test_ipv6_is_keyed_per_64(clock: Clock) -> None:
    throttle = FailureThrottle(block_after=2, clock=clock)
    throttle.record_failure("2001:db8:1:2::1")
    throttle.record_failure("2001:db8:1:2:ffff::9")
    assert throttle.blocked("2001:db8:1:2::77")
    assert not throttle.blocked("2001:db8:1:3::1")
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("[2001:db8::1]") == "2001:db8::/64"


def test_memory_is_bounded(clock: Clock) -> None:
    throttle = FailureThrottle(max_tracked=100, window=60.0, block_for=60.0, clock=clock)
    for i in range(1000):
        throttle.record_failure(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100
    assert throttle.failures("10.0.3.231") == 1  # the most recent are kept
    assert throttle.failures("10.0.0.0") == 0
    clock.now += 61
    throttle.record_failure("192.0.2.1")  # stale entries are pruned on the way
    assert len(throttle) == 1


def test_log_line_matches_fail2ban_regex() -> None:
    pattern = re.compile(FAIL2BAN_FAILREGEX.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))
    line = auth_failure_log_line("203.0.113.5", "x@y", "PLAIN")
    assert line == 'auth failed: ip=203.0.113.5 user="x@y" mechanism=PLAIN'
    match = pattern.search("2024-05-01 12:00:00 pochta[12]: " + line)
    assert match is not None and match["host"] == "203.0.113.5"
    v6 = auth_failure_log_line("2001:db8::5", "x", "scram-sha-256")
    match = pattern.search(v6)
    assert match is not None and match["host"] == "2001:db8::5"


def test_log_line_sanitises_the_username() -> None:
    pattern = re.compile(FAIL2BAN_FAILREGEX.replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)"))
    hostile = 'a" mechanism=PLAIN\nauth failed: ip=198.51.100.1 user="b\\ü' + "z" * 100
    line = auth_failure_log_line("203.0.113.5", hostile, "LOGIN")
    assert "\n" not in line
    user = line.split('user="', 1)[1].rsplit('" mechanism=', 1)[0]
    assert len(user) == 64
    assert all(0x20 <= ord(ch) <= 0x7E and ch not in '"\\' for ch in user)
    matches = [m["host"] for m in pattern.finditer(line)]
    assert matches == ["203.0.113.5"]  # the forged ip= is not picked up
    assert auth_failure_log_line("203.0.113.5", "x", "PL AIN\n").endswith("mechanism=PL_AIN_")
