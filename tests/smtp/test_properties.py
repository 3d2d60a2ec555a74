"""Hypothesis properties of the core: DATA transparency through a real client and server, and
robustness of both roles against any bytes (only RemoteProtocolError may escape)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pochta import smtp
from pochta.smtp import replies as R
from pochta.testing.pair import ConnectionPair, body_of, default_reply, hints

# POCHTA_FUZZ_EXAMPLES=5000 for a long hunt; the default keeps the file at a few seconds.
SETTINGS = settings(
    max_examples=int(os.environ.get("POCHTA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
pytestmark = pytest.mark.timeout(60)
SENDER = smtp.MailFrom(smtp.path_of("a@example.org"))
RCPT = smtp.RcptTo(smtp.path_of("b@example.org"))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def in_data() -> ConnectionPair:
    pair = ConnectionPair.ready()
    pair.run(SENDER, RCPT, smtp.Data())
    assert pair.server.state is smtp.State.DATA
    return pair


# Lines without CR, LF or NUL, shorter than the text-line limit even after stuffing.
LINE = st.binary(max_size=60).filter(lambda b: not (set(b) & {0, 10, 13}))
CRLF_BODY = st.lists(st.one_of(LINE, st.sampled_from([b".", b"..", b". x", b""])), max_size=12)
CUTS = st.lists(st.integers(min_value=0, max_value=2000), max_size=8)


@SETTINGS
@given(lines=CRLF_BODY, client_cuts=CUTS, wire_cuts=CUTS)
def test_crlf_body_round_trips_through_client_and_server(
    lines: list[bytes], client_cuts: list[int], wire_cuts: list[int]
) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    pair = in_data()
    wire = b"".join(pair.client.send(smtp.BodyChunk(p)) for p in split(body, client_cuts))
    wire += pair.client.send(smtp.EndOfData())
    items: list[object] = []
    for piece in split(wire, wire_cuts):
        items.extend(pair.feed_server(piece))
    assert items[-1] == smtp.EndOfData()
    assert body_of(items) == body


@SETTINGS
@given(body=st.binary(max_size=300), client_cuts=CUTS, wire_cuts=CUTS)
def test_no_body_can_end_data_early_or_smuggle_a_command(
    body: bytes, client_cuts: list[int], wire_cuts: list[int]
) -> None:
    pair = in_data()
    wire = b"".join(pair.client.send(smtp.BodyChunk(p)) for p in split(body, client_cuts))
    wire += pair.client.send(smtp.EndOfData()) + b"NOOP\r\n"
    items: list[object] = []
    offset = 0
    for piece in split(wire, wire_cuts):
        offset += len(piece)
        items.extend(pair.feed_server(piece))
        if items and not isinstance(items[-1], smtp.BodyChunk):
            pair.server.receive_data(wire[offset:])  # the rest arrives before the reply
            break
    end = items[-1]
    assert all(isinstance(item, smtp.BodyChunk) for item in items[:-1])
    if isinstance(end, smtp.RemoteProtocolError):
        assert hints([end])[0].code in (500, 550)
        pair.answer_hint(end)
    else:
        assert end == smtp.EndOfData()
        expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
        assert body_of(items) == expected
        pair.server_send(R.OK)
    assert pair.server_events() == [smtp.Noop()]


# -- robustness ----------------------------------------------------------------------------------

PREFIX_LINES = [
    b"EHLO client.test",
    b"HELO client.test",
    b"MAIL FROM:<a@example.org>",
    b"MAIL FROM:<> BODY=BINARYMIME",
    b"RCPT TO:<b@example.org>",
    b"DATA",
    b"BDAT 3",
    b"BDAT 0 LAST",
    b"RSET",
    b"AUTH PLAIN",
    b"AUTH LOGIN",
    b"NOOP",
    b"STARTTLS",
    b"TURN",
    b"QUIT",
]
FRAGMENTS = st.one_of(
    st.binary(max_size=24),
    st.sampled_from(
        [
            b"\r\n",
            b"\r",
            b"\n",
            b".",
            b"\r\n.\r\n",
            b"\x00",
            b"\xff\xfe",
            "ü".encode(),
            b"*",
            b"=",
            b"QUFB",
            b" SIZE=99999999999999999999",
            b"BDAT 4 LAST\r\n",
            b"BDAT 99999999999999\r\n",
            b"MAIL FROM:<a@[IPv6:::1]> SMTPUTF8\r\n",
            b"RCPT TO:<Postmaster>\r\n",
            b"X" * 600,
        ]
        + [line + b"\r\n" for line in PREFIX_LINES]
    ),
)
LIMITS = smtp.Limits(command_line=80, text_line=60, recipients=2, message_size=200, auth_line=90)


SCENARIOS = [
    b"",
    b"EHLO c.test\r\n",
    b"HELO c.test\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\n",
    b"EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n",
    b"EHLO c.test\r\nMAIL FROM:<> BODY=BINARYMIME\r\nRCPT TO:<b@example.org>\r\nBDAT 3\r\nabc",
    b"EHLO c.test\r\nAUTH LOGIN\r\n",
    b"EHLO c.test\r\nAUTH PLAIN\r\nAGEAYg==\r\n",
]


def answer(draw: Callable[[st.SearchStrategy[int]], int], event: smtp.Event) -> smtp.Reply:
    choice = draw(st.integers(0, 5))
    if choice == 0 and isinstance(event, smtp.Auth | smtp.AuthResponse):
        return smtp.Reply(334, "", "")
    if choice == 1:
        return smtp.Reply(451, "4.3.0", "later")
    if choice == 2:
        return smtp.Reply(550, "5.7.1", "no")
    return default_reply(event)


def drive(
    conn: smtp.Connection | None,
    pieces: list[bytes],
    choose: Callable[[smtp.Event], smtp.Reply],
) -> smtp.Connection | None:
    """Run a server over `pieces`: only RemoteProtocolError may come out of the core.
    Returns the connection to go on with (None once it is over)."""
    for piece in pieces:
        if conn is None:
            return None
        conn.receive_data(piece)
        conn = _serve(conn, choose)
    return conn


def _serve(
    conn: smtp.Connection, choose: Callable[[smtp.Event], smtp.Reply]
) -> smtp.Connection | None:
    while True:
        try:
            event = conn.next_event()
        except smtp.RemoteProtocolError as err:
            assert err.reply_hint is not None and err.reply_hint.code >= 400
            if err.fatal:
                return None
            conn.send(err.reply_hint)  # replying with the hint always works
            continue
        if event is smtp.NEED_DATA:
            return conn
        if isinstance(event, smtp.ConnectionClosed | smtp.Turned):
            return None
        if isinstance(event, smtp.BodyChunk):
            continue
        conn.send(choose(event))
        if conn.state is smtp.State.TLS_PENDING:
            try:
                conn = conn.start_tls()
            except smtp.RemoteProtocolError as err:
                assert err.fatal
                return None


@SETTINGS
@given(
    scenario=st.sampled_from(SCENARIOS),
    prefix=st.lists(st.sampled_from(PREFIX_LINES), max_size=4),
    noise=st.lists(FRAGMENTS, max_size=12),
    cuts=CUTS,
    data=st.data(),
)
def test_server_raises_only_remote_protocol_errors(
    scenario: bytes,
    prefix: list[bytes],
    noise: list[bytes],
    cuts: list[int],
    data: st.DataObject,
) -> None:
    conn: smtp.Connection | None = smtp.Connection(smtp.SERVER, LIMITS)
    assert conn is not None
    conn.send(smtp.Reply(220, "", "server.test"))
    conn = drive(conn, [scenario], default_reply)  # a state reached by well-behaved commands
    head = b"".join(line + b"\r\n" for line in prefix)
    conn = drive(conn, [head], lambda e: answer(data.draw, e))
    drive(conn, [*split(b"".join(noise), cuts), b""], lambda e: answer(data.draw, e))


REPLY_FRAGMENTS = st.one_of(
    st.binary(max_size=16),
    st.sampled_from(
        [b"250 2.0.0 ok\r\n", b"250-x\r\n", b"354 go\r\n", b"334 \r\n", b"421 bye\r\n", b"\r\n"]
    ),
)


@SETTINGS
@given(noise=st.lists(REPLY_FRAGMENTS, max_size=12), cuts=CUTS)
def test_client_raises_only_remote_protocol_errors(noise: list[bytes], cuts: list[int]) -> None:
    conn = smtp.Connection(smtp.CLIENT, LIMITS, state=smtp.State.READY)
    conn.peer_extensions = {"PIPELINING": ""}
    conn.send(SENDER)
    conn.send(RCPT)
    conn.send(smtp.Data())
    for piece in [*split(b"".join(noise), cuts), b""]:
        conn.receive_data(piece)
        try:
            event = conn.next_event()
            while event is not smtp.NEED_DATA:
                if isinstance(event, smtp.ConnectionClosed | smtp.Turned):
                    return
                event = conn.next_event()
        except smtp.RemoteProtocolError:
            return


# -- replies -------------------------------------------------------------------------------------

TEXT_LINE = st.text(alphabet="abcXYZ019 .,:;-_=<>@", max_size=30).filter(
    lambda t: not t[:1].isdigit() and not t.endswith(" ")
)


@st.composite
def replies(draw: st.DrawFn) -> smtp.Reply:
    code = draw(st.integers(200, 599))
    enhanced = ""
    if code // 100 != 3 and draw(st.booleans()):
        enhanced = f"{code // 100}.{draw(st.integers(0, 999))}.{draw(st.integers(0, 999))}"
    lines = draw(st.lists(TEXT_LINE, min_size=1, max_size=5))
    return smtp.Reply(code, enhanced, "\n".join(lines))


@SETTINGS
@given(reply=replies(), cuts=CUTS)
def test_any_reply_reaches_the_client_unchanged(reply: smtp.Reply, cuts: list[int]) -> None:
    conn = smtp.Connection(smtp.CLIENT, state=smtp.State.READY)
    conn.send(smtp.Noop())
    events = []
    for piece in split(reply.to_bytes(), cuts):
        conn.receive_data(piece)
        while (event := conn.next_event()) is not smtp.NEED_DATA:
            if isinstance(event, smtp.ConnectionClosed):  # after a 421 (RFC 5321 §3.8)
                break
            events.append(event)
    assert events == [reply]
    assert conn.answered == smtp.Noop()
    assert (conn.state is smtp.State.CLOSED) == (reply.code == 421)
