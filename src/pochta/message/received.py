"""The Received: trace header (RFC 5321 §4.4). Imports stdlib and `message.ids` only.

    Received: from client.example (host.example [192.0.2.1])
    \t(using TLS1.3 TLS_AES_256_GCM_SHA384) by mx.pochta.test (pochta)
    \twith ESMTPS id 1A2B3C for <user@pochta.test>;
    \tTue, 01 Jul 2025 12:00:00 +0000

Every value that came from the peer (HELO argument, reverse DNS name) is sanitised: no CR, LF
or other control characters, no parentheses, backslashes or semicolons (which would break the
comment or the date separator), length bounded, non-ASCII replaced by "?". Lines are folded
before column 78 (RFC 5322 §2.1.1; a tab counts as 8 columns) at clause boundaries.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from functools import lru_cache

from pochta.message.ids import format_date, format_now

_MAX_COLUMNS = 77  # RFC 5322 §2.1.1: lines SHOULD be no more than 78 characters
_TAB_WIDTH = 8
_MAX_TOKEN = 200
_MAX_HELO_COMMENT = 48  # keeps every line far below the 998-octet hard limit
_MAX_LITERAL = 64  # "[IPv6:" + 45 + "]" is 52; anything longer is no address literal
_UNSAFE = re.compile(r"[^\x21-\x7e]|[();\\]")
_NON_ATEXT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~-]")  # RFC 5322 §3.2.3 atext
_DOMAIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9_-]+)*\.?$")
# RFC 3848 / RFC 6531 §3.7.3 WITH protocol types
PROTOCOLS = frozenset(
    {
        "SMTP",
        "ESMTP",
        "ESMTPA",
        "ESMTPS",
        "ESMTPSA",
        "LMTP",
        "LMTPA",
        "LMTPS",
        "LMTPSA",
        "UTF8SMTP",
        "UTF8SMTPA",
        "UTF8SMTPS",
        "UTF8SMTPSA",
        "UTF8LMTP",
        "UTF8LMTPA",
        "UTF8LMTPS",
        "UTF8LMTPSA",
    }
)


def sanitize(text: str | None, *, limit: int = _MAX_TOKEN) -> str:
    """Peer-supplied text made safe for a header comment or clause (may return "")."""
    if not text:
        return ""
    if _UNSAFE.search(text) is None:  # the usual case: nothing to replace
        return text[:limit]
    return _UNSAFE.sub("?", text)[:limit]


@lru_cache(maxsize=1024)
def address_literal(ip: str) -> str:
    """RFC 5321 §4.1.3: "[192.0.2.1]" or "[IPv6:2001:db8::1]"."""
    try:
        parsed = ipaddress.ip_address(ip.strip().strip("[]"))
    except ValueError:
        return "[" + sanitize(ip, limit=64).strip("[]") + "]"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed}]"
    return f"[{parsed}]"


def received_header(
    *,
    from_helo: str,
    peer_ip: str,
    peer_host: str | None,
    by_host: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    tls: str | None,
    when: datetime | None = None,
) -> bytes:
    """One folded `Received:` field ending in CRLF (RFC 5321 §4.4 Stamp).

    `recipient` adds "for <addr>" (give it only for single-recipient transactions, to avoid
    disclosing Bcc recipients); `tls` adds a "(using ...)" comment; `protocol` is an RFC 3848 WITH
    keyword (ESMTPS, ESMTPSA, UTF8SMTPS, ...); `when` defaults to now.
    """
    done, current, width = _head(from_helo, peer_ip, peer_host, by_host, tls)
    proto = protocol.upper() if protocol.upper() in PROTOCOLS else "ESMTP"
    tokens = [f"with {proto}"]
    plain = queue_id.isascii() and queue_id.isalnum()  # ours always are
    clean_id = (queue_id if plain else _NON_ATEXT.sub("?", queue_id))[:64]
    if clean_id:
        tokens.append(f"id {clean_id}")  # RFC 5321 §4.4: ID = "ID" FWS ( Atom / msg-id )
    clean_rcpt = sanitize(recipient).strip("<>").replace(";", "?")
    if clean_rcpt:
        tokens.append(f"for <{clean_rcpt}>")
    tokens[-1] += ";"  # RFC 5321 §4.4: Stamp = ... [CFWS] ";" FWS date-time
    tokens.append(format_now() if when is None else format_date(when))
    done, current, _ = _fold_on(done, current, width, tokens)
    return (done + current).encode("ascii") + b"\r\n"


@lru_cache(maxsize=1024)  # one client's letters (and a relay's) share all of it
def _head(
    from_helo: str, peer_ip: str, peer_host: str | None, by_host: str, tls: str | None
) -> tuple[str, str, int]:
    """The folded clauses that depend on the connection alone, up to "(pochta)"."""
    tokens = [*_helo_comment(from_helo), _tcp_info(peer_ip, peer_host)]
    if tls:
        words = (sanitize(word, limit=80) for word in tls.split())
        tokens.append("(using " + " ".join(words)[:160] + ")")
    tokens += [_by_clause(by_host), "(pochta)"]
    first = "Received: from " + _from_domain(from_helo, peer_ip)
    return _fold_on("", first, _width(first), tokens)


@lru_cache(maxsize=256)  # our own hostname: the same every letter
def _by_clause(by_host: str) -> str:
    return f"by {sanitize(by_host) or 'localhost'}"


@lru_cache(maxsize=1024)  # clients say the same HELO letter after letter
def _helo_ok(helo: str) -> bool:
    if _DOMAIN.match(helo) and len(helo) <= 253:
        return True
    # An address literal is kept as sent only when every character of it is safe (a check of
    # just its start let a long literal carry non-ASCII or ")" and ";" into the header).
    return (
        helo.startswith("[")
        and helo.endswith("]")
        and len(helo) <= _MAX_LITERAL
        and not _UNSAFE.search(helo)
    )


def _from_domain(helo: str, peer_ip: str) -> str:
    """The HELO argument when it is a domain or an address literal, else the peer's literal."""
    helo = helo.strip()
    return helo if _helo_ok(helo) else address_literal(peer_ip)


def _helo_comment(helo: str) -> list[str]:
    """For a HELO that is no domain: its sanitised text in a comment, so nothing is lost."""
    helo = helo.strip()
    if not helo or _helo_ok(helo):
        return []
    return [f"(helo={sanitize(helo, limit=_MAX_HELO_COMMENT)})"]


def _tcp_info(peer_ip: str, peer_host: str | None) -> str:
    # RFC 5321 §4.4: TCP-info = address-literal / ( Domain FWS address-literal )
    host = sanitize(peer_host, limit=_MAX_TOKEN)
    literal = address_literal(peer_ip)
    return f"({host} {literal})" if host and _DOMAIN.match(host) else f"({literal})"


def _width(text: str) -> int:
    return len(text.expandtabs(_TAB_WIDTH))


def _fold_on(done: str, current: str, width: int, tokens: list[str]) -> tuple[str, str, int]:
    """Go on joining tokens to the line `current` (`width` columns; `done` holds the lines
    before it, each with its CRLF) with spaces, starting a new tab-indented line before one
    that would pass the column limit (RFC 5322 §2.2.3 folding). Tokens are never split."""
    for token in tokens:
        # Sanitised tokens hold no tab, so a token's width is its length (else measure it).
        extra = 1 + (len(token) if "\t" not in token else _width(f"{current} {token}") - width - 1)
        if width + extra > _MAX_COLUMNS and current.strip():
            done += current + "\r\n"
            current = "\t" + token
            width = _width(current)
        else:
            current = f"{current} {token}"
            width += extra
    return done, current, width
