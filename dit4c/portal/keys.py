"""
The portal's own signing keys: generated on first start in the data
directory, rotatable, and published (with every key others must check) as a
JWKS.

Rotation adds a new key and makes it the one that signs; older keys stay
published for ``retain`` seconds so that tokens they signed keep verifying
until they expire, then they are removed.
"""

from __future__ import annotations

import os
import time
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
from dit4c.common.tokens import IKeySource, StaticKeySource, TokenSigner


class KeyRing:
    log = Logger()

    def __init__(self, directory: Path, *, issuer: str, clock: IReactorTime | None = None, retain: float = 7 * 86400.0) -> None:
        self.directory = Path(directory)
        self.issuer = issuer
        self.clock = clock
        self.retain = retain
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._keys: list[tuple[float, PrivateKey]] = []
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
        return kid

    def _expire(self, now: float) -> None:
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
        self._keys = keep

    @property
    def current(self) -> PrivateKey:
        return self._keys[-1][1]

    def signer(self) -> TokenSigner:
        return TokenSigner(self.current, issuer=self.issuer, clock=self.clock)

    def publicJWKs(self) -> list[dict[str, Any]]:
        self._expire(self._now())
        return [publicJWK(key) for _, key in self._keys]


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
