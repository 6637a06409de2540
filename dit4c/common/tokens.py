"""
Signed tokens (JWTs): sign them, and verify them with the key their
``kid`` names.

Tokens are how one DIT4C component vouches to another, for example the
portal telling a routing server which instance may take which host name
(docs/protocols.md section 2). The rules that make that safe live here, once:

- the algorithm list is pinned to ``ES256`` and ``EdDSA``; ``none`` and HMAC
  are never accepted, and the header's ``alg`` must also match the type of
  the key its ``kid`` names, so a public key can never be used as an HMAC
  secret;
- ``exp``, ``iat`` and ``aud`` are required, and ``iss`` when the verifier
  has an issuer;
- time is read from an injected clock, so expiry is testable with
  :class:`twisted.internet.task.Clock`;
- every refusal is an :class:`InvalidToken` whose message is short and never
  contains token text, so it can be logged and shown.

All JOSE encoding and signature checking is PyJWT's. What a token's claims
must be is in :mod:`dit4c.common.tokenclaims`; where the keys come from, in
:mod:`dit4c.common.keysources`; the refusal, :class:`InvalidToken`, in
:mod:`dit4c.common.errors`. Every name of the first two, and the refusal,
is importable from here too, so that a verifier's user needs one module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jwt
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    MissingRequiredClaimError,
    PyJWTError,
)
from jwt.types import Options
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dit4c.common.errors import InvalidToken
from dit4c.common.keys import PrivateKey, algorithmFor, keyID
from dit4c.common.keysources import (
    MAX_JWKS_SIZE,
    IKeySource,
    JWKSKeySource,
    StaticKeySource,
    parseJWKS,
)
from dit4c.common.tokenclaims import (
    ALGORITHMS,
    INSTANCE_ID_RE,
    MAX_TOKEN_ID,
    MAX_TOKEN_LENGTH,
    ROUTING_AUDIENCE,
    ROUTING_MAX_LIFETIME,
    checkInstanceID,
    checkLifetime,
    checkTokenID,
    numericDate,
)

__all__ = [
    "ALGORITHMS",
    "INSTANCE_ID_RE",
    "MAX_JWKS_SIZE",
    "MAX_TOKEN_ID",
    "MAX_TOKEN_LENGTH",
    "ROUTING_AUDIENCE",
    "ROUTING_MAX_LIFETIME",
    "IKeySource",
    "InvalidToken",
    "JWKSKeySource",
    "StaticKeySource",
    "TokenSigner",
    "TokenVerifier",
    "checkInstanceID",
    "checkLifetime",
    "checkTokenID",
    "parseJWKS",
]

# -- signing ---------------------------------------------------------------


def _clockFunction(clock: IReactorTime | None) -> Callable[[], float]:
    return clock.seconds if clock is not None else time.time


class TokenSigner:
    """Signs tokens with one private key, naming it by ``kid`` in the header."""

    def __init__(
        self,
        private_key: PrivateKey,
        *,
        issuer: str | None = None,
        kid: str | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self._key = private_key
        self.algorithm = algorithmFor(private_key)
        self.kid = kid if kid is not None else keyID(private_key.public_key())
        self.issuer = issuer
        self._now = _clockFunction(clock)

    def sign(self, claims: Mapping[str, Any], *, audience: str, lifetime: float) -> str:
        """
        A token carrying ``claims``, for ``audience``, valid for ``lifetime``
        seconds from now. ``iat``, ``exp``, ``aud`` (and ``iss``) are always
        set here, overriding any in ``claims``, so no token without expiry
        can be made by mistake.
        """
        if not lifetime > 0:
            raise ValueError("lifetime must be positive")
        now = self._now()
        payload = dict(claims)
        payload.update(iat=int(now), exp=int(now + lifetime), aud=audience)
        if self.issuer is not None:
            payload["iss"] = self.issuer
        return jwt.encode(payload, self._key, algorithm=self.algorithm, headers={"kid": self.kid})


# -- verifying -------------------------------------------------------------


#: PyJWT 2.10 and later check that a ``jti`` is a string.
_InvalidJTIError: Any = getattr(jwt.exceptions, "InvalidJTIError", ())


def _reason(error: PyJWTError) -> str:
    """A short, token-free reason for PyJWT's refusal."""
    if isinstance(error, _InvalidJTIError):
        return "bad jti claim"
    if isinstance(error, InvalidAlgorithmError):
        return "algorithm not allowed"
    if isinstance(error, InvalidSignatureError):
        return "bad signature"
    if isinstance(error, DecodeError):
        return "malformed token"
    if isinstance(error, InvalidAudienceError):
        return "wrong audience"
    if isinstance(error, InvalidIssuerError):
        return "wrong issuer"
    if isinstance(error, MissingRequiredClaimError):
        return f"missing {error.claim} claim"
    if isinstance(error, ExpiredSignatureError):
        return "token expired"
    if isinstance(error, ImmatureSignatureError):
        return "token not yet valid"
    if isinstance(error, InvalidKeyError):
        return "unusable key"
    return "invalid token"


class TokenVerifier:
    """
    Checks tokens: pinned algorithm, signature by the key ``kid`` names,
    audience, issuer, and times against the injected clock.
    """

    _log = Logger()

    def __init__(
        self,
        keys: IKeySource,
        *,
        audience: str,
        issuer: str | None = None,
        leeway: float = 30.0,
        clock: IReactorTime | None = None,
        algorithms: Iterable[str] = ALGORITHMS,
        scopedKeys: Iterable[str] = ("instance",),
    ) -> None:
        """
        :param algorithms: a subset of :data:`ALGORITHMS`; anything else is a
            programming error, not a configuration choice.
        :param scopedKeys: the kinds of party key (a ``kid`` of the form
            ``<kind>:<id>``) that may sign, each only a token whose ``sub``
            is its own id; a party key of any other kind is refused.
        """
        self.scopedKeys = frozenset(scopedKeys)
        self._algorithms = tuple(algorithms)
        if not self._algorithms or not set(self._algorithms) <= set(ALGORITHMS):
            raise ValueError(f"algorithms must be drawn from {ALGORITHMS}")
        self._keys = keys
        self.audience = audience
        self.issuer = issuer
        #: Seconds of clock skew allowed on ``exp``, ``iat`` and ``nbf``: a
        #: token verifies until ``exp + leeway``.
        self.leeway = leeway
        self._now = _clockFunction(clock)
        self._jwt = jwt.PyJWT()
        required = ["exp", "iat", "aud"] + (["iss"] if issuer is not None else [])
        # Times are checked here against the injected clock, not by PyJWT.
        self._options: Options = {
            "require": required,
            "verify_signature": True,
            "verify_aud": True,
            "verify_iss": True,
            "verify_exp": False,
            "verify_iat": False,
            "verify_nbf": False,
        }

    def verify(self, token: str | bytes) -> Deferred[dict[str, Any]]:
        """
        The claims of ``token`` if it is valid; otherwise fails with
        :class:`InvalidToken`, and with nothing else, whatever ``token`` is.
        """
        return Deferred.fromCoroutine(self._verify(token))

    async def _verify(self, token: object) -> dict[str, Any]:
        try:
            return await self._check(token)
        except InvalidToken:
            raise
        except PyJWTError as e:
            raise InvalidToken(_reason(e)) from None
        except Exception as e:
            # Fail closed. Only the type is logged: a message could quote the token.
            self._log.warn(
                "unexpected {errorType} while verifying a token", errorType=type(e).__name__
            )
            raise InvalidToken("malformed token") from None

    async def _check(self, token: object) -> dict[str, Any]:
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise InvalidToken("malformed token") from None
        if not isinstance(token, str) or not token.isascii():
            raise InvalidToken("malformed token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        header = jwt.get_unverified_header(token)
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise InvalidToken("algorithm not allowed")
        kid = header.get("kid")
        key = await self._keys.getKey(kid)
        # PyJWT checks this too; kept so the rule does not depend on its version.
        if key.algorithm_name != alg:
            raise InvalidToken("algorithm does not match key")
        decoded = self._jwt.decode_complete(
            token,
            key=key,
            algorithms=[alg],
            options=self._options,
            audience=self.audience,
            issuer=self.issuer,
        )
        claims: dict[str, Any] = decoded["payload"]
        self._checkScope(kid, claims)
        self._checkTimes(claims)
        return claims

    def _checkScope(self, kid: object, claims: Mapping[str, Any]) -> None:
        # The portal's JWKS also lists keys that speak for one party only:
        # ``instance:<id>`` (an instance's own key) and ``scheduler:<id>``.
        # Such a key signs only tokens about its own party, so one instance
        # cannot sign for another's name.
        if not isinstance(kid, str):
            return
        scope, colon, owner = kid.partition(":")
        if not colon:
            return
        if scope not in self.scopedKeys:
            raise InvalidToken(f"{scope} keys may not sign this token")
        if claims.get("sub") != owner:
            raise InvalidToken(f"the {scope} key of {owner} signs only for {owner}")

    def _checkTimes(self, claims: Mapping[str, Any]) -> None:
        now = self._now()
        exp = numericDate(claims, "exp")
        iat = numericDate(claims, "iat")
        # Arithmetic on ``now`` only: ``exp`` may be an int too big for a float.
        if now - self.leeway >= exp:
            raise InvalidToken("token expired")
        if iat > now + self.leeway:
            raise InvalidToken("token not yet valid")
        if "nbf" in claims and numericDate(claims, "nbf") > now + self.leeway:
            raise InvalidToken("token not yet valid")
