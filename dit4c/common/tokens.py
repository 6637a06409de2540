"""
Signed tokens (JWTs): sign them, find the key that checks them, verify them.

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

All JOSE encoding and signature checking is PyJWT's.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jwt
from jwt import PyJWK
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
from treq import collect
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import Interface, implementer

from dit4c.common.keys import (
    KeyFileError,
    PrivateKey,
    algorithm_for,
    jwks,
    key_id,
    public_key_from_pem,
)

__all__ = [
    "ALGORITHMS",
    "INSTANCE_ID_RE",
    "ROUTING_AUDIENCE",
    "IKeySource",
    "InvalidToken",
    "JWKSKeySource",
    "MAX_TOKEN_ID",
    "ROUTING_MAX_LIFETIME",
    "StaticKeySource",
    "TokenSigner",
    "TokenVerifier",
    "check_instance_id",
    "check_lifetime",
    "check_token_id",
    "parse_jwks",
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

#: A JWKS document larger than this is refused (a handful of keys is < 4 KiB).
MAX_JWKS_SIZE = 1024 * 1024

# (kty, crv) -> the one algorithm such a key may verify.
_KEY_ALGORITHMS: dict[tuple[str, str], str] = {
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
}


class InvalidToken(Exception):
    """The token was refused."""

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or (self.__doc__ or "").strip())

    @property
    def reason(self) -> str:
        """The short reason: safe to log or show, never any token text."""
        return str(self.args[0])


def check_instance_id(value: object) -> str:
    """
    Return ``value`` if it is a valid instance id (one DNS label), so the
    host name built from it cannot name another instance or another domain.

    :raises InvalidToken: ``bad instance id``.
    """
    if not isinstance(value, str) or INSTANCE_ID_RE.fullmatch(value) is None:
        raise InvalidToken("bad instance id")
    return value


def check_token_id(claims: Mapping[str, Any]) -> str:
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


def check_lifetime(claims: Mapping[str, Any], maximum: float) -> float:
    """
    The lifetime (``exp - iat``) of verified ``claims``, if it is more than 0
    and at most ``maximum`` seconds: a token made to last is refused even
    while it is still valid.

    :raises InvalidToken: the lifetime is outside those bounds (the message
        gives it, and the bound).
    """
    try:
        lifetime = float(_numericDate(claims, "exp") - _numericDate(claims, "iat"))
    except OverflowError:  # an int too big for a float: far too long anyway
        lifetime = math.inf
    if not lifetime > 0:
        raise InvalidToken("token lifetime is not positive (exp not after iat)")
    if lifetime > maximum:
        raise InvalidToken(f"token lifetime {lifetime:g} s is longer than the {maximum:g} s allowed")
    return lifetime


# -- keys ------------------------------------------------------------------


def _usable_key(data: object) -> tuple[str, PyJWK] | None:
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
            kid = key_id(key.key)
        return kid, PyJWK({**members, "kid": kid}, algorithm=alg)
    except Exception:
        return None


def parse_jwks(document: object) -> dict[str, PyJWK]:
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
        usable = _usable_key(member)
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
        self._keys = parse_jwks(jwks_document)
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
        return cls.fromKeys(public_key_from_pem(data, str(path)))

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
            keys = parse_jwks(document)
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
        self.algorithm = algorithm_for(private_key)
        self.kid = kid if kid is not None else key_id(private_key.public_key())
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


def _numericDate(claims: Mapping[str, Any], name: str) -> float | int:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidToken(f"bad {name} claim")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidToken(f"bad {name} claim")
    return value


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
        exp = _numericDate(claims, "exp")
        iat = _numericDate(claims, "iat")
        # Arithmetic on ``now`` only: ``exp`` may be an int too big for a float.
        if now - self.leeway >= exp:
            raise InvalidToken("token expired")
        if iat > now + self.leeway:
            raise InvalidToken("token not yet valid")
        if "nbf" in claims and _numericDate(claims, "nbf") > now + self.leeway:
            raise InvalidToken("token not yet valid")
