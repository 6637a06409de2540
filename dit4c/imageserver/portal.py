"""
The image server's question to the portal, server to server
(docs/protocols.md 8.4): may this request go ahead?

The image server keeps no user list: for every request it passes the
request's ``Authorization`` and ``Cookie`` headers (only those, only if
present) to ``POST <portal>/reports/image-access``, proving itself with the
secret it shares with the portal. Only ``200`` with ``"allowed": true`` lets
a request through; the portal's ``403`` refuses it with the portal's
reason; anything else (no answer within the timeout, a refused connection,
an answer that is not the protocol's) makes the request fail with ``503``.
Nothing here logs a header's value or the secret.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from dit4c.common.portalhttp import portalHTTP, readJSON
from dit4c.imageserver.errors import PortalUnavailable

__all__ = ["ACCESS_PATH", "Decision", "PortalGate", "SECRET_HEADER"]

ACCESS_PATH = "/reports/image-access"
SECRET_HEADER = b"X-DIT4C-Image-Server"
#: The largest answer read from the portal (a decision is a few hundred bytes).
MAX_ANSWER = 64 * 1024
#: The longest reason passed on to a client.
MAX_REASON = 500
#: The only request headers passed to the portal.
PASSED_HEADERS = ("authorization", "cookie")


@dataclass(frozen=True)
class Decision:
    """The portal's answer: allowed or not, and why (never containing secrets)."""

    allowed: bool
    reason: str
    user: str | None = None
    via: str | None = None
    instance: str | None = None


class PortalGate:
    """
    Asks the portal at ``base`` (an http(s) URL, or ``unix:/path``) about each
    request, with ``secret``, giving up after ``timeout`` seconds.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        base: str,
        secret: str,
        *,
        timeout: float = 10.0,
        http: HTTPClient | None = None,
    ) -> None:
        self._reactor = reactor
        self.timeout = timeout
        if http is None:
            http, base = portalHTTP(reactor, base, timeout=timeout)
        self._http = http
        self.url = base.rstrip("/") + ACCESS_PATH
        self._secret = secret.strip().encode("utf-8")

    def ask(self, method: str, digest: str, headers: Mapping[str, str]) -> Deferred[Decision]:
        """
        The portal's decision on ``method`` of image ``digest`` by the holder
        of ``headers`` (names in lower case; only ``authorization`` and
        ``cookie`` are passed on).

        Fails with :class:`~dit4c.imageserver.errors.PortalUnavailable` when
        the portal cannot give an answer that counts.
        """
        d: Deferred[Decision] = Deferred.fromCoroutine(self._ask(method, digest, headers))
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure: Any) -> Any:
        if failure.check(PortalUnavailable):
            # The details are for the log; the client hears only that the
            # portal could not be asked.
            self.log.warn("the portal could not be asked: {reason}", reason=failure.value.reason)
            raise PortalUnavailable()
        if failure.check(CancelledError):
            # Cancelled by the caller (its client went away): nothing to say.
            return failure
        if failure.check(TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        else:
            why = type(failure.value).__name__
        self.log.warn("the portal could not be asked: {reason}", reason=why)
        raise PortalUnavailable()

    async def _ask(self, method: str, digest: str, headers: Mapping[str, str]) -> Decision:
        question = {
            "method": method,
            "image": digest,
            "headers": {name: headers[name] for name in PASSED_HEADERS if headers.get(name)},
        }
        response = await self._http.post(
            self.url,
            data=json.dumps(question).encode("utf-8"),
            headers=Headers(
                {
                    b"Content-Type": [b"application/json"],
                    b"Accept": [b"application/json"],
                    SECRET_HEADER: [self._secret],
                }
            ),
            unbuffered=True,
        )
        status, answer = await self._read(response)
        if not isinstance(answer, dict):
            raise PortalUnavailable(f"The portal answered {status} with no decision.")
        reason = answer.get("reason")
        reason = reason[:MAX_REASON] if isinstance(reason, str) and reason else "The portal gave no reason."
        if status == 200 and answer.get("allowed") is True:
            return Decision(
                True, reason, user=_string(answer.get("user")), via=_string(answer.get("via")),
                instance=_string(answer.get("instance")),
            )  # fmt: skip
        if status == 403 and answer.get("allowed") is False:
            return Decision(False, reason)
        # The portal refused the question itself (a wrong secret, no image
        # server configured, a malformed question): that is this server's
        # fault, not the client's.
        error = answer.get("error")
        self.log.error(
            "the portal refused the image server's question: {status} {error}: {reason}",
            status=status, error=error if isinstance(error, str) else None, reason=reason,
        )  # fmt: skip
        raise PortalUnavailable(f"The portal answered {status}.")

    async def _read(self, response: Any) -> tuple[int, Any]:
        return await readJSON(response, limit=MAX_ANSWER, failure=PortalUnavailable)


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None
