"""
The multiplexer: many :class:`~dit4c.tunnel.stream.Stream` s over one link.

A :class:`Session` starts once the handshake is done (see
:mod:`dit4c.tunnel.protocol`). It turns frames into stream events and stream
writes into frames, shares the link fairly between streams (round robin, one
frame per turn while the link is congested), returns window credit as readers
consume, and watches the peer with heartbeats. It writes to an ``ITransport``
and reads time from an injected clock, so a ``StringTransport`` and a
``Clock`` drive it completely in tests.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.tunnel.errors import (
    ErrorCode,
    FlowControlError,
    ProtocolError,
    StreamLimit,
    StreamReset,
    TunnelClosed,
    codeName,
)
from dit4c.tunnel.frames import (
    FLAG_ACK,
    FLAG_FIN,
    Frame,
    FrameType,
    decodeCode,
    decodeJSON,
    decodeWindow,
    encode,
    encodeCode,
    encodeHeader,
    encodeJSON,
    encodeWindow,
)
from dit4c.tunnel.stream import Stream

KiB = 1024
MiB = 1024 * KiB

_PING = struct.Struct("!d")
_MAX_WINDOW_VALUE = 2**31 - 1


@dataclass(frozen=True)
class Settings:
    """
    Limits and tuning of one side of a tunnel. The defaults suit a routing
    server with thousands of streams per tunnel; every figure is a bound on
    what a peer can make us hold.
    """

    #: Initial receive window granted on every stream.
    window: int = 256 * KiB
    #: A stream's receive window never grows beyond this.
    maxWindow: int = 16 * MiB
    #: Largest frame payload we accept (and the peer announces its own).
    maxFrame: int = 64 * KiB
    #: Most streams open at once on one tunnel.
    maxStreams: int = 16384
    #: Window growth beyond ``window``, summed over a tunnel's streams.
    growthBudget: int = 64 * MiB
    #: Data held for paused readers, summed over a tunnel's streams.
    bufferLimit: int = 64 * MiB
    #: Seconds between PINGs.
    heartbeat: float = 10.0
    #: Seconds of silence after which the peer is taken for dead.
    timeout: float = 30.0
    #: A stream pauses its producer when this much waits to be sent.
    sendHighWater: int = 256 * KiB
    #: Seconds a new connection has to complete the handshake.
    handshakeTimeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.window <= self.maxWindow <= _MAX_WINDOW_VALUE:
            raise ValueError("need 0 < window <= maxWindow < 2**31")
        if not 1024 <= self.maxFrame <= 16 * MiB:
            raise ValueError("maxFrame must be between 1 KiB and 16 MiB")
        if self.timeout <= self.heartbeat:
            raise ValueError("timeout must be longer than the heartbeat interval")


#: Called for every stream the peer opens; returns the protocol to run on it,
#: or None to refuse the stream.
StreamHandler = Callable[[Stream], IProtocol | None]


@implementer(IPushProducer)
class Session:
    """
    The established tunnel. It is the link transport's producer: when the
    link's buffer is full it stops sending stream data (control frames still
    go) and each stream's own high-water mark then pauses that stream's
    producer, so nothing buffers without bound. Its streams see it as a
    :class:`~dit4c.tunnel.stream.StreamHost`.
    """

    log = Logger()

    def __init__(
        self,
        transport: Any,
        *,
        isServer: bool,
        settings: Settings,
        peerWindow: int,
        peerMaxFrame: int,
        clock: IReactorTime,
        handler: StreamHandler | None = None,
        heartbeat: float | None = None,
        timeout: float | None = None,
        onGoAway: Callable[[int, str], None] | None = None,
    ) -> None:
        self._transport = transport
        self.isServer = isServer
        self.settings = settings
        self.peerWindow = peerWindow
        self.peerMaxFrame = peerMaxFrame
        self.clock = clock
        self.handler = handler
        self.heartbeat = heartbeat if heartbeat is not None else settings.heartbeat
        self.timeout = timeout if timeout is not None else settings.timeout
        self.onGoAway = onGoAway
        self.peerAddress: IAddress | None = transport.getPeer()
        self.hostAddress: IAddress | None = transport.getHost()
        self._streams: dict[int, Stream] = {}
        self._nextId = 2 if isServer else 1
        self._highestPeerId = 0
        self._ready: deque[Stream] = deque()
        self._linkPaused = False
        self._sending = False
        self.growthAvailable = settings.growthBudget
        self.recvBuffered = 0
        self.goingAway = False
        self.peerGoingAway = False
        self.closed = False
        #: Smoothed round-trip time in seconds; a guess until the first PONG.
        self.rtt = 0.05
        self.lastReceived = clock.seconds()
        self.bytesIn = 0
        self.bytesOut = 0
        self.streamsOpened = 0
        #: Why the tunnel is ending, once a GOAWAY has gone either way: the
        #: code streams still open when the link drops are reset with.
        self.endCode: int | None = None
        self.endReason = ""
        self._pinger: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None
        self._abortTimer: IDelayedCall | None = None

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """Begin heartbeats; the first PING goes at once to measure the RTT."""
        self._ping()
        self._deadline = self.clock.callLater(self.timeout, self._checkAlive)

    def _ping(self) -> None:
        self._pinger = self.clock.callLater(self.heartbeat, self._ping)
        self._transport.write(encode(FrameType.PING, 0, _PING.pack(self.clock.seconds())))

    def _checkAlive(self) -> None:
        silent = self.clock.seconds() - self.lastReceived
        if silent >= self.timeout:
            self._deadline = None
            self.log.warn(
                "tunnel peer {peer} silent for {silent:.1f}s; closing", peer=self.peerAddress, silent=silent
            )
            self.close(ErrorCode.HEARTBEAT_TIMEOUT, f"no frame for {silent:.1f}s", abort=True)
        else:
            self._deadline = self.clock.callLater(self.timeout - silent, self._checkAlive)

    @property
    def streamCount(self) -> int:
        return len(self._streams)

    def streams(self) -> list[Stream]:
        return list(self._streams.values())

    def goAway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """
        Open no new streams and tell the peer so; running streams finish, then
        the link closes.
        """
        if self.closed or self.goingAway:
            return
        self.goingAway = True
        self._ending(code, reason)
        self._transport.write(encodeCode(FrameType.GOAWAY, 0, code, reason))
        if not self._streams:
            self.loseLink()

    def loseLink(self) -> None:
        """
        Close the link once what is written has gone. We are its producer and
        must say so first: a TLS transport waits for its producer to go before
        it closes, and a paused producer left registered on TCP would be
        resumed instead of the close.
        """
        self._transport.unregisterProducer()
        self._transport.loseConnection()

    def close(self, code: int, reason: str, abort: bool = False) -> None:
        """
        End the tunnel now: tell the peer why and drop the link. A peer that
        does not read what is left is cut off after a short grace.
        """
        if self.closed:
            return
        self.closed = True
        self.goingAway = True
        self._ending(code, reason, force=True)
        self._transport.write(encodeCode(FrameType.GOAWAY, 0, code, reason))
        if abort:
            self._transport.abortConnection()
        else:
            self.loseLink()
            self._abortTimer = self.clock.callLater(5.0, self._transport.abortConnection)

    def _ending(self, code: int, reason: str, force: bool = False) -> None:
        if self.endCode is None or force:
            self.endCode, self.endReason = int(code), reason

    def connectionLost(self, code: int, reason: str) -> None:
        """
        The link is gone: every stream still open ends with a reset, carrying
        the GOAWAY's code if one was sent or received, else ``code``.
        """
        if self.endCode is not None:
            code, reason = self.endCode, self.endReason
        self.closed = True
        for timer in (self._pinger, self._deadline, self._abortTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._pinger = self._deadline = self._abortTimer = None
        self._ready.clear()
        for stream in list(self._streams.values()):
            stream._terminate(StreamReset(code, reason or "tunnel closed"))
        self._streams.clear()

    # -- opening streams ------------------------------------------------------

    def openStream(self, protocol: IProtocol, metadata: dict[str, Any] | None = None) -> Stream:
        """
        Open a stream to the peer and connect ``protocol`` to it. Raises
        :class:`TunnelClosed` or :class:`StreamLimit` when the tunnel cannot
        take one more.
        """
        if self.closed or self.goingAway or self.peerGoingAway:
            raise TunnelClosed()
        if len(self._streams) >= self.settings.maxStreams:
            raise StreamLimit()
        streamId = self._nextId
        self._nextId += 2
        metadata = metadata or {}
        stream = Stream(self, streamId, metadata)
        self._streams[streamId] = stream
        self.streamsOpened += 1
        self._transport.write(encodeJSON(FrameType.OPEN, streamId, metadata))
        stream.attach(protocol)
        return stream

    # -- frames in --------------------------------------------------------------

    def frameReceived(self, frame: Frame) -> None:
        """Handle one frame; raises :class:`ProtocolError` if it breaks the rules."""
        ftype = frame.type
        if ftype == FrameType.DATA:
            stream = self._stream(frame.stream)
            n = len(frame.payload)
            self.bytesIn += n
            if stream is not None:
                stream._dataReceived(frame.payload, bool(frame.flags & FLAG_FIN))
        elif ftype == FrameType.WINDOW:
            increment = decodeWindow(frame)
            stream = self._stream(frame.stream)
            if stream is not None:
                stream.sendWindow += increment
                if stream.sendWindow > _MAX_WINDOW_VALUE:
                    raise FlowControlError(f"stream {stream.id}: window beyond 2**31")
                if stream._sendable():
                    self._wantSend(stream)
        elif ftype == FrameType.OPEN:
            self._peerOpened(frame)
        elif ftype == FrameType.RESET:
            code, reason = decodeCode(frame)
            stream = self._stream(frame.stream)
            if stream is not None:
                        stream._terminate(StreamReset(code, reason))
        elif ftype == FrameType.PING:
            if frame.flags & FLAG_ACK:
                if len(frame.payload) == _PING.size:
                    (sent,) = _PING.unpack(frame.payload)
                    sample = self.clock.seconds() - sent
                    if 0 <= sample < 60:
                        self.rtt = sample if self.rtt == 0.05 else 0.875 * self.rtt + 0.125 * sample
            else:
                if len(frame.payload) != 8:
                    raise ProtocolError("PING payload must be 8 bytes")
                self._transport.write(encode(FrameType.PING, 0, frame.payload, FLAG_ACK))
        elif ftype == FrameType.GOAWAY:
            code, reason = decodeCode(frame)
            self.log.info(
                "tunnel peer {peer} going away: {code} {reason}",
                peer=self.peerAddress,
                code=codeName(code),
                reason=reason,
            )
            self.peerGoingAway = True
            self._ending(code, reason)
            if self.onGoAway is not None:
                self.onGoAway(code, reason)
            if not self._streams:
                self.loseLink()
        else:
            raise ProtocolError(f"{FrameType(ftype).name} frame after the handshake")

    def _stream(self, streamId: int) -> Stream | None:
        """
        The live stream with this id, or None if it has ended (frames may
        cross a RESET); an id that was never opened is a protocol error.
        """
        stream = self._streams.get(streamId)
        if stream is not None:
            return stream
        ours = (streamId % 2 == 0) == self.isServer
        if (ours and streamId < self._nextId) or (not ours and streamId <= self._highestPeerId):
            return None
        raise ProtocolError(f"frame for stream {streamId}, which was never opened")

    def _peerOpened(self, frame: Frame) -> None:
        streamId = frame.stream
        if (streamId % 2 == 0) == self.isServer:
            raise ProtocolError(f"peer opened stream {streamId} with our parity")
        metadata = decodeJSON(frame)
        if streamId <= self._highestPeerId:
            self._sendReset(streamId, ErrorCode.REFUSED_STREAM, "stream id not increasing")
            return
        self._highestPeerId = streamId
        if self.goingAway or self.closed or self.handler is None:
            self._sendReset(streamId, ErrorCode.REFUSED_STREAM, "not accepting streams")
            return
        if len(self._streams) >= self.settings.maxStreams:
            self._sendReset(streamId, ErrorCode.REFUSED_STREAM, "too many streams")
            return
        stream = Stream(self, streamId, metadata)
        self._streams[streamId] = stream
        self.streamsOpened += 1
        try:
            protocol = self.handler(stream)
        except Exception:
            self.log.failure("stream handler failed for stream {id}", id=streamId)
            protocol = None
        if protocol is None:
            stream.reset(ErrorCode.REFUSED_STREAM, "refused")
            return
        stream.attach(protocol)

    # -- frames out -------------------------------------------------------------

    def _wantSend(self, stream: Stream) -> None:
        """``stream`` has something to send: send it now, or queue it fairly."""
        if self._linkPaused or self._sending or self._ready:
            if not stream.scheduled:
                stream.scheduled = True
                self._ready.append(stream)
            if not self._linkPaused and not self._sending:
                self._drain()
            return
        self._sending = True
        try:
            self._sendFrom(stream, 1 << 30)
        finally:
            self._sending = False
        if self._ready and not self._linkPaused:
            self._drain()

    def _sendFrom(self, stream: Stream, maxFrames: int) -> None:
        write = self._transport.writeSequence
        sent = 0
        while sent < maxFrames and not self._linkPaused and stream._sendable():
            if stream.sendBuffered:
                chunk, fin = stream._takeChunk(min(stream.sendWindow, self.peerMaxFrame))
                n = len(chunk)
                self.bytesOut += n
                write((encodeHeader(FrameType.DATA, stream.id, n, FLAG_FIN if fin else 0), chunk))
            else:
                fin = True
                write((encodeHeader(FrameType.DATA, stream.id, 0, FLAG_FIN),))
            sent += 1
            stream._afterSend(fin)
            if fin:
                break
        if stream._sendable() and not stream.scheduled:
            stream.scheduled = True
            self._ready.append(stream)

    def _drain(self) -> None:
        """Round robin over streams waiting to send, one frame each per turn."""
        ready = self._ready
        self._sending = True
        try:
            while ready and not self._linkPaused:
                stream = ready.popleft()
                stream.scheduled = False
                self._sendFrom(stream, 1)
        finally:
            self._sending = False

    def _sendReset(self, streamId: int, code: int, reason: str) -> None:
        if not self.closed:
            self._transport.write(encodeCode(FrameType.RESET, streamId, code, reason))

    def _credit(self, stream: Stream) -> None:
        increment = stream._takeCredit(self.clock.seconds(), self.rtt)
        if increment and not self.closed:
            self._transport.write(encodeWindow(stream.id, increment))

    def _buffered(self, stream: Stream, delta: int) -> None:
        """
        Account for data held for paused readers; past the tunnel's cap the
        stream holding the most is reset so that the others go on.
        """
        self.recvBuffered += delta
        if delta > 0 and self.recvBuffered > self.settings.bufferLimit:
            largest = max(self._streams.values(), key=lambda s: s.recvBuffered)
            self.log.warn(
                "tunnel buffers over {limit} bytes; resetting stream {id} holding {held}",
                limit=self.settings.bufferLimit,
                id=largest.id,
                held=largest.recvBuffered,
            )
            largest.reset(ErrorCode.BUFFER_LIMIT, "tunnel buffer limit")

    def _streamEnded(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        self.growthAvailable += stream.grown
        stream.grown = 0
        if stream.scheduled:
            try:
                self._ready.remove(stream)
            except ValueError:
                pass
            stream.scheduled = False
        if (self.goingAway or self.peerGoingAway) and not self._streams and not self.closed:
            self.loseLink()

    # -- IPushProducer: the link's buffer ----------------------------------------

    def pauseProducing(self) -> None:
        self._linkPaused = True

    def resumeProducing(self) -> None:
        self._linkPaused = False
        if self._ready and not self._sending:
            self._drain()

    def stopProducing(self) -> None:
        self._linkPaused = True
