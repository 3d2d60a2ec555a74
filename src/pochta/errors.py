"""The application error tree. Stdlib only (plus the SMTP core's protocol errors).

    MailError
     ├── PolicyReject          a policy said no; carries the SMTP reply to send
     ├── DeliveryError         an outbound attempt failed; carries permanent/transient
     ├── StoreError
     │    ├── StoreUnavailable  busy, locked, connection lost -> 451 4.3.0
     │    ├── NotFound
     │    └── Conflict
     ├── ConfigError           a configuration file or value is wrong
     └── UsageError            a CLI invocation is wrong
The SMTP core's ProtocolError (Local/Remote) lives in pochta.smtp and is not a MailError: it is
raised by the sans-IO core, which imports nothing of the application.
"""

from __future__ import annotations


class MailError(Exception):
    """Base of every application error."""


class StoreError(MailError):
    """Base of the store's errors; backends translate driver exceptions into these."""


class StoreUnavailable(StoreError):
    """The store is busy, locked or unreachable; the caller should answer 451 4.3.0 and retry."""


class NotFound(StoreError):
    """The named domain, user, mailbox, message or queue entry does not exist."""


class Conflict(StoreError):
    """The object already exists, or the change would break an invariant."""


class ConfigError(MailError):
    """The configuration file or one of its values is invalid."""


class UsageError(MailError):
    """A command-line invocation is invalid."""


class DeliveryError(MailError):
    """An outbound delivery attempt failed.

    Attributes:
        permanent: True for a 5xx-class failure (bounce), False for a transient one (retry).
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent
