"""
Questions asked across a link and answered on it (``logs``, docs/protocols.md
7.6), unlike commands: never stored or sent again. Each waits for the answer
with its id, at most ``timeout`` seconds; a link that closes fails every
question still open on it, so the asker learns at once that nobody will answer.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from dit4c.channel.wire import LogChunk, LogsRequest

__all__ = ["QUESTION_TIMEOUT", "Questions", "Unanswered", "answerTo"]

#: Seconds a question waits for its answer.
QUESTION_TIMEOUT = 30.0


class Unanswered(Exception):
    """The question could not be asked, or no answer came."""


class Questions:
    """The questions open on one end of a link, by id."""

    def __init__(self, clock: IReactorTime, timeout: float = QUESTION_TIMEOUT) -> None:
        self.clock = clock
        self.timeout = timeout
        self._open: dict[str, Deferred[LogChunk]] = {}

    def ask(
        self, send: Callable[[dict[str, Any]], bool], instance: str, offset: int | None, limit: int, whom: str
    ) -> Deferred[LogChunk]:
        """Send a ``logs`` question with ``send``; the answer, or ``Unanswered`` naming ``whom``."""
        request = LogsRequest(secrets.token_urlsafe(12), instance, offset, limit)
        d: Deferred[LogChunk] = Deferred()
        if not send(request.toJSON()):
            d.errback(Unanswered(f"{whom} cannot be asked now."))
            return d
        self._open[request.id] = d
        timer = self.clock.callLater(self.timeout, self._timedOut, request.id, whom)

        def settled(result: object) -> object:
            if timer.active():
                timer.cancel()
            self._open.pop(request.id, None)
            return result

        d.addBoth(settled)
        return d

    def answer(self, requestId: str, chunk: LogChunk) -> None:
        """The answer to question ``requestId`` came (one nobody waits for any more is dropped)."""
        d = self._open.get(requestId)
        if d is not None:
            d.callback(chunk)

    def _timedOut(self, requestId: str, whom: str) -> None:
        d = self._open.get(requestId)
        if d is not None:
            d.errback(Unanswered(f"{whom} did not answer within {self.timeout:g} s."))

    def failAll(self, why: str) -> None:
        """The link closed: nobody will answer what is open."""
        for d in list(self._open.values()):
            d.errback(Unanswered(why))


def answerTo(
    request: LogsRequest,
    asking: Deferred[LogChunk],
    send: Callable[[dict[str, Any]], object],
    shown: tuple[type[BaseException], ...] = (),
) -> Deferred[None]:
    """
    Send what ``asking`` fires with as the answer to ``request``; a failure
    as the answer's ``error``: its own message for ``Unanswered`` and the
    kinds in ``shown`` (written for the person), a plain one for anything
    else (whose message may name this machine's paths). Fires with None, or
    with the failure of another kind, for the caller to log.
    """

    def answered(chunk: LogChunk) -> None:
        send(chunk.toJSON(request.id))

    def failed(failure: Any) -> Any:
        told = failure.check(Unanswered, *shown) is not None
        reason = failure.getErrorMessage() if told else "The tool's output could not be read."
        at = request.offset or 0
        send(LogChunk(at, at, "", reason[:1000]).toJSON(request.id))
        return None if told else failure

    return asking.addCallbacks(answered, failed)
