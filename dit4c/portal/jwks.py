"""
Public keys as the portal takes and publishes them: a scheduler's key as
an administrator registers it (:func:`publicJWKProblem`), and the key
directory others check tokens against (:class:`KeyDirectory`, served at
``/.well-known/jwks.json``).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime

from dit4c.common.life import ACTIVE
from dit4c.common.tokens import parseJWKS
from dit4c.portal.keys import KeyRing
from dit4c.portal.store.interfaces import IStore

__all__ = ["KeyDirectory", "publicJWKProblem", "publicMembers"]

_PUBLIC_MEMBERS = ("kty", "crv", "x", "y", "alg", "use")

#: Seconds the published schedulers' and instances' keys are kept before they are read again.
CACHE_SECONDS = 10


def publicMembers(text: str | None, kid: str) -> dict[str, Any] | None:
    """The public members of a stored JWK (JSON text), under ``kid``; None if unusable."""
    try:
        jwk = json.loads(text or "")
    except ValueError:
        return None
    if not isinstance(jwk, dict) or "kty" not in jwk:
        return None
    key = {k: jwk[k] for k in _PUBLIC_MEMBERS if k in jwk}
    key["kid"] = kid
    key.setdefault("use", "sig")
    return key


def publicJWKProblem(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """Parse a scheduler's public JWK; refuse anything private or unusable."""
    try:
        jwk = json.loads(text)
    except ValueError:
        return None, "The key is not JSON."
    if not isinstance(jwk, dict):
        return None, "The key must be a JSON object (a JWK)."
    if any(member in jwk for member in ("d", "p", "q", "dp", "dq", "qi", "k")):
        return None, "That is a private key. Register the public key only."
    if not parseJWKS({"keys": [dict(jwk, kid=jwk.get("kid", "k"))]}):
        return None, "The key must be an EC P-256 or Ed25519 public key."
    return jwk, None


class KeyDirectory:
    """
    Every public key others must check: the portal's own (its ``kid`` is
    the key's thumbprint), each enabled scheduler's (``scheduler:<id>``)
    and each live instance's (``instance:<id>``). Public members only.

    The schedulers' and instances' keys are read from the store at most
    every :data:`CACHE_SECONDS`, and afresh after :meth:`keysChanged`.
    """

    def __init__(self, store: IStore, keys: KeyRing, clock: IReactorTime) -> None:
        self.store = store
        self.keys = keys
        self.clock = clock
        self._cache: tuple[float, list[dict[str, Any]]] | None = None

    async def document(self) -> dict[str, Any]:
        """The JWKS document: ``{"keys": [...]}``."""
        now = self.clock.seconds()
        cached = self._cache
        if cached is None or now - cached[0] >= CACHE_SECONDS:
            cached = self._cache = (now, await self._published())
        return {"keys": list(self.keys.publicJWKs()) + cached[1]}

    def keysChanged(self) -> None:
        """
        An instance or scheduler key came or went: the next document is made
        afresh (a routing server waits for a new instance's key).
        """
        self._cache = None

    async def _published(self) -> list[dict[str, Any]]:
        published: list[dict[str, Any]] = []
        for scheduler in await self.store.listSchedulers():
            if scheduler.disabled:
                continue
            key = publicMembers(scheduler.public_jwk, f"scheduler:{scheduler.id}")
            if key is not None:
                published.append(key)
            for instance in await self.store.listInstancesOfScheduler(scheduler.id):
                if instance.state in ACTIVE and instance.public_jwk:
                    key = publicMembers(instance.public_jwk, f"instance:{instance.id}")
                    if key is not None:
                        published.append(key)
        return published
