"""SASLprep (RFC 4013), the stringprep profile for user names and passwords. Imports stdlib only.

SCRAM (RFC 5802 §2.2) derives its keys from the SASLprep'd password, and PLAIN (RFC 4616 §2)
compares prepared strings, so every password goes through `saslprep` before it is hashed.
"""

from __future__ import annotations

import stringprep
import unicodedata

_PROHIBITED = (
    stringprep.in_table_c12,  # non-ASCII space characters      RFC 4013 §2.3
    stringprep.in_table_c21_c22,  # ASCII and non-ASCII control characters
    stringprep.in_table_c3,  # private use
    stringprep.in_table_c4,  # non-character code points
    stringprep.in_table_c5,  # surrogate codes
    stringprep.in_table_c6,  # inappropriate for plain text
    stringprep.in_table_c7,  # inappropriate for canonical representation
    stringprep.in_table_c8,  # change display properties / deprecated
    stringprep.in_table_c9,  # tagging characters
)


def _map(text: str) -> str:
    # RFC 4013 §2.1: non-ASCII spaces map to SPACE; "commonly mapped to nothing" (B.1) vanish.
    return "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in text if not stringprep.in_table_b1(ch)
    )


def _check_bidi(text: str) -> None:
    # RFC 3454 §6 (required by RFC 4013 §2.4)
    has_ral = any(stringprep.in_table_d1(ch) for ch in text)
    if not has_ral:
        return
    if any(stringprep.in_table_d2(ch) for ch in text):
        raise ValueError("SASLprep: mixed right-to-left and left-to-right text")
    if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
        raise ValueError("SASLprep: right-to-left text must start and end with RandALCat")


def saslprep(text: str, *, allow_unassigned: bool = True) -> str:
    """Prepare `text` per RFC 4013; raises ValueError for prohibited characters.

    `allow_unassigned=True` is the "query" profile (RFC 3454 §7) used when verifying; pass False
    for "stored strings", i.e. when a password is being set.
    """
    prepared = unicodedata.normalize("NFKC", _map(text))  # RFC 4013 §2.2
    for ch in prepared:
        if any(table(ch) for table in _PROHIBITED):
            raise ValueError(f"SASLprep: prohibited character U+{ord(ch):04X}")
        if not allow_unassigned and stringprep.in_table_a1(ch):  # RFC 4013 §2.5
            raise ValueError(f"SASLprep: unassigned code point U+{ord(ch):04X}")
    if prepared:
        _check_bidi(prepared)
    return prepared
