"""
The login providers as the portal is configured with them: ``ProviderConfig``
(checked as it is made), ``providersFromFile`` (the JSON file, secrets each
in a file of their own) and ``loginLinks`` (the login page's "Log in with
..." links).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode, urlsplit

from dit4c.common.nextpath import safeNext

from .errors import ConfigError

__all__ = [
    "GITHUB_AUTHORIZE_URL",
    "GITHUB_TOKEN_URL",
    "GITHUB_USER_URL",
    "ProviderConfig",
    "checkURL",
    "loginLinks",
    "providersFromFile",
]

GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"
GITHUB_USER_URL = "https://api.github.com/user"

#: Provider names: they appear in URLs and in the identities stored.
_PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def _isLoopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def checkURL(url: str, what: str) -> str:
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
        def default(name: str, value: object) -> None:
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
            checkURL(self.issuer, f"provider {self.name}: issuer")
            if not self.scopes:
                default("scopes", ("openid", "profile", "email"))
            elif "openid" not in self.scopes:
                default("scopes", ("openid", *self.scopes))
        elif self.kind == "github":
            default("authorizeURL", self.authorizeURL or GITHUB_AUTHORIZE_URL)
            default("tokenURL", self.tokenURL or GITHUB_TOKEN_URL)
            default("userURL", self.userURL or GITHUB_USER_URL)
            for what in ("authorizeURL", "tokenURL", "userURL"):
                checkURL(getattr(self, what), f"provider {self.name}: {what}")
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
