"""
The connection every public HTTP front shares: the routing server's public
side and the auth helper in front of each tool.

A browser's connection is read as a sequence of requests, each parsed
(httptools: llhttp, Node's strict parser) and decided on before a byte of it
goes on; what differs between the fronts is only the decision and the head
passed on (:class:`IFrontRules`: which tunnel owns the host and
``X-Forwarded-*`` at the routing server; the session check, its cookies
stripped and ``X-DIT4C-User`` set at the auth helper). Everything else is
here, once:

- a deadline for each request head (from its first byte, not reset by
  later ones), and one for a connection with no byte either way;
- refusals answered with the front's own page, in order behind the
  responses to the requests before them;
- bodies re-framed exactly as parsed (a chunked body stays chunked, a
  ``Content-Length`` beside it is dropped), so nothing is smuggled past;
- the upstream's responses parsed too (httptools' response parser), only to
  know where each one ends and what its status is: the bytes themselves pass
  back untouched;
- the switch to a raw pipe only once the upstream answered ``101 Switching
  Protocols`` to a request that asked to switch. Until then every request on
  the connection is parsed and its headers set again: a request that asked
  to upgrade and got a ``200`` leaves the connection an HTTP one;
- back-pressure both ways (a slow reader slows the writer), and half-close
  carried across as a direct connection would see it.

:class:`FrontConnection` is the machine: it takes bytes and events and acts
through :class:`IFrontIO`; :class:`FrontProtocol` is the thin Twisted
protocol around it, with the upstream side (:class:`UpstreamProtocol`). The
machine is a table (:data:`TRANSITIONS`) rather than an automat machine:
each request crosses three or four moves, and at the routing server's rate
automat's cost per input (a few microseconds) would be a fifth of the time a
request may take. The table is the whole of the machine, and the tests check
it. The rules are in docs/protocols.md, sections 3 and 10.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from dit4c.common.httpfront import HEAD_TOO_LARGE, FrontLimits, HeadError, RequestHead
from dit4c.common.service import IConnectionTransport, noDelay
from dit4c.tunnel.splice import halfClose

__all__ = [
    "TRANSITIONS",
    "Answer",
    "Event",
    "Forward",
    "FrontConnection",
    "FrontMetrics",
    "FrontProtocol",
    "IFrontIO",
    "IFrontRules",
    "Phase",
    "UpstreamProtocol",
]



# -- what a front decides ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forward:
    """Pass the request on, with this head (its body follows as parsed)."""

    head: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """
    Answer the request here with ``response`` (a whole HTTP response). The
    connection closes after it if ``close``, or if the request's body was
    not read or it asked so (:attr:`RequestHead.endsConnection`).
    """

    response: bytes
    close: bool = False


Verdict = Forward | Answer


class IFrontRules(Interface):
    """What one front decides for one client connection (made per connection)."""

    def check(head: RequestHead) -> Verdict | Deferred[Verdict]:
        """
        Decide about a complete request head: pass it on, or answer it.
        Raise (or fail with) :class:`HeadError` to refuse it and close.
        """

    def connect(protocol: UpstreamProtocol) -> Deferred[Any] | None:
        """
        Open the upstream connection for ``protocol`` (once, at the first
        request passed on): None when connected at once, else a Deferred
        that fires once connected or fails (:class:`HeadError` for the
        page the client gets).
        """

    def page(status: int, title: str, message: str) -> bytes:
        """The front's own page for a refusal: a whole ``Connection: close`` response."""

    def unanswered(reason: Failure | None) -> bytes:
        """The page for a request the upstream ended without answering (``reason``: how it ended)."""

    def cut(reason: Failure | None) -> bool:
        """Whether the upstream ended abnormally, so the client's connection is aborted rather than closed."""

    def ended() -> None:
        """The client's connection has ended (closed by either side)."""


class IFrontIO(Interface):
    """Where the machine's actions go: the two connections (:class:`FrontProtocol`)."""

    def writeClient(data: bytes) -> None:
        """Send bytes to the client."""

    def writeUpstream(data: bytes) -> None:
        """Send bytes to the upstream."""

    def connectUpstream() -> Deferred[Any] | None:
        """Open the upstream connection (:meth:`IFrontRules.connect`)."""

    def holdClient(hold: bool) -> None:
        """Stop (or start again) reading from the client while a request is decided or answered."""

    def closeClient(abort: bool) -> None:
        """Close the client's connection once written bytes are sent (or at once, ``abort``)."""

    def halfCloseClient() -> None:
        """Send EOF to the client, still reading."""

    def closeUpstream(abort: bool) -> None:
        """Close the upstream connection (if any)."""

    def halfCloseUpstream() -> None:
        """Send EOF to the upstream, still reading."""


class FrontMetrics:
    """Counters a front keeps (the routing server's admin endpoint shows them); plain ints, so the hot path stays cheap."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.open = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


# -- the machine ----------------------------------------------------------------------------------


class Phase(enum.StrEnum):
    """Where a connection is, as its client's bytes are read."""

    #: Reading a request head (or waiting for the next one).
    HEAD = "head"
    #: A complete head is being decided on; the client is held.
    CHECKING = "checking"
    #: The request went on; its body follows as parsed.
    FORWARDING = "forwarding"
    #: Held until the upstream has answered every request passed on: an own
    #: answer waits for the responses before it, a ``HEAD`` request for its
    #: response's head (whose body length cannot be read from it).
    AWAITING = "awaiting"
    #: A request that asked to switch protocols went on; held until its
    #: answer's status: ``101`` makes the connection raw, any other leaves it HTTP.
    SWITCHING = "switching"
    #: After ``101``: a pipe both ways, nothing parsed.
    RAW = "raw"
    #: No more requests: what the upstream owes finishes, then our last answer, then the close.
    CLOSING = "closing"
    CLOSED = "closed"


class Event(enum.StrEnum):
    HEAD_COMPLETE = "head-complete"
    FORWARDED = "forwarded"
    ANSWERED = "answered"
    SENT = "sent"
    WAIT = "wait"
    ASK_SWITCH = "ask-switch"
    CAUGHT_UP = "caught-up"
    SWITCHED = "switched"
    NOT_SWITCHED = "not-switched"
    CLOSE = "close"
    LOST = "lost"


_P, _E = Phase, Event

#: The machine: (phase, event) -> next phase. Every phase but CLOSED may
#: close (CLOSE) and every phase ends when the client's connection is lost (LOST).
TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (_P.HEAD, _E.HEAD_COMPLETE): _P.CHECKING,
    (_P.CHECKING, _E.FORWARDED): _P.FORWARDING,
    (_P.CHECKING, _E.ANSWERED): _P.HEAD,
    (_P.CHECKING, _E.WAIT): _P.AWAITING,
    (_P.FORWARDING, _E.SENT): _P.HEAD,
    (_P.FORWARDING, _E.WAIT): _P.AWAITING,
    (_P.FORWARDING, _E.ASK_SWITCH): _P.SWITCHING,
    (_P.AWAITING, _E.CAUGHT_UP): _P.HEAD,
    (_P.SWITCHING, _E.SWITCHED): _P.RAW,
    (_P.SWITCHING, _E.NOT_SWITCHED): _P.HEAD,
    **{(p, _E.CLOSE): _P.CLOSING for p in Phase if p is not _P.CLOSED},
    **{(p, _E.LOST): _P.CLOSED for p in Phase},
}

#: Phases in which the client's later requests wait.
HOLDING = frozenset((_P.CHECKING, _P.AWAITING, _P.SWITCHING, _P.CLOSING))
#: Phases in which the client is not read meanwhile. (A closing connection
#: is read, and what comes dropped, so that a client that goes away is seen.)
UNREAD = frozenset((_P.CHECKING, _P.AWAITING, _P.SWITCHING))

# The hot path compares phases often: module names are faster than the class's.
HEAD, CHECKING, FORWARDING, AWAITING = _P.HEAD, _P.CHECKING, _P.FORWARDING, _P.AWAITING
SWITCHING, RAW, CLOSING, CLOSED = _P.SWITCHING, _P.RAW, _P.CLOSING, _P.CLOSED

#: What a connection keeps of its queues once it is a raw pipe or closed: nothing (appends are dropped).
_NOTHING: deque[Any] = deque(maxlen=0)

# What the request parser's callbacks queue, in order.
_BODY, _END, _HEAD, _REFUSE, _EOF = range(5)

#: How far past the head limit httptools may hold a header line before the callbacks can count it.
_HEAD_SLACK = 65536

class _Stopped(Exception):
    """Raised in a request callback once the machine reads no more requests: it stops the parser."""


class _Responses:
    """
    httptools' response callbacks, for the machine: where each response
    starts and ends, and its status. Kept apart because the request
    parser's callbacks have the same names.
    """

    __slots__ = ("machine", "parser", "status", "headDone")

    def __init__(self, machine: FrontConnection) -> None:
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


class FrontConnection:
    """
    One client connection of a front: the phase it is in, the requests
    passed on and not yet answered, the deadlines. Fed by
    :class:`FrontProtocol` (bytes, EOF and loss of either connection);
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
        self, rules: IFrontRules, io: IFrontIO, clock: IReactorTime, limits: FrontLimits, metrics: FrontMetrics
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
        self._responses: _Responses | None = None
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
        new = TRANSITIONS.get((self.phase, event))
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
            self._event(_REFUSE, HeadError(408, "Request Timeout", "The request was not sent in time.", "head_timeout"))
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
            self._event(_REFUSE, e)
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, _Stopped):
                return
            self._parser = None
            if isinstance(cause, HeadError):
                self._event(_REFUSE, cause)
            else:
                self.log.failure("request handling failed", Failure(cause or e))
                self._event(_REFUSE, HeadError(500, "Internal Server Error", "The server failed.", "internal"))
        except httptools.HttpParserError as e:
            self._parser = None
            self._event(_REFUSE, HeadError(400, "Bad Request", f"Malformed request: {e}", "bad_request"))
        else:
            # httptools holds a header line until it ends: bound what a client
            # can make it hold (the callbacks count the head exactly).
            if self._inHead and self._headBytes > self.limits.maxHeadBytes + _HEAD_SLACK:
                self._parser = None
                self._event(_REFUSE, HeadError(*HEAD_TOO_LARGE))

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
            self._event(_EOF, None)
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
        self._event(_HEAD, head)

    def on_body(self, body: bytes) -> None:
        if self._parser is None:
            raise _Stopped()
        self._event(_BODY, body)

    def on_message_complete(self) -> None:
        if self._parser is None:
            raise _Stopped()
        self._event(_END, None)

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
        if kind == _BODY:
            if phase is FORWARDING:
                if self._request.chunked:  # type: ignore[union-attr]
                    self.io.writeUpstream(b"%x\r\n%s\r\n" % (len(value), value))
                else:
                    self.io.writeUpstream(value)
        elif kind == _END:
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
        elif kind == _HEAD:
            if phase is HEAD:
                self.metrics.requests += 1
                self._move(Event.HEAD_COMPLETE)
                self._decide(value)
        elif kind == _REFUSE:
            self._refuse(value)
        elif kind == _EOF:
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

    def upstreamConnected(self) -> None:
        """The upstream connection is made (perhaps before ``connectUpstream`` returned)."""
        self._upstream = True
        self._responses = _Responses(self)

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

    # -- the upstream's side ----------------------------------------------------------------------------------

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
                self._event(_EOF, None)
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


# -- the protocols -----------------------------------------------------------------------------------------


@implementer(IHalfCloseableProtocol, IPushProducer)
class UpstreamProtocol(Protocol):
    """
    The upstream connection (a tunnel stream, a connection to the tool):
    its bytes go to the machine. It is the client transport's producer: a
    client that reads slowly pauses reading from the upstream.
    """

    transport: IConnectionTransport

    def __init__(self, front: FrontProtocol) -> None:
        self.front = front
        self.readClosed = False
        self.writeClosed = False

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.front.upstreamMade(self)

    def dataReceived(self, data: bytes) -> None:
        self.front.machine.upstreamData(data)

    def readConnectionLost(self) -> None:
        self.readClosed = True
        self.front.machine.upstreamEOF()
        if self.writeClosed and self.transport is not None:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.writeClosed = True
        if self.readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.front.upstreamGone(self, reason)

    def pauseProducing(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


#: Why the client is not read: the machine holds it, or the upstream takes no more now.
_HELD, _CONGESTED = 1, 2


@implementer(IHalfCloseableProtocol, IPushProducer, IFrontIO)
class FrontProtocol(Protocol):
    """
    One client connection of a front: moves bytes between the two
    connections and its :class:`FrontConnection`. It is the upstream
    transport's producer: an upstream that takes bytes slowly pauses
    reading from the client, as the machine does while it waits.

    :param rulesFor: ``rulesFor(transport)``, the front's rules for the
        connection on ``transport``.
    """

    transport: IConnectionTransport

    def __init__(
        self, rulesFor: Callable[[Any], IFrontRules], clock: IReactorTime, limits: FrontLimits, metrics: FrontMetrics
    ) -> None:
        self.rulesFor = rulesFor
        self.clock = clock
        self.limits = limits
        self.metrics = metrics
        self.machine: FrontConnection = None  # type: ignore[assignment]
        self.rules: IFrontRules = None  # type: ignore[assignment]
        self.upstream: UpstreamProtocol | None = None
        #: The upstream whose transport and ours are each other's producers.
        self._paired: UpstreamProtocol | None = None
        self._paused = 0
        self._readClosed = False
        self._writeClosed = False

    # -- the client's connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self.rules = self.rulesFor(self.transport)
        self.machine = FrontConnection(self.rules, self, self.clock, self.limits, self.metrics)
        self.machine.start()

    def dataReceived(self, data: bytes) -> None:
        self.machine.dataReceived(data)

    def readConnectionLost(self) -> None:
        self._readClosed = True
        self.machine.clientEOF()
        if self._writeClosed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._writeClosed = True
        if self._readClosed:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.machine is not None:
            self.machine.clientLost()

    # -- IPushProducer, for the upstream transport -------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._pause(_CONGESTED, True)

    def resumeProducing(self) -> None:
        self._pause(_CONGESTED, False)

    def stopProducing(self) -> None:
        pass

    def _pause(self, why: int, on: bool) -> None:
        before = self._paused
        after = before | why if on else before & ~why
        if after == before:
            return
        self._paused = after
        transport = self.transport
        if transport is None:
            return
        if not before:
            transport.pauseProducing()
        elif not after:
            transport.resumeProducing()

    # -- IFrontIO ----------------------------------------------------------------------------------------

    def writeClient(self, data: bytes) -> None:
        self.transport.write(data)

    def writeUpstream(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)

    def connectUpstream(self) -> Deferred[Any] | None:
        return self.rules.connect(UpstreamProtocol(self))

    def upstreamMade(self, upstream: UpstreamProtocol) -> None:
        if self.machine.phase is CLOSED:
            upstream.transport.loseConnection()
            return
        self.upstream = upstream
        # Back-pressure both ways: a slow client pauses reading from the
        # upstream, a slow upstream pauses reading from the client.
        self.transport.registerProducer(upstream, True)
        upstream.transport.registerProducer(self, True)
        self._paired = upstream
        self.machine.upstreamConnected()

    def _unpair(self) -> None:
        """
        Each transport was the other's producer: unregister them before a
        close, or a paused producer would be resumed instead of the close.
        """
        paired, self._paired = self._paired, None
        if paired is not None:
            self.transport.unregisterProducer()
            if paired.transport is not None:
                paired.transport.unregisterProducer()

    def upstreamGone(self, upstream: UpstreamProtocol, reason: Failure | None) -> None:
        if upstream is not self.upstream:
            return
        self.upstream = None
        self._unpair()
        self.machine.upstreamLost(reason)

    def holdClient(self, hold: bool) -> None:
        self._pause(_HELD, hold)

    def closeClient(self, abort: bool) -> None:
        self._unpair()
        transport = self.transport
        if abort:
            transport.abortConnection()
        else:
            transport.loseConnection()

    def halfCloseClient(self) -> None:
        halfClose(self.transport)

    def closeUpstream(self, abort: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is None or upstream.transport is None:
            return
        self._unpair()
        if abort:
            upstream.transport.abortConnection()
        else:
            upstream.transport.loseConnection()

    def halfCloseUpstream(self) -> None:
        upstream = self.upstream
        if upstream is not None:
            halfClose(upstream.transport)
