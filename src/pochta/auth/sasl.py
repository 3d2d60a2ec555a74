"""SASL server exchanges for SMTP AUTH (RFC 4954): PLAIN, LOGIN and SCRAM-SHA-256.

Imports stdlib, `pochta.store.api` and the `pochta.auth` modules (base, passwords, scram).

Sans-IO: the SMTP server base64-decodes each client line and hands the raw bytes to
`SaslServer.step`; it base64-encodes `Challenge.data` into a 334 reply. Usage:

    server = start(mechanism, lookup)          # UnknownMechanism -> 504 5.5.4
    result = await server.step(initial_response_or_None)
    while isinstance(result, Challenge):
        result = await server.step(await read_client_line())
    # Success -> 235 2.7.0 (after sending Success.data as a 334 challenge, if any);
    # Failure -> 535 5.7.8, or 501 5.5.2 when malformed.

`lookup` may raise StoreUnavailable; it propagates (answer 454 4.7.0). Passwords are never logged
or kept beyond the step that checks them.
"""

from __future__ import annotations

import secrets

from pochta.auth.base import (
    INVALID_CREDENTIALS,
    AuthError,
    Challenge,
    Failure,
    Lookup,
    Result,
    SaslServer,
    ScramError,
    Success,
    UnknownMechanism,
)
from pochta.auth.passwords import burn_time_async, verify_password_async
from pochta.auth.scram import ScramClient, ScramServer
from pochta.store.api import normalize_address

__all__ = [
    "MECHANISMS",
    "AuthError",
    "Challenge",
    "Failure",
    "LoginServer",
    "Lookup",
    "PlainServer",
    "Result",
    "SaslServer",
    "ScramClient",
    "ScramError",
    "ScramServer",
    "Success",
    "UnknownMechanism",
    "start",
]

MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")

_MAX_FIELD = 255  # RFC 4616 §2: authcid and passwd are 1 to 255 octets

# Fallback secret for SCRAM's fake salts (unknown users). It changes on restart and differs
# between nodes: deployments pass a persistent configured secret to `start` instead.
_PROCESS_SECRET = secrets.token_bytes(32)


def start(mechanism: str, lookup: Lookup, *, secret: bytes | None = None) -> SaslServer:
    """A server for one AUTH attempt with `mechanism` (case-insensitive, RFC 4422 §3.1).

    `secret` keys SCRAM's fake salts for unknown users; give every node the same one.
    """
    name = mechanism.upper()
    if name == "PLAIN":
        return PlainServer(lookup)
    if name == "LOGIN":
        return LoginServer(lookup)
    if name == "SCRAM-SHA-256":
        return ScramServer(lookup, secret or _PROCESS_SECRET)
    raise UnknownMechanism(mechanism)


def _field(data: bytes, what: str) -> str | Failure:
    """A UTF-8 field of 1..255 octets without NUL/CR/LF, or a malformed Failure."""
    if not data:
        return Failure(f"empty {what}", malformed=True)
    if len(data) > _MAX_FIELD:
        return Failure(f"{what} too long", malformed=True)
    if any(b in data for b in (0, 10, 13)):
        return Failure(f"control character in {what}", malformed=True)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Failure(f"{what} is not UTF-8", malformed=True)


async def _check_password(lookup: Lookup, address: str, password: str) -> Result:
    """Look the user up and check the password; the same work whether the user exists or not."""
    user = await lookup(address)
    if user is None:
        await burn_time_async(password)
        return Failure(INVALID_CREDENTIALS)
    if not await verify_password_async(user.password_hash, password):
        return Failure(INVALID_CREDENTIALS)
    return Success(user)


class PlainServer(SaslServer):
    """PLAIN (RFC 4616): one message `[authzid] NUL authcid NUL passwd`."""

    mechanism = "PLAIN"

    def __init__(self, lookup: Lookup) -> None:
        super().__init__(lookup)
        self._challenged = False

    async def _step(self, response: bytes | None) -> Result:
        if response is None:
            if self._challenged:
                return Failure("PLAIN: missing response", malformed=True)
            self._challenged = True
            return Challenge(b"")  # RFC 4954 §4: "334 " and wait for the message
        parts = response.split(b"\0")
        if len(parts) != 3:  # RFC 4616 §2: exactly two NUL separators
            return Failure("PLAIN: expected authzid NUL authcid NUL passwd", malformed=True)
        authzid, authcid, passwd = parts
        username = _field(authcid, "authcid")
        if isinstance(username, Failure):
            return username
        self.username = normalize_address(username)
        password = _field(passwd, "password")
        if isinstance(password, Failure):
            return password
        if authzid:
            # RFC 4616 §2: we act only as the authenticated identity itself
            identity = _field(authzid, "authzid")
            if isinstance(identity, Failure):
                return identity
            if normalize_address(identity) != self.username:
                return Failure("PLAIN: authorization identity not permitted")
        return await _check_password(self._lookup, self.username, password)


class LoginServer(SaslServer):
    """LOGIN (draft-murchison-sasl-login): "Username:" and "Password:" challenges.

    An initial response (`AUTH LOGIN <base64 username>`) skips the "Username:" challenge.
    """

    mechanism = "LOGIN"

    def __init__(self, lookup: Lookup) -> None:
        super().__init__(lookup)
        self._asked_username = False

    async def _step(self, response: bytes | None) -> Result:
        if response is None:
            if self._asked_username or self.username is not None:
                return Failure("LOGIN: missing response", malformed=True)
            self._asked_username = True
            return Challenge(b"Username:")
        if self.username is None:
            username = _field(response, "username")
            if isinstance(username, Failure):
                return username
            self.username = normalize_address(username)
            return Challenge(b"Password:")
        password = _field(response, "password")
        if isinstance(password, Failure):
            return password
        return await _check_password(self._lookup, self.username, password)
