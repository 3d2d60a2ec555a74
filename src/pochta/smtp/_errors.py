"""Protocol errors of the sans-IO SMTP core. Stdlib only (plus `_replies`)."""

from __future__ import annotations

from pochta.smtp._replies import Reply


class ProtocolError(Exception):
    """Base of the core's errors.

    Attributes:
        reply_hint: the reply a server should send for this error (None on the client side).
        fatal: the connection cannot continue; send the hint (if any) and close.
    """

    def __init__(self, message: str, reply_hint: Reply | None = None, *, fatal: bool = False):
        super().__init__(message)
        self.reply_hint = reply_hint
        self.fatal = fatal


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow.

    On the server side the connection stays usable unless `fatal`: the adapter sends
    `reply_hint` (which settles the offending command in the pipeline) and goes on.
    """
