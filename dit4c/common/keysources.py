"""
Where a verifier finds the public key a token's ``kid`` names
(:class:`IKeySource`): keys fixed at start-up (:class:`StaticKeySource`)
or fetched from a JWKS URL and cached (:class:`JWKSKeySource`).

Apart from the verifier (:mod:`dit4c.common.tokens`) because finding keys
is its own matter: which JWKS members can verify here at all (only the
pinned key types, public members only), and how a fetched cache is kept
fresh without letting tokens with forged key ids hammer the portal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jwt import PyJWK
from treq import collect
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import Interface, implementer

from dit4c.common.errors import InvalidToken, KeyFileError
from dit4c.common.keys import jwks, keyID, publicKeyFromPEM

__all__ = ["MAX_JWKS_SIZE", "IKeySource", "JWKSKeySource", "StaticKeySource", "parseJWKS"]

#: A JWKS document larger than this is refused (a handful of keys is < 4 KiB).
MAX_JWKS_SIZE = 1024 * 1024

# (kty, crv) -> the one algorithm such a key may verify.
_KEY_ALGORITHMS: dict[tuple[str, str], str] = {
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
}


def _usableKey(data: object) -> tuple[str, PyJWK] | None:
    """
    The (kid, key) for one JWKS member, or None when it cannot verify a
    token here: a key type outside the pinned list, an ``alg`` or ``use``
    that disagrees, or bad key material.

    Only public members are read, so a JWKS that carelessly includes ``d``
    still yields nothing but a public key.
    """
    if not isinstance(data, dict):
        return None
    kty, crv = data.get("kty"), data.get("crv")
    if not isinstance(kty, str) or not isinstance(crv, str):
        return None
    alg = _KEY_ALGORITHMS.get((kty, crv))
    if alg is None or data.get("alg", alg) != alg or data.get("use", "sig") != "sig":
        return None
    members = {name: data[name] for name in ("kty", "crv", "x", "y") if name in data}
    kid = data.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    try:
        key = PyJWK(members, algorithm=alg)
        if kid is None:
            kid = keyID(key.key)
        return kid, PyJWK({**members, "kid": kid}, algorithm=alg)
    except Exception:
        return None


def parseJWKS(document: object) -> dict[str, PyJWK]:
    """
    The usable keys of a JWKS document, by key id.

    A key without ``kid`` is filed under its RFC 7638 thumbprint, which is
    the kid :class:`TokenSigner` puts in tokens by default. Unusable members
    are skipped; if two keys share a kid the first wins.

    :raises ValueError: ``document`` is not a JWKS document.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError('not a JWKS document (no "keys" list)')
    found: dict[str, PyJWK] = {}
    for member in document["keys"]:
        usable = _usableKey(member)
        if usable is not None:
            found.setdefault(*usable)
    return found


def _select(keys: Mapping[str, PyJWK], kid: str | None) -> PyJWK:
    """The key ``kid`` names; a token without kid is accepted only when one key is known."""
    if kid is None:
        if len(keys) == 1:
            return next(iter(keys.values()))
        raise InvalidToken("unknown key (token names no key id)")
    try:
        return keys[kid]
    except KeyError:
        raise InvalidToken("unknown key") from None


class IKeySource(Interface):
    """Where a verifier finds the public key that a token's ``kid`` names."""

    def getKey(kid: str | None) -> Deferred[PyJWK]:
        """
        The key with id ``kid`` (``None``: the token named no key).

        Fails with :class:`InvalidToken` (``unknown key ...``) when there is
        no such key, never with another exception for an unknown kid.
        """


@implementer(IKeySource)
class StaticKeySource:
    """Keys fixed at start-up: a JWKS file, or one public key given by hand."""

    def __init__(self, jwks_document: dict[str, Any]) -> None:
        """
        :raises ValueError: the document is not a JWKS or has no usable key
            (a verifier that can accept nothing is a configuration mistake).
        """
        self._keys = parseJWKS(jwks_document)
        if not self._keys:
            raise ValueError("the JWKS has no usable (ES256 or EdDSA) key")

    @classmethod
    def fromFile(cls, path: str | Path) -> StaticKeySource:
        """
        Keys from a file: a JWKS (or single JWK) JSON document, a PEM public
        key, or a PEM private key whose public half is used.

        :raises KeyFileError: the file holds none of these.
        :raises OSError: the file cannot be read.
        """
        path = Path(path)
        data = path.read_bytes()
        if data.lstrip().startswith(b"{"):
            try:
                document = json.loads(data)
                if isinstance(document, dict) and "kty" in document:
                    document = {"keys": [document]}
                return cls(document)
            except ValueError as e:
                raise KeyFileError(f"{path}: {e}") from e
        return cls.fromKeys(publicKeyFromPEM(data, str(path)))

    @classmethod
    def fromKeys(cls, *keys: Any) -> StaticKeySource:
        """Keys from key objects (private or public; only public halves are kept)."""
        return cls(jwks(*keys))

    def getKey(self, kid: str | None) -> Deferred[PyJWK]:
        try:
            return succeed(_select(self._keys, kid))
        except InvalidToken as e:
            return fail(e)


class _FetchError(Exception):
    """The JWKS document could not be fetched or was not usable."""


@implementer(IKeySource)
class JWKSKeySource:
    """
    Keys fetched from a JWKS URL (in production the portal's
    ``/.well-known/jwks.json``) and cached.

    The cache is refetched when older than ``refresh`` seconds, and when a
    token names an unknown kid, which is how a rotated-in key is found. To
    keep a flood of tokens with forged kids from hammering the portal, a
    fetch starts at most once per ``min_refetch`` seconds, and requests that
    arrive while a fetch is under way wait for it instead of starting
    another. A failed fetch keeps the keys already known.
    """

    _log = Logger()

    def __init__(
        self,
        url: str,
        *,
        reactor: Any,
        http_client: HTTPClient | None = None,
        refresh: float = 300.0,
        min_refetch: float = 10.0,
        timeout: float = 10.0,
        clock: IReactorTime | None = None,
        max_size: int = MAX_JWKS_SIZE,
    ) -> None:
        """
        :param reactor: runs the HTTP requests and the fetch timeout.
        :param clock: judges cache age and ``min_refetch`` (default: ``reactor``);
            separate so that tests can drive it with ``Clock`` while the
            requests go over a real connection.
        """
        self.url = url
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        if http_client is None:
            # Fetches are minutes apart: keeping connections open buys nothing.
            pool = HTTPConnectionPool(reactor, persistent=False)
            http_client = HTTPClient(Agent(reactor, pool=pool))
        self._http = http_client
        self._refresh = refresh
        self._minRefetch = min_refetch
        self._timeout = timeout
        self._maxSize = max_size
        self._keys: dict[str, PyJWK] = {}
        self._fetchedAt: float | None = None
        self._attemptedAt: float | None = None
        self._fetching = False
        self._waiters: list[Deferred[None]] = []

    def getKey(self, kid: str | None) -> Deferred[PyJWK]:
        return Deferred.fromCoroutine(self._getKey(kid))

    async def _getKey(self, kid: str | None) -> PyJWK:
        now = self._clock.seconds()
        stale = self._fetchedAt is None or now - self._fetchedAt >= self._refresh
        unknown = kid not in self._keys if kid is not None else len(self._keys) != 1
        if (stale or unknown) and self._mayFetch(now):
            await self._waitForFetch()
        if self._fetchedAt is None:
            raise InvalidToken("unknown key (keys unavailable)")
        return _select(self._keys, kid)

    def _mayFetch(self, now: float) -> bool:
        if self._fetching:
            return True  # joining the fetch under way costs nothing
        return self._attemptedAt is None or now - self._attemptedAt >= self._minRefetch

    def _waitForFetch(self) -> Deferred[None]:
        """Wait for a fetch of the JWKS, starting one unless one is under way."""
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        if not self._fetching:
            self._fetching = True
            self._attemptedAt = self._clock.seconds()
            fetch = Deferred.fromCoroutine(self._fetch())
            fetch.addTimeout(self._timeout, self._reactor)
            fetch.addErrback(self._fetchFailed)
            fetch.addBoth(self._fetchDone)
        return waiter

    async def _fetch(self) -> None:
        response = await self._http.get(self.url, unbuffered=True)
        body: list[bytes] = []
        size = 0

        def collector(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > self._maxSize:
                raise _FetchError(f"document larger than {self._maxSize} bytes")
            body.append(data)

        await collect(response, collector)
        if response.code != 200:
            raise _FetchError(f"HTTP status {response.code}")
        try:
            document = json.loads(b"".join(body))
        except (ValueError, RecursionError):
            raise _FetchError("not JSON") from None
        try:
            keys = parseJWKS(document)
        except ValueError as e:
            raise _FetchError(str(e)) from None
        if not keys:
            raise _FetchError("no usable (ES256 or EdDSA) key")
        added = keys.keys() - self._keys.keys()
        self._keys = keys
        self._fetchedAt = self._clock.seconds()
        self._log.info(
            "fetched {count} keys ({added} new) from {url}",
            count=len(keys),
            added=len(added),
            url=self.url,
        )

    def _fetchFailed(self, failure: Failure) -> None:
        reason = failure.value
        if isinstance(reason, _FetchError | KeyFileError):
            why = str(reason)
        elif failure.check(TimeoutError):
            why = f"no answer within {self._timeout} s"
        else:
            why = f"{type(reason).__name__}: {reason}"
        self._log.warn(
            "could not fetch keys from {url} ({why}); keeping {count} known keys",
            url=self.url,
            why=why,
            count=len(self._keys),
        )

    def _fetchDone(self, _: object) -> None:
        self._fetching = False
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.called:  # a waiter may have been cancelled
                waiter.callback(None)
