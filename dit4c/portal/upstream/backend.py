"""
What a provider's client is to the login (``Backend``: where to send the
browser, who the answer says is there), what it answers
(``UpstreamIdentity``), and the HTTP requests every client makes to its
provider (``ProviderHTTP``: timeouts, size limits, client authentication,
and every failure as ``ProviderUnavailable`` or ``CodeRejected``).
"""

from __future__ import annotations

import json
from base64 import b64encode
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import treq
from treq.client import HTTPClient
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IResponse

from .config import ProviderConfig
from .errors import CodeRejected, ProviderUnavailable, UpstreamLoginError

__all__ = ["HTTP_TIMEOUT", "MAX_RESPONSE", "Backend", "ProviderHTTP", "UpstreamIdentity"]

#: Seconds an HTTP request to a provider may take.
HTTP_TIMEOUT = 15.0

#: The largest provider answer read (discovery, JWKS, tokens, user).
MAX_RESPONSE = 1024 * 1024


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


async def _readJSON(response: IResponse, what: str) -> Any:
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


class Backend(Protocol):
    """
    One provider's client (``OpenIDConnect``, ``GitHub``): the login asks it
    where to send the browser, whether an answer came from its issuer, and
    who the answer's code belongs to.
    """

    config: ProviderConfig

    async def authorizationURL(
        self, redirectURI: str, state: str, nonce: str, challenge: str
    ) -> str: ...

    async def identify(
        self, code: str, verifier: str, nonce: str, redirectURI: str
    ) -> UpstreamIdentity: ...

    async def checkIssuer(self, iss: str | None) -> None: ...


class ProviderHTTP:
    """Requests to one provider: timeouts, size limits, and errors as ``ProviderUnavailable``."""

    def __init__(self, config: ProviderConfig, client: HTTPClient, clock: IReactorTime) -> None:
        self.config = config
        self.client = client
        self.clock = clock

    async def request(
        self,
        method: str,
        url: str,
        what: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """The status and JSON body of ``method url`` (``what`` names it in errors)."""
        sent: dict[bytes | str, bytes | str] = {"Accept": "application/json", "User-Agent": "dit4c-portal"}
        sent.update((headers or {}).items())
        try:
            # treq takes the clock for the timeout alone (``callLater``),
            # though its type asks for a whole reactor (treq's ``_ITreqReactor``).
            clock: Any = self.clock
            response = await self.client.request(
                method, url, headers=sent, data=data, timeout=HTTP_TIMEOUT, reactor=clock
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
