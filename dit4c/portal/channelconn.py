"""
One scheduler's channel as the portal holds it (:class:`ChannelProtocol`):
the WebSocket, its handshake's phase, and its messages handled one at a
time in order, with reading paused while many wait. Thin: the hub
(:class:`dit4c.portal.channel.ChannelHub`) decides what each message does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from dit4c.channel.errors import ProtocolError
from dit4c.channel.handshake import PORTAL_LINK, Dialled, Hello, Phase
from dit4c.channel.questions import Questions
from dit4c.channel.wire import PATH, SUBPROTOCOL, CloseCode, decode, encode
from dit4c.common.service import IConnectionTransport
from dit4c.portal.store.errors import StoreError

__all__ = ["ChannelFactory", "ChannelHolder", "ChannelProtocol"]


class ChannelHolder(Protocol):
    """What a channel needs of the hub that holds it (``dit4c.portal.channel.ChannelHub``)."""

    reactor: IReactorTime
    issuer: str
    handshakeTimeout: float

    def _opened(self, protocol: ChannelProtocol) -> None: ...

    def _authenticate(self, protocol: ChannelProtocol, hello: Hello) -> None: ...

    def _received(self, protocol: ChannelProtocol, kind: str, message: dict[str, Any]) -> None: ...

    def _closed(self, protocol: ChannelProtocol) -> None: ...

#: Messages a channel holds unhandled before it stops reading from the socket.
_INBOX_HIGH = 64
_INBOX_LOW = 16


class ChannelProtocol(WebSocketServerProtocol):
    """One scheduler's channel. Thin: the hub decides what each message does."""

    # Not "log": that name is autobahn's (txaio) logger.
    _log = Logger()
    schedulerId: str | None = None
    handshake: Dialled | None = None
    _timer: IDelayedCall | None = None

    @property
    def phase(self) -> Phase:
        return self.handshake.phase if self.handshake is not None else Phase.CHALLENGE

    @property
    def hub(self) -> ChannelHolder:
        hub: ChannelHolder = self.factory.hub
        return hub

    def onConnect(self, request: ConnectionRequest) -> str:
        if request.path != PATH:
            raise ConnectionDeny(404, "not the scheduler channel")
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"subprotocol {SUBPROTOCOL} required")
        return SUBPROTOCOL

    def onOpen(self) -> None:
        hub = self.hub
        self.closed: Deferred[None] = Deferred()
        self.inbox: deque[Callable[[], Awaitable[None]]] = deque()
        self.busy = False
        self.paused = False
        #: Ids of the pending commands sent down this channel.
        self.sent: set[str] = set()
        self.pumping = False
        self.pumpAgain = False
        self.truncated = False
        #: Questions about tools' output asked down this channel.
        self.questions = Questions(hub.reactor)
        self.handshake = Dialled(PORTAL_LINK, hub.issuer)
        hub._opened(self)
        self.sendJSON(self.handshake.challenge())
        self._timer = hub.reactor.callLater(hub.handshakeTimeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self.fail(CloseCode.HANDSHAKE_TIMEOUT, f"no valid hello within {self.hub.handshakeTimeout} s")

    def describe(self) -> str:
        """Who is at the other end, for the log."""
        who = f"scheduler {self.schedulerId}" if self.schedulerId else "unauthenticated peer"
        return f"{who} at {self.peer}"

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.handshake is None or self.phase is Phase.CLOSED:
            return
        try:
            message = decode(payload, isBinary)
            hello = self.handshake.receive(message)
            if hello is not None:
                self.hub._authenticate(self, hello)
            else:
                self.hub._received(self, message["type"], message)
        except ProtocolError as e:
            self.fail(CloseCode.PROTOCOL_ERROR, e.reason)

    def sendJSON(self, message: Mapping[str, Any]) -> bool:
        if self.phase is not Phase.CLOSED and self.state == self.STATE_OPEN:
            self.sendMessage(encode(message), isBinary=False)
            return True
        return False

    def enqueue(self, work: Callable[[], Awaitable[None]]) -> None:
        """Handle a message after those before it (stop reading while many wait)."""
        self.inbox.append(work)
        if len(self.inbox) >= _INBOX_HIGH and not self.paused:
            self.paused = True
            self._tcp().pauseProducing()
        if not self.busy:
            Deferred.fromCoroutine(self._drain())

    def _tcp(self) -> IConnectionTransport:
        return cast(IConnectionTransport, self.transport)

    async def _drain(self) -> None:
        self.busy = True
        try:
            while self.inbox and self.phase is Phase.OPEN:
                work = self.inbox.popleft()
                if self.paused and len(self.inbox) <= _INBOX_LOW:
                    self.paused = False
                    self._tcp().resumeProducing()
                await work()
        except StoreError as e:
            self._log.warn(
                "the store failed while handling {who}: {error}", who=self.describe(), error=e.message
            )
            self.fail(CloseCode.INTERNAL_ERROR, "the portal's database failed; reconnect later")
        except Exception:
            self._log.failure("bug while handling a message from {who}", who=self.describe())
            self.fail(CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            self.busy = False

    def fail(self, code: CloseCode, reason: str, *, quiet: bool = False) -> None:
        """Close the channel for ``reason`` (logged)."""
        if self.phase is Phase.CLOSED:
            return
        if quiet:
            self._log.info("closing the channel of {who}: {reason}", who=self.describe(), reason=reason)
        else:
            self._log.warn("closing the channel of {who}: {reason}", who=self.describe(), reason=reason)
        self._shut()
        self.sendClose(int(code), reason)

    def _shut(self) -> None:
        if self.handshake is not None:
            self.handshake.close()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.inbox.clear()
        self.questions.failAll("The instance's cluster went away; try again in a moment.")
        self.hub._closed(self)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not hasattr(self, "closed"):
            return  # the WebSocket never opened
        if self.phase is not Phase.CLOSED:
            if getattr(self, "closedByMe", False) and self.localCloseCode is not None:
                # autobahn failed it (a message too big, say): say why, not what came back.
                code, reason, by = self.localCloseCode, self.localCloseReason, "the portal"
            else:
                by = "the scheduler" if code is not None and code != 1006 else "the network"
            self._log.info(
                "channel of {who} closed by {by} ({code} {reason})",
                who=self.describe(),
                by=by,
                code=code,
                reason=reason or "",
            )
            self._shut()
        self.closed.callback(None)


class ChannelFactory(WebSocketServerFactory):
    hub: ChannelHolder
