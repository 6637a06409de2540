"""
The scheduler channel, portal side: schedulers dial in over a WebSocket,
prove who they are, take commands and report instance states
(docs/protocols.md, "The scheduler channel"; the wire format itself is in
:mod:`dit4c.channel.wire`, shared with the scheduler's end, and the
handshake is :mod:`dit4c.channel.handshake`).

:class:`ChannelHub` is what the rest of the portal uses:

- ``send(scheduler_id, op, instance_id, params)`` keeps a command in the
  store and pushes it down the scheduler's channel if it is connected; a
  command is re-sent after every reconnect until the scheduler acknowledges
  it;
- ``connected(scheduler_id)`` says whether a scheduler has a live channel;
- ``subscribe(user_id or instance_id, callback)`` streams the instance
  changes the channel applies (``dit4c.portal.events.InstanceEvent``): they
  go on the portal's one event bus (``events.InstanceEvents``), which the
  hub is given, and this subscribes there.

Each channel handles its messages one at a time, in order, so that one
scheduler's reports are applied as it sent them
(:mod:`dit4c.portal.channelupdates` applies them); a protocol violation closes
only the offending channel.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, TimeoutError, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from dit4c.channel.errors import AuthRefused, ProtocolError
from dit4c.channel.handshake import PORTAL_LINK, Dialled, Hello, Phase
from dit4c.channel.questions import Questions, Unanswered
from dit4c.channel.wire import (
    HANDSHAKE_TIMEOUT,
    PATH,
    PING_INTERVAL,
    PING_TIMEOUT,
    SUBPROTOCOL,
    CloseCode,
    Command,
    LogChunk,
    decode,
    encode,
    instanceField,
    linkOptions,
    parseLogChunk,
    parseReport,
    parseStatus,
    text,
)
from dit4c.common.service import IConnectionTransport, ListeningService
from dit4c.common.tokens import StaticKeySource
from dit4c.portal.channelupdates import InstanceUpdates, publishableKey
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.instances import ICommandSink
from dit4c.portal.nodes import NODE_MESSAGES, NodeDirectory
from dit4c.portal.store.errors import StoreError
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Scheduler

__all__ = [
    "ChannelHub",
    "IInstanceEvents",
]

#: Messages a channel holds unhandled before it stops reading from the socket.
_INBOX_HIGH = 64
_INBOX_LOW = 16

#: Pending commands sent per store query.
_PUMP_BATCH = 500


class IInstanceEvents(Interface):
    """Where the pages learn of instance changes as they happen."""

    def subscribe(key: str | None, callback: Callable[[InstanceEvent], object]) -> Callable[[], None]:
        """
        Call ``callback`` with every change to an instance whose id or
        owner's id is ``key`` (every instance's, for None); returns the
        function that unsubscribes.
        """


class _ChannelProtocol(WebSocketServerProtocol):
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
    def hub(self) -> ChannelHub:
        hub: ChannelHub = self.factory.hub
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


class _ChannelFactory(WebSocketServerFactory):
    hub: ChannelHub


@implementer(IInstanceEvents, ICommandSink)
class ChannelHub(MultiService):
    """
    Every scheduler channel of this portal process, and the portal's API to them.

    A ``MultiService``: the endpoints given to :meth:`listen` are served while
    it runs, and stopping it closes every channel (``SHUTDOWN``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        store: IStore,
        *,
        issuer: str,
        events: InstanceEvents | None = None,
        clock: IReactorTime | None = None,
        handshakeTimeout: float = HANDSHAKE_TIMEOUT,
        pingInterval: float = PING_INTERVAL,
        pingTimeout: float = PING_TIMEOUT,
        leeway: float = 30.0,
        pollInterval: float | None = 30.0,
        keepAcked: float = 7 * 86400.0,
    ) -> None:
        """
        :param issuer: the portal's public URL; challenges name it and
            proofs must too.
        :param events: the portal's event bus, where every change the
            channel applies is published (None: one of the hub's own).
        :param clock: judges proofs' times (default: ``reactor``).
        :param leeway: clock skew allowed when checking a proof's times.
        :param pollInterval: seconds between looks at the store for commands
            that another portal process made for a scheduler connected here
            (None: never; commands made here are pushed at once regardless).
        :param keepAcked: seconds acknowledged commands are kept (for the
            record) before the poll forgets them.
        """
        super().__init__()
        self.reactor = reactor
        self.store = store
        self.issuer = issuer
        self.clock: IReactorTime = clock if clock is not None else reactor
        self.handshakeTimeout = handshakeTimeout
        self.pingInterval = pingInterval
        self.pingTimeout = pingTimeout
        self.leeway = leeway
        self.pollInterval = pollInterval
        self.keepAcked = keepAcked
        self._channels: dict[str, _ChannelProtocol] = {}
        self._open: set[_ChannelProtocol] = set()
        #: The bus every change applied here goes on.
        self.events = events if events is not None else InstanceEvents()
        #: What schedulers report, applied to the store and published on the bus.
        self.updates = InstanceUpdates(store, self.events)
        #: What each connected scheduler says about its compute nodes (docs/protocols.md 7.7).
        self.nodes = NodeDirectory(reactor, self._sendTo)
        self._poll: LoopingCall | None = None
        self._lastPrune: float | None = None
        #: What a stored command's params become as the pump sends it
        #: ``(op, instance id, params)``: the portal makes there what must
        #: not be stored (a saved image's read token); as stored if unset.
        self.paramsToSend: Callable[[str, str, Mapping[str, Any]], Awaitable[Mapping[str, Any]]] | None = None

    # -- serving ----------------------------------------------------------------------------

    def factory(self, url: str = "ws://localhost/") -> WebSocketServerFactory:
        """A WebSocket factory serving the channel at :data:`PATH` (listen on it directly)."""
        factory = _ChannelFactory(url, reactor=self.reactor)
        factory.protocol = _ChannelProtocol
        factory.hub = self
        linkOptions(
            factory, handshakeTimeout=self.handshakeTimeout, pingInterval=self.pingInterval, pingTimeout=self.pingTimeout
        )
        return factory

    def resource(self) -> WebSocketResource:
        """The channel as a web resource, to mount at :data:`PATH` of a ``Site``."""
        return WebSocketResource(self.factory())

    def listen(self, endpoint: IStreamServerEndpoint) -> ListeningService:
        """Serve the channel on ``endpoint`` while the hub runs."""
        service = ListeningService(endpoint, self.factory(), "scheduler channel")
        service.setServiceParent(self)
        return service

    # -- the portal's API ------------------------------------------------------------------

    def send(
        self, scheduler_id: str, op: str, instance_id: str, params: Mapping[str, Any] | None = None
    ) -> Deferred[str]:
        """
        Keep a command for a scheduler and push it down its channel if it is
        connected (else when it connects). Fires with the command's id once
        it is stored: delivery is the channel's business from then on.
        """
        return Deferred.fromCoroutine(self._send(scheduler_id, op, instance_id, params or {}))

    async def _send(self, schedulerId: str, op: str, instanceId: str, params: Mapping[str, Any]) -> str:
        command = await self.store.createCommand(schedulerId, instanceId, op, params)
        protocol = self._channels.get(schedulerId)
        live = protocol is not None and protocol.phase is Phase.OPEN
        self.log.info(
            "command {id}: {op} {instance} on scheduler {scheduler} ({delivery})",
            id=command.id,
            op=op,
            instance=instanceId,
            scheduler=schedulerId,
            delivery="sending" if live else "waiting for it to connect",
        )
        if protocol is not None and live:
            self._pump(protocol)
        return command.id

    def logs(self, scheduler_id: str, instance_id: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """Ask a connected scheduler for a piece of an instance's tool's output (never stored, not retried)."""
        protocol = self._channels.get(scheduler_id)
        if protocol is None or protocol.phase is not Phase.OPEN:
            return fail(Unanswered("The instance's cluster is not connected now; try again in a moment."))
        return protocol.questions.ask(protocol.sendJSON, instance_id, offset, limit, "The instance's cluster")

    def connected(self, scheduler_id: str) -> bool:
        """Whether the scheduler has a live (authenticated) channel to this portal process."""
        protocol = self._channels.get(scheduler_id)
        return protocol is not None and protocol.phase is Phase.OPEN

    def _sendTo(self, scheduler_id: str, message: Mapping[str, Any]) -> bool:
        protocol = self._channels.get(scheduler_id)
        return protocol is not None and protocol.phase is Phase.OPEN and protocol.sendJSON(message)

    def connectedSchedulers(self) -> list[str]:
        """The ids of the schedulers connected now."""
        return sorted(s for s in self._channels if self.connected(s))

    def subscribe(self, key: str | None, callback: Callable[[InstanceEvent], object]) -> Callable[[], None]:
        return self.events.subscribeChanges(key, callback)

    # -- channels coming and going ---------------------------------------------------------------

    def _opened(self, protocol: _ChannelProtocol) -> None:
        self._open.add(protocol)

    def _closed(self, protocol: _ChannelProtocol) -> None:
        self._open.discard(protocol)
        if protocol.schedulerId is not None and self._channels.get(protocol.schedulerId) is protocol:
            del self._channels[protocol.schedulerId]
            self.nodes.closed(protocol.schedulerId)

    def _authenticate(self, protocol: _ChannelProtocol, hello: Hello) -> None:
        def failed(failure: Failure) -> None:
            if isinstance(failure.value, StoreError):
                self.log.warn("the store failed while checking a scheduler: {error}", error=failure.value.message)
            else:
                self.log.failure("bug while checking a scheduler's proof", failure)
            protocol.fail(CloseCode.INTERNAL_ERROR, "the portal could not check the proof; reconnect later")

        d = Deferred.fromCoroutine(self._verify(protocol, hello))
        d.addCallback(lambda scheduler: self._verified(protocol, hello.peer, scheduler))
        d.addErrback(failed)

    async def _verify(self, protocol: _ChannelProtocol, hello: Hello) -> str | Scheduler:
        """The scheduler record if the proof is good; otherwise why not (a string)."""
        scheduler = await self.store.schedulerById(hello.peer)
        if scheduler is None:
            return "unknown scheduler"
        if scheduler.disabled:
            return "scheduler disabled"
        try:
            registered = json.loads(scheduler.public_jwk)
            keys = registered["keys"] if "keys" in registered else [registered]
            # Known by the kid it was registered with, and by its thumbprint
            # (the kid ChannelClient puts in proofs).
            keys = [*keys, *({k: v for k, v in key.items() if k != "kid"} for key in keys)]
            source = StaticKeySource({"keys": keys})
        except (ValueError, TypeError, AttributeError, KeyError):
            self.log.error(
                "scheduler {name} ({id}) has no usable registered key (an EC P-256 or Ed25519 JWK)",
                name=scheduler.name,
                id=scheduler.id,
            )
            return "the scheduler's registered key is not usable"
        assert protocol.handshake is not None
        try:
            await protocol.handshake.check(
                hello, source, clock=self.clock, leeway=self.leeway, scopedKeys=("scheduler",)
            )
        except AuthRefused as e:
            return e.reason
        return scheduler

    def _verified(self, protocol: _ChannelProtocol, schedulerId: str, scheduler: str | Scheduler) -> None:
        if protocol.phase is not Phase.CHECKING or protocol.handshake is None:
            return  # closed meanwhile
        if isinstance(scheduler, str):
            protocol.fail(CloseCode.AUTH_FAILED, f"{scheduler} ({schedulerId})")
            return
        if protocol._timer is not None and protocol._timer.active():
            protocol._timer.cancel()
        protocol._timer = None
        welcome = protocol.handshake.welcome(
            schedulerId, {"scheduler": schedulerId, "ping": self.pingInterval, "timeout": self.pingTimeout}
        )
        protocol.schedulerId = schedulerId
        old = self._channels.get(schedulerId)
        self._channels[schedulerId] = protocol
        if old is not None and old is not protocol:
            old.fail(CloseCode.REPLACED, "replaced by a newer channel of the same scheduler", quiet=True)
        protocol.sendJSON(welcome)
        self.log.info(
            "scheduler {name} ({id}) connected from {peer}", name=scheduler.name, id=schedulerId, peer=protocol.peer
        )
        self._pump(protocol)

    # -- commands down -------------------------------------------------------------------------

    def _pump(self, protocol: _ChannelProtocol) -> None:
        """Send the scheduler's pending commands not yet sent on this channel, in order."""
        if protocol.pumping:
            protocol.pumpAgain = True
            return
        protocol.pumping = True
        Deferred.fromCoroutine(self._pumpLoop(protocol))

    async def _pumpLoop(self, protocol: _ChannelProtocol) -> None:
        schedulerId = protocol.schedulerId
        assert schedulerId is not None
        try:
            while protocol.phase is Phase.OPEN:
                protocol.pumpAgain = False
                pending = await self.store.pendingCommands(schedulerId, limit=_PUMP_BATCH)
                for command in pending:
                    if protocol.phase is not Phase.OPEN:
                        return
                    if command.id not in protocol.sent:
                        params = command.params
                        if self.paramsToSend is not None:
                            params = await self.paramsToSend(command.op, command.instance_id, params)
                            if protocol.phase is not Phase.OPEN:
                                return
                        protocol.sent.add(command.id)
                        message = Command(command.id, command.op, command.instance_id, params)
                        protocol.sendJSON(message.toJSON())
                protocol.truncated = len(pending) >= _PUMP_BATCH
                if not protocol.pumpAgain:
                    return
        except StoreError as e:
            self.log.warn(
                "could not read the commands for scheduler {id}: {error} (trying again at the next poll)",
                id=schedulerId,
                error=e.message,
            )
        except Exception:
            self.log.failure("bug while sending commands to scheduler {id}", id=schedulerId)
        finally:
            protocol.pumping = False

    def _pollAll(self) -> Deferred[None]:
        for protocol in list(self._channels.values()):
            if protocol.phase is Phase.OPEN:
                self._pump(protocol)
        return Deferred.fromCoroutine(self._prune())

    async def _prune(self) -> None:
        now = self.clock.seconds()
        if self._lastPrune is not None and now - self._lastPrune < 3600:
            return
        self._lastPrune = now
        try:
            forgotten = await self.store.deleteAckedCommands(now - self.keepAcked)
        except StoreError as e:
            self.log.warn("could not forget old commands: {error}", error=e.message)
            return
        if forgotten:
            self.log.info("forgot {count} acknowledged commands", count=forgotten)

    # -- messages up ---------------------------------------------------------------------------

    def _received(self, protocol: _ChannelProtocol, kind: str, message: dict[str, Any]) -> None:
        """Check a message at once (a bad one closes the channel); queue what it asks for."""
        schedulerId = protocol.schedulerId
        assert schedulerId is not None
        if kind == "state":
            status = parseStatus(message)
            protocol.enqueue(lambda: self.updates.applyStatus(schedulerId, status))
        elif kind == "report":
            statuses = parseReport(message)
            protocol.enqueue(lambda: self.updates.reconcile(schedulerId, statuses))
        elif kind == "instance-key":
            instanceId = instanceField(message)
            jwk = message.get("jwk")
            if not isinstance(jwk, dict):
                raise ProtocolError("instance-key: jwk must be a JSON object")
            published = publishableKey(schedulerId, instanceId, jwk)
            if published is not None:
                protocol.enqueue(lambda: self.updates.applyKey(schedulerId, instanceId, published))
        elif kind == "ack":
            commandId = text(message, "id")
            protocol.enqueue(lambda: self._ack(protocol, commandId))
        elif kind == "logs-chunk":
            protocol.questions.answer(*parseLogChunk(message))
        elif kind in NODE_MESSAGES:
            self.nodes.received(schedulerId, kind, message)
        else:
            raise ProtocolError(f"unknown message type {kind!r}")

    async def _ack(self, protocol: _ChannelProtocol, commandId: str) -> None:
        schedulerId = protocol.schedulerId
        assert schedulerId is not None
        if await self.store.ackCommand(schedulerId, commandId):
            protocol.sent.discard(commandId)
            if protocol.truncated:
                self._pump(protocol)
        else:
            self.log.info(
                "scheduler {scheduler} acknowledged command {id}, which is not pending; ignored",
                scheduler=schedulerId,
                id=commandId,
            )

    # -- the service ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.pollInterval:
            self._poll = LoopingCall(self._pollAll)
            self._poll.clock = self.reactor
            self._poll.start(self.pollInterval, now=False).addErrback(
                lambda f: self.log.failure("the command poll failed", f)
            )

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None
        await MultiService.stopService(self)
        channels = list(self._open)
        closing = [protocol.closed for protocol in channels]
        for protocol in channels:
            protocol.fail(CloseCode.SHUTDOWN, "the portal is stopping", quiet=True)
        if closing:
            done: Deferred[list[tuple[bool, None]]] = DeferredList(closing)
            done.addTimeout(6, self.reactor)
            try:
                await done
            except TimeoutError:
                for protocol in channels:
                    if not protocol.closed.called:
                        protocol.dropConnection(abort=True)
