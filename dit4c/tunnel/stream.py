"""
One stream of a tunnel, as a Twisted transport.

A :class:`Stream` is what a protocol running over the tunnel sees as its
``transport``: ``ITransport`` (write, half-close, close, abort), ``IConsumer``
(a producer registered on it is paused while the stream cannot send), and
``IPushProducer`` (a consumer that cannot keep up pauses it, and the pause
travels back to the sender as withheld window credit). So any Protocol runs
over a stream unchanged, with back-pressure end to end.

A stream's life is a small state machine (:data:`_TRANSITIONS`). It is kept
as a table rather than an automat machine because a routing server holds tens
of thousands of streams and each must stay small; the table is the whole of
the machine and is checked by the tests.
"""

from __future__ import annotations

import enum
from collections import deque
from typing import Any, Protocol

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.tunnel.errors import ErrorCode, FlowControlError, ProtocolError, StreamReset


class StreamLimits(Protocol):
    """The tunnel's figures a stream sizes its windows and buffers by."""

    @property
    def window(self) -> int:
        """The receive window a stream starts with."""

    @property
    def maxWindow(self) -> int:
        """A stream's receive window never grows beyond this."""

    @property
    def sendHighWater(self) -> int:
        """Bytes buffered to send past which a stream pauses its producer."""


class StreamHost(Protocol):
    """
    What a stream needs of the tunnel it runs in (the session provides it):
    the tunnel's figures and addresses, the shared window growth budget, and
    the calls that put its frames on the link and account for its buffers.
    Streams are written against this, not against the session, so the
    session can depend on streams without streams depending back on it.
    """

    #: Window growth still available to the tunnel's streams (a stream takes
    #: from it as its window grows; the session gives it back when it ends).
    growthAvailable: int

    @property
    def settings(self) -> StreamLimits: ...

    @property
    def peerWindow(self) -> int:
        """The send window the peer grants each new stream."""

    @property
    def peerAddress(self) -> IAddress | None: ...

    @property
    def hostAddress(self) -> IAddress | None: ...

    @property
    def log(self) -> Logger: ...

    def _wantSend(self, stream: Stream) -> None:
        """``stream`` has something to send."""

    def _sendReset(self, streamId: int, code: int, reason: str) -> None:
        """Tell the peer stream ``streamId`` is reset."""

    def _credit(self, stream: Stream) -> None:
        """``stream``'s reader consumed data: return window credit to the peer."""

    def _buffered(self, stream: Stream, delta: int) -> None:
        """``stream`` holds ``delta`` more (or fewer) bytes for a paused reader."""

    def _streamEnded(self, stream: Stream) -> None:
        """``stream`` is closed both ways: forget it."""


class State(enum.Enum):
    OPEN = "open"
    #: We sent FIN; the peer may still send.
    LOCAL_CLOSED = "local-closed"
    #: The peer sent FIN (and the protocol has been told); we may still send.
    REMOTE_CLOSED = "remote-closed"
    CLOSED = "closed"


class Event(enum.Enum):
    FIN_SENT = "fin-sent"
    FIN_RECEIVED = "fin-received"
    RESET = "reset"


#: The stream machine: (state, event) -> next state. RESET (sent or received)
#: ends a stream from any state; a FIN in each direction ends it cleanly.
_TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.OPEN, Event.FIN_SENT): State.LOCAL_CLOSED,
    (State.OPEN, Event.FIN_RECEIVED): State.REMOTE_CLOSED,
    (State.LOCAL_CLOSED, Event.FIN_RECEIVED): State.CLOSED,
    (State.REMOTE_CLOSED, Event.FIN_SENT): State.CLOSED,
    (State.OPEN, Event.RESET): State.CLOSED,
    (State.LOCAL_CLOSED, Event.RESET): State.CLOSED,
    (State.REMOTE_CLOSED, Event.RESET): State.CLOSED,
}


@implementer(IAddress)
class StreamAddress:
    """
    The address of one end of a stream: the tunnel's peer address plus the
    stream id and the metadata the opener sent (for example the public
    client's address, as seen by the routing server).
    """

    __slots__ = ("tunnel", "stream", "metadata")

    def __init__(self, tunnel: IAddress | None, stream: int, metadata: dict[str, Any]) -> None:
        self.tunnel = tunnel
        self.stream = stream
        self.metadata = metadata

    def __repr__(self) -> str:
        return f"StreamAddress(stream={self.stream}, metadata={self.metadata!r})"


@implementer(ITransport, IConsumer, IPushProducer)
class Stream:
    """
    Both directions of one stream: its send buffer and window, its receive
    buffer and the window credit it hands back, and its life.
    """

    __slots__ = (
        "id",
        "session",
        "metadata",
        "protocol",
        "state",
        "disconnecting",
        "_halfCloseable",
        "_sendBuf",
        "sendBuffered",
        "sendWindow",
        "_finPending",
        "_fullClose",
        "scheduled",
        "_producer",
        "_producerPaused",
        "_streaming",
        "_recvBuf",
        "recvBuffered",
        "recvWindow",
        "recvRemaining",
        "_recvUnacked",
        "_lastCredit",
        "grown",
        "_readPaused",
        "_finAfterBuffer",
    )

    def __init__(self, session: StreamHost, streamId: int, metadata: dict[str, Any]) -> None:
        self.id = streamId
        self.session = session
        self.metadata = metadata
        self.protocol: IProtocol | None = None
        self.state = State.OPEN
        self.disconnecting = False
        self._halfCloseable = False
        # send direction
        self._sendBuf: deque[bytes | memoryview] | None = None
        self.sendBuffered = 0
        self.sendWindow = session.peerWindow
        self._finPending = False
        self._fullClose = False
        self.scheduled = False
        self._producer: Any = None
        self._producerPaused = False
        self._streaming = True
        # receive direction
        self._recvBuf: deque[bytes] | None = None
        self.recvBuffered = 0
        self.recvWindow = session.settings.window
        self.recvRemaining = self.recvWindow
        self._recvUnacked = 0
        self._lastCredit = -1.0e9
        self.grown = 0
        self._readPaused = False
        self._finAfterBuffer = False

    def __repr__(self) -> str:
        return f"<Stream {self.id} {self.state.value}>"

    # -- the machine --------------------------------------------------------

    def _transition(self, event: Event) -> State:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise AssertionError(f"stream {self.id}: no transition from {self.state} on {event}")
        self.state = new
        return new

    def attach(self, protocol: IProtocol) -> None:
        """Connect ``protocol`` to this stream (``makeConnection``)."""
        self.protocol = protocol
        self._halfCloseable = IHalfCloseableProtocol.providedBy(protocol)
        self._notify(protocol, "makeConnection", self)

    # -- ITransport ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._finPending or self.state is State.LOCAL_CLOSED or self.state is State.CLOSED:
            return
        if not data:
            return
        if self._sendBuf is None:
            self._sendBuf = deque()
        self._sendBuf.append(data)
        self.sendBuffered += len(data)
        self.session._wantSend(self)
        if (
            self.sendBuffered > self.session.settings.sendHighWater
            and self._producer is not None
            and not self._producerPaused
            and self.state is not State.CLOSED
        ):
            self._producerPaused = True
            self._producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        for chunk in data:
            self.write(chunk)

    def loseConnection(self) -> None:
        """
        Close both directions once everything written has been sent, as TCP
        does: the protocol's ``connectionLost`` comes when our FIN has gone,
        and anything the peer sends after that resets the stream.
        """
        if self.state is State.CLOSED or self._fullClose:
            return
        self.disconnecting = True
        self._fullClose = True
        self._closeWrite()

    def loseWriteConnection(self) -> None:
        """Half-close: send FIN after buffered data, keep reading."""
        if self.state is State.CLOSED:
            return
        self._closeWrite()

    def abortConnection(self) -> None:
        """Drop buffered data and reset the stream (``CANCEL``)."""
        self.reset(ErrorCode.CANCEL, "aborted")

    def getPeer(self) -> StreamAddress:
        return StreamAddress(self.session.peerAddress, self.id, self.metadata)

    def getHost(self) -> StreamAddress:
        return StreamAddress(self.session.hostAddress, self.id, self.metadata)

    # -- IConsumer ----------------------------------------------------------

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"stream {self.id} already has a producer")
        self._producer = producer
        self._producerPaused = False
        self._streaming = streaming
        if not streaming:
            # A pull producer is asked for data whenever the buffer drains.
            producer.resumeProducing()
        elif self.sendBuffered > self.session.settings.sendHighWater:
            self._producerPaused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producerPaused = False

    # -- IPushProducer: our reader's consumer pauses us -----------------------

    def pauseProducing(self) -> None:
        self._readPaused = True

    def resumeProducing(self) -> None:
        if not self._readPaused:
            return
        self._readPaused = False
        self._deliverBuffered()

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- send side, driven by the session ------------------------------------

    def _closeWrite(self) -> None:
        if self._finPending or self.state is State.LOCAL_CLOSED:
            return
        self._finPending = True
        self.session._wantSend(self)

    def _takeChunk(self, limit: int) -> tuple[bytes, bool]:
        """
        Up to ``limit`` bytes from the send buffer, and whether this chunk
        should carry FIN. Bulk writes are cut without copying what is left.
        """
        buf = self._sendBuf
        assert buf is not None
        first = buf[0]
        if len(first) <= limit:
            buf.popleft()
            chunk = first if type(first) is bytes else bytes(first)
        else:
            view = first if type(first) is memoryview else memoryview(first)
            chunk = bytes(view[:limit])
            buf[0] = view[limit:]
        n = len(chunk)
        self.sendBuffered -= n
        self.sendWindow -= n
        return chunk, self._finPending and not buf

    def _sendable(self) -> bool:
        """Whether the session can send something for us now."""
        if self.state is State.CLOSED:
            return False
        if self.sendBuffered:
            return self.sendWindow > 0
        return self._finPending

    def _afterSend(self, finSent: bool) -> None:
        producer = self._producer
        if (
            producer is not None
            and self._producerPaused
            and self.sendBuffered <= self.session.settings.sendHighWater // 2
        ):
            self._producerPaused = False
            producer.resumeProducing()
        elif producer is not None and not self._streaming and not self.sendBuffered:
            # A pull producer is asked for more whenever the buffer drains.
            producer.resumeProducing()
        if finSent:
            self._finSent()

    def _finSent(self) -> None:
        self._finPending = False
        new = self._transition(Event.FIN_SENT)
        protocol = self.protocol
        if new is State.CLOSED:
            self._finish(None)
        elif self._fullClose:
            # TCP semantics: the protocol is done once our FIN has gone.
            self.protocol = None
            if protocol is not None:
                self._notify(protocol, "connectionLost", Failure(ConnectionDone("stream closed")))
            if self._recvBuf and self.state is not State.CLOSED:
                # Nobody will read what was held for a paused reader now; a
                # FIN waiting behind it (or still to come) ends the stream.
                self.session._buffered(self, -self.recvBuffered)
                self._recvBuf.clear()
                self.recvBuffered = 0
                if self._finAfterBuffer:
                    self._finAfterBuffer = False
                    self._remoteFin()
        elif self._halfCloseable and protocol is not None:
            self._notify(protocol, "writeConnectionLost")

    # -- receive side, driven by the session -----------------------------------

    def _dataReceived(self, payload: bytes, fin: bool) -> None:
        n = len(payload)
        if n > self.recvRemaining:
            raise FlowControlError(
                f"stream {self.id}: {n} bytes with only {self.recvRemaining} of window left"
            )
        if self.state is State.REMOTE_CLOSED or self._finAfterBuffer:
            raise ProtocolError(f"stream {self.id}: DATA after FIN")
        self.recvRemaining -= n
        if self.protocol is None:
            # Fully closed here: like TCP, data to a closed socket resets it.
            if n:
                self.reset(ErrorCode.CANCEL, "data after close")
                return
        elif n:
            if self._readPaused or self._recvBuf:
                if self._recvBuf is None:
                    self._recvBuf = deque()
                self._recvBuf.append(payload)
                self.recvBuffered += n
                self.session._buffered(self, n)
            else:
                self._deliver(payload)
        if fin and self.state is not State.CLOSED:
            if self._recvBuf:
                self._finAfterBuffer = True
            else:
                self._remoteFin()

    def _deliverBuffered(self) -> None:
        buf = self._recvBuf
        while buf and not self._readPaused and self.protocol is not None:
            chunk = buf.popleft()
            n = len(chunk)
            self.recvBuffered -= n
            self.session._buffered(self, -n)
            self._deliver(chunk)
        if not buf and self._finAfterBuffer and self.state is not State.CLOSED:
            self._finAfterBuffer = False
            self._remoteFin()

    def _notify(self, protocol: IProtocol, method: str, *args: Any) -> None:
        """
        Call the protocol; an exception costs this stream only (it is reset),
        never the tunnel the stream shares with others.
        """
        try:
            getattr(protocol, method)(*args)
        except Exception:
            self.session.log.failure(
                "protocol on stream {id} failed in {method}", id=self.id, method=method
            )
            if method != "connectionLost":
                self.reset(ErrorCode.INTERNAL_ERROR, "protocol error")

    def _deliver(self, data: bytes) -> None:
        """Hand data to the protocol; its failure costs this stream only."""
        try:
            self.protocol.dataReceived(data)  # type: ignore[union-attr]
        except Exception:
            self.session.log.failure("protocol on stream {id} failed", id=self.id)
            self.reset(ErrorCode.INTERNAL_ERROR, "protocol error")
            return
        self._consumed(len(data))

    def _consumed(self, n: int) -> None:
        if self.state is State.CLOSED:
            return
        self._recvUnacked += n
        if self._recvUnacked >= self.recvWindow >> 2:
            self.session._credit(self)

    def _takeCredit(self, now: float, rtt: float) -> int:
        """
        The increment for a WINDOW frame, growing the window when the last
        credit went out less than two round trips ago: the reader keeps up
        and the window, not the reader, is what limits this stream.
        """
        increment = self._recvUnacked
        session = self.session
        maxWindow = session.settings.maxWindow
        if now - self._lastCredit < 2 * rtt and self.recvWindow < maxWindow:
            grow = min(self.recvWindow, maxWindow - self.recvWindow, session.growthAvailable)
            if grow > 0:
                session.growthAvailable -= grow
                self.grown += grow
                self.recvWindow += grow
                increment += grow
        self._lastCredit = now
        self._recvUnacked = 0
        self.recvRemaining += increment
        return increment

    def _remoteFin(self) -> None:
        new = self._transition(Event.FIN_RECEIVED)
        protocol = self.protocol
        if new is State.CLOSED:
            self._finish(None)
        elif protocol is None:
            pass
        elif self._halfCloseable:
            self._notify(protocol, "readConnectionLost")
        else:
            # A protocol that cannot half-close is closed, as TCP does.
            self.loseConnection()

    # -- the end ------------------------------------------------------------

    def reset(self, code: int, reason: str = "") -> None:
        """Reset the stream: tell the peer, drop buffers, tell the protocol."""
        if self.state is State.CLOSED:
            return
        self.session._sendReset(self.id, code, reason)
        self._terminate(StreamReset(code, reason))

    def _terminate(self, error: Exception | None) -> None:
        """The stream is over (reset, or its tunnel is gone)."""
        if self.state is State.CLOSED:
            return
        self._transition(Event.RESET)
        self._finish(error)

    def _finish(self, error: Exception | None) -> None:
        if self._sendBuf:
            self._sendBuf.clear()
        self.sendBuffered = 0
        if self._recvBuf:
            self.session._buffered(self, -self.recvBuffered)
            self._recvBuf.clear()
        self.recvBuffered = 0
        self._finPending = False
        self._producer = None
        protocol, self.protocol = self.protocol, None
        self.session._streamEnded(self)
        if protocol is not None:
            self._notify(protocol, "connectionLost", Failure(error or ConnectionDone("stream closed")))
