"""Mailbox paths of MAIL FROM / RCPT TO (RFC 5321 §4.1.2, RFC 6531 §3.3). Stdlib only
(plus `pochta.value`).

    Reverse-path   = Path / "<>"
    Forward-path   = Path
    Path           = "<" [ A-d-l ":" ] Mailbox ">"
    Mailbox        = Local-part "@" ( Domain / address-literal )
    Local-part     = Dot-string / Quoted-string
    Dot-string     = Atom *("."  Atom)
    Quoted-string  = DQUOTE *QcontentSMTP DQUOTE
    Domain         = sub-domain *("." sub-domain)
    address-literal = "[" ( IPv4-address-literal / IPv6-address-literal /
                            General-address-literal ) "]"

RFC 6531 §3.3 extends atext, qtextSMTP and sub-domain with UTF8-non-ascii when SMTPUTF8 is used.
Source routes (A-d-l) are accepted and ignored (RFC 5321 §4.1.1.3, App. C).
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache
from typing import Final

from pochta.value import Value

# RFC 5321 §4.5.3.1.1-3
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256
MAX_LABEL = 63  # RFC 1035 §2.3.4

_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = r"\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"^[{_ATEXT}{_UTF8}]+(\.[{_ATEXT}{_UTF8}]+)*$")
_QUOTED = re.compile(rf'^"([\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"$')
_QUOTED_PAIR = re.compile(r"\\([\x20-\x7e])")
# sub-domain = Let-dig [Ldh-str]; U-labels allowed with SMTPUTF8 (RFC 6531 §3.3)
_LABEL = rf"[A-Za-z0-9{_UTF8}]([A-Za-z0-9{_UTF8}\-]*[A-Za-z0-9{_UTF8}])?"
_DOMAIN = re.compile(rf"^{_LABEL}(\.{_LABEL})*$")
_ADL = re.compile(rf"^@{_LABEL}(\.{_LABEL})*(,@{_LABEL}(\.{_LABEL})*)*:")


class AddressError(ValueError):
    """The text is not a valid path; `reason` is one of 'syntax', 'local', 'domain', 'path'."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Path(Value):
    """A mailbox path; the null reverse-path `<>` has empty local and domain."""

    __match_args__ = ("local", "domain")

    def __init__(self, local: str, domain: str) -> None:
        self.local: Final = local
        self.domain: Final = domain

    @property
    def is_null(self) -> bool:
        return not self.local and not self.domain

    @property
    def address(self) -> str:
        """`local@domain` ("" for the null path; `postmaster` alone for RFC 5321 §4.1.1.3)."""
        if self.is_null:
            return ""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_ascii(self) -> bool:
        return self.address.isascii()

    def __str__(self) -> str:
        return f"<{self.address}>"


NULL_PATH = Path("", "")


@lru_cache(maxsize=4096)  # the same few domains come in letter after letter
def valid_domain(domain: str) -> bool:
    """A Domain or an address-literal of RFC 5321 §4.1.2 / §4.1.3."""
    if domain.startswith("[") and domain.endswith("]"):
        return _valid_literal(domain[1:-1])
    if len(domain.encode("utf-8")) > MAX_DOMAIN or not _DOMAIN.match(domain):
        return False
    # RFC 1035 §2.3.4: a label is at most 63 octets (checked on ASCII labels; U-labels are
    # measured by their A-label form, which this module does not compute).
    return all(len(label) <= MAX_LABEL for label in domain.split(".") if label.isascii())


def _valid_literal(inner: str) -> bool:
    # RFC 5321 §4.1.3: IPv4, "IPv6:" + IPv6, or a General-address-literal (not accepted here).
    # ipaddress accepts an IPv6 zone id ("fe80::1%eth0"), which IPv6-addr does not allow.
    if not inner.isascii() or "%" in inner:
        return False
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


@lru_cache(maxsize=4096)  # Path is immutable; a bad path raises and is not cached
def parse_path(text: str, *, allow_null: bool = False, allow_bare_postmaster: bool = False) -> Path:
    """Parse `<...>` (the angle brackets included).

    Raises:
        AddressError: with reason 'syntax', 'local', 'domain' or 'path' (too long).
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("syntax")
    inner = text[1:-1]
    if not inner:
        if allow_null:
            return NULL_PATH
        raise AddressError("syntax")
    if len(inner.encode("utf-8")) > MAX_PATH - 2:  # octets, the brackets included
        raise AddressError("path")
    if inner.startswith("@"):
        m = _ADL.match(inner)
        if not m:
            raise AddressError("syntax")
        inner = inner[m.end() :]
    if allow_bare_postmaster and inner.lower() == "postmaster":
        return Path("postmaster", "")
    local, at, domain = inner.rpartition("@")
    if not at or not local or not domain:
        raise AddressError("syntax")
    _check_local(local)
    if not valid_domain(domain):
        raise AddressError("domain" if len(domain) > MAX_DOMAIN else "syntax")
    return Path(unquote_local(local), domain.lower())


def unquote_local(local: str) -> str:
    """A quoted local part whose content is a valid Dot-string names the same mailbox as that
    Dot-string (RFC 5321 §4.1.2: `"alice"` and `alice`, `"al\\ice"` too): return the Dot-string
    form; any other local part unchanged."""
    if not local.startswith('"'):
        return local
    content = _QUOTED_PAIR.sub(r"\1", local[1:-1])  # RFC 5321 §4.1.2 quoted-pairSMTP
    return content if _DOT_STRING.match(content) else local


def _check_local(local: str) -> None:
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local")
    if local.startswith('"'):
        if not _QUOTED.match(local):
            raise AddressError("syntax")
    elif not _DOT_STRING.match(local):
        raise AddressError("syntax")
