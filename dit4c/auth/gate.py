"""
Who is at the browser: a session cookie (the portal's access token) checked
locally against the portal's published keys, and re-checked with the portal
at most every ``recheck`` seconds per session while the portal's changes
are watched (``unwatchedRecheck`` while they are not), and at once when the
portal says that a person's access changed (:meth:`Sessions.changed`).

No session is kept in memory that a restart would lose: the cookie itself
is the session. Memory holds only a bounded cache of recent answers.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dit4c.auth.errors import PortalUnreachable
from dit4c.auth.portal import PortalClient, UserInfo
from dit4c.common.errors import InvalidToken
from dit4c.common.tokens import TokenVerifier

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
    #: The person's user id (the token's ``sub``).
    sub: str | None = None
    #: Bumped whenever the portal says this person's access changed: an
    #: answer to a question asked before then is not taken as fresh.
    epoch: int = 0


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
        unwatchedRecheck: float = 5.0,
        retryAfterFailure: float = 5.0,
        maxEntries: int = 10000,
    ) -> None:
        self.verifier = verifier
        self.portal = portal
        self.clock = clock
        self.recheck = recheck
        self.unwatchedRecheck = unwatchedRecheck
        #: Whether the portal's changes to this instance's access are
        #: watched now (``dit4c.auth.connections.Revocations`` says).
        self.watched = False
        self.retryAfterFailure = retryAfterFailure
        self.maxEntries = maxEntries
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._pending: dict[bytes, tuple[int, Deferred[Verdict]]] = {}

    @property
    def interval(self) -> float:
        """
        How long the portal's answer stands: ``recheck`` while the portal
        tells of every change as it happens, else the shorter
        ``unwatchedRecheck``, so that a revocation still takes effect soon.
        """
        return self.recheck if self.watched else min(self.recheck, self.unwatchedRecheck)

    def remember(self, token: str, name: str, expires: float) -> None:
        """
        A token the portal has just issued, and the caller has just
        verified: allowed, checked now. (Its ``sub`` is read from it
        unverified for that reason alone.)
        """
        try:
            sub = jwt.decode(token, options={"verify_signature": False}).get("sub")
        except jwt.PyJWTError:
            sub = None
        entry = _Entry(Verdict(ALLOWED, name), self.clock.seconds(), expires, sub if isinstance(sub, str) else None)
        self._store(self._key(token), entry)

    def changed(self, sub: str | None) -> None:
        """
        The portal says the access of the person ``sub`` (None: anyone)
        changed: their answers are no longer fresh, and an answer to a
        question already under way will not count as fresh either.
        """
        for entry in self._cache.values():
            if sub is None or entry.sub is None or entry.sub == sub:
                entry.checkedAt = float("-inf")
                entry.epoch += 1

    def subjectOf(self, token: str) -> str | None:
        """The user id of ``token``'s person, if its answer is in memory."""
        entry = self._cache.get(self._key(token))
        return entry.sub if entry is not None else None

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

    def known(self, token: str) -> Verdict | None:
        """
        The verdict for ``token`` if the one in memory is fresh, else None
        (then :meth:`check`). The path every request of a live session
        takes, so it makes no Deferred.
        """
        key = self._key(token)
        entry = self._cache.get(key)
        if entry is None:
            return None
        now = self.clock.seconds()
        if now - 30.0 >= entry.expires or now - entry.checkedAt >= self.interval:
            return None
        self._cache.move_to_end(key)
        return entry.verdict

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
            name, sub = claims.get("name"), claims.get("sub")
            entry = _Entry(
                Verdict(ALLOWED, name if isinstance(name, str) else None),
                checkedAt=float("-inf"),
                expires=float(claims["exp"]),
                sub=sub if isinstance(sub, str) else None,
            )
            self._store(key, entry)
        if now - entry.checkedAt < self.interval:
            self._cache.move_to_end(key)
            return entry.verdict
        asked = self._pending.get(key)
        if asked is not None and asked[0] == entry.epoch:
            pending = asked[1]
        else:
            # No question under way, or one asked before the latest change.
            pending = Deferred.fromCoroutine(self._ask(key, token, entry, entry.epoch))
            self._pending[key] = (entry.epoch, pending)
            pending.addBoth(self._askDone, key, pending)
        # Every waiter gets its own Deferred chained to the one question.
        waiter: Deferred[Verdict] = Deferred()

        def relay(result: Any) -> Any:
            waiter.callback(result)
            return result

        pending.addBoth(relay)
        return await waiter

    def _askDone(self, result: Any, key: bytes, pending: Deferred[Verdict]) -> Any:
        asked = self._pending.get(key)
        if asked is not None and asked[1] is pending:
            del self._pending[key]
        return result

    async def _ask(self, key: bytes, token: str, entry: _Entry, epoch: int) -> Verdict:
        try:
            info: UserInfo = await self.portal.userinfo(token)
        except Exception as e:
            # The portal cannot be asked: the token itself is signed and
            # unexpired, so the last answer stands until it expires; ask
            # again soon.
            why = str(e) if isinstance(e, PortalUnreachable) else type(e).__name__
            self.log.warn("could not ask the portal about a session ({why}); keeping the last answer", why=why)
            if entry.epoch == epoch:
                entry.checkedAt = self.clock.seconds() - self.interval + self.retryAfterFailure
            return entry.verdict
        if info.verdict == "allowed":
            verdict = Verdict(ALLOWED, info.name)
        elif info.verdict == "forbidden":
            verdict = Verdict(FORBIDDEN)
        else:
            verdict = Verdict(UNAUTHENTICATED)
        if entry.epoch != epoch:
            # Access changed while the question was under way: the answer
            # may be from before the change. The next check asks again.
            return verdict
        if verdict.kind != entry.verdict.kind:
            self.log.info("the portal now says {verdict} for {name}", verdict=verdict.kind, name=entry.verdict.name)
        entry.verdict = verdict
        entry.checkedAt = self.clock.seconds()
        self._store(key, entry)
        return verdict
