"""
What a listener signs with its instance's key: its routing tokens (a new,
single-use one for every dial, so no token has to be handed to it, or
renewed), and the report of its public URL to the portal
(docs/protocols.md sections 2 and 8.2).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from dit4c.common.keys import PrivateKey
from dit4c.common.portalhttp import portalHTTP
from dit4c.common.tokens import ROUTING_AUDIENCE, TokenSigner
from dit4c.listener.service import backoff

__all__ = ["REPORT_AUDIENCE", "ROUTING_TOKEN_LIFETIME", "URLReporter", "postReport", "routingToken"]

REPORT_AUDIENCE = "dit4c-portal-report"
#: Seconds a routing token the listener signs for itself lives: only long
#: enough to cross one handshake (a new one is signed for every dial), with
#: room for a listener's clock running behind the routing server's.
ROUTING_TOKEN_LIFETIME = 120
#: Seconds a report token lives (the portal takes at most 300).
REPORT_LIFETIME = 120


def routingToken(
    key: PrivateKey,
    instance: str,
    *,
    audience: str = ROUTING_AUDIENCE,
    scoped: bool = True,
    clock: Any = None,
) -> Callable[[], str]:
    """
    A token source for :class:`~dit4c.listener.service.ListenerService`: a
    fresh routing token for every dial, each with a new random ``jti``, so
    that no token is ever sent twice (a routing server refuses a ``jti`` it
    has seen).

    :param scoped: name the key by the ``kid`` the portal publishes an
        instance's key under (``instance:<id>``), which routing servers
        accept only for that instance's own name; if false, by the key's
        RFC 7638 thumbprint, as ``dit4c jwks`` publishes a key given by hand.
    """
    signer = TokenSigner(key, kid=f"instance:{instance}" if scoped else None, clock=clock)

    def token() -> str:
        return signer.sign(
            {"sub": instance, "jti": secrets.token_urlsafe(16)}, audience=audience, lifetime=ROUTING_TOKEN_LIFETIME
        )

    return token


async def postReport(
    http: Any, endpoint: str, signer: TokenSigner, instance: str, claims: dict[str, Any], timeout: float
) -> tuple[int, str]:
    """
    A report to the portal (docs/protocols.md 8.1): ``claims`` in a token
    the instance signs, with a new ``jti`` every time (the portal takes a
    report once); the answer's status and body.
    """
    token = signer.sign(
        {"sub": instance, **claims, "jti": secrets.token_urlsafe(16)}, audience=REPORT_AUDIENCE, lifetime=REPORT_LIFETIME
    )
    response = await http.post(
        endpoint, data=token.encode("ascii"), headers=Headers({"Content-Type": ["application/jwt"]}), timeout=timeout
    )
    return response.code, await response.text("utf-8")


class URLReporter:
    """
    Tells the portal the instance's public URL (``POST /reports/url``) each
    time the routing server gives one, retrying with back-off until the
    portal takes it: the portal may not know the instance's key yet (it
    travels up the scheduler channel at the same time), or be away.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        portal: str,
        instance: str,
        key: PrivateKey,
        *,
        retryPolicy: Callable[[int], float] | None = None,
        timeout: float = 10.0,
        maxAttempts: int = 30,
    ) -> None:
        self.reactor = reactor
        self.http, base = portalHTTP(reactor, portal, timeout=timeout, persistent=False)
        self.endpoint = base + "/reports/url"
        self.instance = instance
        self.signer = TokenSigner(key, clock=reactor)
        self.retryPolicy = retryPolicy or backoff(initial=0.25, maximum=15.0)
        self.timeout = timeout
        self.maxAttempts = maxAttempts
        #: The URL the portal took last.
        self.reported: str | None = None
        self._wanted: str | None = None
        self._attempt = 0
        self._timer: IDelayedCall | None = None
        self._busy = False
        self._waiting: list[tuple[str, Deferred[str]]] = []

    def report(self, url: str) -> None:
        """Report ``url`` (again: after a reconnect the portal may have lost it)."""
        self._wanted = url
        self._attempt = 0
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._busy:
            self._send()

    def whenReported(self, url: str) -> Deferred[str]:
        """Fires once the portal took ``url``."""
        if self.reported == url:
            d: Deferred[str] = Deferred()
            d.callback(url)
            return d
        d = Deferred()
        self._waiting.append((url, d))
        return d

    def stop(self) -> None:
        self._wanted = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _send(self) -> None:
        self._timer = None
        url = self._wanted
        if url is None:
            return
        self._busy = True
        Deferred.fromCoroutine(self._post(url)).addBoth(self._done, url)

    async def _post(self, url: str) -> tuple[int, str]:
        return await postReport(self.http, self.endpoint, self.signer, self.instance, {"url": url}, self.timeout)

    def _done(self, result: Any, url: str) -> None:
        self._busy = False
        if self._wanted != url:
            self._send()  # a newer URL came meanwhile
            return
        if isinstance(result, tuple) and result[0] == 200:
            self.reported = url
            self._wanted = None
            self.log.info("portal told the instance's URL {url}", url=url)
            waiting, self._waiting = self._waiting, []
            for wanted, d in waiting:
                if wanted == url:
                    d.callback(url)
                else:
                    self._waiting.append((wanted, d))
            return
        if isinstance(result, tuple):
            code, body = result
            why = f"{code} {body[:200]}"
            if code in (400, 403, 409):
                # The portal will not take it whatever we do (wrong host, wrong state).
                self.log.warn("the portal refused the instance's URL {url}: {why}", url=url, why=why)
                self._wanted = None
                return
        else:
            why = result.getErrorMessage()
        self._attempt += 1
        if self._attempt >= self.maxAttempts:
            self.log.error("giving up telling the portal the URL {url}: {why}", url=url, why=why)
            self._wanted = None
            return
        delay = self.retryPolicy(self._attempt)
        self.log.info("could not tell the portal the URL yet ({why}); again in {delay:.1f} s", why=why, delay=delay)
        self._timer = self.reactor.callLater(delay, self._send)
