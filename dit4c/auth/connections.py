"""
The connections the auth helper holds open for each session, and what ends
them when the portal stops allowing that session's person.

A page load is checked as it comes; a connection that already forwards (a
WebSocket after its ``101``, a long answer still streaming) is not asked
again by anything else. So the proxy tells :class:`Connections` which
session each connection forwards for and when it ends; :class:`Revocations`
closes every connection of a session the portal no longer allows:

- at once, when the portal says that a person's access to this instance
  changed (the watch, ``dit4c.auth.watch``, docs/protocols.md 6.6): their
  answers stop being fresh, and each of their sessions with open
  connections is asked about again;
- and in a sweep every :attr:`Sessions.interval <dit4c.auth.gate.Sessions.interval>`
  seconds (30 s while watched, 5 s while not), for a change the watch
  missed: made through another portal process, or while the watch was
  down. The sweep asks the portal only about sessions whose answer is no
  longer fresh, so an idle instance asks nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dit4c.auth.gate import ALLOWED, Sessions

__all__ = ["Connections", "Revocations"]


class Connections:
    """
    Open connections by session, each with the function that closes it at
    once. The proxy says when a connection starts forwarding for a session
    (:meth:`forwarding`, for every request it forwards) and when it ends
    (:meth:`ended`); a connection is any hashable object, its protocol.
    """

    def __init__(self) -> None:
        self._open: dict[str, dict[object, Callable[[], None]]] = {}
        self._sessionOf: dict[object, str] = {}

    def forwarding(self, connection: object, token: str | None, close: Callable[[], None]) -> None:
        """
        ``connection`` forwards for the session ``token`` now (None: for
        none); ``close`` aborts it, both legs, nothing more forwarded.
        """
        previous = self._sessionOf.get(connection)
        if previous == token:
            return
        if previous is not None:
            self._forget(connection, previous)
        if token is not None:
            self._sessionOf[connection] = token
            self._open.setdefault(token, {})[connection] = close

    def ended(self, connection: object) -> None:
        """``connection`` is closed. Safe to call for one never seen, or twice."""
        token = self._sessionOf.get(connection)
        if token is not None:
            self._forget(connection, token)

    def _forget(self, connection: object, token: str) -> None:
        del self._sessionOf[connection]
        held = self._open.get(token)
        if held is not None:
            held.pop(connection, None)
            if not held:
                del self._open[token]

    def sessions(self) -> list[str]:
        """The sessions that have open connections."""
        return list(self._open)

    def count(self, token: str | None = None) -> int:
        """Open connections of ``token`` (None: of every session)."""
        if token is not None:
            return len(self._open.get(token, ()))
        return len(self._sessionOf)

    def close(self, token: str) -> int:
        """Close every connection of session ``token``; how many there were."""
        held = self._open.pop(token, {})
        for connection in held:
            self._sessionOf.pop(connection, None)
        for close in list(held.values()):
            close()
        return len(held)


class Revocations(Service):
    """See the module docstring: closes what the portal no longer allows."""

    log = Logger()

    def __init__(self, sessions: Sessions, connections: Connections, clock: IReactorTime) -> None:
        self.sessions = sessions
        self.connections = connections
        self.clock = clock
        self._sweep: LoopingCall | None = None
        self._sweepEvery = 0.0

    # -- what the watch says ---------------------------------------------------------------------

    def changed(self, sub: str | None) -> Deferred[None]:
        """
        The portal says the access of ``sub`` (a user id; None: anyone's)
        to this instance changed. Fires once every session concerned with
        open connections was asked about (and closed if refused).
        """
        self.sessions.changed(sub)
        tokens = [
            token
            for token in self.connections.sessions()
            if sub is None or self.sessions.subjectOf(token) in (sub, None)
        ]
        return self._recheck(tokens)

    def watching(self, live: bool) -> None:
        """
        The watch is up (``live``) or down. Coming up, anything may have
        changed while it was down: every session is asked about again.
        """
        was = self.sessions.watched
        self.sessions.watched = live
        self._schedule()
        if live and not was:
            self.changed(None)

    # -- the sweep ---------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
        self._sweep = None
        return None

    def _schedule(self) -> None:
        """(Re)start the sweep at the interval the sessions' answers stand for."""
        if not self.running:
            return
        every = self.sessions.interval
        if self._sweep is not None and self._sweep.running:
            if every == self._sweepEvery:
                return
            self._sweep.stop()
        self._sweepEvery = every
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = self.clock
        self._sweep.start(every, now=False).addErrback(
            lambda f: self.log.failure("the sweep of open connections failed", f)
        )

    def sweep(self) -> Deferred[None]:
        """Ask about every session with open connections whose answer is no longer fresh."""
        return self._recheck(self.connections.sessions())

    # -- asking ------------------------------------------------------------------------------------

    def _recheck(self, tokens: list[str]) -> Deferred[None]:
        checks = [Deferred.fromCoroutine(self._one(token)) for token in tokens]
        d: Deferred[None] = DeferredList(checks, consumeErrors=True).addCallback(lambda _: None)
        return d

    async def _one(self, token: str) -> None:
        try:
            verdict = await self.sessions.check(token)
        except Exception:
            self.log.failure("could not recheck a session with open connections")
            return
        if verdict.kind != ALLOWED:
            closed = self.connections.close(token)
            if closed:
                self.log.info(
                    "closed {count} connection(s): the portal no longer allows the session ({verdict})",
                    count=closed,
                    verdict=verdict.kind,
                )
