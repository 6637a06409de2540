"""
GitHub (or GitHub Enterprise) as the login's ``Backend``: OAuth 2 with
PKCE, and no ID token, so the user API says who logged in (its numeric id
is the subject; a login name can change hands).
"""

from __future__ import annotations

from urllib.parse import urlencode

from .backend import ProviderHTTP, UpstreamIdentity
from .config import ProviderConfig
from .errors import ProviderUnavailable

__all__ = ["GitHub"]


class GitHub:
    """GitHub's OAuth 2 (no ID token: the user API says who it is)."""

    def __init__(self, config: ProviderConfig, http: ProviderHTTP) -> None:
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
