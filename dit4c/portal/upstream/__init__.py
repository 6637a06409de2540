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

The modules, by concern:

- ``config``: ``ProviderConfig``, ``providersFromFile``, ``loginLinks``;
- ``errors``: what can go wrong, as the person and the log are told;
- ``backend``: a provider's client (``Backend``), its answer
  (``UpstreamIdentity``) and its HTTP requests (``ProviderHTTP``);
- ``oidc`` and ``github``: the two kinds of client;
- ``idtoken``: ``verifyIDToken``;
- ``names``: login names for people who sign up;
- ``host``: what the login uses of the portal (``LoginHost``, ``LoginDoors``);
- ``app``: ``UpstreamLogin``, the Klein app the portal mounts at ``/login/``.
"""

from __future__ import annotations

from .app import FLOW_COOKIE, FLOW_LIFETIME, MAX_PARAMETER, UpstreamLogin
from .backend import HTTP_TIMEOUT, MAX_RESPONSE, UpstreamIdentity
from .config import (
    GITHUB_AUTHORIZE_URL,
    GITHUB_TOKEN_URL,
    GITHUB_USER_URL,
    ProviderConfig,
    loginLinks,
    providersFromFile,
)
from .errors import (
    AccountDisabled,
    CodeRejected,
    ConfigError,
    FlowExpired,
    FlowReplayed,
    InvalidIdentity,
    NotRegistered,
    ProviderRefused,
    ProviderUnavailable,
    StateMismatch,
    TooManyFailures,
    UnknownProvider,
    UpstreamLoginError,
)
from .host import LoginDoors, LoginHost
from .idtoken import ALLOWED_ALGORITHMS, LEEWAY, verifyIDToken
from .names import MAX_LOGIN_NAME, RESERVED_NAMES, baseLoginName
from .oidc import DISCOVERY_LIFETIME, JWKS_REFETCH_INTERVAL

__all__ = [
    "ALLOWED_ALGORITHMS",
    "DISCOVERY_LIFETIME",
    "FLOW_COOKIE",
    "FLOW_LIFETIME",
    "GITHUB_AUTHORIZE_URL",
    "GITHUB_TOKEN_URL",
    "GITHUB_USER_URL",
    "HTTP_TIMEOUT",
    "JWKS_REFETCH_INTERVAL",
    "LEEWAY",
    "MAX_LOGIN_NAME",
    "MAX_PARAMETER",
    "MAX_RESPONSE",
    "RESERVED_NAMES",
    "AccountDisabled",
    "CodeRejected",
    "ConfigError",
    "FlowExpired",
    "FlowReplayed",
    "InvalidIdentity",
    "LoginDoors",
    "LoginHost",
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
