"""
Whether anyone uses the instance: what comes down its tunnel, told to the
portal, which stops (or saves) an instance left unused past its catalogue
entry's idle limit (docs/protocols.md 8.8 and 14.5).

Use is what a browser sends: a new connection (a stream the routing server
opens) or data on one (a page's requests, a WebSocket's frames and its
answers to the tool's pings). The tunnel's session already counts both
(``Session.streamsOpened``, ``Session.bytesIn``: DATA frames only, so the
tunnel's own PINGs are not use). Every ``interval`` seconds the reporter
compares them with its last look, and if they grew it reports the time of
this look (``POST /reports/activity``, signed with the instance key), so
the portal hears at most one report a minute per instance, and an instance
nobody uses sends nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dit4c.common.keys import PrivateKey
from dit4c.common.portalhttp import portalHTTP
from dit4c.common.tokens import TokenSigner
from dit4c.listener.report import postReport
from dit4c.listener.service import ListenerService

__all__ = ["ACTIVITY_INTERVAL", "ActivityReporter"]

#: Seconds between two looks at the tunnel's counters (and at most one report each).
ACTIVITY_INTERVAL = 60.0


class ActivityReporter(Service):
    """Tells the portal when the listener's tunnel last carried a browser's traffic."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listener: ListenerService,
        portal: str,
        instance: str,
        key: PrivateKey,
        *,
        interval: float = ACTIVITY_INTERVAL,
        timeout: float = 10.0,
        clock: IReactorTime | None = None,
    ) -> None:
        """
        :param reactor: the reactor the reports go out on.
        :param clock: the time of a look, and its schedule (the reactor's by default).
        """
        self.reactor = reactor
        self.clock: IReactorTime = clock or reactor
        self.listener = listener
        self.http, base = portalHTTP(reactor, portal, timeout=timeout, persistent=False)
        self.endpoint = base + "/reports/activity"
        self.instance = instance
        self.signer = TokenSigner(key, clock=self.clock)
        self.interval = interval
        self.timeout = timeout
        #: The session and its counters at the last look.
        self._seen: tuple[object, int, int] | None = None
        #: A time not yet taken by the portal (sent again at the next look).
        self.pending: float | None = None
        #: The last time the portal took.
        self.reported: float | None = None
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.look)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(lambda f: self.log.failure("activity reports stopped", f))

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def used(self) -> bool:
        """Whether a browser's traffic came down the tunnel since the last look."""
        tunnel = self.listener.tunnel
        session = tunnel.session if tunnel is not None else None
        if session is None:
            return False
        now = (session, session.streamsOpened, session.bytesIn)
        before, self._seen = self._seen, now
        if before is None or before[0] is not session:
            # A new tunnel (a reconnect is not use): anything it carried is.
            return now[1] > 0 or now[2] > 0
        return now[1] > before[1] or now[2] > before[2]

    def look(self) -> Deferred[None] | None:
        if self.used():
            self.pending = self.clock.seconds()
        if self.pending is None:
            return None
        return Deferred.fromCoroutine(self._send(self.pending))

    async def _send(self, at: float) -> None:
        try:
            code, body = await postReport(self.http, self.endpoint, self.signer, self.instance, {"active_at": at}, self.timeout)
        except Exception as e:
            self.log.info("could not tell the portal of the instance's use ({error}); again at the next look", error=str(e))
            return
        if code in (200, 400, 403, 409):
            # Taken; or never to be (the instance is no longer running): either way not sent again.
            if self.pending == at:
                self.pending = None
            if code == 200:
                self.reported = at
            else:
                self.log.info("the portal did not take the instance's use: {code} {body}", code=code, body=body[:200])
        else:
            self.log.info("the portal answered {code} to the instance's use; again at the next look", code=code)
