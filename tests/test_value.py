"""pochta.value.Value: the records made for every letter behave as the frozen dataclasses they
replaced (equality, hash, repr, match patterns), compiled or from source."""

from __future__ import annotations

import pytest

from pochta import smtp
from pochta.store.api import Accepted, Summary, Target


def test_equality_is_by_class_and_fields() -> None:
    assert smtp.Ehlo("mx.test") == smtp.Ehlo("mx.test")
    assert smtp.Ehlo("mx.test") != smtp.Ehlo("other.test")
    assert smtp.Ehlo("mx.test") != smtp.Helo("mx.test")  # same field, other class
    assert smtp.Data() == smtp.Data() and smtp.Data() != smtp.Quit()
    assert Target("a@mx.test") == Target("a@mx.test", "INBOX", None)
    assert Target("a@mx.test") != Target("a@mx.test", "Sent")
    assert smtp.Path("a", "mx.test") != "a@mx.test"


def test_hash_follows_the_fields() -> None:
    assert len({smtp.Path("a", "mx.test"), smtp.Path("a", "mx.test"), smtp.NULL_PATH}) == 2
    assert hash(Accepted((1, 2), None)) == hash(Accepted((1, 2), None))
    assert {Summary(subject="hi"): 1}[Summary(subject="hi")] == 1
    with pytest.raises(TypeError):  # a dict field, as with a frozen dataclass
        hash(smtp.MailFrom(smtp.Path("a", "mx.test"), {"SIZE": "10"}))


def test_repr_and_defaults() -> None:
    assert repr(smtp.Ehlo("mx.test")) == "Ehlo(domain='mx.test')"
    assert repr(Target("a@mx.test")) == (
        "Target(address='a@mx.test', folder='INBOX', return_path=None)"
    )
    mail = smtp.MailFrom(smtp.Path("a", "mx.test"))
    assert mail.params == {} and mail.size is None
    assert smtp.MailFrom(smtp.NULL_PATH).params is not mail.params  # no shared default


def test_positional_match_patterns() -> None:
    event: object = smtp.RcptTo(smtp.Path("b", "mx.test"), {})
    match event:
        case smtp.RcptTo(smtp.Path(local, domain)):
            assert (local, domain) == ("b", "mx.test")
        case _:
            pytest.fail("RcptTo did not match positionally")
    match smtp.Bdat(10, True):
        case smtp.Bdat(size, last):
            assert (size, last) == (10, True)


def test_replies_compare_hash_and_keep_their_wire_form() -> None:
    reply = smtp.Reply(250, "2.0.0", "OK")
    assert reply == smtp.replies.OK and hash(reply) == hash(smtp.replies.OK)
    assert reply.to_bytes() == b"250 2.0.0 OK\r\n"
    assert reply.to_bytes() is reply.to_bytes()
    assert smtp.Reply(250, "", "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"
    assert smtp.Reply(354).to_bytes() == b"354\r\n"
