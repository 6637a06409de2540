"""
The thin Protocol layer of a tunnel: preface, handshake, then bytes to the
:class:`~dit4c.tunnel.session.Session`.

The handshake is a small machine per side (docs/protocols.md 1.3):

- server: ``PREFACE`` → ``HELLO`` → ``VERIFYING`` → ``ESTABLISHED`` → ``CLOSED``
- client: ``HELLO_SENT`` → ``ESTABLISHED`` → ``CLOSED``

Everything a peer can get wrong costs that peer its own tunnel only, with the
reason logged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from inspect import isawaitable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.service import IConnectionTransport, noDelay
from dit4c.tunnel.errors import ErrorCode, HandshakeRefused, ProtocolError, TunnelError, codeName
from dit4c.tunnel.frames import (
    PREFACE,
    Frame,
    FrameDecoder,
    FrameType,
    decodeCode,
    decodeJSON,
    encode,
    encodeCode,
    encodeJSON,
)
from dit4c.tunnel.session import Session, Settings, StreamHandler

VERSION = 1
#: Bound on the handshake frames, before the peer's own limits are known.
_HANDSHAKE_MAX_FRAME = 16 * 1024


class Phase(enum.Enum):
    PREFACE = "preface"
    HELLO = "hello"
    VERIFYING = "verifying"
    HELLO_SENT = "hello-sent"
    ESTABLISHED = "established"
    CLOSED = "closed"


def _positiveInt(body: dict[str, Any], key: str, low: int, high: int) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"handshake field {key!r} must be an integer in [{low}, {high}]")
    return value


def _positiveFloat(body: dict[str, Any], key: str, low: float, high: float) -> float:
    value = body.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"handshake field {key!r} must be a number in [{low}, {high}]")
    return float(value)


class TunnelProtocol(Protocol):
    """Common to both ends: decoding, dispatch, and the end of the link."""

    log = Logger()
    isServer = False
    transport: IConnectionTransport

    def __init__(self, settings: Settings, clock: IReactorTime) -> None:
        self.settings = settings
        self.clock = clock
        self.phase = Phase.HELLO
        self.session: Session | None = None
        self._decoder = FrameDecoder(_HANDSHAKE_MAX_FRAME)
        self._closeCode = int(ErrorCode.NO_ERROR)
        self._closeReason = ""
        #: Fires with this protocol when the tunnel closes.
        self.closed: Deferred[TunnelProtocol] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        session = self.session
        if session is not None:
            session.lastReceived = self.clock.seconds()
        try:
            frames = self._decoder.feed(data)
            for frame in frames:
                if self.session is not None:
                    self.session.frameReceived(frame)
                else:
                    self._handshakeFrame(frame)
                if self.phase is Phase.CLOSED:
                    return
        except TunnelError as e:
            self.protocolFailed(e)

    def _handshakeFrame(self, frame: Frame) -> None:
        raise NotImplementedError

    def protocolFailed(self, error: TunnelError) -> None:
        """The peer broke the protocol: log why, tell it, drop its tunnel."""
        self.log.warn(
            "tunnel from {peer} closed: {code}: {reason}",
            peer=self.transport.getPeer() if self.transport else None,
            code=codeName(error.code),
            reason=error.reason,
        )
        self._fail(error.code, error.reason)

    def _fail(self, code: int, reason: str) -> None:
        self._closeCode, self._closeReason = int(code), reason
        if self.session is not None:
            self.session.close(code, reason)
        else:
            self.transport.write(encodeCode(FrameType.GOAWAY, 0, code, reason))
            self.transport.loseConnection()
        self.phase = Phase.CLOSED

    def _establish(self, peerWindow: int, peerMaxFrame: int, heartbeat: float, timeout: float,
                   handler: StreamHandler | None, onGoAway: Callable[[int, str], None] | None) -> Session:
        self.session = Session(
            self.transport,
            isServer=self.isServer,
            settings=self.settings,
            peerWindow=peerWindow,
            peerMaxFrame=peerMaxFrame,
            clock=self.clock,
            handler=handler,
            heartbeat=heartbeat,
            timeout=timeout,
            onGoAway=onGoAway,
        )
        self._decoder.maxFrame = self.settings.maxFrame
        self.phase = Phase.ESTABLISHED
        self.transport.registerProducer(self.session, True)
        self.session.start()
        return self.session

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.phase = Phase.CLOSED
        if self.session is not None:
            code, why = self._closeCode, self._closeReason
            if not why:
                why = reason.getErrorMessage()
                code = ErrorCode.CANCEL
            self.session.connectionLost(code, why)
        self.closed.callback(self)


class TunnelServerProtocol(TunnelProtocol):
    """
    The routing server's end. ``factory.authenticate(hello)`` decides whether
    the tunnel may exist (a Deferred of a dict with ``instance``, ``host``,
    ``url``), and ``factory.established(protocol)`` hears of it once it does.
    """

    isServer = True
    factory: Any

    def __init__(self, settings: Settings, clock: IReactorTime) -> None:
        super().__init__(settings, clock)
        self.phase = Phase.PREFACE
        self._preface = b""
        self._handshakeTimer: IDelayedCall | None = None
        self.registration: dict[str, Any] = {}

    def connectionMade(self) -> None:
        noDelay(self.transport)
        self._handshakeTimer = self.clock.callLater(self.settings.handshakeTimeout, self._handshakeTimedOut)

    def _handshakeTimedOut(self) -> None:
        self._handshakeTimer = None
        if self.phase in (Phase.PREFACE, Phase.HELLO, Phase.VERIFYING):
            self.log.warn("tunnel from {peer}: no handshake in time", peer=self.transport.getPeer())
            self.phase = Phase.CLOSED
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.phase is Phase.PREFACE:
            need = len(PREFACE) - len(self._preface)
            self._preface += data[:need]
            data = data[need:]
            if len(self._preface) < len(PREFACE):
                if PREFACE.startswith(self._preface):
                    return
            if self._preface != PREFACE:
                self.log.warn(
                    "connection from {peer} is not a tunnel (bad preface); dropped",
                    peer=self.transport.getPeer(),
                )
                self.phase = Phase.CLOSED
                self.transport.abortConnection()
                return
            self.phase = Phase.HELLO
            if not data:
                return
        if self.phase is Phase.VERIFYING:
            # The client must wait for WELCOME; anything else is a violation.
            self.protocolFailed(ProtocolError("data before WELCOME"))
            return
        super().dataReceived(data)

    def _handshakeFrame(self, frame: Frame) -> None:
        if self.phase is not Phase.HELLO or frame.type != FrameType.HELLO:
            raise ProtocolError(f"expected HELLO, got {FrameType(frame.type).name}")
        hello = decodeJSON(frame)
        if hello.get("version") != VERSION:
            raise ProtocolError(f"unsupported tunnel version {hello.get('version')!r}")
        if not isinstance(hello.get("token"), str):
            raise ProtocolError("HELLO has no token")
        peerWindow = _positiveInt(hello, "window", 1024, 2**31 - 1)
        peerMaxFrame = _positiveInt(hello, "max_frame", 1024, 16 * 1024 * 1024)
        self.phase = Phase.VERIFYING
        d = Deferred.fromCoroutine(self._verify(hello["token"], peerWindow, peerMaxFrame))
        d.addErrback(lambda f: self.log.failure("tunnel handshake failed", f))

    async def _verify(self, token: str, peerWindow: int, peerMaxFrame: int) -> None:
        try:
            registration = self.factory.authenticate(token, self)
            if isawaitable(registration):
                registration = await registration
        except HandshakeRefused as e:
            if self.phase is not Phase.CLOSED:
                self.log.warn(
                    "tunnel from {peer} refused: {reason}", peer=self.transport.getPeer(), reason=e.reason
                )
                self._fail(ErrorCode.AUTH_FAILED, e.reason)
            return
        if self.phase is not Phase.VERIFYING:
            return
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        self._handshakeTimer = None
        self.registration = registration
        settings = self.settings
        self.transport.write(
            encodeJSON(
                FrameType.WELCOME,
                0,
                dict(
                    registration,
                    window=settings.window,
                    max_frame=settings.maxFrame,
                    max_streams=settings.maxStreams,
                    heartbeat=settings.heartbeat,
                    timeout=settings.timeout,
                ),
            )
        )
        self._establish(peerWindow, peerMaxFrame, settings.heartbeat, settings.timeout, None, None)
        self.factory.established(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._handshakeTimer is not None and self._handshakeTimer.active():
            self._handshakeTimer.cancel()
        super().connectionLost(reason)


class TunnelClientProtocol(TunnelProtocol):
    """
    The listener's end. ``token`` is asked for at every connection (a token
    file may be renewed while we run); ``handler`` gives a protocol for each
    stream the server opens. ``ready`` fires with the WELCOME once established
    (``ClientService``'s ``prepareConnection`` waits on it).
    """

    isServer = False

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        token: Callable[[], str],
        handler: StreamHandler,
        onGoAway: Callable[[int, str], None] | None = None,
    ) -> None:
        super().__init__(settings, clock)
        self._token = token
        self._handler = handler
        self._onGoAway = onGoAway
        self.welcome: dict[str, Any] = {}
        self.ready: Deferred[dict[str, Any]] = Deferred()

    def connectionMade(self) -> None:
        noDelay(self.transport)
        settings = self.settings
        hello = {
            "version": VERSION,
            "token": self._token(),
            "window": settings.window,
            "max_frame": settings.maxFrame,
        }
        self.transport.write(PREFACE + encodeJSON(FrameType.HELLO, 0, hello))
        self.phase = Phase.HELLO_SENT
        # Frames up to the max_frame we announce may follow WELCOME in the
        # same read, before _establish could raise the decoder's limit.
        self._decoder.maxFrame = settings.maxFrame

    def _handshakeFrame(self, frame: Frame) -> None:
        if frame.type == FrameType.GOAWAY:
            code, reason = decodeCode(frame)
            self.phase = Phase.CLOSED
            self._closeCode, self._closeReason = code, reason
            self.transport.loseConnection()
            self._fireReady(Failure(HandshakeRefused(reason, code)))
            return
        if frame.type != FrameType.WELCOME:
            raise ProtocolError(f"expected WELCOME, got {FrameType(frame.type).name}")
        welcome = decodeJSON(frame)
        peerWindow = _positiveInt(welcome, "window", 1024, 2**31 - 1)
        peerMaxFrame = _positiveInt(welcome, "max_frame", 1024, 16 * 1024 * 1024)
        heartbeat = _positiveFloat(welcome, "heartbeat", 0.01, 3600)
        timeout = _positiveFloat(welcome, "timeout", heartbeat, 7200)
        self.welcome = welcome
        self._establish(peerWindow, peerMaxFrame, heartbeat, timeout, self._handler, self._onGoAway)
        self._fireReady(welcome)

    def _fireReady(self, result: Any) -> None:
        if not self.ready.called:
            self.ready.callback(result) if not isinstance(result, Failure) else self.ready.errback(result)

    def protocolFailed(self, error: TunnelError) -> None:
        super().protocolFailed(error)
        self._fireReady(Failure(error))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fireReady(Failure(HandshakeRefused(f"connection lost before WELCOME: {reason.getErrorMessage()}", ErrorCode.CANCEL)))
        super().connectionLost(reason)


class TunnelServerFactory(Factory):
    """
    Accepts tunnels. Subclass or configure with ``authenticate`` (token →
    Deferred of registration dict, or HandshakeRefused) and ``established``.
    """

    noisy = False

    protocol = TunnelServerProtocol

    def __init__(
        self,
        settings: Settings,
        clock: IReactorTime,
        authenticate: Callable[[str, TunnelServerProtocol], Any],
        established: Callable[[TunnelServerProtocol], None],
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.authenticate = authenticate
        self.established = established

    def buildProtocol(self, addr: Any) -> TunnelServerProtocol:
        p = TunnelServerProtocol(self.settings, self.clock)
        p.factory = self
        return p


__all__ = [
    "Phase",
    "TunnelClientProtocol",
    "TunnelProtocol",
    "TunnelServerFactory",
    "TunnelServerProtocol",
    "VERSION",
    "encode",
]
