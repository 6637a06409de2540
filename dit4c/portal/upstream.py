"""
Logging in through upstream identity providers: GitHub (OAuth 2) and any
OpenID Connect issuer (found by discovery).

Both use the authorization code flow (RFC 6749 section 4.1) with PKCE
(RFC 7636, ``S256``) and ``state``; OpenID Connect adds a ``nonce`` and an
ID token, verified with PyJWT against the issuer's JWKS:

- ``GET /login/<provider>?next=/path`` makes a fresh ``state``, ``nonce`` and
  PKCE verifier, keeps them in a short-lived cookie signed by the portal
  (HttpOnly, SameSite=Lax, Secure and named ``__Host-`` under https, 10
  minutes) and redirects the browser to the provider;
- ``GET /login/<provider>/callback`` checks that the answer belongs to that
  cookie (so to this browser, and to a login it started), that it is not a
  replay, exchanges the code with the verifier, verifies the ID token
  (signature with algorithms pinned to the issuer's discovery document
  intersected with ``ALLOWED_ALGORITHMS``; ``iss``, ``aud`` = client id,
  ``exp``, ``iat``, ``nonce``) and logs the person in, exactly as the local
  login does: a fresh session and its cookie.

A person is found by the identity ``(provider name, subject)`` linked to
their user (``IStore.linkIdentity``). A new identity either signs up (a new
user with a free login name made from the provider's user name) or, if the
provider does not allow sign-up, is told that the account is not registered.

``UpstreamLogin`` is a Klein app of its own, mounted by the portal at
``/login/``; ``providersFromFile`` reads the providers from a JSON file and
``loginLinks`` makes the "Log in with ..." links for the login page.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import re
import secrets
import unicodedata
from base64 import b64encode
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlencode, urlsplit

import jwt
import treq
from jwt import PyJWK
from klein import Klein
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dit4c.common.nextpath import safeNext
from dit4c.common.pkce import codeChallenge
from dit4c.portal import security
from dit4c.portal.store.errors import Conflict

if TYPE_CHECKING:
    from dit4c.portal.app import Portal


__all__ = [
    "ALLOWED_ALGORITHMS",
    "FLOW_COOKIE",
    "FLOW_LIFETIME",
    "AccountDisabled",
    "CodeRejected",
    "ConfigError",
    "FlowExpired",
    "FlowReplayed",
    "InvalidIdentity",
    "NotRegistered",
    "ProviderConfig",
    "ProviderRefused",
    "ProviderUnavailable",
    "StateMismatch",
    "TooManyFailures",
    "UnknownProvider",
    "UpstreamIdentity",
    "UpstreamLogin",
    "UpstreamLoginError",
    "baseLoginName",
    "loginLinks",
    "providersFromFile",
    "verifyIDToken",
]

#: The cookie that carries a login in progress from ``/login/<p>`` to its callback.
FLOW_COOKIE = b"dit4c_upstream_flow"

#: How long a person has to log in at the provider, in seconds.
FLOW_LIFETIME = 600.0

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

#: How long a discovery document is trusted before it is fetched again.
DISCOVERY_LIFETIME = 3600.0

#: The least time between two JWKS fetches caused by an unknown ``kid``.
JWKS_REFETCH_INTERVAL = 60.0

#: Seconds an HTTP request to a provider may take.
HTTP_TIMEOUT = 15.0

#: The largest provider answer read (discovery, JWKS, tokens, user).
MAX_RESPONSE = 1024 * 1024

#: The largest callback parameter accepted (a code or state).
MAX_PARAMETER = 2048

GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"
GITHUB_USER_URL = "https://api.github.com/user"

#: Provider names: they appear in URLs and in the identities stored.
_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

#: The longest login name made for a new user.
MAX_LOGIN_NAME = 32

#: Login names never given to a new user from a provider's name for them.
RESERVED_NAMES: frozenset[str] = frozenset(
    {"admin", "administrator", "root", "system", "dit4c", "portal", "api", "login", "logout", "www"}
)

_ERROR_CODE = re.compile(r"[a-z_]{1,64}")


# -- errors ------------------------------------------------------------------------------------


class UpstreamLoginError(Exception):
    """The login did not work. Please try again."""

    #: The HTTP status of the error page.
    status = 400
    #: The error page's title.
    title = "Login failed"
    #: Whether this answer counts as a failed login from its address
    #: (``security.LoginThrottle``): one that was forged, stale or replayed.
    failure = False

    def __init__(self, message: str = "", *, reason: str = "") -> None:
        super().__init__(message or (self.__doc__ or "").strip())
        #: For the log only: never a code, token or secret.
        self.reason = reason or self.message

    @property
    def message(self) -> str:
        """What the person at the browser is told."""
        return str(self.args[0])


class UnknownProvider(UpstreamLoginError):
    """There is no such way to log in here."""

    status = 404
    title = "Not found"


class ProviderRefused(UpstreamLoginError):
    """The login provider did not log you in."""

    status = 403


class FlowExpired(UpstreamLoginError):
    """
    This login took too long, or was started in another browser. Please
    start again.
    """

    failure = True


class StateMismatch(UpstreamLoginError):
    """This answer from the login provider does not belong to the login you started. Please start again."""

    failure = True


class FlowReplayed(UpstreamLoginError):
    """This answer from the login provider was used already. Please start again."""

    failure = True


class CodeRejected(UpstreamLoginError):
    """The login provider did not accept this login any more. Please start again."""

    failure = True


class ProviderUnavailable(UpstreamLoginError):
    """The login provider could not be reached, or its answer made no sense. Please try again later."""

    status = 502


class InvalidIdentity(UpstreamLoginError):
    """The login provider's answer could not be verified, so you were not logged in."""

    status = 403
    failure = True


class _UnknownSigningKey(InvalidIdentity):
    """No key of the issuer's JWKS fits the ID token (yet: the issuer may have new keys)."""


class NotRegistered(UpstreamLoginError):
    """
    This account is not registered here. Ask an administrator of this
    portal to give you access.
    """

    status = 403
    title = "Not registered"


class AccountDisabled(UpstreamLoginError):
    """This account is disabled."""

    status = 403
    title = "Account disabled"


class TooManyFailures(UpstreamLoginError):
    """Too many failed logins from here. Please wait a little and try again."""

    status = 429
    title = "Too many failed logins"

    def __init__(self, wait: float) -> None:
        super().__init__(
            f"Too many failed logins from here. Try again in {security.waitText(wait)}.",
            reason=f"throttled for {wait:.0f} s",
        )
        #: Seconds until an attempt from here goes ahead.
        self.wait = wait


class ConfigError(ValueError):
    """The login providers' configuration is wrong."""


# -- configuration ---------------------------------------------------------------------------


def _isLoopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _checkURL(url: str, what: str) -> str:
    """An https URL, or http on loopback (tests, a provider on the same host)."""
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and _isLoopback(parts.hostname):
        return url
    raise ConfigError(f"{what} must be an https:// URL (http:// only on loopback): {url!r}")


@dataclass(frozen=True)
class ProviderConfig:
    """
    One upstream identity provider. ``kind`` is ``"oidc"`` (give ``issuer``)
    or ``"github"`` (the GitHub endpoints are the defaults; give others for
    GitHub Enterprise).
    """

    #: In URLs (``/login/<name>``) and in the identities stored: renaming a
    #: provider orphans the identities linked through it.
    name: str
    kind: str
    clientId: str
    #: Never logged, never shown (``repr`` leaves it out).
    clientSecret: str = field(repr=False)
    issuer: str | None = None
    authorizeURL: str | None = None
    tokenURL: str | None = None
    userURL: str | None = None
    #: Defaults: ``openid profile email`` (OIDC), ``read:user`` (GitHub).
    scopes: tuple[str, ...] = ()
    #: Whether a person the portal does not know yet gets a new user.
    allowSignup: bool = False
    #: Shown as "Log in with <label>"; defaults to GitHub or the name.
    label: str | None = None
    #: How the portal authenticates at the token endpoint:
    #: ``client_secret_basic`` (the OIDC default) or ``client_secret_post``
    #: (the GitHub default).
    tokenAuth: str = ""

    def __post_init__(self) -> None:
        def default(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.name, str) or _PROVIDER_NAME.fullmatch(self.name) is None:
            raise ConfigError(f"provider name {self.name!r}: use 1-32 of a-z, 0-9, '-', '_'")
        if not self.clientId or not isinstance(self.clientId, str):
            raise ConfigError(f"provider {self.name}: client_id is missing")
        if not self.clientSecret or not isinstance(self.clientSecret, str):
            raise ConfigError(f"provider {self.name}: the client secret is empty")
        if not self.tokenAuth:
            default(
                "tokenAuth",
                "client_secret_post" if self.kind == "github" else "client_secret_basic",
            )
        if self.tokenAuth not in ("client_secret_basic", "client_secret_post"):
            raise ConfigError(
                f"provider {self.name}: token_auth must be client_secret_basic or client_secret_post"
            )
        default("scopes", tuple(self.scopes))
        if self.kind == "oidc":
            if not self.issuer:
                raise ConfigError(
                    f"provider {self.name}: an OpenID Connect provider needs an issuer"
                )
            _checkURL(self.issuer, f"provider {self.name}: issuer")
            if not self.scopes:
                default("scopes", ("openid", "profile", "email"))
            elif "openid" not in self.scopes:
                default("scopes", ("openid", *self.scopes))
        elif self.kind == "github":
            default("authorizeURL", self.authorizeURL or GITHUB_AUTHORIZE_URL)
            default("tokenURL", self.tokenURL or GITHUB_TOKEN_URL)
            default("userURL", self.userURL or GITHUB_USER_URL)
            for what in ("authorizeURL", "tokenURL", "userURL"):
                _checkURL(getattr(self, what), f"provider {self.name}: {what}")
            if not self.scopes:
                default("scopes", ("read:user",))
        else:
            raise ConfigError(
                f"provider {self.name}: kind must be 'oidc' or 'github', not {self.kind!r}"
            )
        if self.label is None:
            default("label", "GitHub" if self.kind == "github" else self.name)


_FILE_KEYS = {
    "name",
    "kind",
    "label",
    "issuer",
    "client_id",
    "client_secret_file",
    "scopes",
    "allow_signup",
    "token_auth",
    "authorize_url",
    "token_url",
    "user_url",
}


def providersFromFile(path: str | Path) -> list[ProviderConfig]:
    """
    Read the login providers from a JSON file::

        {"providers": [
          {"name": "github", "kind": "github", "client_id": "Iv1.0123",
           "client_secret_file": "github.secret", "allow_signup": true},
          {"name": "uni", "kind": "oidc", "label": "University",
           "issuer": "https://login.uni.example", "client_id": "dit4c",
           "client_secret_file": "/etc/dit4c/uni.secret",
           "scopes": ["openid", "profile", "email"]}
        ]}

    Each client secret is read from its own file (relative paths are from
    the configuration file's directory), so the configuration itself holds
    no secret. Fails with ``ConfigError`` (a ``ValueError``).
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
    entries = document.get("providers") if isinstance(document, dict) else document
    if not isinstance(entries, list):
        raise ConfigError(f'{path}: expected {{"providers": [...]}} or a list of providers')
    providers: list[ProviderConfig] = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: provider {index} is not an object")
        where = f"{path}: provider {entry.get('name', index)!r}"
        unknown = set(entry) - _FILE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        secretFile = entry.get("client_secret_file")
        if not isinstance(secretFile, str) or not secretFile:
            raise ConfigError(f"{where}: client_secret_file is missing")
        try:
            secret = (path.parent / secretFile).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{where}: cannot read the client secret: {e.__class__.__name__}"
            ) from None
        scopes = entry.get("scopes", [])
        if not isinstance(scopes, list) or not all(isinstance(s, str) and s for s in scopes):
            raise ConfigError(f"{where}: scopes must be a list of strings")
        allowSignup = entry.get("allow_signup", False)
        if not isinstance(allowSignup, bool):
            raise ConfigError(f"{where}: allow_signup must be true or false")
        try:
            providers.append(
                ProviderConfig(
                    name=entry.get("name", ""),
                    kind=entry.get("kind", ""),
                    clientId=entry.get("client_id", ""),
                    clientSecret=secret,
                    issuer=entry.get("issuer"),
                    authorizeURL=entry.get("authorize_url"),
                    tokenURL=entry.get("token_url"),
                    userURL=entry.get("user_url"),
                    scopes=tuple(scopes),
                    allowSignup=allowSignup,
                    label=entry.get("label"),
                    tokenAuth=entry.get("token_auth", ""),
                )
            )
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    names = [p.name for p in providers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{path}: providers named twice: {duplicates}")
    return providers


def loginLinks(
    providers: Iterable[ProviderConfig], next: str | None = None
) -> list[tuple[str, str]]:
    """``("Log in with <label>", "/login/<name>?next=...")`` for each provider, for the login page."""
    query = ""
    target = safeNext(next)
    if target != "/":
        query = "?" + urlencode({"next": target})
    return [(f"Log in with {p.label}", f"/login/{p.name}{query}") for p in providers]


# -- the pieces of the flow ----------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamIdentity:
    """Who the provider says is at the browser."""

    provider: str
    #: Stable and unique at the provider: OIDC ``sub``, GitHub's numeric id.
    subject: str
    #: Names to make a login name from, best first (user name, then email).
    nameHints: tuple[str, ...] = ()
    displayName: str | None = None
    #: Only an address the provider says it verified.
    email: str | None = None


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
        raise _UnknownSigningKey(reason=f"no {alg} key with kid {kid!r} in the issuer's JWKS")
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


def baseLoginName(hints: Iterable[str | None]) -> str:
    """
    A login name from a provider's names for a person, best first: lower
    case, DNS-label-like (``a-z``, ``0-9``, ``-``; no ``-`` at either end),
    at most ``MAX_LOGIN_NAME`` characters; an email address gives its local
    part. ``user`` when none of them gives anything usable.
    """
    for hint in hints:
        if not hint:
            continue
        if "@" in hint:
            hint = hint.rsplit("@", 1)[0]
        ascii_ = unicodedata.normalize("NFKD", hint).encode("ascii", "ignore").decode().lower()
        name = re.sub(r"[^a-z0-9]+", "-", ascii_).strip("-")[:MAX_LOGIN_NAME].rstrip("-")
        if name and name not in RESERVED_NAMES:
            return name
    return "user"


def _withDigits(base: str, n: int) -> str:
    """``base`` with the number ``n`` after it, still at most ``MAX_LOGIN_NAME`` long."""
    suffix = str(n)
    return base[: MAX_LOGIN_NAME - len(suffix)].rstrip("-") + suffix


async def _readJSON(response: Any, what: str) -> Any:
    """A provider's JSON answer, at most ``MAX_RESPONSE`` bytes."""
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > MAX_RESPONSE:
            raise ProviderUnavailable(reason=f"{what}: answer larger than {MAX_RESPONSE} bytes")
        chunks.append(data)

    await treq.collect(response, collect)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise ProviderUnavailable(
            reason=f"{what}: answer is not JSON (HTTP {response.code})"
        ) from None


def _basicAuth(clientId: str, secret: str) -> str:
    """RFC 6749 section 2.3.1: both form-encoded, then HTTP Basic."""
    pair = f"{quote(clientId, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + b64encode(pair).decode("ascii")


class _Backend(Protocol):
    config: ProviderConfig

    async def authorizationURL(
        self, redirectURI: str, state: str, nonce: str, challenge: str
    ) -> str: ...

    async def identify(
        self, code: str, verifier: str, nonce: str, redirectURI: str
    ) -> UpstreamIdentity: ...

    async def checkIssuer(self, iss: str | None) -> None: ...


class _HTTP:
    """Requests to one provider: timeouts, size limits, and errors as ``ProviderUnavailable``."""

    def __init__(self, config: ProviderConfig, client: HTTPClient, clock: Any) -> None:
        self.config = config
        self.client = client
        self.clock = clock

    async def request(self, method: str, url: str, what: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {
            "Accept": "application/json",
            "User-Agent": "dit4c-portal",
            **kwargs.pop("headers", {}),
        }
        try:
            response = await self.client.request(
                method, url, headers=headers, timeout=HTTP_TIMEOUT, reactor=self.clock, **kwargs
            )
            body = await _readJSON(response, what)
        except UpstreamLoginError:
            raise
        except Exception as e:
            raise ProviderUnavailable(reason=f"{what}: {e.__class__.__name__}: {e}") from None
        return response.code, body

    async def token(self, url: str, params: dict[str, str]) -> dict[str, Any]:
        """Exchange a code at the token endpoint; the answer's JSON object."""
        headers: dict[str, str] = {}
        data = dict(params)
        if self.config.tokenAuth == "client_secret_basic":
            headers["Authorization"] = _basicAuth(self.config.clientId, self.config.clientSecret)
        else:
            data.update(client_id=self.config.clientId, client_secret=self.config.clientSecret)
        code, body = await self.request("POST", url, "token endpoint", data=data, headers=headers)
        if not isinstance(body, dict):
            raise ProviderUnavailable(reason=f"token endpoint: HTTP {code}, not a JSON object")
        # GitHub reports errors with status 200.
        if code != 200 or "error" in body:
            error = body.get("error")
            if 400 <= code < 500 or error:
                raise CodeRejected(reason=f"token endpoint: HTTP {code}: {str(error)[:64]}")
            raise ProviderUnavailable(reason=f"token endpoint: HTTP {code}")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise ProviderUnavailable(reason="token endpoint: no access_token")
        if str(body.get("token_type", "bearer")).lower() != "bearer":
            raise ProviderUnavailable(
                reason=f"token endpoint: token_type {body.get('token_type')!r}"
            )
        return body


class _OpenIDConnect:
    """An OpenID Connect issuer, found by discovery."""

    log = Logger()

    def __init__(self, config: ProviderConfig, http: _HTTP, clock: Any) -> None:
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
                _checkURL(value, name)
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
        except _UnknownSigningKey:
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
            _checkURL(url, "userinfo_endpoint")
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


class _GitHub:
    """GitHub's OAuth 2 (no ID token: the user API says who it is)."""

    def __init__(self, config: ProviderConfig, http: _HTTP) -> None:
        self.config = config
        self.http = http

    async def authorizationURL(
        self, redirectURI: str, state: str, nonce: str, challenge: str
    ) -> str:
        assert self.config.authorizeURL is not None
        query = urlencode(
            {
                "client_id": self.config.clientId,
                "redirect_uri": redirectURI,
                "scope": " ".join(self.config.scopes),
                "state": state,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        return self.config.authorizeURL + "?" + query

    async def checkIssuer(self, iss: str | None) -> None:
        return None

    async def identify(
        self, code: str, verifier: str, nonce: str, redirectURI: str
    ) -> UpstreamIdentity:
        assert self.config.tokenURL is not None and self.config.userURL is not None
        tokens = await self.http.token(
            self.config.tokenURL,
            {"code": code, "redirect_uri": redirectURI, "code_verifier": verifier},
        )
        status, user = await self.http.request(
            "GET",
            self.config.userURL,
            "GitHub user API",
            headers={
                "Authorization": f"Bearer {tokens['access_token']}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            },
        )
        if status != 200 or not isinstance(user, dict):
            raise ProviderUnavailable(reason=f"GitHub user API: HTTP {status}")
        number, login = user.get("id"), user.get("login")
        if not isinstance(number, int) or isinstance(number, bool) or not isinstance(login, str):
            raise ProviderUnavailable(reason="GitHub user API: no numeric id and login")
        name = user.get("name")
        return UpstreamIdentity(
            provider=self.config.name,
            subject=str(number),
            nameHints=(login,),
            displayName=name if isinstance(name, str) and name else login,
        )


# -- the web app ------------------------------------------------------------------------------------


class UpstreamLogin:
    """
    ``/login/<provider>`` and ``/login/<provider>/callback`` for each
    provider; mount at ``/login/`` (a Klein branch).
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        portal: Portal,
        providers: Sequence[ProviderConfig],
        httpClient: HTTPClient,
        *,
        clock: Any = None,
    ) -> None:
        self.portal = portal
        self.clock = clock if clock is not None else portal.clock
        self.configs = {p.name: p for p in providers}
        if len(self.configs) != len(providers):
            raise ConfigError("two providers have the same name")
        self.backends: dict[str, _Backend] = {}
        for p in providers:
            http = _HTTP(p, httpClient, self.clock)
            self.backends[p.name] = (
                _OpenIDConnect(p, http, self.clock) if p.kind == "oidc" else _GitHub(p, http)
            )
        #: The state of each flow that came back, until its cookie expires:
        #: a callback replayed (even with its cookie) is refused here.
        self._used: dict[str, float] = {}
        #: New users are made one at a time, so that one identity makes one user.
        self._signup = DeferredLock()

    def links(self, next: str | None = None) -> list[tuple[str, str]]:
        return loginLinks(self.configs.values(), next)

    def redirectURI(self, name: str) -> str:
        return f"{self.portal.config.publicURL}/login/{name}/callback"

    def _backend(self, name: str) -> _Backend:
        backend = self.backends.get(name)
        if backend is None:
            raise UnknownProvider(reason=f"no provider {name!r}")
        return backend

    def _flowKey(self, config: ProviderConfig) -> bytes:
        # From the client secret: every portal process (and a restarted one)
        # has it, so a flow started at one is accepted at another.
        return hmac.new(
            config.clientSecret.encode(),
            b"dit4c upstream login flow:" + config.name.encode(),
            hashlib.sha256,
        ).digest()

    # -- the flow ------------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def index(self, request: IRequest) -> bytes:
        return self.portal.redirect(request, "/login")

    @app.route("/<name>", methods=["GET"])
    async def start(self, request: IRequest, name: str) -> bytes:
        backend = self._backend(name)
        target = safeNext(self.portal.arg(request, "next"))
        if await self.portal.loggedIn(request) is not None:
            return self._redirect(request, target)
        state, nonce, verifier = (
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(48),
        )
        url = await backend.authorizationURL(
            self.redirectURI(name), state, nonce, codeChallenge(verifier)
        )
        now = self.clock.seconds()
        flow = {
            "p": name,
            "s": state,
            "n": nonce,
            "v": verifier,
            "next": target,
            "exp": int(now + FLOW_LIFETIME),
        }
        cookie = jwt.encode(flow, self._flowKey(backend.config), algorithm="HS256")
        self.portal.cookies.set(request, FLOW_COOKIE, cookie, maxAge=FLOW_LIFETIME)
        return self._redirect(request, url)

    @app.route("/<name>/callback", methods=["GET"])
    async def callback(self, request: IRequest, name: str) -> bytes:
        """
        The provider's answer, throttled as password logins are: an answer
        that was forged, stale or replayed counts as a failed login from
        its address (``UpstreamLoginError.failure``), and an address with
        too many of them waits before its next answer is even read.
        """
        backend = self._backend(name)
        throttle, address = self.portal.throttle, self.portal.proxies.clientAddress(request)
        wait = await throttle.claim(None, address)
        if wait > 0:
            raise TooManyFailures(wait)
        try:
            page = await self._finish(request, name, backend)
        except UpstreamLoginError as e:
            if not e.failure:
                await throttle.succeeded(None, address)
            raise
        except BaseException:
            await throttle.succeeded(None, address)  # the portal failed, not the person
            raise
        await throttle.succeeded(None, address)
        return page

    async def _finish(self, request: IRequest, name: str, backend: _Backend) -> bytes:
        flow = self._takeFlow(request, backend.config)
        state = self._param(request, "state")
        if not security.tokensEqual(state, flow["s"]):
            raise StateMismatch(reason="state differs from the flow cookie's")
        self._useOnce(flow["s"], flow["exp"])
        await backend.checkIssuer(self._param(request, "iss"))
        error = self._param(request, "error")
        if error is not None:
            raise self._refused(backend.config, error)
        code = self._param(request, "code")
        if not code:
            raise ProviderRefused(reason="callback without code or error")
        identity = await backend.identify(code, flow["v"], flow["n"], self.redirectURI(name))
        user = await self._userFor(identity, backend.config)
        await self._logIn(request, user)
        self.log.info(
            "{name} logged in through {provider} (subject {subject})",
            name=user.name,
            provider=identity.provider,
            subject=identity.subject,
        )
        return self._redirect(request, safeNext(flow["next"]))

    def _takeFlow(self, request: IRequest, config: ProviderConfig) -> dict[str, Any]:
        """The flow this browser started (its cookie, now spent), or ``FlowExpired``."""
        raw = self.portal.cookies.get(request, FLOW_COOKIE)
        if not raw:
            raise FlowExpired(reason="no flow cookie")
        self.portal.cookies.clear(request, FLOW_COOKIE)
        try:
            flow = jwt.decode(
                raw.decode("ascii"),
                self._flowKey(config),
                algorithms=["HS256"],
                # The portal's clock decides (checked below), not the wall clock.
                options={"verify_exp": False, "require": ["exp"]},
            )
        except (UnicodeDecodeError, jwt.PyJWTError) as e:
            raise FlowExpired(reason=f"flow cookie refused: {e}") from None
        if flow.get("p") != config.name:
            raise StateMismatch(reason=f"the flow was started for {flow.get('p')!r}")
        if not isinstance(flow.get("exp"), int) or flow["exp"] <= self.clock.seconds():
            raise FlowExpired(reason="flow cookie expired")
        if not all(isinstance(flow.get(k), str) for k in ("s", "n", "v", "next")):
            raise FlowExpired(reason="flow cookie incomplete")
        return flow

    def _useOnce(self, state: str, expires: float) -> None:
        now = self.clock.seconds()
        for old in [s for s, e in self._used.items() if e <= now]:
            del self._used[old]
        if state in self._used:
            raise FlowReplayed(reason="callback replayed")
        self._used[state] = expires

    @staticmethod
    def _param(request: IRequest, name: str) -> str | None:
        values = request.args.get(name.encode())
        if not values or len(values) != 1 or len(values[0]) > MAX_PARAMETER:
            return None
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return None

    @staticmethod
    def _refused(config: ProviderConfig, error: str) -> ProviderRefused:
        code = error if _ERROR_CODE.fullmatch(error) else "unknown"
        if code == "access_denied":
            message = f"You did not allow logging in here with {config.label}."
        else:
            message = f"{config.label} did not log you in ({code})."
        return ProviderRefused(message, reason=f"provider error {code}")

    # -- users and sessions ----------------------------------------------------------------------

    async def _userFor(self, identity: UpstreamIdentity, config: ProviderConfig) -> Any:
        store = self.portal.store
        user = await store.userByIdentity(identity.provider, identity.subject)
        if user is None:
            if not config.allowSignup:
                raise NotRegistered(
                    reason=f"{identity.provider} subject {identity.subject} is not linked to a user"
                )
            user = await self._signup.run(lambda: Deferred.fromCoroutine(self._signUp(identity)))
        if user.disabled:
            raise AccountDisabled(reason=f"{user.name} is disabled")
        return user

    async def _signUp(self, identity: UpstreamIdentity) -> Any:
        store = self.portal.store
        user = await store.userByIdentity(identity.provider, identity.subject)
        if user is not None:
            return user  # another callback made it meanwhile
        base = baseLoginName(identity.nameHints)
        names = [base] + [_withDigits(base, n) for n in range(2, 100)]
        names += [_withDigits(base, secrets.randbelow(10**6)) for _ in range(10)]
        for name in names:
            if await store.userByName(name) is not None:
                continue
            try:
                user = await store.createUser(
                    name, email=identity.email, display_name=identity.displayName or name
                )
                break
            except Conflict:
                continue
        else:
            raise ProviderUnavailable(
                "No free login name could be found for you.", reason=f"no free name for {base}"
            )
        try:
            await store.linkIdentity(user.id, identity.provider, identity.subject)
        except Conflict:
            # Linked by another portal process meanwhile: use that user, and
            # retire the one made here.
            await store.updateUser(user.id, disabled=True)
            linked = await store.userByIdentity(identity.provider, identity.subject)
            if linked is None:
                raise
            return linked
        self.log.info(
            "new user {name} signed up through {provider} (subject {subject})",
            name=user.name,
            provider=identity.provider,
            subject=identity.subject,
        )
        return user

    async def _logIn(self, request: IRequest, user: Any) -> None:
        """A fresh session, exactly as the local login makes one."""
        portal = self.portal
        old = portal.cookies.get(request, security.SESSION_COOKIE)
        if old:
            await portal.store.deleteSession(old.decode("ascii", "replace"))
        session = await portal.store.createSession(user.id, portal.config.sessionLifetime)
        portal.cookies.set(
            request, security.SESSION_COOKIE, session.id, maxAge=portal.config.sessionLifetime
        )
        portal.cookies.clear(request, security.LOGIN_COOKIE)

    def _redirect(self, request: IRequest, location: str) -> bytes:
        request.setHeader(b"cache-control", b"no-store")
        # The callback's URL holds a code: it goes to no one else.
        request.setHeader(b"referrer-policy", b"no-referrer")
        return self.portal.redirect(request, location)

    # -- errors ---------------------------------------------------------------------------------------

    @app.handle_errors(UpstreamLoginError)
    def refused(self, request: IRequest, failure: Any) -> bytes:
        error: UpstreamLoginError = failure.value
        self.log.warn(
            "login through {uri} refused: {error}: {reason}",
            uri=request.path.decode("ascii", "replace"),
            error=error.__class__.__name__,
            reason=error.reason,
        )
        body = self.portal.render(
            request, "error.html", error.status, title=error.title, message=error.message
        )
        request.setHeader(b"referrer-policy", b"no-referrer")
        if isinstance(error, TooManyFailures):
            security.setRetryAfter(request, error.wait)
        return body

    @app.handle_errors(Exception)
    def failed(self, request: IRequest, failure: Any) -> bytes:
        from werkzeug.exceptions import HTTPException

        if failure.check(HTTPException):
            code = failure.value.code
            return self.portal.render(
                request,
                "error.html",
                code,
                title=failure.value.name,
                message=failure.value.description,
            )
        self.log.failure("upstream login failed: {uri}", failure, uri=request.path)
        return self.portal.render(
            request,
            "error.html",
            500,
            title="Something went wrong",
            message="The portal failed; try again.",
        )
