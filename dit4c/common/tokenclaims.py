"""
What a DIT4C token must be, apart from its signature: the pinned
algorithms, the audiences and bounds, the checks on its claims (an
instance id, a token id, a lifetime). Their one refusal is
:class:`dit4c.common.errors.InvalidToken`.

These are shared by whoever signs or verifies (:mod:`dit4c.common.tokens`),
finds keys (:mod:`dit4c.common.keysources`) or reads claims after a
verification (the routing server, the channel, the portal), so they stand
apart from both and import neither.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from dit4c.common.errors import InvalidToken

__all__ = [
    "ALGORITHMS",
    "INSTANCE_ID_RE",
    "MAX_TOKEN_ID",
    "MAX_TOKEN_LENGTH",
    "ROUTING_AUDIENCE",
    "ROUTING_MAX_LIFETIME",
    "checkInstanceID",
    "checkLifetime",
    "checkTokenID",
    "numericDate",
]

#: The only JWS algorithms DIT4C signs or accepts.
ALGORITHMS: tuple[str, ...] = ("ES256", "EdDSA")

#: The audience of routing tokens unless a routing server is told otherwise.
ROUTING_AUDIENCE = "dit4c-routing"

#: The longest lifetime (``exp - iat``, seconds) of a routing token that a
#: routing server accepts unless told otherwise: a token only has to cross
#: one handshake, and a short one is little use to whoever copies it.
ROUTING_MAX_LIFETIME = 300.0

#: The longest token id (``jti``) accepted; the ids are remembered, so they are bounded.
MAX_TOKEN_ID = 255

#: An instance id is one DNS label: it becomes ``<id>.<domain>``.
INSTANCE_ID_RE: re.Pattern[str] = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")

#: Tokens longer than this are refused before any parsing: DIT4C's tokens are
#: a few hundred bytes, and a verifier should not spend effort on a flood.
MAX_TOKEN_LENGTH = 8192


def checkInstanceID(value: object) -> str:
    """
    Return ``value`` if it is a valid instance id (one DNS label), so the
    host name built from it cannot name another instance or another domain.

    :raises InvalidToken: ``bad instance id``.
    """
    if not isinstance(value, str) or INSTANCE_ID_RE.fullmatch(value) is None:
        raise InvalidToken("bad instance id")
    return value


def checkTokenID(claims: Mapping[str, Any]) -> str:
    """
    The ``jti`` of verified ``claims``: a string of 1 to :data:`MAX_TOKEN_ID`
    characters, the id under which a single-use token is remembered.

    :raises InvalidToken: ``missing jti claim`` or ``bad jti claim``.
    """
    jti = claims.get("jti")
    if jti is None:
        raise InvalidToken("missing jti claim")
    if not isinstance(jti, str) or not 0 < len(jti) <= MAX_TOKEN_ID:
        raise InvalidToken("bad jti claim")
    return jti


def checkLifetime(claims: Mapping[str, Any], maximum: float) -> float:
    """
    The lifetime (``exp - iat``) of verified ``claims``, if it is more than 0
    and at most ``maximum`` seconds: a token made to last is refused even
    while it is still valid.

    :raises InvalidToken: the lifetime is outside those bounds (the message
        gives it, and the bound).
    """
    try:
        lifetime = float(numericDate(claims, "exp") - numericDate(claims, "iat"))
    except OverflowError:  # an int too big for a float: far too long anyway
        lifetime = math.inf
    if not lifetime > 0:
        raise InvalidToken("token lifetime is not positive (exp not after iat)")
    if lifetime > maximum:
        raise InvalidToken(f"token lifetime {lifetime:g} s is longer than the {maximum:g} s allowed")
    return lifetime


def numericDate(claims: Mapping[str, Any], name: str) -> float | int:
    """
    The time claim ``name`` of ``claims``: a finite number (``True`` is not one).

    :raises InvalidToken: ``bad <name> claim``.
    """
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"bad {name} claim")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidToken(f"bad {name} claim")
    return value

