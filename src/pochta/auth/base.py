"""What every SASL mechanism shares: the outcomes of a step, the server base class, the errors.

Imports stdlib, `pochta.errors` and `pochta.store.api`. Public names are re-exported by
`pochta.auth.sasl`; import them from there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pochta.errors import MailError
from pochta.store.api import User

Lookup = Callable[[str], Awaitable[User | None]]
"""Finds a user by normalized address; may raise StoreUnavailable (answer 454 4.7.0)."""

INVALID_CREDENTIALS = "invalid credentials"  # one reason for unknown user and wrong password


class AuthError(MailError):
    """Base of the authentication errors."""


class UnknownMechanism(AuthError):
    """The client asked for a SASL mechanism we do not offer (RFC 4954 §4: 504 5.5.4)."""


class ScramError(AuthError):
    """The SCRAM server's messages are malformed or its signature does not match (client side)."""


@dataclass(frozen=True)
class Challenge:
    """Send `data` as a 334 challenge (RFC 4954 §4) and call `step` with the client's answer."""

    data: bytes


@dataclass(frozen=True)
class Success:
    """The client is authenticated as `user` (235 2.7.0).

    `data` is final server data (SCRAM's `v=...`). We chose to send it as a 334 challenge: the
    SMTP server sends `334 base64(data)`, waits for the client's (empty) response, then answers
    235 2.7.0 (RFC 4422 §5 for protocols that may not carry additional data with success).
    """

    user: User
    data: bytes | None = None


@dataclass(frozen=True)
class Failure:
    """Authentication failed. `reason` is for the log, not for the client: answer 535 5.7.8, or
    501 5.5.2 when `malformed` (the client broke the mechanism's syntax)."""

    reason: str
    malformed: bool = False


Result = Challenge | Success | Failure


class SaslServer(ABC):
    """One server side of one AUTH exchange. `step(None)` starts it without an initial response.

    `username` is the normalized authentication identity the client claimed (None before it did),
    for logging failures. Once `step` returned Success or Failure, further steps fail (malformed).
    """

    mechanism: str = ""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup
        self._finished = False
        self.username: str | None = None

    async def step(self, response: bytes | None) -> Result:
        if self._finished:
            return Failure("exchange already finished", malformed=True)
        result = await self._step(response)
        if not isinstance(result, Challenge):
            self._finished = True
        return result

    @abstractmethod
    async def _step(self, response: bytes | None) -> Result: ...
