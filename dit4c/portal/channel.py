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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict
from typing import Any, NoReturn

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, DeferredLock, TimeoutError, fail, succeed
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from dit4c.channel.errors import AuthRefused, ProtocolError
from dit4c.channel.handshake import Hello, Phase
from dit4c.channel.nodewire import NodeDone, NodeSummary, parseNodeDone, parseNodes
from dit4c.channel.questions import Unanswered
from dit4c.channel.wire import (
    HANDSHAKE_TIMEOUT,
    PING_INTERVAL,
    PING_TIMEOUT,
    CloseCode,
    Command,
    LogChunk,
    instanceField,
    linkOptions,
    parseLogChunk,
    parseReport,
    parseStatus,
    text,
)
from dit4c.common.service import ListeningService
from dit4c.common.tokens import StaticKeySource
from dit4c.portal.channelconn import ChannelFactory, ChannelProtocol
from dit4c.portal.channelrelay import ChannelRelay
from dit4c.portal.channelupdates import InstanceUpdates, publishableKey
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.instances import ICommandSink
from dit4c.portal.nodes import NODE_MESSAGES, INodeQuestions, NodeDirectory, NodeUnavailable
from dit4c.portal.peers import IPeers, NoPeers
from dit4c.portal.store.errors import StoreError
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Scheduler

__all__ = [
    "ChannelHub",
    "IInstanceEvents",
]

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


@implementer(IInstanceEvents, ICommandSink, INodeQuestions)
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
        peers: IPeers | None = None,
    ) -> None:
        """
        :param issuer: the portal's public URL; challenges name it and
            proofs must too.
        :param events: the portal's event bus, where every change the
            channel applies is published (None: one of the hub's own).
        :param clock: judges proofs' times (default: ``reactor``).
        :param leeway: clock skew allowed when checking a proof's times.
        :param pollInterval: seconds between looks at the store for commands
            that another process made for a scheduler connected here, which
            it did not tell (None: never; commands made here, and those the
            other portal processes tell of, are pushed at once regardless).
        :param keepAcked: seconds acknowledged commands are kept (for the
            record) before the poll forgets them.
        :param peers: the other portal processes: told of each command made
            here for a scheduler connected elsewhere, and heard of theirs.
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
        self._channels: dict[str, ChannelProtocol] = {}
        self._open: set[ChannelProtocol] = set()
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
        self.peers: IPeers = peers if peers is not None else NoPeers()
        self.peers.hear("command", self._heardCommand)
        #: Questions for schedulers another portal process holds, and theirs for ours.
        self.relay = ChannelRelay(self.clock, store, self.peers, self._answerHere)
        # Which process holds each channel, in the store in the order it happened.
        self._links = DeferredLock()
        # Back after the link to the others was lost: any command told meanwhile was missed.
        self.peers.onJoined(self._pumpAll)

    # -- serving ----------------------------------------------------------------------------

    def factory(self, url: str = "ws://localhost/") -> WebSocketServerFactory:
        """A WebSocket factory serving the channel at :data:`PATH` (listen on it directly)."""
        factory = ChannelFactory(url, reactor=self.reactor)
        factory.protocol = ChannelProtocol
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
            delivery="sending" if live else "waiting for it to connect" if self.peers.alone else "for the portal holding its channel",
        )
        if protocol is not None and live:
            self._pump(protocol)
        else:
            self.peers.tell("command", {"scheduler": schedulerId})
        return command.id

    def _heardCommand(self, body: Mapping[str, Any]) -> None:
        """Another portal process stored a command: sent down the scheduler's channel if it is here."""
        protocol = self._channels.get(str(body.get("scheduler")))
        if protocol is not None and protocol.phase is Phase.OPEN:
            self._pump(protocol)

    def logs(self, scheduler_id: str, instance_id: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """
        Ask the scheduler for a piece of an instance's tool's output (never
        stored, not retried), down its channel here or through the portal
        process holding it.
        """
        if self.connected(scheduler_id):
            return self._logsHere(scheduler_id, instance_id, offset, limit)
        asked = Deferred.fromCoroutine(
            self.relay.ask(scheduler_id, "logs", {"instance": instance_id, "offset": offset, "limit": limit})
        )
        return asked.addCallback(lambda answer: LogChunk(**answer))

    def _logsHere(self, scheduler_id: str, instance_id: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        protocol = self._channels[scheduler_id]
        return protocol.questions.ask(protocol.sendJSON, instance_id, offset, limit, "The instance's cluster")

    def nodesOf(self, scheduler_id: str) -> Deferred[tuple[NodeSummary, ...] | None]:
        """What the scheduler last said of its compute nodes (None: nothing, or it is not connected)."""
        if self.connected(scheduler_id):
            return succeed(self.nodes.of(scheduler_id))
        asked = Deferred.fromCoroutine(self.relay.ask(scheduler_id, "nodes", {}))

        def away(failure: Failure) -> None:
            failure.trap(Unanswered)
            return None

        return asked.addCallbacks(lambda answer: None if answer is None else parseNodes({"nodes": answer}), away)

    def nodeCommand(self, scheduler_id: str, node: str, op: str) -> Deferred[NodeDone]:
        """Ask the scheduler to cool ``node`` down, take instances again or drain it (``NodeDirectory.command``)."""
        if self.connected(scheduler_id):
            return self.nodes.command(scheduler_id, node, op)
        asked = Deferred.fromCoroutine(self.relay.ask(scheduler_id, "node-command", {"node": node, "op": op}))

        def away(failure: Failure) -> NoReturn:
            failure.trap(Unanswered)
            raise NodeUnavailable(str(failure.value))

        return asked.addCallbacks(lambda answer: parseNodeDone(answer), away)

    def _answerHere(self, scheduler_id: str, question: str, args: Mapping[str, Any]) -> Deferred[Any] | None:
        """Another portal process's question for a scheduler connected here (None: it is not)."""
        if not self.connected(scheduler_id):
            return None
        if question == "logs":
            chunk = self._logsHere(scheduler_id, str(args["instance"]), args.get("offset"), int(args["limit"]))
            return chunk.addCallback(asdict)
        if question == "nodes":
            nodes = self.nodes.of(scheduler_id)
            return succeed(None if nodes is None else [n.toJSON() for n in nodes])
        if question == "node-command":
            done = self.nodes.command(scheduler_id, str(args["node"]), str(args["op"]))

            def unavailable(failure: Failure) -> NoReturn:
                failure.trap(NodeUnavailable)
                raise Unanswered(str(failure.value))

            return done.addCallbacks(lambda d: d.toJSON(), unavailable)
        return fail(Unanswered(f"no such question as {question!r}"))

    def connected(self, scheduler_id: str) -> bool:
        """Whether the scheduler has a live (authenticated) channel to this portal process."""
        protocol = self._channels.get(scheduler_id)
        return protocol is not None and protocol.phase is Phase.OPEN

    def reachable(self, scheduler_id: str) -> Deferred[bool]:
        """Whether the scheduler has a live channel to this portal process or to another running one."""
        if self.connected(scheduler_id):
            return succeed(True)
        return Deferred.fromCoroutine(self.relay.holder(scheduler_id)).addCallback(lambda holder: holder is not None)

    def _sendTo(self, scheduler_id: str, message: Mapping[str, Any]) -> bool:
        protocol = self._channels.get(scheduler_id)
        return protocol is not None and protocol.phase is Phase.OPEN and protocol.sendJSON(message)

    def connectedSchedulers(self) -> list[str]:
        """The ids of the schedulers connected now."""
        return sorted(s for s in self._channels if self.connected(s))

    def subscribe(self, key: str | None, callback: Callable[[InstanceEvent], object]) -> Callable[[], None]:
        return self.events.subscribeChanges(key, callback)

    # -- channels coming and going ---------------------------------------------------------------

    def _opened(self, protocol: ChannelProtocol) -> None:
        self._open.add(protocol)

    def _closed(self, protocol: ChannelProtocol) -> None:
        self._open.discard(protocol)
        if protocol.schedulerId is not None and self._channels.get(protocol.schedulerId) is protocol:
            del self._channels[protocol.schedulerId]
            self.nodes.closed(protocol.schedulerId)
            self._link(self.store.releaseChannel, protocol.schedulerId)

    def _link(self, change: Callable[[str, str], Deferred[None]], schedulerId: str) -> None:
        """Say in the store that this process holds a scheduler's channel, or no longer does."""
        holder: str = self.peers.id
        d: Deferred[None] = self._links.run(lambda: change(schedulerId, holder))
        d.addErrback(
            lambda f: self.log.warn(
                "could not record which portal holds scheduler {id}'s channel: {error}", id=schedulerId,
                error=f.getErrorMessage(),
            )  # fmt: skip
        )

    def _authenticate(self, protocol: ChannelProtocol, hello: Hello) -> None:
        def failed(failure: Failure) -> None:
            if isinstance(failure.value, StoreError):
                self.log.warn("the store failed while checking a scheduler: {error}", error=failure.value.message)
            else:
                self.log.failure("bug while checking a scheduler's proof", failure)
            protocol.fail(CloseCode.INTERNAL_ERROR, "the portal could not check the proof; reconnect later")

        d = Deferred.fromCoroutine(self._verify(protocol, hello))
        d.addCallback(lambda scheduler: self._verified(protocol, hello.peer, scheduler))
        d.addErrback(failed)

    async def _verify(self, protocol: ChannelProtocol, hello: Hello) -> str | Scheduler:
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

    def _verified(self, protocol: ChannelProtocol, schedulerId: str, scheduler: str | Scheduler) -> None:
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
        self._link(self.store.holdChannel, schedulerId)
        self.log.info(
            "scheduler {name} ({id}) connected from {peer}", name=scheduler.name, id=schedulerId, peer=protocol.peer
        )
        self._pump(protocol)

    # -- commands down -------------------------------------------------------------------------

    def _pump(self, protocol: ChannelProtocol) -> None:
        """Send the scheduler's pending commands not yet sent on this channel, in order."""
        if protocol.pumping:
            protocol.pumpAgain = True
            return
        protocol.pumping = True
        Deferred.fromCoroutine(self._pumpLoop(protocol))

    async def _pumpLoop(self, protocol: ChannelProtocol) -> None:
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

    def _pumpAll(self) -> None:
        for protocol in list(self._channels.values()):
            if protocol.phase is Phase.OPEN:
                self._pump(protocol)

    def _pollAll(self) -> Deferred[None]:
        self._pumpAll()
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

    def _received(self, protocol: ChannelProtocol, kind: str, message: dict[str, Any]) -> None:
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

    async def _ack(self, protocol: ChannelProtocol, commandId: str) -> None:
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
