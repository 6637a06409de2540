"""
The auth helper's watch of its instance at the portal (docs/protocols.md
6.6): one long request, dialled out (the helper may be behind NAT), whose
answer is a line of JSON per access change to the instance. Each
``changed`` line makes :class:`~dit4c.auth.connections.Revocations` ask
the portal again, at once, about that person's sessions with open
connections.

:class:`NoticeParser` is the wire format without I/O (bytes in, notices
out); :class:`AccessWatch` keeps one watch open: it reconnects with
back-off when the watch fails or falls silent for three keepalive periods,
and tells ``Revocations`` whether it is watching, so that rechecks come
often while it is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.auth.connections import Revocations
from dit4c.auth.errors import WatchError
from dit4c.auth.portal import PortalClient

__all__ = ["MAX_LINE", "AccessWatch", "Notice", "NoticeParser"]

#: The longest line a watch may send (a real one is under 100 bytes).
MAX_LINE = 4096
#: The keepalive period assumed until the portal says its own.
DEFAULT_KEEPALIVE = 5.0
#: Silence, in keepalive periods, after which the watch is judged dead.
SILENT_PERIODS = 3


@dataclass(frozen=True)
class Notice:
    #: ``watching`` (first), ``keepalive`` or ``changed``; other types are ignored.
    type: str
    #: For ``changed``: whose access changed (a user id); None: anyone's.
    sub: str | None = None
    #: For ``watching``: seconds between the portal's keepalives.
    keepalive: float | None = None


class NoticeParser:
    """The watch's body, a line of JSON at a time (section 6.6)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Notice]:
        """
        The notices completed by ``data``.

        :raises WatchError: a line too long, not a JSON object, or a known
            type with malformed fields.
        """
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            raise WatchError(f"a line longer than {MAX_LINE} bytes")
        notices = []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            if len(line) > MAX_LINE:
                raise WatchError(f"a line longer than {MAX_LINE} bytes")
            notice = self._notice(line)
            if notice is not None:
                notices.append(notice)
        return notices

    @staticmethod
    def _notice(line: bytes) -> Notice | None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            raise WatchError("a line that is not JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise WatchError("a line that is not a notice")
        kind = message["type"]
        if kind == "watching":
            keepalive = message.get("keepalive", DEFAULT_KEEPALIVE)
            if isinstance(keepalive, bool) or not isinstance(keepalive, int | float) or not 0 < keepalive <= 3600:
                raise WatchError("a keepalive that is not a number of seconds")
            return Notice(kind, keepalive=float(keepalive))
        if kind == "keepalive":
            return Notice(kind)
        if kind == "changed":
            sub = message.get("sub")
            if sub is not None and not isinstance(sub, str):
                raise WatchError("a sub that is not a string")
            return Notice(kind, sub=sub)
        return None  # a newer portal's notice: not ours to act on


class _Body(Protocol):
    """The watch's body as it streams: parsed, and each notice handed on."""

    def __init__(self, watch: AccessWatch) -> None:
        self.watch = watch
        self.parser = NoticeParser()
        self.finished: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            notices = self.parser.feed(data)
        except WatchError as e:
            self.watch.log.warn("the portal's watch sent {what}; opening it again", what=str(e))
            self.stop()
            return
        self.watch.heard()
        for notice in notices:
            self.watch.notice(notice)

    def stop(self) -> None:
        """Drop the watch: its connection closes, and :meth:`connectionLost` follows."""
        transport: Any = self.transport  # the response body's producer
        if transport is not None:
            transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.finished.callback(None)


class AccessWatch(Service):
    """
    Keeps the watch open while the service runs (see the module
    docstring). Its states: connecting (asking the portal), watching (the
    portal answered ``200`` and said ``watching``), waiting (to try again,
    with back-off), stopped.
    """

    log = Logger()

    def __init__(
        self,
        portal: PortalClient,
        revocations: Revocations,
        clock: IReactorTime,
        *,
        backoff: Callable[[int], float] | None = None,
    ) -> None:
        self.portal = portal
        self.revocations = revocations
        self.clock = clock
        self.backoff = backoff or backoffPolicy(initialDelay=1.0, maxDelay=60.0)
        self.state = "stopped"
        self._failures = 0
        self._attempt: Deferred[Any] | None = None
        self._body: _Body | None = None
        self._retry: IDelayedCall | None = None
        self._silence: IDelayedCall | None = None
        self._keepalive = DEFAULT_KEEPALIVE

    # -- life ------------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._connect()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self.state = "stopped"
        for timer in (self._retry, self._silence):
            if timer is not None and timer.active():
                timer.cancel()
        self._retry = self._silence = None
        attempt, self._attempt = self._attempt, None
        if attempt is not None:
            attempt.cancel()
        body, self._body = self._body, None
        if body is not None:
            body.stop()
            return body.finished
        return None

    def _connect(self) -> None:
        self._retry = None
        if not self.running:
            return
        self.state = "connecting"
        self._attempt = Deferred.fromCoroutine(self._open())
        self._attempt.addErrback(self._failed)

    async def _open(self) -> None:
        response = await self.portal.watch()
        self._attempt = None
        if not self.running:
            response.deliverBody(Protocol())
            return
        if response.code != 200:
            raise WatchError(f"the portal refused the watch ({await self.portal.refusal(response)})")
        body = self._body = _Body(self)
        self._expectWithin(self._keepalive * SILENT_PERIODS)
        response.deliverBody(body)
        await body.finished
        if self._body is body:
            self._body = None
            self._lost("the portal closed the watch")

    def _failed(self, failure: Failure) -> None:
        self._attempt = None
        if failure.check(CancelledError) and not self.running:
            return
        why = failure.getErrorMessage() or repr(failure.value)
        if failure.check(defer.TimeoutError, TimeoutError, CancelledError):
            why = "no answer in time"
        self._lost(why)

    def _lost(self, why: str) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        self._silence = None
        self.revocations.watching(False)
        if not self.running:
            return
        delay = self.backoff(self._failures)
        self._failures += 1
        self.log.warn(
            "not watching the portal for access changes ({why}); trying again in {delay:.1f} s",
            why=why,
            delay=delay,
        )
        self.state = "waiting"
        self._retry = self.clock.callLater(delay, self._connect)

    # -- what the portal says ----------------------------------------------------------------------

    def heard(self) -> None:
        """Bytes arrived: the watch is alive for three more keepalive periods."""
        self._expectWithin(self._keepalive * SILENT_PERIODS)

    def _expectWithin(self, seconds: float) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.reset(seconds)
        else:
            self._silence = self.clock.callLater(seconds, self._silent)

    def _silent(self) -> None:
        self._silence = None
        body, self._body = self._body, None
        if body is not None:
            self.log.warn("the portal's watch fell silent; opening it again")
            body.stop()
            self._lost("silent")

    def notice(self, notice: Notice) -> None:
        if notice.type == "watching":
            self._keepalive = notice.keepalive or DEFAULT_KEEPALIVE
            self._expectWithin(self._keepalive * SILENT_PERIODS)
            if self.state != "watching":
                self.state = "watching"
                self._failures = 0
                self.log.info("watching the portal for access changes")
                self.revocations.watching(True)
        elif notice.type == "changed" and self.state == "watching":
            self.revocations.changed(notice.sub)
