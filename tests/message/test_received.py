"""The Received: trace header."""

from __future__ import annotations

import email
import email.policy
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pochta.message import received_header

WHEN = datetime(2025, 7, 1, 12, 0, tzinfo=UTC)


def make(**overrides: object) -> bytes:
    args: dict[str, object] = {
        "from_helo": "client.example",
        "peer_ip": "192.0.2.1",
        "peer_host": "host.example",
        "by_host": "mx.pochta.test",
        "protocol": "ESMTPS",
        "queue_id": "1A2B3C",
        "recipient": "user@pochta.test",
        "tls": "TLS1.3 TLS_AES_256_GCM_SHA384",
        "when": WHEN,
    }
    args.update(overrides)
    return received_header(**args)  # type: ignore[arg-type]


def unfold(header: bytes) -> str:
    return re.sub(r"\r\n[ \t]+", " ", header.decode("ascii"))


def assert_well_formed(header: bytes, max_columns: int = 77) -> None:
    assert header.startswith(b"Received: from ")
    assert header.endswith(b"\r\n")
    lines = header[:-2].split(b"\r\n")
    for i, line in enumerate(lines):
        assert b"\r" not in line and b"\n" not in line
        assert len(line.expandtabs(8)) <= max_columns
        if i:
            assert line[:1] in (b" ", b"\t")  # a continuation, never a new field
    assert header.isascii()


def test_full_stamp() -> None:
    header = make()
    assert_well_formed(header)
    text = unfold(header)
    assert text.startswith("Received: from client.example (host.example [192.0.2.1])")
    assert "(using TLS1.3 TLS_AES_256_GCM_SHA384)" in text
    assert "by mx.pochta.test" in text
    assert "with ESMTPS id 1A2B3C" in text
    assert "for <user@pochta.test>; Tue, 01 Jul 2025 12:00:00 +0000" in text
    assert text.endswith("+0000\r\n")


def test_parses_with_email_package() -> None:
    msg = email.message_from_bytes(make() + b"Subject: x\r\n\r\nbody", policy=email.policy.SMTP)
    assert msg["Subject"] == "x"
    assert "by mx.pochta.test" in str(msg["Received"])


def test_minimal_stamp_without_optional_parts() -> None:
    header = make(peer_host=None, recipient=None, tls=None, protocol="SMTP")
    assert_well_formed(header)
    text = unfold(header)
    assert "([192.0.2.1])" in text
    assert " for " not in text and "using" not in text
    assert re.search(r"with SMTP id 1A2B3C; Tue, 01 Jul 2025 12:00:00 \+0000\r\n$", text)


def test_ipv6_peer_and_time_zone() -> None:
    tz = timezone(timedelta(hours=3))
    text = unfold(make(peer_ip="2001:db8::1", when=datetime(2025, 7, 1, 15, 0, tzinfo=tz)))
    assert "[IPv6:2001:db8::1]" in text
    assert text.endswith("Tue, 01 Jul 2025 15:00:00 +0300\r\n")


@pytest.mark.parametrize(
    "helo",
    [
        "evil)\r\nX-Injected: yes (",
        "a(b)c",
        "with\\backslash",
        "",
        "  ",
        "héllo",
        "x" * 500,
        "[" + "1" * 70 + "é]",  # a long "literal": once only its first 64 characters were checked
        "[" + "1" * 70 + ");(]",
    ],
)
def test_hostile_helo_is_sanitised(helo: str) -> None:
    header = make(from_helo=helo)
    assert_well_formed(header)
    text = unfold(header)
    assert "X-Injected:" not in text.replace("?X-Injected:", "")
    assert text.count("(") == text.count(")")
    assert "\\" not in text
    msg = email.message_from_bytes(header + b"\r\n", policy=email.policy.compat32)
    assert list(msg.keys()) == ["Received"]


def test_invalid_helo_uses_peer_literal_and_keeps_helo_in_comment() -> None:
    text = unfold(make(from_helo="not a domain"))
    assert text.startswith("Received: from [192.0.2.1] (helo=not?a?domain) (host.example")


def test_address_literal_helo_is_kept() -> None:
    assert unfold(make(from_helo="[192.0.2.1]")).startswith("Received: from [192.0.2.1] (")


def test_hostile_peer_host_is_dropped() -> None:
    text = unfold(make(peer_host="bad)(host\r\n"))
    assert "([192.0.2.1])" in text


def test_unknown_protocol_falls_back() -> None:
    assert "with ESMTP id" in unfold(make(protocol="HTTP"))
    assert "with UTF8SMTPS id" in unfold(make(protocol="utf8smtps"))


@given(
    st.text(max_size=80),
    st.one_of(st.none(), st.text(max_size=80)),
    st.text(max_size=30),
    st.one_of(st.none(), st.text(max_size=80)),
)
def test_any_input_gives_a_single_well_formed_field(
    helo: str, host: str | None, qid: str, rcpt: str | None
) -> None:
    header = make(from_helo=helo, peer_host=host, queue_id=qid, recipient=rcpt)
    # a long valid HELO domain or host name cannot be folded; lines still stay far below 998
    assert_well_formed(header, max_columns=77 if len(helo) + len(host or "") < 40 else 400)
    assert unfold(header).count(";") == 1  # only the date separator
