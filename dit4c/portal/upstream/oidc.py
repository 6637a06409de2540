"""
An OpenID Connect issuer as the login's ``Backend``: discovery (cached),
its JWKS (fetched again when a token names a key not seen yet, at most once
a minute), the authorization request with ``nonce`` and PKCE, RFC 9207's
``iss`` check, and the code exchanged for an ID token that
``verifyIDToken`` checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .backend import ProviderHTTP, UpstreamIdentity
from .config import ProviderConfig, checkURL
from .errors import (
    ConfigError,
    InvalidIdentity,
    ProviderUnavailable,
    StateMismatch,
    UnknownSigningKey,
)
from .idtoken import ALLOWED_ALGORITHMS, verifyIDToken

__all__ = ["DISCOVERY_LIFETIME", "JWKS_REFETCH_INTERVAL", "OpenIDConnect"]

#: How long a discovery document is trusted before it is fetched again.
DISCOVERY_LIFETIME = 3600.0

#: The least time between two JWKS fetches caused by an unknown ``kid``.
JWKS_REFETCH_INTERVAL = 60.0


class OpenIDConnect:
    """An OpenID Connect issuer, found by discovery."""

    log = Logger()

    def __init__(self, config: ProviderConfig, http: ProviderHTTP, clock: IReactorTime) -> None:
        assert config.issuer is not None
        self.config = config
        self.issuer = config.issuer
        self.http = http
        self.clock = clock
        self._metadata: dict[str, Any] | None = None
        self._metadataExpires = 0.0
        self._jwks: dict[str, Any] | None = None
        self._jwksFetched = float("-inf")

    async def metadata(self) -> dict[str, Any]:
        now = self.clock.seconds()
        if self._metadata is not None and now < self._metadataExpires:
            return self._metadata
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        code, doc = await self.http.request("GET", url, "discovery")
        if code != 200 or not isinstance(doc, dict):
            raise ProviderUnavailable(reason=f"discovery: HTTP {code}")
        # OpenID Connect Discovery 1.0 section 4.3: exactly the issuer asked.
        if doc.get("issuer") != self.issuer:
            raise ProviderUnavailable(
                reason=f"discovery: issuer is {doc.get('issuer')!r}, not {self.issuer!r}"
            )
        for name in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            value = doc.get(name)
            if not isinstance(value, str):
                raise ProviderUnavailable(reason=f"discovery: no {name}")
            try:
                checkURL(value, name)
            except ConfigError as e:
                raise ProviderUnavailable(reason=f"discovery: {e}") from None
        methods = doc.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            raise ProviderUnavailable(reason="discovery: the issuer does not support PKCE S256")
        algs = doc.get("id_token_signing_alg_values_supported")
        if not isinstance(algs, list) or not (set(algs) & ALLOWED_ALGORITHMS):
            raise ProviderUnavailable(
                reason=f"discovery: no ID token algorithm the portal accepts in {algs!r}"
            )
        self._metadata = doc
        self._metadataExpires = now + DISCOVERY_LIFETIME
        return doc

    async def jwks(self, refresh: bool = False) -> dict[str, Any]:
        now = self.clock.seconds()
        if self._jwks is not None and not (
            refresh and now - self._jwksFetched >= JWKS_REFETCH_INTERVAL
        ):
            return self._jwks
        meta = await self.metadata()
        code, doc = await self.http.request("GET", meta["jwks_uri"], "JWKS")
        if code != 200 or not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ProviderUnavailable(reason=f"JWKS: HTTP {code}, or no keys")
        self._jwks = doc
        self._jwksFetched = now
        return doc

    async def authorizationURL(
        self, redirectURI: str, state: str, nonce: str, challenge: str
    ) -> str:
        meta = await self.metadata()
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.config.clientId,
                "redirect_uri": redirectURI,
                "scope": " ".join(self.config.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        endpoint: str = meta["authorization_endpoint"]
        return endpoint + ("&" if "?" in endpoint else "?") + query

    async def checkIssuer(self, iss: str | None) -> None:
        """RFC 9207: the ``iss`` of an authorization response names this issuer (mix-up defence)."""
        meta = await self.metadata()
        if iss is None:
            if meta.get("authorization_response_iss_parameter_supported") is True:
                raise StateMismatch(reason="authorization response without iss")
        elif iss != self.issuer:
            raise StateMismatch(reason=f"authorization response from issuer {iss!r}")

    async def identify(
        self, code: str, verifier: str, nonce: str, redirectURI: str
    ) -> UpstreamIdentity:
        meta = await self.metadata()
        tokens = await self.http.token(
            meta["token_endpoint"],
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirectURI,
                "code_verifier": verifier,
            },
        )
        idToken = tokens.get("id_token")
        if not isinstance(idToken, str):
            raise InvalidIdentity(reason="token endpoint: no id_token")
        algorithms = set(meta["id_token_signing_alg_values_supported"]) & ALLOWED_ALGORITHMS

        def verify(jwks: Mapping[str, Any]) -> dict[str, Any]:
            return verifyIDToken(
                idToken,
                jwks,
                issuer=self.issuer,
                clientId=self.config.clientId,
                nonce=nonce,
                algorithms=algorithms,
            )

        try:
            claims = verify(await self.jwks())
        except UnknownSigningKey:
            # The issuer may have rolled its keys since they were fetched.
            claims = verify(await self.jwks(refresh=True))
        if not any(isinstance(claims.get(c), str) for c in ("preferred_username", "email")):
            claims = {
                **(await self._userinfo(meta, tokens["access_token"], claims["sub"])),
                **claims,
            }
        return self._identity(claims)

    async def _userinfo(
        self, meta: Mapping[str, Any], accessToken: str, subject: str
    ) -> dict[str, Any]:
        """The UserInfo claims (Core 5.3), for a name when the ID token has none."""
        url = meta.get("userinfo_endpoint")
        if not isinstance(url, str):
            return {}
        try:
            checkURL(url, "userinfo_endpoint")
        except ConfigError:
            return {}
        code, doc = await self.http.request(
            "GET", url, "userinfo", headers={"Authorization": f"Bearer {accessToken}"}
        )
        if code != 200 or not isinstance(doc, dict):
            self.log.warn(
                "userinfo of {provider} failed: HTTP {code}", provider=self.config.name, code=code
            )
            return {}
        if doc.get("sub") != subject:
            raise InvalidIdentity(reason="userinfo sub differs from the ID token's")
        return doc

    def _identity(self, claims: Mapping[str, Any]) -> UpstreamIdentity:
        def text(name: str) -> str | None:
            value = claims.get(name)
            return value if isinstance(value, str) and value else None

        email = text("email") if claims.get("email_verified") is True else None
        hints = tuple(h for h in (text("preferred_username"), text("email"), text("name")) if h)
        return UpstreamIdentity(
            provider=self.config.name,
            subject=claims["sub"],
            nameHints=hints,
            displayName=text("name") or text("preferred_username"),
            email=email,
        )
