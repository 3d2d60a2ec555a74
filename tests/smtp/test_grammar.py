"""Command grammar: paths (RFC 5321 §4.1.2, RFC 6531), ESMTP parameters, verbs."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.smtp import replies as R
from pochta.testing.pair import ConnectionPair, hints

# -- paths ---------------------------------------------------------------------------------------

VALID_PATHS = [
    ("<user@example.org>", "user", "example.org"),
    ("<User.Name+tag@Example.ORG>", "User.Name+tag", "example.org"),
    ("<!#$%&'*+-/=?^_`{|}~@x.example>", "!#$%&'*+-/=?^_`{|}~", "x.example"),
    ('<"john doe"@example.org>', '"john doe"', "example.org"),
    ('<"a@b"@example.org>', '"a@b"', "example.org"),
    ('<"quoted \\" pair"@example.org>', '"quoted \\" pair"', "example.org"),
    ("<u@[127.0.0.1]>", "u", "[127.0.0.1]"),
    ("<u@[IPv6:::1]>", "u", "[ipv6:::1]"),
    ("<u@[IPv6:2001:db8::1]>", "u", "[ipv6:2001:db8::1]"),
    # RFC 5321 §4.1.1.3 / App. C: source routes are accepted and ignored
    ("<@relay.example:user@example.org>", "user", "example.org"),
    ("<@a.example,@b.example:user@example.org>", "user", "example.org"),
    ("<a-b.c-d@sub-1.example-2.org>", "a-b.c-d", "sub-1.example-2.org"),
]

INVALID_PATHS = [
    "user@example.org",  # no brackets
    "<user@example.org",
    "<>",  # not a forward-path
    "<user>",
    "<@example.org>",
    "<user@>",
    "<.user@example.org>",
    "<user.@example.org>",
    "<us..er@example.org>",
    "<us er@example.org>",
    '<"unterminated@example.org>',
    "<user@-example.org>",
    "<user@example-.org>",
    "<user@exa_mple.org>",
    "<user@[300.0.0.1]>",
    "<user@[IPv6:::g]>",
    "<user@[IPv6:fe80::1%eth0]>",  # no zone ids in address literals
    "<user@[tag:general]>",  # General-address-literal: not accepted
    "<@relay:user@example.org",
    "<@relay user@example.org>",
]


@pytest.mark.parametrize(("text", "local", "domain"), VALID_PATHS)
def test_valid_path_parses(text: str, local: str, domain: str) -> None:
    path = smtp.parse_path(text)
    assert (path.local, path.domain) == (local, domain)


@pytest.mark.parametrize("text", INVALID_PATHS)
def test_invalid_path_raises_address_error(text: str) -> None:
    with pytest.raises(smtp.AddressError):
        smtp.parse_path(text)


def test_null_reverse_path_only_where_allowed() -> None:
    assert smtp.parse_path("<>", allow_null=True) is smtp.NULL_PATH
    assert smtp.NULL_PATH.is_null and smtp.NULL_PATH.address == ""
    with pytest.raises(smtp.AddressError):
        smtp.parse_path("<>")


def test_bare_postmaster_only_where_allowed() -> None:
    path = smtp.parse_path("<Postmaster>", allow_bare_postmaster=True)
    assert path.address == "postmaster" and str(path) == "<postmaster>"
    with pytest.raises(smtp.AddressError):
        smtp.parse_path("<postmaster>")


# RFC 5321 §4.5.3.1.1-3: 64 octets of local part, 255 of domain, 256 of path (brackets included)
def test_local_part_of_64_octets_is_accepted_65_is_not() -> None:
    assert smtp.parse_path(f"<{'a' * 64}@example.org>").local == "a" * 64
    with pytest.raises(smtp.AddressError) as info:
        smtp.parse_path(f"<{'a' * 65}@example.org>")
    assert info.value.reason == "local"


def test_local_part_limit_counts_utf8_octets() -> None:
    with pytest.raises(smtp.AddressError) as info:
        smtp.parse_path(f"<{'ü' * 33}@example.org>")  # 66 octets, 33 characters
    assert info.value.reason == "local"


def _domain(length: int) -> str:
    labels = ["a" * 63] * (length // 64)
    rest = length - 64 * len(labels)
    if rest > 0:
        labels.append("b" * rest)
    name = ".".join(labels)
    assert len(name) == length, len(name)
    return name


def test_domain_of_255_octets_is_valid_256_is_not() -> None:
    assert smtp.valid_domain(_domain(255))
    assert not smtp.valid_domain(_domain(255) + "c")


def test_domain_label_over_63_octets_is_invalid() -> None:  # RFC 1035 §2.3.4
    assert smtp.valid_domain("a" * 63 + ".example")
    assert not smtp.valid_domain("a" * 64 + ".example")


def test_path_of_256_octets_is_accepted_257_is_not() -> None:
    domain = _domain(256 - 2 - 1 - 10)
    assert len(f"<{'l' * 10}@{domain}>") == 256
    assert smtp.parse_path(f"<{'l' * 10}@{domain}>").local == "l" * 10
    with pytest.raises(smtp.AddressError) as info:
        smtp.parse_path(f"<{'l' * 11}@{domain}>")
    assert info.value.reason == "path"


def test_overlong_path_in_rcpt_is_501_5_1_3(pair: ConnectionPair) -> None:
    pair.client_send(smtp.MailFrom(smtp.path_of("a@example.org")))
    pair.server_send(R.SENDER_OK)
    items = pair.feed_server(f"RCPT TO:<a@{_domain(260)}>\r\n".encode())
    assert hints(items) == [R.PATH_TOO_LONG]
    pair.answer_hint(items[0])
    items = pair.feed_server(f"RCPT TO:<{'a' * 65}@example.org>\r\n".encode())
    assert hints(items) == [R.LOCAL_PART_TOO_LONG]


# -- UTF-8 addresses (RFC 6531) -----------------------------------------------------------------


def test_utf8_sender_with_smtputf8_is_accepted(pair: ConnectionPair) -> None:
    items = pair.feed_server("MAIL FROM:<jürgen@bücher.example> SMTPUTF8\r\n".encode())
    assert items == [smtp.MailFrom(smtp.Path("jürgen", "bücher.example"), {"SMTPUTF8": None})]
    assert isinstance(items[0], smtp.MailFrom) and items[0].smtputf8


def test_utf8_sender_without_smtputf8_is_553_5_6_7(pair: ConnectionPair) -> None:
    items = pair.feed_server("MAIL FROM:<jürgen@example.org>\r\n".encode())
    assert hints(items) == [R.NON_ASCII_ADDRESS]
    assert (hints(items)[0].code, hints(items)[0].enhanced) == (553, "5.6.7")


def test_utf8_recipient_without_smtputf8_is_553_5_6_7(pair: ConnectionPair) -> None:
    pair.client_send(smtp.MailFrom(smtp.path_of("a@example.org")))
    pair.server_send(R.SENDER_OK)
    items = pair.feed_server("RCPT TO:<jürgen@example.org>\r\n".encode())
    assert hints(items) == [R.NON_ASCII_ADDRESS]
    pair.answer_hint(items[0])
    assert pair.server.state is smtp.State.MAIL


def test_utf8_recipient_in_smtputf8_transaction_is_accepted(pair: ConnectionPair) -> None:
    pair.feed_server(b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    pair.server_send(R.SENDER_OK)
    items = pair.feed_server("RCPT TO:<jürgen@bücher.example>\r\n".encode())
    assert items == [smtp.RcptTo(smtp.Path("jürgen", "bücher.example"))]


def test_smtputf8_not_advertised_is_555() -> None:
    pair = ConnectionPair.ready(extensions=smtp.ALL_EXTENSIONS - {"SMTPUTF8"})
    assert hints(pair.feed_server(b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")) == [
        R.PARAMETER_NO_EXT
    ]


# -- MAIL / RCPT commands and ESMTP parameters --------------------------------------------------


def test_mail_from_null_path_is_accepted(pair: ConnectionPair) -> None:
    assert pair.feed_server(b"MAIL FROM:<>\r\n") == [smtp.MailFrom(smtp.NULL_PATH)]


def test_rcpt_to_bare_postmaster_is_accepted(pair: ConnectionPair) -> None:  # RFC 5321 §4.1.1.3
    pair.feed_server(b"MAIL FROM:<>\r\n")
    pair.server_send(R.SENDER_OK)
    assert pair.feed_server(b"RCPT TO:<Postmaster>\r\n") == [
        smtp.RcptTo(smtp.Path("postmaster", ""))
    ]


def test_mail_from_bare_postmaster_is_501(pair: ConnectionPair) -> None:
    assert hints(pair.feed_server(b"MAIL FROM:<postmaster>\r\n")) == [R.BAD_SENDER_ADDRESS]


def test_rcpt_null_path_is_501_5_1_3(pair: ConnectionPair) -> None:
    pair.feed_server(b"MAIL FROM:<>\r\n")
    pair.server_send(R.SENDER_OK)
    assert hints(pair.feed_server(b"RCPT TO:<>\r\n")) == [R.BAD_ADDRESS]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("SIZE=1000", {"SIZE": "1000"}),
        ("size=0", {"SIZE": "0"}),
        ("BODY=7BIT", {"BODY": "7BIT"}),
        ("BODY=8BITMIME", {"BODY": "8BITMIME"}),
        ("body=binarymime", {"BODY": "binarymime"}),
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("AUTH=<>", {"AUTH": "<>"}),
        ("AUTH=user+40example.org", {"AUTH": "user+40example.org"}),
        ("SIZE=10 BODY=8BITMIME SMTPUTF8", {"SIZE": "10", "BODY": "8BITMIME", "SMTPUTF8": None}),
    ],
)
def test_mail_parameters_are_parsed(
    pair: ConnectionPair, params: str, expected: dict[str, str | None]
) -> None:
    items = pair.feed_server(f"MAIL FROM:<a@example.org> {params}\r\n".encode())
    assert items == [smtp.MailFrom(smtp.path_of("a@example.org"), expected)]


def test_mail_parameter_accessors() -> None:
    mail = smtp.MailFrom(smtp.NULL_PATH, {"SIZE": "42", "BODY": "8bitmime"})
    assert (mail.size, mail.body, mail.smtputf8) == (42, "8BITMIME", False)
    assert (smtp.MailFrom(smtp.NULL_PATH).size, smtp.MailFrom(smtp.NULL_PATH).body) == (
        None,
        "7BIT",
    )


@pytest.mark.parametrize(
    ("params", "reply"),
    [
        ("FOO=bar", R.UNKNOWN_PARAMETER),  # RFC 5321 §4.1.1.11: 555 5.5.4
        ("RET=HDRS", R.UNKNOWN_PARAMETER),
        ("SIZE", R.SYNTAX_ERROR),
        ("SIZE=-1", R.SYNTAX_ERROR),
        ("SIZE=12x", R.SYNTAX_ERROR),
        ("BODY=9BIT", R.SYNTAX_ERROR),
        ("BODY", R.SYNTAX_ERROR),
        ("SMTPUTF8=yes", R.SYNTAX_ERROR),
        ("AUTH", R.SYNTAX_ERROR),
        ("AUTH=a+zz", R.SYNTAX_ERROR),  # bad xtext (RFC 3461 §4)
        ("SIZE=1 SIZE=2", R.SYNTAX_ERROR),
        ("=x", R.SYNTAX_ERROR),
    ],
)
def test_bad_mail_parameter_is_rejected(
    pair: ConnectionPair, params: str, reply: smtp.Reply
) -> None:
    assert hints(pair.feed_server(f"MAIL FROM:<a@example.org> {params}\r\n".encode())) == [reply]
    assert pair.server.state is smtp.State.READY


def test_unknown_rcpt_parameter_is_555_5_5_4(pair: ConnectionPair) -> None:
    pair.feed_server(b"MAIL FROM:<>\r\n")
    pair.server_send(R.SENDER_OK)
    reply = hints(pair.feed_server(b"RCPT TO:<b@example.org> NOTIFY=NEVER\r\n"))
    assert [(r.code, r.enhanced) for r in reply] == [(555, "5.5.4")]


def test_size_not_advertised_is_555() -> None:
    pair = ConnectionPair.ready(extensions=frozenset({"PIPELINING"}))
    assert hints(pair.feed_server(b"MAIL FROM:<> SIZE=10\r\n")) == [R.PARAMETER_NO_EXT]


@pytest.mark.parametrize("body", ["8BITMIME", "BINARYMIME"])
def test_body_type_not_advertised_is_555(body: str) -> None:
    pair = ConnectionPair.ready(extensions=frozenset({"PIPELINING"}))
    assert hints(pair.feed_server(f"MAIL FROM:<> BODY={body}\r\n".encode())) == [R.PARAMETER_NO_EXT]


def test_mail_parameters_after_helo_are_555() -> None:  # RFC 5321 §4.1.1.11: ESMTP only
    pair = ConnectionPair()
    pair.greet()
    pair.client_send(smtp.Helo("client.test"))
    pair.server_send(smtp.Reply(250, "", "server.test"))
    assert hints(pair.feed_server(b"MAIL FROM:<a@example.org> SIZE=10\r\n")) == [R.PARAMETER_NO_EXT]


@pytest.mark.parametrize(
    "line",
    [
        "MAIL FROM <a@example.org>",
        "MAIL TO:<a@example.org>",
        "MAIL FROM:a@example.org",
        "MAIL FROM:<a@example.org",
        "MAIL",
    ],
)
def test_malformed_mail_is_501(pair: ConnectionPair, line: str) -> None:
    [reply] = hints(pair.feed_server(line.encode() + b"\r\n"))
    assert reply.code == 501 and reply.enhanced.startswith("5.")


def test_space_after_colon_is_tolerated(pair: ConnectionPair) -> None:
    assert pair.feed_server(b"MAIL FROM: <a@example.org>\r\n") == [
        smtp.MailFrom(smtp.path_of("a@example.org"))
    ]


# -- verbs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        ("noop", smtp.Noop()),
        ("NoOp hello", smtp.Noop("hello")),
        ("rset", smtp.Rset()),
        ("help", smtp.Help()),
        ("HELP mail", smtp.Help("mail")),
        ("vrfy someone", smtp.Vrfy("someone")),
        ("eXpN list", smtp.Expn("list")),
        ("mail from:<a@example.org>", smtp.MailFrom(smtp.path_of("a@example.org"))),
        ("ehlo client.test", smtp.Ehlo("client.test")),
        ("quit", smtp.Quit()),
        ("etrn example.org", smtp.Etrn("example.org")),
        ("Auth plain", smtp.Auth("PLAIN")),
        ("AUTH PLAIN =", smtp.Auth("PLAIN", b"")),
        ("AUTH PLAIN AGFsaWNlAHNlY3JldA==", smtp.Auth("PLAIN", b"\x00alice\x00secret")),
    ],
)
def test_verbs_are_case_insensitive(pair: ConnectionPair, line: str, event: smtp.Event) -> None:
    assert pair.feed_server(line.encode() + b"\r\n") == [event]


@pytest.mark.parametrize("line", ["FOO", "MAILFROM:<a@b.c>", "", " NOOP", "HELLO x", "DATAX"])
def test_unknown_verb_is_500_5_5_1(pair: ConnectionPair, line: str) -> None:
    assert hints(pair.feed_server(line.encode() + b"\r\n")) == [R.UNRECOGNIZED]


@pytest.mark.parametrize("line", ["ſtarttls", "maıl FROM:<a@example.org>", "ＮＯＯＰ"])
def test_non_ascii_lookalike_verb_is_500_5_5_1(pair: ConnectionPair, line: str) -> None:
    # str.upper() maps "ſ" to "S" and "ı" to "I": the verb must be ASCII before case folding.
    assert hints(pair.feed_server(line.encode() + b"\r\n")) == [R.UNRECOGNIZED]


@pytest.mark.parametrize(
    "line",
    ["QUIT now", "RSET x", "DATA x", "STARTTLS x", "VRFY", "EXPN ", "EHLO", "HELO  ", "ETRN"],
)
def test_wrong_arguments_are_501(pair: ConnectionPair, line: str) -> None:
    [reply] = hints(pair.feed_server(line.encode() + b"\r\n"))
    assert reply.code == 501


def test_atrn_domains_are_split_and_lowercased(pair: ConnectionPair) -> None:
    assert pair.feed_server(b"ATRN Example.org,b.example\r\n") == [
        smtp.Atrn(("example.org", "b.example"))
    ]


def test_commands_format_and_parse_back() -> None:
    commands: list[smtp.Command] = [
        smtp.Ehlo("c.test"),
        smtp.Helo("c.test"),
        smtp.MailFrom(smtp.path_of("a@example.org"), {"SIZE": "5", "BODY": "8BITMIME"}),
        smtp.RcptTo(smtp.Path('"x y"', "example.org")),
        smtp.RcptTo(smtp.Path("postmaster", "")),
        smtp.Noop(),
        smtp.Help("x"),
        smtp.Vrfy("a"),
        smtp.Expn("b"),
        smtp.Etrn("@example.org"),
        smtp.Atrn(("a.example", "b.example")),
        smtp.Auth("PLAIN", b"\x00u\x00p"),
        smtp.Auth("LOGIN", b""),
        smtp.Auth("LOGIN"),
    ]
    for cmd in commands:
        pair = ConnectionPair.ready()
        if isinstance(cmd, smtp.RcptTo):
            pair.client_send(smtp.MailFrom(smtp.NULL_PATH))
            pair.server_send(R.SENDER_OK)
        assert pair.client_send(cmd) == [cmd]


def test_base64_helpers() -> None:
    assert smtp.encode_base64(b"") == "="
    assert smtp.decode_base64("=") == b""
    assert smtp.decode_base64(smtp.encode_base64(b"\x00\xffabc")) == b"\x00\xffabc"
    with pytest.raises(smtp.RemoteProtocolError) as info:
        smtp.decode_base64("not base64!")
    assert info.value.reply_hint == R.AUTH_BAD_BASE64


def test_path_of_builds_paths() -> None:
    assert smtp.path_of("") == smtp.NULL_PATH
    assert smtp.path_of("User@Example.ORG") == smtp.Path("User", "example.org")
    assert smtp.path_of("postmaster") == smtp.Path("postmaster", "")


# RFC 5321 §4.1.2: a Quoted-string local part whose content is a valid Dot-string is the same
# mailbox as that Dot-string; the Path carries the Dot-string form.
@pytest.mark.parametrize(
    ("text", "local"),
    [
        ('<"alice"@mail.test>', "alice"),
        ('<"Alice.Smith"@mail.test>', "Alice.Smith"),
        ('<"al\\ice"@mail.test>', "alice"),  # quoted-pairSMTP: \i is i
        ('<"a+tag"@mail.test>', "a+tag"),
        ('<"john doe"@mail.test>', '"john doe"'),  # a space: only the quoted form is valid
        ('<"a..b"@mail.test>', '"a..b"'),
        ('<".a"@mail.test>', '".a"'),
        ('<"a@b"@mail.test>', '"a@b"'),
        ('<""@mail.test>', '""'),
    ],
)
def test_quoted_dot_string_local_part_is_unquoted(text: str, local: str) -> None:
    assert smtp.parse_path(text).local == local


def test_rcpt_with_a_quoted_local_part_names_the_plain_mailbox(pair: ConnectionPair) -> None:
    pair.client_send(smtp.MailFrom(smtp.path_of("a@example.org")))
    pair.server_send(R.SENDER_OK)
    items = pair.feed_server(b'RCPT TO:<"alice"@Mail.Test>\r\n')
    assert items == [smtp.RcptTo(smtp.Path("alice", "mail.test"), {})]
    assert str(items[0].path) == "<alice@mail.test>"


def test_mail_from_with_a_quoted_local_part(pair: ConnectionPair) -> None:
    items = pair.feed_server(b'MAIL FROM:<"bob"@example.org> SIZE=10\r\n')
    assert items == [smtp.MailFrom(smtp.Path("bob", "example.org"), {"SIZE": "10"})]
