"""Message helpers on raw bytes: header parsing, trace headers, ids and dates, DSNs.

Stdlib only (plus `store.api` records). Nothing here touches the network or the store.
"""

from pochta.message.dsn import FailedRecipient, build_dsn
from pochta.message.headers import (
    decode_header_value,
    get_header,
    has_header,
    is_8bit,
    iter_fields,
    needs_smtputf8,
    parse_summary,
    split_header_block,
)
from pochta.message.ids import format_date, make_message_id
from pochta.message.received import received_header

__all__ = [
    "FailedRecipient",
    "build_dsn",
    "decode_header_value",
    "format_date",
    "get_header",
    "has_header",
    "is_8bit",
    "iter_fields",
    "make_message_id",
    "needs_smtputf8",
    "parse_summary",
    "received_header",
    "split_header_block",
]
