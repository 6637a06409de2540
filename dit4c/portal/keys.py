"""
The portal's own signing keys: generated on first start in the data
directory, rotatable, and published (with every key others must check) as a
JWKS.

Rotation adds a new key and makes it the one that signs; older keys stay
published for ``retain`` seconds so that tokens they signed keep verifying
until they expire, then they are removed.

Each portal process has keys of its own. Several processes sharing a store
publish their public keys there (:class:`SharedKeys`), and each takes the
others' as its own for checking: a login form one process made, or an
access token it signed, verifies at every other, and every process's JWKS
lists them all. No private key leaves the process that made it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jwt import PyJWK
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.common.keys import (
    PrivateKey,
    generatePrivateKey,
    keyID,
    loadPrivateKey,
    publicJWK,
    savePrivateKey,
)
from dit4c.common.tokens import IKeySource, StaticKeySource, TokenSigner, parseJWKS
from dit4c.portal.peers import IPeers
from dit4c.portal.store.interfaces import IPortals


class KeyRing:
    log = Logger()

    def __init__(self, directory: Path, *, issuer: str, clock: IReactorTime | None = None, retain: float = 7 * 86400.0) -> None:
        self.directory = Path(directory)
        self.issuer = issuer
        self.clock = clock
        self.retain = retain
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._keys: list[tuple[float, PrivateKey]] = []
        #: The other portal processes' public keys (JWKs), taken for checking and published.
        self._others: list[dict[str, Any]] = []
        #: Called after this process's own keys changed (a rotation, a key retired).
        self.changed: Callable[[], object] | None = None
        self._load()
        if not self._keys:
            self.rotate()

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def _load(self) -> None:
        keys: list[tuple[float, PrivateKey]] = []
        for path in sorted(self.directory.glob("portal-*.pem")):
            keys.append((path.stat().st_mtime, loadPrivateKey(path)))
        keys.sort(key=lambda pair: pair[0])
        self._keys = keys

    def rotate(self) -> str:
        """Make a new signing key current; returns its key id."""
        key = generatePrivateKey()
        kid = keyID(key.public_key())
        path = self.directory / f"portal-{kid}.pem"
        savePrivateKey(key, path)
        now = self._now()
        os.utime(path, (now, now))
        self._keys.append((now, key))
        self.log.info("portal signing key {kid} is now current", kid=kid)
        self._expire(now)
        self._tellChanged()
        return kid

    def _tellChanged(self) -> None:
        if self.changed is not None:
            self.changed()

    def _expire(self, now: float) -> bool:
        # Every key but the current one is dropped once it has been
        # superseded for longer than ``retain``.
        keep: list[tuple[float, PrivateKey]] = []
        for i, (created, key) in enumerate(self._keys):
            superseded = self._keys[i + 1][0] if i + 1 < len(self._keys) else None
            if superseded is not None and now - superseded > self.retain:
                kid = keyID(key.public_key())
                (self.directory / f"portal-{kid}.pem").unlink(missing_ok=True)
                self.log.info("portal signing key {kid} retired", kid=kid)
            else:
                keep.append((created, key))
        retired = len(keep) < len(self._keys)
        self._keys = keep
        return retired

    @property
    def current(self) -> PrivateKey:
        return self._keys[-1][1]

    def signer(self) -> TokenSigner:
        return TokenSigner(self.current, issuer=self.issuer, clock=self.clock)

    def ownJWKs(self) -> dict[str, dict[str, Any]]:
        """This process's public keys, by key id."""
        if self._expire(self._now()):
            self._tellChanged()
        return {str(jwk["kid"]): jwk for jwk in (publicJWK(key) for _, key in self._keys)}

    def setOthers(self, jwks: list[dict[str, Any]]) -> None:
        """The other portal processes' public keys, as they published them (our own are left out)."""
        own = {keyID(key.public_key()) for _, key in self._keys}
        self._others = [jwk for jwk in jwks if jwk.get("kid") not in own]

    def publicJWKs(self) -> list[dict[str, Any]]:
        """Every key a token the portal signed may carry: this process's, then the others'."""
        return [*self.ownJWKs().values(), *self._others]


@implementer(IKeySource)
class KeyRingKeySource:
    """
    The portal's own public keys, as the KeyRing publishes them at the
    moment of each use: a rotation is seen at once, and a key retired from
    the JWKS no longer verifies here either.
    """

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys
        self._kids: tuple[str, ...] = ()
        self._source: StaticKeySource | None = None

    def getKey(self, kid: str | None) -> Deferred[PyJWK]:
        published = self._keys.publicJWKs()
        kids = tuple(str(jwk.get("kid")) for jwk in published)
        if self._source is None or kids != self._kids:
            self._source = StaticKeySource({"keys": published})
            self._kids = kids
        return self._source.getKey(kid)


class SharedKeys:
    """
    This process's public keys in the store, for the other portal processes,
    and theirs taken from it (see the module docstring): published at start
    and after each change of ours, read again whenever another process says
    its keys changed and whenever the link to the others comes back.
    """

    log = Logger()

    def __init__(self, keys: KeyRing, store: IPortals, peers: IPeers) -> None:
        self.keys = keys
        self.store = store
        self.peers = peers
        self._published: set[str] = set()
        keys.changed = self._changed
        peers.hear("keys", lambda _: self._reload())
        peers.onJoined(self._reload)

    async def publish(self) -> None:
        """Our keys into the store (those retired out of it), the others' read, and the others told."""
        own = self.keys.ownJWKs()
        await self.store.publishPortalKeys({kid: json.dumps(jwk, sort_keys=True) for kid, jwk in own.items()})
        retired = self._published - own.keys()
        if retired:
            await self.store.retirePortalKeys(retired)
        self._published = set(own)
        await self.reload()
        self.peers.tell("keys", {})

    async def reload(self) -> None:
        """The other processes' keys, read from the store."""
        published = await self.store.portalKeys()
        others: list[dict[str, Any]] = []
        for kid, text in published.items():
            try:
                jwk = json.loads(text)
            except ValueError:
                continue
            if isinstance(jwk, dict) and parseJWKS({"keys": [dict(jwk, kid=kid)]}):
                others.append(dict(jwk, kid=kid))
        self.keys.setOthers(others)

    def _changed(self) -> None:
        self._log(Deferred.fromCoroutine(self.publish()), "publish this portal's keys")

    def _reload(self) -> Deferred[None]:
        return self._log(Deferred.fromCoroutine(self.reload()), "read the other portals' keys")

    def _log(self, d: Deferred[None], what: str) -> Deferred[None]:
        return d.addErrback(lambda f: self.log.warn("could not {what}: {error}", what=what, error=f.getErrorMessage()))
