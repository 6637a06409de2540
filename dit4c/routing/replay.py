"""
The token ids (``jti``) a routing server has already accepted, so that a
routing token serves one handshake only (docs/protocols.md section 2).

Without this, a copy of a listener's token (from a log, a proxy, a core
dump) sent in a second HELLO would take the instance's host name from the
real listener. Each id is kept only for as long as its token could still
verify (its ``exp`` plus the verifier's leeway); after that the token is
refused as expired anyway, so the memory is pruned. The routing server caps
a token's lifetime, which caps how long any id is kept; the number of ids
is capped too, in all and per instance, so one instance's key cannot crowd
out every other instance's dials.

Ids are filed under a digest of (instance, jti): every entry has the same
small size whatever a token carries, and one instance's ids cannot spoil
another's.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter

from twisted.internet.interfaces import IReactorTime

from dit4c.routing.errors import ReplayedToken, TooManyTokens

__all__ = ["SeenTokens"]


def _digest(instance: str, jti: str) -> bytes:
    return hashlib.blake2b(f"{instance}\0{jti}".encode(), digest_size=16).digest()


class SeenTokens:
    """
    A bounded memory of spent token ids, pruned by expiry on an injected
    clock. Sans-I/O: :meth:`spend` either records an id or refuses it.
    """

    def __init__(self, clock: IReactorTime, *, maxEntries: int = 100_000, maxPerInstance: int = 256) -> None:
        """
        :param maxEntries: the most ids kept at once; beyond it new tokens are
            refused (never an id forgotten early, which would let its token
            be replayed) until older ones expire.
        :param maxPerInstance: the most ids kept at once for one instance.
        """
        if maxEntries < 1 or maxPerInstance < 1:
            raise ValueError("the bounds must be positive")
        self.clock = clock
        self.maxEntries = maxEntries
        self.maxPerInstance = maxPerInstance
        self._until: dict[bytes, float] = {}
        # (forget at, digest, instance), the soonest first.
        self._expiries: list[tuple[float, bytes, str]] = []
        self._perInstance: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, key: tuple[str, str]) -> bool:
        self.prune()
        return _digest(*key) in self._until

    def prune(self) -> int:
        """Forget the ids whose tokens can no longer verify; returns how many."""
        now = self.clock.seconds()
        pruned = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, digest, instance = heapq.heappop(self._expiries)
            del self._until[digest]
            self._perInstance[instance] -= 1
            if not self._perInstance[instance]:
                del self._perInstance[instance]
            pruned += 1
        return pruned

    def spend(self, instance: str, jti: str, until: float) -> None:
        """
        Record that the token ``jti`` of ``instance`` was used, to be
        remembered until ``until`` (its ``exp`` plus the leeway).

        :raises ReplayedToken: the id was seen before and is still remembered.
        :raises TooManyTokens: a bound is reached; nothing was recorded.
        """
        self.prune()
        digest = _digest(instance, jti)
        if digest in self._until:
            raise ReplayedToken()
        if until <= self.clock.seconds():
            return  # it cannot verify any more: nothing to remember
        if len(self._until) >= self.maxEntries:
            raise TooManyTokens()
        if self._perInstance[instance] >= self.maxPerInstance:
            raise TooManyTokens("too many recent tunnel tokens for this instance; try again later")
        self._until[digest] = until
        heapq.heappush(self._expiries, (until, digest, instance))
        self._perInstance[instance] += 1
