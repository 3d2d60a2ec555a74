"""SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding: the server and the client.

Imports stdlib, `pochta.store.api`, `pochta.auth.base`, `pochta.auth.passwords` and
`pochta.auth.saslprep`. Use the server through `pochta.auth.sasl.start("SCRAM-SHA-256", ...)`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from pochta.auth.base import (
    INVALID_CREDENTIALS,
    Challenge,
    Failure,
    Lookup,
    Result,
    SaslServer,
    ScramError,
    Success,
)
from pochta.auth.passwords import (
    SCRAM_ITERATIONS,
    client_key,
    salted_password,
    server_key,
    stored_key,
)
from pochta.auth.saslprep import saslprep
from pochta.store.api import ScramCredentials, User, normalize_address

MECHANISM = "SCRAM-SHA-256"
_KEY_LEN = 32  # SHA-256 output
_NONCE_BYTES = 18
MAX_CLIENT_ITERATIONS = 1_000_000  # a client refuses to spend more (a hostile server's DoS)


class _Malformed(Exception):
    """Internal: the peer broke the SCRAM syntax (RFC 5802 §7)."""


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise _Malformed("bad base64 value") from exc


def _text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed("not UTF-8") from exc


def escape_saslname(name: str) -> str:
    """RFC 5802 §5.1: "=" -> "=3D", "," -> "=2C"."""
    return name.replace("=", "=3D").replace(",", "=2C")


def unescape_saslname(value: str) -> str:
    """RFC 5802 §5.1: the inverse of `escape_saslname`; any other "=" is malformed."""
    if "," in value:
        raise _Malformed("unescaped comma in saslname")
    parts = value.split("=")
    out = [parts[0]]
    for part in parts[1:]:
        if part[:2] == "2C":
            out.append("," + part[2:])
        elif part[:2] == "3D":
            out.append("=" + part[2:])
        else:
            raise _Malformed("bad escape in saslname")
    return "".join(out)


def _attributes(text: str) -> list[tuple[str, str]]:
    """`a=v,b=w,...` (RFC 5802 §7 attr-val); attribute names are single ASCII letters."""
    attrs = []
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=" or not (part[0].isascii() and part[0].isalpha()):
            raise _Malformed("bad attribute")
        attrs.append((part[0], part[2:]))
    return attrs


def _expect(attrs: list[tuple[str, str]], index: int, name: str) -> str:
    if len(attrs) <= index or attrs[index][0] != name:
        raise _Malformed(f"attribute {name}= missing")
    return attrs[index][1]


def _check_nonce(nonce: str) -> str:
    # RFC 5802 §7: printable = %x21-2B / %x2D-7E (no comma; commas were split off already)
    if not nonce or any(not 0x21 <= ord(ch) <= 0x7E for ch in nonce):
        raise _Malformed("bad nonce")
    return nonce


def _split_gs2(text: str) -> tuple[str, str, str]:
    """(cbind flag, authzid, client-first-message-bare) of a client-first-message."""
    fields = text.split(",", 2)
    if len(fields) != 3:
        raise _Malformed("no gs2 header")
    return fields[0], fields[1], fields[2]


def _fake_credentials(secret: bytes, address: str) -> ScramCredentials:
    """Stable per-address salt from the server secret, so an unknown user looks like a known one;
    random keys, so no proof can match."""
    salt = _hmac(secret, b"pochta scram fake salt\0" + address.encode("utf-8"))[:16]
    return ScramCredentials(
        salt=salt,
        iterations=SCRAM_ITERATIONS,
        stored_key=secrets.token_bytes(_KEY_LEN),
        server_key=secrets.token_bytes(_KEY_LEN),
    )


class ScramServer(SaslServer):
    """Server side: client-first -> server-first -> client-final -> Success(data=server-final)."""

    mechanism = MECHANISM

    def __init__(self, lookup: Lookup, secret: bytes, *, nonce: str | None = None) -> None:
        """`nonce` fixes the server's nonce part (for test vectors); random by default."""
        super().__init__(lookup)
        self._secret = secret
        self._server_nonce = _check_nonce_client(nonce) if nonce else None
        self._started = False
        self._gs2_header = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self._user: User | None = None
        self._creds: ScramCredentials | None = None

    async def _step(self, response: bytes | None) -> Result:
        try:
            if self._creds is None:
                return await self._first(response)
            return self._final(response)
        except _Malformed as exc:
            return Failure(f"SCRAM: {exc}", malformed=True)

    async def _first(self, response: bytes | None) -> Result:
        if response is None:
            if self._started:
                raise _Malformed("missing client-first-message")
            self._started = True
            return Challenge(b"")  # RFC 4954 §4: empty challenge, client sends client-first
        flag, authzid, bare = _split_gs2(_text(response))
        if flag.startswith("p="):  # RFC 5802 §6: we offer no channel binding (no -PLUS)
            return Failure("SCRAM: channel binding not supported")
        if flag not in ("n", "y"):
            raise _Malformed("bad gs2-cbind-flag")
        self._gs2_header = f"{flag},{authzid},"
        attrs = _attributes(bare)
        if attrs and attrs[0][0] == "m":  # RFC 5802 §5.1: m= MUST cause authentication failure
            return Failure("SCRAM: unsupported mandatory extension")
        address = normalize_address(unescape_saslname(_expect(attrs, 0, "n")))
        client_nonce = _check_nonce(_expect(attrs, 1, "r"))
        if not address:
            raise _Malformed("empty username")
        self.username = address
        if authzid:
            if not authzid.startswith("a="):
                raise _Malformed("bad authzid")
            if normalize_address(unescape_saslname(authzid[2:])) != address:
                return Failure("SCRAM: authorization identity not permitted")
        self._client_first_bare = bare
        return await self._server_first_message(address, client_nonce)

    async def _server_first_message(self, address: str, client_nonce: str) -> Result:
        user = await self._lookup(address)
        if user is not None and user.password_hash and user.scram is not None:
            self._user, self._creds = user, user.scram
        else:  # unknown user, login disabled or no verifiers: go through the motions anyway
            self._creds = _fake_credentials(self._secret, address)
        self._nonce = client_nonce + (self._server_nonce or secrets.token_urlsafe(_NONCE_BYTES))
        creds = self._creds
        self._server_first = f"r={self._nonce},s={_b64(creds.salt)},i={creds.iterations}"
        return Challenge(self._server_first.encode("ascii"))

    def _final(self, response: bytes | None) -> Result:
        assert self._creds is not None
        if response is None:
            raise _Malformed("missing client-final-message")
        text = _text(response)
        without_proof, sep, proof_b64 = text.rpartition(",p=")  # RFC 5802 §7: proof is last
        if not sep:
            raise _Malformed("no proof")
        proof = _unb64(proof_b64)
        attrs = _attributes(without_proof)
        cbind = _unb64(_expect(attrs, 0, "c"))
        nonce = _expect(attrs, 1, "r")
        if cbind != self._gs2_header.encode("utf-8"):  # RFC 5802 §5.1 c=: gs2 header, no data
            return Failure("SCRAM: channel binding data mismatch")
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("utf-8")):
            return Failure("SCRAM: nonce mismatch")
        auth_message = ",".join((self._client_first_bare, self._server_first, without_proof))
        return self._verify(auth_message.encode("utf-8"), proof)

    def _verify(self, auth_message: bytes, proof: bytes) -> Result:
        assert self._creds is not None
        if len(proof) != _KEY_LEN:
            return Failure(INVALID_CREDENTIALS)
        # RFC 5802 §3: ClientKey := ClientProof XOR HMAC(StoredKey, AuthMessage);
        # the proof is good when H(ClientKey) == StoredKey.
        signature = _hmac(self._creds.stored_key, auth_message)
        candidate = stored_key(_xor(proof, signature))
        good = hmac.compare_digest(candidate, self._creds.stored_key)
        if not good or self._user is None:
            return Failure(INVALID_CREDENTIALS)
        server_signature = _hmac(self._creds.server_key, auth_message)  # RFC 5802 §3
        return Success(self._user, data=b"v=" + _b64(server_signature).encode("ascii"))


class ScramClient:
    """Client side, for our MUA: `first()`, `final(server_first)`, `verify(server_final)`.

    The password is dropped as soon as `final` has derived the keys from it.
    """

    mechanism = MECHANISM

    def __init__(self, username: str, password: str, *, nonce: str | None = None) -> None:
        self._username = escape_saslname(saslprep(username))  # RFC 5802 §5.1 n=
        self._password: str | None = password
        self._nonce = _check_nonce_client(nonce or secrets.token_urlsafe(_NONCE_BYTES))
        self._bare = f"n={self._username},r={self._nonce}"
        self._server_signature: bytes | None = None
        self._first_sent = False

    def first(self) -> bytes:
        """The client-first-message: gs2 header `n,,` (no channel binding) + bare message."""
        self._first_sent = True
        return ("n,," + self._bare).encode("utf-8")

    def final(self, server_first: bytes) -> bytes:
        """The client-final-message with the ClientProof (RFC 5802 §3)."""
        if not self._first_sent or self._password is None:
            raise ScramError("final() out of order")
        try:
            nonce, salt, iterations = _parse_server_first(server_first, self._nonce)
        except _Malformed as exc:
            raise ScramError(f"bad server-first-message: {exc}") from exc
        salted = salted_password(self._password, salt, iterations)
        self._password = None
        without_proof = f"c={_b64(b'n,,')},r={nonce}"
        auth_message = f"{self._bare},{server_first.decode('utf-8')},{without_proof}"
        key = client_key(salted)
        signature = _hmac(stored_key(key), auth_message.encode("utf-8"))
        self._server_signature = _hmac(server_key(salted), auth_message.encode("utf-8"))
        return f"{without_proof},p={_b64(_xor(key, signature))}".encode("ascii")

    def verify(self, server_final: bytes) -> None:
        """Check the server's `v=` ServerSignature; raises ScramError on `e=` or a mismatch."""
        if self._server_signature is None:
            raise ScramError("verify() out of order")
        text = server_final.decode("utf-8", "replace")
        if text.startswith("e="):
            raise ScramError(f"server error: {text[2:]}")
        if not text.startswith("v="):
            raise ScramError("bad server-final-message")
        try:
            signature = _unb64(text[2:])
        except _Malformed as exc:
            raise ScramError("bad server signature encoding") from exc
        if not hmac.compare_digest(signature, self._server_signature):
            raise ScramError("server signature mismatch: the server does not know the password")


def _check_nonce_client(nonce: str) -> str:
    try:
        return _check_nonce(nonce)
    except _Malformed as exc:
        raise ValueError("nonce must be printable ASCII without commas") from exc


def _parse_server_first(message: bytes, client_nonce: str) -> tuple[str, bytes, int]:
    attrs = _attributes(_text(message))
    if attrs and attrs[0][0] == "m":  # RFC 5802 §5.1
        raise _Malformed("unsupported mandatory extension")
    nonce = _check_nonce(_expect(attrs, 0, "r"))
    # RFC 5802 §5.1: the server's nonce extends ours
    if not nonce.startswith(client_nonce) or len(nonce) == len(client_nonce):
        raise _Malformed("server nonce does not extend the client nonce")
    salt = _unb64(_expect(attrs, 1, "s"))
    iterations_text = _expect(attrs, 2, "i")
    digits = iterations_text.isascii() and iterations_text.isdigit()
    if not digits or len(iterations_text) > 9 or not salt:
        raise _Malformed("bad salt or iteration count")
    iterations = int(iterations_text)
    if not SCRAM_ITERATIONS <= iterations <= MAX_CLIENT_ITERATIONS:  # RFC 7677 §4: >= 4096
        raise _Malformed(f"iteration count {iterations} out of range")
    return nonce, salt, iterations
