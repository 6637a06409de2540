"""
The token with which the portal sends a person's uploaded file to the image
server as a new image (``POST /images``, docs/protocols.md 12.1), and its
check when the image server asks (8.4): the image's digest is known only
once every byte is in, so the token names no digest, only the person, and
lives a minute (the image server asks once, before it reads the body).

Apart from :mod:`dit4c.portal.uploads` (which signs it) so that
:mod:`dit4c.portal.reports` (which checks it) need not import the uploads.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from dit4c.common.errors import InvalidToken
from dit4c.common.tokens import TokenVerifier
from dit4c.portal.keys import KeyRing, KeyRingKeySource
from dit4c.portal.reportrules import API_TOKEN_PREFIX, LEEWAY, bearerToken

__all__ = ["IMPORT_AUDIENCE", "IMPORT_LIFETIME", "NEW_IMAGE", "ImportTokens", "importToken"]

#: The ``aud`` of the token that lets the portal send the image server a new image.
IMPORT_AUDIENCE = "dit4c-image-import"
#: What the image server asks about for ``POST /images`` (the digest is not known yet).
NEW_IMAGE = "new"
#: Seconds an import token is valid: the image server asks at the start of the upload.
IMPORT_LIFETIME = 60.0


def importToken(keys: KeyRing, userId: str) -> str:
    """A token for one new image, uploaded by the person ``userId``, signed by the portal's current key."""
    token: str = keys.signer().sign({"sub": userId}, audience=IMPORT_AUDIENCE, lifetime=IMPORT_LIFETIME)
    return token


class ImportTokens:
    """The check of import tokens: the portal's own keys, as published now."""

    def __init__(self, keys: KeyRing, clock: IReactorTime) -> None:
        self._verifier = TokenVerifier(
            KeyRingKeySource(keys), audience=IMPORT_AUDIENCE, issuer=keys.issuer, leeway=LEEWAY, clock=clock
        )

    async def who(self, authorization: str | None) -> tuple[str | None, str]:
        """The person an import token in ``authorization`` was signed for (None: refused), and why."""
        token = bearerToken(authorization)
        if token is None or token.startswith(API_TOKEN_PREFIX):
            return None, "A new image is sent only by the portal, with an import token."
        try:
            claims: dict[str, Any] = await self._verifier.verify(token)
        except InvalidToken as e:
            return None, f"The import token was refused: {e.reason}."
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            return None, "The import token names nobody."
        return subject, "The portal sends a file its owner uploaded."
