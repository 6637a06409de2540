"""
The shared front's connection machine: one client connection, read as a
sequence of requests, each decided on
(:class:`~dit4c.common.frontrules.IRequestRules`) before a byte of it goes on.

:class:`FrontConnection` takes the client's bytes and events, follows the
table (:mod:`dit4c.common.frontmoves`) and acts through
:class:`~dit4c.common.frontrules.IFrontIO`; the upstream's side of it (the
responses) is :class:`~dit4c.common.frontresponses.ResponseTracking`. It
knows nothing of sockets, so it is driven on ``StringTransport`` and
``Clock`` in the tests; :mod:`dit4c.common.frontproto` is the Twisted
protocol around it. What it guarantees is said in :mod:`dit4c.common.frontconn`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.errors import HeadError
from dit4c.common.frontmetrics import FrontMetrics
from dit4c.common.frontmoves import (
    CHECKING,
    CLOSED,
    CLOSING,
    FORWARDING,
    HEAD,
    HOLDING,
    PARSED_BODY,
    PARSED_END,
    PARSED_EOF,
    PARSED_HEAD,
    PARSED_REFUSAL,
    RAW,
    TRANSITIONS,
    UNREAD,
    Event,
    Phase,
)
from dit4c.common.frontresponses import ResponseTracking
from dit4c.common.frontrules import Answer, Forward, IFrontIO, IRequestRules, Verdict
from dit4c.common.httpfront import HEAD_TOO_LARGE, FrontLimits, RequestHead

__all__ = ["FrontConnection"]


# The next phase, or None: a name of this module, because Python 3.11 looks a
# method of an imported name (``TRANSITIONS.get``) up again on every call.
_nextPhase = TRANSITIONS.get

#: What a connection keeps of its queues once it is a raw pipe or closed: nothing (appends are dropped).
_NOTHING: deque[Any] = deque(maxlen=0)

#: How far past the head limit httptools may hold a header line before the callbacks can count it.
_HEAD_SLACK = 65536


class _Stopped(Exception):
    """Raised in a request callback once the machine reads no more requests: it stops the parser."""


class FrontConnection(ResponseTracking):
    """
    One client connection of a front: the phase it is in, the requests
    passed on and not yet answered, the deadlines. Fed by
    :class:`~dit4c.common.frontproto.FrontProtocol` (bytes, EOF and loss of either connection);
    acts through ``io`` and asks ``rules``.
    """

    log = Logger()

    __slots__ = (
        "rules", "io", "clock", "limits", "metrics", "phase",
        "_parser", "_head", "_inHead", "_headBytes", "_events", "_pumping", "_held", "_heldEOF",
        "_request", "_pending", "_responses", "_answering", "_upstream", "_connecting",
        "_awaited", "_final", "_headTimer", "_idleTimer", "lastActivity", "_clientEOF", "_sentEOF",
    )  # fmt: skip

    def __init__(
        self, rules: IRequestRules, io: IFrontIO, clock: IReactorTime, limits: FrontLimits, metrics: FrontMetrics
    ) -> None:
        self.rules = rules
        self.io = io
        self.clock = clock
        self.limits = limits
        self.metrics = metrics
        self.phase = HEAD
        self._parser: Any = httptools.HttpRequestParser(self)
        self._head: RequestHead | None = None
        #: A request head is being read (or the connection's first is awaited).
        self._inHead = True
        self._headBytes = 0
        #: What the request parser found that the machine has not taken yet, in order.
        self._events: deque[tuple[int, Any]] = deque()
        self._pumping = False
        #: The client's bytes after the head of a request that asked to
        #: switch: the parser stops there until the answer says what they are.
        self._held: list[bytes] | None = None
        self._heldEOF = False
        #: The request being decided on or sent.
        self._request: RequestHead | None = None
        #: Requests passed on whose responses are not complete, oldest first.
        self._pending: deque[RequestHead] = deque()
        self._responses = None
        #: A byte of the oldest pending request's response has come.
        self._answering = False
        #: None: no upstream connection; False: being made; True: made.
        self._upstream: bool | None = None
        self._connecting: Deferred[Any] | None = None
        #: AWAITING: our answer, written once the upstream has answered what came before (None: a ``HEAD`` request).
        self._awaited: Answer | None = None
        #: CLOSING: our last answer, written once the upstream has answered what it has.
        self._final: bytes | None = None
        self._headTimer: IDelayedCall | None = None
        self._idleTimer: IDelayedCall | None = None
        self.lastActivity = clock.seconds()
        self._clientEOF = False
        #: The upstream has been sent the client's EOF.
        self._sentEOF = False

    def _move(self, event: Event) -> Phase:
        new = _nextPhase((self.phase, event))
        if new is None:
            raise AssertionError(f"front connection: no move from {self.phase} on {event}")
        self.phase = new
        return new

    # -- connection life ---------------------------------------------------------------------------

    def start(self) -> None:
        """The client connected: the first head's deadline and the idle deadline run."""
        self.metrics.connections += 1
        self.metrics.open += 1
        self._headTimer = self.clock.callLater(self.limits.headTimeout, self._headTimedOut)
        self._idleTimer = self.clock.callLater(self.limits.idleTimeout, self._checkIdle)

    def clientLost(self) -> None:
        """
        The client's connection is gone: so is everything of it. An upstream
        that already had the client's EOF is cut (nothing it still sends can
        reach anyone); otherwise it hears EOF after what it was sent.
        """
        if self.phase is CLOSED:
            return
        self._end()
        self.io.closeUpstream(self._sentEOF)

    def _sendEOF(self) -> None:
        self._sentEOF = True
        self.io.halfCloseUpstream()

    def _end(self) -> None:
        self.metrics.open -= 1
        self._move(Event.LOST)
        self._cancelTimers()
        self._forget()
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
        self.rules.ended()

    def _forget(self) -> None:
        """Drop what only an HTTP connection needs (a raw pipe keeps little per connection)."""
        self._parser = self._responses = self._held = self._head = self._request = None
        self._events = self._pending = _NOTHING

    def _cancelTimers(self) -> None:
        for timer in (self._headTimer, self._idleTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._headTimer = self._idleTimer = None

    def _headTimedOut(self) -> None:
        self._headTimer = None
        if self._inHead and self._parser is not None and self.phase is not CLOSING and self.phase is not CLOSED:
            self._parser = None
            self._event(PARSED_REFUSAL, HeadError(408, "Request Timeout", "The request was not sent in time.", "head_timeout"))
            self._settle()

    def _checkIdle(self) -> None:
        self._idleTimer = None
        if self.phase is RAW or self.phase is CLOSED:
            return
        idle = self.clock.seconds() - self.lastActivity
        if idle >= self.limits.idleTimeout and self.phase is not CHECKING:
            self.metrics.error("idle_timeout")
            self._close(abort=False)
        else:
            self._idleTimer = self.clock.callLater(max(self.limits.idleTimeout - idle, 0.1), self._checkIdle)

    # -- bytes and EOF from the client --------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        phase = self.phase
        if phase is RAW:
            self.metrics.bytesIn += len(data)
            self.lastActivity = self.clock.seconds()
            self.io.writeUpstream(data)
            return
        if phase is CLOSING or phase is CLOSED:
            return
        self.metrics.bytesIn += len(data)
        self.lastActivity = self.clock.seconds()
        self._parse(data)
        self._settle()

    def _parse(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            if self._held is not None:
                self._held.append(data)
            return
        if self._inHead:
            self._headBytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # The parser stops after a head that asks to switch: what follows
            # is held until the upstream's answer says what it is.
            self._parser = None
            self._held = [data[e.args[0]:]]
        except HeadError as e:
            self._parser = None
            self._event(PARSED_REFUSAL, e)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Stopped):
                return
            self._parser = None
            if isinstance(cause, HeadError):
                self._event(PARSED_REFUSAL, cause)
            else:
                self.log.failure("request handling failed", Failure(cause or e))
                self._event(PARSED_REFUSAL, HeadError(500, "Internal Server Error", "The server failed.", "internal"))
        except httptools.HttpParserError as e:
            self._parser = None
            self._event(PARSED_REFUSAL, HeadError(400, "Bad Request", f"Malformed request: {e}", "bad_request"))
        else:
            # httptools holds a header line until it ends: bound what a client
            # can make it hold (the callbacks count the head exactly).
            if self._inHead and self._headBytes > self.limits.maxHeadBytes + _HEAD_SLACK:
                self._parser = None
                self._event(PARSED_REFUSAL, HeadError(*HEAD_TOO_LARGE))

    def clientEOF(self) -> None:
        """The client has sent all it will; the upstream hears so in turn, after what came before."""
        self._clientEOF = True
        phase = self.phase
        if phase is RAW:
            self._sendEOF()
        elif phase is CLOSING or phase is CLOSED:
            return
        elif self._parser is None and self._held is not None:
            self._heldEOF = True
        else:
            self._event(PARSED_EOF, None)
            self._settle()

    # -- httptools' request callbacks ----------------------------------------------------------------------

    # The machine may stop reading requests inside a callback (a refusal,
    # an answer that closes): the parser then stops at its next callback.

    def on_message_begin(self) -> None:
        if self._parser is None:
            raise _Stopped()
        self._inHead = True
        self._headBytes = 0
        self._head = RequestHead(self.limits)
        if self._headTimer is None:
            self._headTimer = self.clock.callLater(self.limits.headTimeout, self._headTimedOut)

    def on_url(self, url: bytes) -> None:
        self._head.onUrl(url)  # type: ignore[union-attr]

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head.onHeader(name, value)  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        if self._parser is None:
            raise _Stopped()
        self._inHead = False
        timer = self._headTimer
        if timer is not None:
            if timer.active():
                timer.cancel()
            self._headTimer = None
        head = self._head
        assert head is not None
        head.complete(self._parser)
        self._event(PARSED_HEAD, head)

    def on_body(self, body: bytes) -> None:
        if self._parser is None:
            raise _Stopped()
        self._event(PARSED_BODY, body)

    def on_message_complete(self) -> None:
        if self._parser is None:
            raise _Stopped()
        self._event(PARSED_END, None)

    # -- taking the client's requests in order -------------------------------------------------------------

    def _event(self, kind: int, value: Any) -> None:
        if self._pumping or self._events or self.phase in HOLDING:
            self._events.append((kind, value))
            self._pump()
        else:
            self._pumping = True
            try:
                self._handle(kind, value)
            finally:
                self._pumping = False
            if self._events:
                self._pump()

    def _pump(self) -> None:
        """Take what waited, in order, for as long as the machine is not waiting itself."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._events and self.phase not in HOLDING:
                kind, value = self._events.popleft()
                self._handle(kind, value)
        finally:
            self._pumping = False

    def _later(self) -> None:
        """After something that came in its own reactor turn (a decision, a response): take what waited."""
        if not self._pumping and self.phase is not CLOSED:
            self._pump()
            self._settle()

    def _settle(self) -> None:
        """Hold the client while the machine waits, read it again when it does not."""
        if self.phase is not CLOSED:
            self.io.holdClient(self.phase in UNREAD)

    def _handle(self, kind: int, value: Any) -> None:
        phase = self.phase
        if kind == PARSED_BODY:
            if phase is FORWARDING:
                if self._request.chunked:  # type: ignore[union-attr]
                    self.io.writeUpstream(b"%x\r\n%s\r\n" % (len(value), value))
                else:
                    self.io.writeUpstream(value)
        elif kind == PARSED_END:
            if phase is FORWARDING:
                request = self._request
                assert request is not None
                if request.chunked:
                    self.io.writeUpstream(b"0\r\n\r\n")
                if request.upgrade:
                    self._move(Event.ASK_SWITCH)
                elif request.method == b"HEAD":
                    self._awaited = None
                    self._move(Event.WAIT)
                else:
                    self._move(Event.SENT)
        elif kind == PARSED_HEAD:
            if phase is HEAD:
                self.metrics.requests += 1
                self._move(Event.HEAD_COMPLETE)
                self._decide(value)
        elif kind == PARSED_REFUSAL:
            self._refuse(value)
        elif kind == PARSED_EOF:
            self._eof()

    # -- deciding ------------------------------------------------------------------------------------------

    def _decide(self, head: RequestHead) -> None:
        self._request = head
        try:
            verdict = self.rules.check(head)
        except HeadError as e:
            self._refuse(e)
            return
        except Exception:
            self._failed(Failure())
            return
        if isinstance(verdict, Deferred):
            verdict.addCallbacks(self._decided, self._failed)
        else:
            self._decided(verdict)

    def _failed(self, failure: Failure) -> None:
        if self.phase is CLOSED:
            return
        if isinstance(failure.value, HeadError):
            self._refuse(failure.value)
        else:
            self.log.failure("request handling failed", failure)
            self._refuse(HeadError(500, "Internal Server Error", "The server failed.", "internal"))
        self._later()

    def _decided(self, verdict: Verdict) -> None:
        if self.phase is not CHECKING:
            return
        request = self._request
        assert request is not None
        if isinstance(verdict, Forward):
            if self._upstream is None:
                self._connect(verdict)
                return
            self._forward(verdict.head)
        elif verdict.close or request.endsConnection:
            self._finish(verdict.response)
        elif self._pending:
            self._awaited = verdict
            self._move(Event.WAIT)
        else:
            self.io.writeClient(verdict.response)
            self._move(Event.ANSWERED)
        self._later()

    def _connect(self, verdict: Forward) -> None:
        """The first request passed on opens the upstream connection; it goes once that is made."""
        self._upstream = False
        try:
            connecting = self.io.connectUpstream()
        except Exception:
            self._failed(Failure())
            return
        if connecting is None:
            self._forward(verdict.head)
            self._later()
            return
        self._connecting = connecting

        def connected(_: Any) -> None:
            self._connecting = None
            self._forward(verdict.head)
            self._later()

        def failed(failure: Failure) -> None:
            self._connecting = None
            self._failed(failure)

        connecting.addCallbacks(connected, failed)


    def _forward(self, head: bytes) -> None:
        if self.phase is not CHECKING or not self._upstream:
            return
        request = self._request
        assert request is not None
        if not self._pending:
            self._answering = False
        self._pending.append(request)
        self._move(Event.FORWARDED)
        self.io.writeUpstream(head)

    # -- refusing and closing --------------------------------------------------------------------------------

    def _refuse(self, error: HeadError) -> None:
        phase = self.phase
        if phase is CLOSING or phase is CLOSED:
            return
        if error.kind:
            self.metrics.error(error.kind)
        page = self.rules.page(error.status, error.title, error.message)
        if phase is FORWARDING:
            # A request is cut short upstream, and nothing will answer it
            # properly: say why if no response is under way, and end.
            if not self._answering:
                self.io.writeClient(page)
            self._close(abort=False)
            return
        self._finish(page)

    def _finish(self, final: bytes | None) -> None:
        """No more requests: once the upstream has answered those it has, ``final`` (if any), then close."""
        if self.phase is CLOSING or self.phase is CLOSED:
            return
        self._move(Event.CLOSE)
        self._parser = self._held = None
        self._events.clear()
        timer = self._headTimer
        if timer is not None and timer.active():
            timer.cancel()
        self._headTimer = None
        if self._pending and self._upstream:
            self._final = final
            return
        if final is not None:
            self.io.writeClient(final)
        self._close(abort=False)

    def _close(self, abort: bool) -> None:
        if self.phase is CLOSED:
            return
        self._end()
        self.io.closeClient(abort)
        self.io.closeUpstream(abort)

    def _eof(self) -> None:
        """The client's EOF, in its turn."""
        phase = self.phase
        if phase is FORWARDING or (phase is HEAD and not self._inHead and self._upstream):
            # The upstream has what the client sent (a request, perhaps cut
            # short in its body): it hears EOF too, and may still answer.
            self._sendEOF()
            self._finish(None)
        elif phase is HEAD:
            # Nobody is left to answer, or a head was cut short.
            self._finish(None)
