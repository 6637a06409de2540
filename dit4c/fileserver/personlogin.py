"""
The portal's login to the file server, acting for one person (the portal's
Files page, docs/protocols.md 13.6).

- The SSH user name is ``user:<user id>``; the password is a token the
  portal signed with its current signing key (published in its JWKS, found
  with the same :class:`~dit4c.common.tokens.JWKSKeySource` as instances'
  keys), for the audience :data:`PERSON_AUDIENCE`, with ``sub`` = that
  user id, living at most :data:`MAX_LIFETIME` seconds. The algorithm is
  pinned (``TokenVerifier``); no party key (``instance:...``,
  ``scheduler:...``) may sign it.
- The login then works in ``users/<user id>/`` exactly as an instance's
  does (the same realm, resolver and limits).

No other password is taken: a token that is forged, expired, made to last,
for another audience or for another person is refused, counted as
``bad_credentials``. The token is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.common.tokens import IKeySource, InvalidToken, TokenVerifier, checkLifetime
from dit4c.fileserver.access import USER_ID_RE
from dit4c.fileserver.metrics import FileServerMetrics
from dit4c.fileserver.sftp import IAccess

__all__ = ["MAX_LIFETIME", "PERSON_AUDIENCE", "PERSON_PREFIX", "PersonAccess", "PortalTokenChecker"]

#: The ``aud`` of the portal's tokens for the file server.
PERSON_AUDIENCE = "dit4c-fileserver"
#: The SSH user name's prefix when the portal logs in for a person.
PERSON_PREFIX = "user:"
#: The longest lifetime (``exp - iat``) taken: the portal signs for 60 s.
MAX_LIFETIME = 120.0
#: Seconds of clock skew allowed between the portal and the file server.
LEEWAY = 30.0


@implementer(IAccess)
@dataclass
class PersonAccess:
    """
    A connection of the portal's for the person ``user``: the token was
    checked at login, and the portal closes the connection once its one
    request is done, so nothing is asked again.
    """

    user: str
    revoked: bool = False
    onRevoke: list[Any] = field(default_factory=list)

    @property
    def who(self) -> str:
        """Who logged in, as the log says it."""
        return "the portal"

    def check(self) -> Deferred[None]:
        if self.revoked:
            d: Deferred[None] = Deferred()
            d.errback(PermissionError(13, "This connection was closed."))
            return d
        return succeed(None)


@implementer(ICredentialsChecker)
class PortalTokenChecker:
    """Password login as ``user:<id>`` with a token the portal signed for that person."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self, keySource: IKeySource, clock: Any, *, audience: str = PERSON_AUDIENCE, metrics: FileServerMetrics | None = None
    ) -> None:
        self.verifier = TokenVerifier(keySource, audience=audience, leeway=LEEWAY, clock=clock, scopedKeys=())
        self.metrics = metrics if metrics is not None else FileServerMetrics()

    def requestAvatarId(self, credentials: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: Any) -> PersonAccess:
        try:
            name = credentials.username.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        prefix, _, user = name.partition(":")
        if prefix + ":" != PERSON_PREFIX or USER_ID_RE.fullmatch(user) is None:
            raise self._refusal(name, "The user name must be user:<user id>.")
        try:
            claims = await self.verifier.verify(credentials.password)
            checkLifetime(claims, MAX_LIFETIME)
        except InvalidToken as e:
            raise self._refusal(name, f"token refused: {e.reason}") from None
        if claims.get("sub") != user:
            raise self._refusal(name, "the token is for someone else")
        return PersonAccess(user)

    def _refusal(self, name: str, reason: str) -> UnauthorizedLogin:
        # Only a well-formed name is logged: anything else could be a token typed in the wrong place.
        shown = name if name.startswith(PERSON_PREFIX) and USER_ID_RE.fullmatch(name[len(PERSON_PREFIX):]) else "(bad name)"
        self.log.info("password login as {name} refused: {reason}", name=shown, reason=reason)
        self.metrics.login("bad_credentials")
        return UnauthorizedLogin(reason)
