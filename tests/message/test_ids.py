"""Message-ID and Date values."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

from pochta.message import format_date, ids, make_message_id


def test_message_ids_are_unique_and_well_formed() -> None:
    ids = {make_message_id("mx.pochta.test") for _ in range(1000)}
    assert len(ids) == 1000
    for mid in ids:
        assert re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]{24}@mx\.pochta\.test>", mid)


def test_message_id_with_odd_hostnames() -> None:
    assert make_message_id("").endswith("@localhost.invalid>")
    assert make_message_id("bad host\r\n").endswith("@localhost.invalid>")
    assert make_message_id("пример.test").endswith("@xn--e1afmkfd.test>")
    assert make_message_id("mx.pochta.test.").endswith("@mx.pochta.test>")


def test_format_date_roundtrips() -> None:
    tz = timezone(timedelta(hours=-5))
    dt = datetime(2025, 1, 2, 3, 4, 5, tzinfo=tz)
    assert format_date(dt) == "Thu, 02 Jan 2025 03:04:05 -0500"
    assert parsedate_to_datetime(format_date(dt)) == dt


def test_format_date_naive_is_utc() -> None:
    assert format_date(datetime(2025, 7, 1, 12, 0)) == "Tue, 01 Jul 2025 12:00:00 +0000"
    assert format_date(datetime(2025, 7, 1, 12, 0, tzinfo=UTC)).endswith("+0000")


def test_format_now_is_the_current_second_in_utc() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    text = ids.format_now()
    after = datetime.now(UTC)
    assert text.endswith("+0000")
    assert before <= parsedate_to_datetime(text) <= after


def test_queue_ids_are_unique_alphanumeric_and_count_in_hex() -> None:
    made = [ids.make_queue_id() for _ in range(5000)]
    assert len(set(made)) == len(made)
    assert all(q.isascii() and q.isalnum() and q == q.upper() for q in made)
    # the last five digits are the per-process counter (it wraps at 0xFFFFF)
    counts = [int(q[-5:], 16) for q in made]
    assert all((b - a) % 0x100000 == 1 for a, b in itertools.pairwise(counts))
