"""
The other portal processes through PostgreSQL's LISTEN/NOTIFY
(docs/protocols.md 16): :class:`PostgresPeers`, an ``IPeers``.

One connection of its own LISTENs; the reactor watches its socket and
hands each notification on as it arrives (libpq reads what is there without
blocking). Messages are sent with ``pg_notify`` on a second connection, one
at a time in the order told, so that the others hear them in that order.
When the listening connection is lost it is made again, with Twisted's
back-off, and those who asked hear that the link came back
(``IPeers.onJoined``): what was said meanwhile is lost.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.enterprise.adbapi import ConnectionPool
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.portal.peers import CHANNEL, IPeers, PeerMessages, encode
from dit4c.portal.store._open import describe, postgresDefaults

__all__ = ["PostgresPeers"]

#: TCP keep-alives on the listening connection, so that a server gone
#: silently (a network cut, not a restart) is noticed within about a minute.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


@implementer(IReadDescriptor)
class _Listening:
    """The listening connection's socket as the reactor watches it."""

    def __init__(self, connection: Any, peers: PostgresPeers) -> None:
        self.connection = connection
        self.peers = peers
        # A copy of libpq's socket: libpq closes its own when the server
        # goes, before the reactor has stopped watching it.
        self._fileno = os.dup(int(connection.pgconn.socket))

    def fileno(self) -> int:
        return self._fileno

    def close(self) -> None:
        """Close the connection and the copy of its socket (once the reactor no longer watches it)."""
        try:
            self.connection.close()
        finally:
            if self._fileno >= 0:
                os.close(self._fileno)
                self._fileno = -1

    def logPrefix(self) -> str:
        return "PostgresPeers"

    def doRead(self) -> Failure | None:
        import psycopg

        pgconn = self.connection.pgconn
        try:
            pgconn.consume_input()
        except psycopg.OperationalError as e:
            return Failure(ConnectionLost(str(e).strip() or "the database closed the connection"))
        while (notification := pgconn.notifies()) is not None:
            self.peers.received(bytes(notification.extra).decode("utf-8", "replace"))
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.peers._lost(self, reason)


@implementer(IPeers)
class PostgresPeers(PeerMessages, Service):
    """The portal processes sharing the PostgreSQL database at ``url``."""

    alone = False
    log = Logger()

    def __init__(self, reactor: Any, url: str) -> None:
        PeerMessages.__init__(self)
        self.reactor = reactor
        self.url = url
        self._defaults = postgresDefaults(url)
        self._backoff = backoffPolicy(initialDelay=0.5, maxDelay=30.0)
        self._failures = 0
        self._listening: _Listening | None = None
        self._retry: IDelayedCall | None = None
        self._sender: ConnectionPool | None = None
        #: Fires once this process listens for the first time.
        self.listening: Deferred[None] = Deferred()
        self._joinedBefore = False

    # -- telling --------------------------------------------------------------------------------

    def tell(self, kind: str, body: Mapping[str, Any]) -> None:
        payload = encode(self.id, kind, body)
        if self._sender is None:
            return
        d = self._sender.runOperation("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
        d.addErrback(
            lambda f: self.log.warn(
                "could not tell the other portal processes of a {kind} change: {error}",
                kind=kind, error=f.getErrorMessage(),
            )  # fmt: skip
        )

    @staticmethod
    def applicationName(process: str) -> str:
        """The name a process's listening connection goes by in ``pg_stat_activity``."""
        return f"dit4c-portal/{process}"

    def live(self, process: str) -> Deferred[bool]:
        if process == self.id:
            return succeed(True)
        if self._sender is None:
            return succeed(False)
        d: Deferred[list[Any]] = self._sender.runQuery(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s", (self.applicationName(process),)
        )
        return d.addCallback(lambda rows: bool(rows))

    # -- listening ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # One connection, so that what is told goes out in the order told.
        self._sender = ConnectionPool(
            "psycopg", self.url, **self._defaults, cp_min=1, cp_max=1, cp_reconnect=True, cp_reactor=self.reactor
        )
        self._connect()

    def _open(self) -> Any:
        """Connect and LISTEN (in a pool thread: libpq connects blocking)."""
        import psycopg
        from psycopg.conninfo import make_conninfo

        # Named for this process: the others see it is alive while this connection is (``live``).
        named = dict(self._defaults, application_name=self.applicationName(self.id))
        connection = psycopg.connect(make_conninfo(self.url, **named, **KEEPALIVES), autocommit=True)
        try:
            connection.execute(f"LISTEN {CHANNEL}")
        except BaseException:
            connection.close()
            raise
        return connection

    def _connect(self) -> None:
        self._retry = None
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._open)
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, connection: Any) -> None:
        if not self.running:
            connection.close()
            return
        self._failures = 0
        self._listening = _Listening(connection, self)
        self.reactor.addReader(self._listening)
        self.log.info("listening for the other portal processes at {url}", url=describe(self.url))
        # Anything already waiting (it arrived while LISTEN answered).
        self.reactor.callLater(0, self._drain)
        if self._joinedBefore:
            self.rejoined()
        else:
            self._joinedBefore = True
            self.listening.callback(None)

    def _drain(self) -> None:
        listening = self._listening
        if listening is not None:
            why = listening.doRead()
            if why is not None:
                self.reactor.removeReader(listening)
                listening.connectionLost(why)

    def _failed(self, failure: Failure) -> None:
        if not self.running:
            return
        self._failures += 1
        delay = self._backoff(self._failures)
        self.log.warn(
            "could not listen for the other portal processes: {error} (trying again in {delay:.1f} s)",
            error=failure.getErrorMessage().strip(), delay=delay,
        )  # fmt: skip
        self._retry = self.reactor.callLater(delay, self._connect)

    def _lost(self, listening: _Listening, reason: Failure) -> None:
        if listening is not self._listening:
            return
        self._listening = None
        try:
            listening.close()
        except Exception:
            pass
        if self.running:
            self.log.warn(
                "lost the link to the other portal processes: {error}; listening again",
                error=reason.getErrorMessage(),
            )
            self._failed(reason)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        listening, self._listening = self._listening, None
        if listening is not None:
            self.reactor.removeReader(listening)
            listening.close()
        sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()
        return None
