"""
The checks of an OpenID Connect ID token (Core 1.0 section 3.1.3.7), with
PyJWT: the signature by a key of the issuer's JWKS, with the algorithm
pinned, and the claims that bind the token to this client and this login.

PyJWT rather than authlib's JOSE and OIDC core: authlib would not make
this shorter, and would be less strict unless the same code stayed around
it. ``authlib.oidc.core.IDToken`` compares the nonce with ``!=`` (here in
constant time), does not bound ``sub``, and its key set picks a key only
by ``kid`` (a token without one only against a one-key set), where here a
key must also have the type and curve of the pinned algorithm; the
algorithms allowed, and telling an unknown key apart
(``UnknownSigningKey``, so that the issuer's keys are fetched again once),
would remain ours either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from jwt import PyJWK

from dit4c.portal import security

from .errors import InvalidIdentity, UnknownSigningKey

__all__ = ["ALLOWED_ALGORITHMS", "LEEWAY", "verifyIDToken"]

#: ID token signature algorithms the portal accepts at all; a provider's own
#: list (its discovery document) narrows them further. No ``HS*`` (the
#: client secret is no signing key here) and never ``none``.
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"RS256", "ES256", "EdDSA", "PS256"})

#: Which key an algorithm needs: JWK ``kty`` and, for curves, ``crv``.
_KEY_TYPES: Mapping[str, tuple[str, str | None]] = {
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "EdDSA": ("OKP", "Ed25519"),
}

#: Clock skew allowed between the portal and a provider, in seconds.
LEEWAY = 60.0


def verifyIDToken(
    token: str,
    jwks: Mapping[str, Any],
    *,
    issuer: str,
    clientId: str,
    nonce: str,
    algorithms: Iterable[str],
    leeway: float = LEEWAY,
) -> dict[str, Any]:
    """
    Verify an OpenID Connect ID token (Core 1.0 section 3.1.3.7) with PyJWT:
    signature by a key of ``jwks`` with one of ``algorithms`` (each must
    also be in ``ALLOWED_ALGORITHMS``), ``iss``, ``aud`` (and ``azp``),
    ``exp``, ``iat`` and ``nonce``. Returns the claims, or raises
    ``InvalidIdentity`` with the reason.
    """
    allowed = set(algorithms) & ALLOWED_ALGORITHMS
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise InvalidIdentity(reason=f"malformed ID token: {e}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in allowed:
        raise InvalidIdentity(reason=f"ID token algorithm {alg!r} is not one of {sorted(allowed)}")
    kid = header.get("kid")
    kty, crv = _KEY_TYPES[alg]
    candidates = [
        k
        for k in jwks.get("keys", [])
        if isinstance(k, dict)
        and k.get("kty") == kty
        and (crv is None or k.get("crv") == crv)
        and k.get("use", "sig") == "sig"
        and k.get("alg", alg) == alg
        and (kid is None or k.get("kid") == kid)
    ]
    if not candidates:
        raise UnknownSigningKey(reason=f"no {alg} key with kid {kid!r} in the issuer's JWKS")
    claims: dict[str, Any] | None = None
    for jwk in candidates[:8]:
        try:
            key = PyJWK(jwk, algorithm=alg)
        except jwt.PyJWTError:
            continue
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=clientId,
                issuer=issuer,
                leeway=leeway,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as e:
            raise InvalidIdentity(reason=f"ID token refused: {e}") from None
        break
    if claims is None:
        raise InvalidIdentity(reason="ID token signature does not verify")
    audience = claims["aud"]
    if isinstance(audience, list) and len(audience) > 1 and claims.get("azp") != clientId:
        raise InvalidIdentity(reason="ID token for several audiences without azp = client_id")
    if "azp" in claims and claims["azp"] != clientId:
        raise InvalidIdentity(reason=f"ID token azp is {claims['azp']!r}, not the client id")
    if not security.tokensEqual(
        claims.get("nonce") if isinstance(claims.get("nonce"), str) else None, nonce
    ):
        raise InvalidIdentity(reason="ID token nonce does not match the login's")
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject or len(subject) > 255:
        raise InvalidIdentity(reason="ID token sub is not a string of 1 to 255 characters")
    return claims
