"""
Who is at the browser: a session cookie (the portal's access token) checked
locally against the portal's published keys, and re-checked with the portal
at most every ``recheck`` seconds per session.

No session is kept in memory that a restart would lose: the cookie itself
is the session. Memory holds only a bounded cache of recent answers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dit4c.auth.portal import PortalClient, PortalUnreachable, UserInfo
from dit4c.common.tokens import InvalidToken, TokenVerifier

__all__ = ["ALLOWED", "FORBIDDEN", "UNAUTHENTICATED", "Sessions", "Verdict"]

ALLOWED = "allowed"
#: The portal says this person may not (or no longer) use the instance.
FORBIDDEN = "forbidden"
#: No usable token: expired, forged, for another instance, or refused by the portal.
UNAUTHENTICATED = "unauthenticated"


@dataclass(frozen=True)
class Verdict:
    kind: str
    #: The person's login name, when allowed.
    name: str | None = None


@dataclass
class _Entry:
    verdict: Verdict
    checkedAt: float
    expires: float


class Sessions:
    """Checks session tokens; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        verifier: TokenVerifier,
        portal: PortalClient,
        clock: IReactorTime,
        *,
        recheck: float = 30.0,
        retryAfterFailure: float = 5.0,
        maxEntries: int = 10000,
    ) -> None:
        self.verifier = verifier
        self.portal = portal
        self.clock = clock
        self.recheck = recheck
        self.retryAfterFailure = retryAfterFailure
        self.maxEntries = maxEntries
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._pending: dict[bytes, Deferred[Verdict]] = {}

    def remember(self, token: str, name: str, expires: float) -> None:
        """A token the portal has just issued: allowed, checked now."""
        self._store(self._key(token), _Entry(Verdict(ALLOWED, name), self.clock.seconds(), expires))

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "replace")).digest()

    def _store(self, key: bytes, entry: _Entry) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.maxEntries:
            self._cache.popitem(last=False)

    def check(self, token: str) -> Deferred[Verdict]:
        """The verdict for ``token``; fires at once when the cache answers."""
        return Deferred.fromCoroutine(self._check(token))

    async def _check(self, token: str) -> Verdict:
        key = self._key(token)
        now = self.clock.seconds()
        entry = self._cache.get(key)
        if entry is not None and now - 30.0 >= entry.expires:
            del self._cache[key]
            entry = None
        if entry is None:
            try:
                claims = await self.verifier.verify(token)
            except InvalidToken as e:
                self.log.info("session refused: {reason}", reason=e.reason)
                return Verdict(UNAUTHENTICATED)
            name = claims.get("name")
            entry = _Entry(
                Verdict(ALLOWED, name if isinstance(name, str) else None),
                checkedAt=float("-inf"),
                expires=float(claims["exp"]),
            )
            self._store(key, entry)
        if now - entry.checkedAt < self.recheck:
            self._cache.move_to_end(key)
            return entry.verdict
        pending = self._pending.get(key)
        if pending is None:
            pending = Deferred.fromCoroutine(self._ask(key, token, entry))
            self._pending[key] = pending
            pending.addBoth(self._askDone, key)
        # Every waiter gets its own Deferred chained to the one question.
        waiter: Deferred[Verdict] = Deferred()

        def relay(result: Any) -> Any:
            waiter.callback(result)
            return result

        pending.addBoth(relay)
        return await waiter

    def _askDone(self, result: Any, key: bytes) -> Any:
        self._pending.pop(key, None)
        return result

    async def _ask(self, key: bytes, token: str, entry: _Entry) -> Verdict:
        try:
            info: UserInfo = await self.portal.userinfo(token)
        except Exception as e:
            # The portal cannot be asked: the token itself is signed and
            # unexpired, so the last answer stands until it expires; ask
            # again soon.
            why = str(e) if isinstance(e, PortalUnreachable) else type(e).__name__
            self.log.warn("could not ask the portal about a session ({why}); keeping the last answer", why=why)
            entry.checkedAt = self.clock.seconds() - self.recheck + self.retryAfterFailure
            return entry.verdict
        if info.verdict == "allowed":
            verdict = Verdict(ALLOWED, info.name)
        elif info.verdict == "forbidden":
            verdict = Verdict(FORBIDDEN)
        else:
            verdict = Verdict(UNAUTHENTICATED)
        if verdict.kind != entry.verdict.kind:
            self.log.info("the portal now says {verdict} for {name}", verdict=verdict.kind, name=entry.verdict.name)
        entry.verdict = verdict
        entry.checkedAt = self.clock.seconds()
        self._store(key, entry)
        return verdict
