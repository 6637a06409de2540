"""
The shared front's machine, the upstream's side: where each response to a
request passed on starts and ends, and what its status says.

The upstream's bytes go back to the client untouched; they are parsed on
the side (httptools' response parser) only to know when the requests
passed on are answered (an own answer or the last page waits for that), to
end a ``HEAD`` request's answer at its head, and to switch to a raw pipe
only on a ``101`` to the request that asked for it. It is a base class of
:class:`~dit4c.common.frontmachine.FrontConnection` rather than an object
beside it, so that a response costs no more lookups than when both halves
were one class; apart because the request parser's callbacks and the
response parser's have the same names.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import httptools
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.frontmetrics import FrontMetrics
from dit4c.common.frontmoves import (
    AWAITING,
    CLOSED,
    CLOSING,
    PARSED_EOF,
    RAW,
    SWITCHING,
    Event,
    Phase,
)
from dit4c.common.frontrules import Answer, IFrontIO, IRequestRules
from dit4c.common.httpfront import RequestHead

__all__ = ["ResponseTracking"]


class _Responses:
    """
    httptools' response callbacks, for the machine: where each response
    starts and ends, and its status. Kept apart because the request
    parser's callbacks have the same names.
    """

    __slots__ = ("machine", "parser", "status", "headDone")

    def __init__(self, machine: ResponseTracking) -> None:
        self.machine = machine
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        #: The response to a ``HEAD`` request ended with its head.
        self.headDone = False

    def on_message_begin(self) -> None:
        self.machine._answering = True

    def on_headers_complete(self) -> None:
        self.status = status = self.parser.get_status_code()
        if status >= 200:
            self.headDone = self.machine._responseHead()
        elif status == 101:
            self.machine._switchAnswered()

    def on_message_complete(self) -> None:
        if self.status >= 200 and not self.headDone:
            self.machine._responseDone()


class ResponseTracking:
    """
    The machine's methods for the upstream's side: its connection made, its
    bytes, its EOF and its loss. The state is the machine's own
    (:class:`~dit4c.common.frontmachine.FrontConnection` holds every slot).
    """

    if TYPE_CHECKING:
        # What this side reads and calls of the machine (FrontConnection).
        log: Logger
        rules: IRequestRules
        io: IFrontIO
        clock: IReactorTime
        metrics: FrontMetrics
        phase: Phase
        lastActivity: float
        _parser: Any
        _inHead: bool
        _pumping: bool
        _held: list[bytes] | None
        _heldEOF: bool
        _pending: deque[RequestHead]
        _responses: _Responses | None
        _answering: bool
        _upstream: bool | None
        _awaited: Answer | None
        _final: bytes | None
        _clientEOF: bool

        def _move(self, event: Event) -> Phase: ...
        def _parse(self, data: bytes) -> None: ...
        def _event(self, kind: int, value: Any) -> None: ...
        def _later(self) -> None: ...
        def _close(self, abort: bool) -> None: ...
        def _forget(self) -> None: ...
        def _cancelTimers(self) -> None: ...
        def _sendEOF(self) -> None: ...

    else:
        # No slots of its own: the machine's hold all the state. (Hidden from
        # mypy, which would read every assignment here as outside them.)
        __slots__ = ()

    def upstreamConnected(self) -> None:
        """The upstream connection is made (perhaps before ``connectUpstream`` returned)."""
        self._upstream = True
        self._responses = _Responses(self)

    def upstreamData(self, data: bytes) -> None:
        """Bytes from the upstream: to the client as they are; parsed on the side for where each response ends."""
        phase = self.phase
        if phase is CLOSED:
            return
        self.metrics.bytesOut += len(data)
        self.lastActivity = self.clock.seconds()
        self.io.writeClient(data)
        responses = self._responses
        if responses is None or phase is RAW:
            return
        try:
            responses.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._switch()
        except httptools.HttpParserCallbackError as e:
            self.log.failure("response handling failed", Failure(e.__context__ or e))
            self._close(abort=True)
        except httptools.HttpParserError as e:
            self._badResponse(str(e))
        else:
            if responses.headDone and self._responses is responses:
                # The answer to HEAD ended with its head; the parser would
                # read a body: the next response starts afresh.
                self._responses = _Responses(self)
        self._later()

    def _responseHead(self) -> bool:
        """The head of a final response (status 200 or more) came: True if that ends it (the answer to ``HEAD``)."""
        pending = self._pending
        if not pending:
            return False
        request = pending[0]
        if request.upgrade and self.phase is SWITCHING and len(pending) == 1:
            self._notSwitched()
        if request.method == b"HEAD":
            self._responseDone()
            return True
        return False

    def _notSwitched(self) -> None:
        """
        The upstream did not switch protocols: the connection stays HTTP,
        and what the client sent after the head is read as requests.
        """
        self._move(Event.NOT_SWITCHED)
        self._parser = httptools.HttpRequestParser(self)
        self._inHead = False
        held, self._held = self._held or [], None
        eof, self._heldEOF = self._heldEOF, False
        # Inside the response parser's turn: what the held bytes hold only
        # queues, and is taken once that turn is over (``_later``).
        pumping, self._pumping = self._pumping, True
        try:
            for data in held:
                if self._parser is None:
                    break
                self._parse(data)
            if eof:
                self._event(PARSED_EOF, None)
        finally:
            self._pumping = pumping

    def _responseDone(self) -> None:
        """The oldest pending request's response is complete."""
        pending = self._pending
        if not pending:
            self._badResponse("a response to no request")
            return
        pending.popleft()
        self._answering = False
        if pending:
            return
        phase = self.phase
        if phase is AWAITING:
            awaited, self._awaited = self._awaited, None
            self._move(Event.CAUGHT_UP)
            if awaited is not None:
                self.io.writeClient(awaited.response)
        elif phase is CLOSING:
            final, self._final = self._final, None
            if final is not None:
                self.io.writeClient(final)
            self._close(abort=False)

    def _switchAnswered(self) -> None:
        """A ``101``: only the answer to a request that asked to switch, and the last one sent, may say so."""
        pending = self._pending
        if not (self.phase is SWITCHING and len(pending) == 1 and pending[0].upgrade):
            self._badResponse("101 Switching Protocols to a request that did not ask to switch")

    def _switch(self) -> None:
        """After ``101``: a pipe both ways, what the client sent after its head first."""
        if self.phase is not SWITCHING:
            self._close(abort=True)
            return
        self._move(Event.SWITCHED)
        self._cancelTimers()
        held = self._held or []
        eof = self._heldEOF or self._clientEOF
        self._forget()
        for data in held:
            if data:
                self.io.writeUpstream(data)
        if eof:
            self._sendEOF()

    def _badResponse(self, why: str) -> None:
        """The upstream broke HTTP: what it sent is passed on, and the connection ends."""
        if self.phase is CLOSED:
            return
        self.log.info("the upstream broke HTTP ({why}); closing the connection", why=why)
        self.metrics.error("bad_response")
        self._close(abort=False)

    def upstreamEOF(self) -> None:
        """The upstream sent EOF: in a raw pipe the client hears it and may still send; otherwise the connection ends."""
        if self.phase is RAW:
            self.io.halfCloseClient()
        else:
            self.upstreamLost(None)

    def upstreamLost(self, reason: Failure | None) -> None:
        """The upstream connection is gone: the client's ends too, with a page if a request got no answer."""
        self._upstream = None
        if self.phase is CLOSED:
            return
        if self._pending and not self._answering:
            self.metrics.error("bad_gateway")
            self.io.writeClient(self.rules.unanswered(reason))
            self._close(abort=False)
            return
        self._close(abort=self.rules.cut(reason))
