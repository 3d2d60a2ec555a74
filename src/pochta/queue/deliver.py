"""Hand claimed queue entries to a connected SMTP peer. Imports `client`, `store.api`, `smtp` and
`message`.

Used by the queue worker (MX delivery) and by the relay (the provider side of TURN/ATRN after the
role swap). One connection carries several letters, each with all its claimed recipients.
"""

from __future__ import annotations

from collections.abc import Sequence

from pochta.client.session import SmtpClient
from pochta.message.headers import is_8bit, needs_smtputf8
from pochta.smtp import Reply
from pochta.store.api import Claim

NEEDS_8BITMIME = Reply(554, "5.6.3", "Letter has 8-bit content and the server lacks 8BITMIME")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Letter needs SMTPUTF8 and the server lacks it")
TOO_BIG = Reply(552, "5.3.4", "Letter is larger than the server's SIZE limit")


def mail_params(client: SmtpClient, claim: Claim) -> tuple[dict[str, str | None], Reply | None]:
    """MAIL parameters for this letter, or the permanent reason it cannot go to this peer
    (RFC 6152 §3: no 8-bit data to a server without 8BITMIME; RFC 6531 §3.2; RFC 1870 §5)."""
    params: dict[str, str | None] = {}
    addresses = [claim.sender, *(r.address for r in claim.recipients)]
    if needs_smtputf8(claim.body, addresses):
        if not client.supports("SMTPUTF8"):
            return params, NEEDS_SMTPUTF8
        params["SMTPUTF8"] = None
    if is_8bit(claim.body):
        if not client.supports("8BITMIME"):
            return params, NEEDS_8BITMIME
        params["BODY"] = "8BITMIME"
    limit = client.extensions.get("SIZE", "")
    if limit.isdigit() and int(limit) > 0 and len(claim.body) > int(limit):
        return params, TOO_BIG
    return params, None


async def send_claims(client: SmtpClient, claims: Sequence[Claim]) -> dict[int, Reply]:
    """Send every claimed letter over `client`; the deciding reply per recipient id.

    Raises:
        OSError, TimeoutError, smtp.ProtocolError: the connection failed; recipients not in
        the returned dict so far were not decided (they stay transient for the caller).
    """
    decided: dict[int, Reply] = {}
    for claim in claims:
        decided.update(await send_claim(client, claim))
    return decided


async def send_claim(client: SmtpClient, claim: Claim) -> dict[int, Reply]:
    """One letter with all its claimed recipients."""
    params, refusal = mail_params(client, claim)
    if refusal is not None:
        return {r.id: refusal for r in claim.recipients}
    addresses = [r.address for r in claim.recipients]
    result = await client.send(claim.sender, addresses, claim.body, params=params)
    return {r.id: res.reply for r, res in zip(claim.recipients, result.recipients, strict=True)}
