"""
The auth helper's calls to the portal, server to server (docs/protocols.md
6.3, 6.5 and 6.6): exchange a code for an access token, ask whether a
token's person may still use the instance, and open the watch that tells of
every access change to it. Every call has a timeout (the watch: until its
answer's head); no answer ever quotes a code or a token.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from dit4c.auth.errors import PortalRefused, PortalUnreachable
from dit4c.common.portalhttp import portalHTTP, readJSON
from dit4c.common.tokens import TokenSigner

__all__ = ["WATCH_AUDIENCE", "PortalClient", "UserInfo"]

#: The largest answer read from the portal (a token answer is about 1 KiB).
MAX_ANSWER = 64 * 1024
#: The audience of the token that opens a watch (docs/protocols.md 6.6).
WATCH_AUDIENCE = "dit4c-portal-watch"
#: Its lifetime: it is spent once, when the watch opens.
WATCH_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class UserInfo:
    """The portal's answer to "may this token's person use the instance?"."""

    #: ``allowed``, ``forbidden`` (403) or ``invalid`` (401: the token is no good).
    verdict: str
    name: str | None = None
    sub: str | None = None


class PortalClient:
    def __init__(
        self,
        reactor: Any,
        base: str,
        instance: str,
        *,
        timeout: float = 10.0,
        http: HTTPClient | None = None,
        signer: TokenSigner | None = None,
    ) -> None:
        """:param signer: signs with the instance's own key; needed only to watch."""
        self._reactor = reactor
        self.base = base.rstrip("/")
        self.instance = instance
        self.timeout = timeout
        self.signer = signer
        if http is None:
            http, self.base = portalHTTP(reactor, self.base, timeout=timeout)
        self._http = http

    def _timed(self, coroutine: Any) -> Deferred[Any]:
        """
        ``coroutine``, failing with a ``TimeoutError`` past ``timeout``
        whatever the cancelled request failed with (treq's own error wraps
        the cancellation), so callers can say "no answer in time".
        """
        d: Deferred[Any] = Deferred.fromCoroutine(coroutine)

        def timedOut(result: Any, timeout: float) -> Failure:
            return Failure(TimeoutError(f"no answer within {timeout:g} s"))

        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=timedOut)
        return d

    async def _read(self, response: Any) -> tuple[int, Any]:
        return await readJSON(response, limit=MAX_ANSWER, failure=PortalUnreachable)

    def exchange(self, code: str, verifier: str, redirectURI: str) -> Deferred[str]:
        """
        The access token for ``code``.

        Fails with :class:`PortalRefused` (the code was refused),
        :class:`PortalUnreachable` or a timeout.
        """
        return self._timed(self._exchange(code, verifier, redirectURI))

    async def _exchange(self, code: str, verifier: str, redirectURI: str) -> str:
        form = urlencode(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirectURI,
                "client_id": self.instance,
                "code_verifier": verifier,
            }
        ).encode("ascii")
        response = await self._http.post(
            self.base + "/oauth/token",
            data=form,
            headers=Headers({b"Content-Type": [b"application/x-www-form-urlencoded"], b"Accept": [b"application/json"]}),
            unbuffered=True,
        )
        status, answer = await self._read(response)
        if status == 200 and isinstance(answer, dict) and isinstance(answer.get("access_token"), str):
            return str(answer["access_token"])
        if status == 400 and isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise PortalRefused(answer["error"][:64])
        raise PortalUnreachable(f"the portal's token endpoint answered {status}")

    def userinfo(self, token: str) -> Deferred[UserInfo]:
        """Ask the portal, now, whether ``token``'s person may use the instance."""
        return self._timed(self._userinfo(token))

    async def _userinfo(self, token: str) -> UserInfo:
        response = await self._http.get(
            self.base + "/oauth/userinfo?" + urlencode({"instance": self.instance}),
            headers=Headers({b"Authorization": [f"Bearer {token}".encode("latin-1")], b"Accept": [b"application/json"]}),
            unbuffered=True,
        )
        status, answer = await self._read(response)
        if status == 200 and isinstance(answer, dict) and answer.get("allowed") is True:
            name, sub = answer.get("name"), answer.get("sub")
            if isinstance(name, str) and isinstance(sub, str):
                return UserInfo("allowed", name, sub)
        if status == 403:
            return UserInfo("forbidden")
        if status == 401:
            return UserInfo("invalid")
        raise PortalUnreachable(f"the portal's userinfo endpoint answered {status}")

    def watch(self) -> Deferred[Any]:
        """
        Open the watch of this instance (6.6): fires with the response
        (an ``IResponse``, its body not read) once its head arrived, within
        the timeout. The caller reads a ``200``'s body as it streams.
        """
        return self._timed(self._watch())

    async def _watch(self) -> Any:
        if self.signer is None:
            raise PortalUnreachable("no instance key to sign the watch with")
        token = self.signer.sign(
            {"sub": self.instance, "jti": secrets.token_urlsafe(16)},
            audience=WATCH_AUDIENCE,
            lifetime=WATCH_TOKEN_LIFETIME,
        )
        return await self._http.get(
            self.base + "/oauth/watch",
            headers=Headers({b"Authorization": [f"Bearer {token}".encode("ascii")], b"Accept": [b"application/x-ndjson"]}),
            unbuffered=True,
        )

    async def refusal(self, response: Any) -> str:
        """Why the portal refused a watch: its ``error_description`` (or status), at most 200 characters."""
        try:
            status, answer = await self._read(response)
        except PortalUnreachable as e:
            return str(e)
        if isinstance(answer, dict) and isinstance(answer.get("error_description"), str):
            return f"{status}: {answer['error_description'][:200]}"
        return str(status)
