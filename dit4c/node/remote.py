"""
The scheduler's end of the node link (docs/protocols.md, "The node link"):
:class:`RemoteNode` dials a compute node, proves who it is, and drives the
node as an :class:`~dit4c.channel.interfaces.INode` (the node's end is
:mod:`dit4c.node.link`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
)
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.channel.errors import AuthRefused, NodeAway, NodeFull, ProtocolError
from dit4c.channel.handshake import NODE_LINK, Dialler, Phase, Welcome
from dit4c.channel.interfaces import INode, INodeObserver
from dit4c.channel.nodewire import parseNodeState
from dit4c.channel.questions import Questions
from dit4c.channel.wire import (
    CloseCode,
    Command,
    InstanceStatus,
    LogChunk,
    decode,
    encode,
    instanceField,
    linkOptions,
    parseLogChunk,
    parseReport,
    parseStatus,
    privateMembers,
    text,
)
from dit4c.common.keys import PrivateKey
from dit4c.common.life import ACTIVE, State
from dit4c.common.tokens import IKeySource
from dit4c.common.websocket import webSocketEndpoint
from dit4c.listener.service import backoff
from dit4c.node.link import HANDSHAKE_TIMEOUT, NODE_GRACE, PATH, SUBPROTOCOL

__all__ = ["RemoteNode"]


class _SchedulerSide(WebSocketClientProtocol):
    _log = Logger()
    remote: RemoteNode
    handshake: Dialler | None = None
    _timer: IDelayedCall | None = None
    #: Messages that came while the node's welcome was being checked.
    _held: list[tuple[bytes, bool]] | None = None

    @property
    def welcomed(self) -> bool:
        return self.handshake is not None and self.handshake.open

    def onOpen(self) -> None:
        remote = self.remote
        self.handshake = Dialler(
            NODE_LINK, remote.schedulerId, remote.key, clock=remote.reactor, expected=remote.expectedName
        )
        self._timer = remote.reactor.callLater(
            HANDSHAKE_TIMEOUT, self._close, CloseCode.HANDSHAKE_TIMEOUT, "handshake too slow"
        )

    def send(self, message: Mapping[str, Any]) -> bool:
        if self.state != self.STATE_OPEN:
            return False
        self.sendMessage(encode(message), isBinary=False)
        return True

    def _close(self, code: int, reason: str) -> None:
        self._cancelTimer()
        if self.handshake is not None:
            self.handshake.close()
        self.remote._lastError = reason
        self._log.warn("closing the link to node {url}: {reason}", url=self.remote.url, reason=reason)
        self.sendClose(int(code), reason)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self._held is not None:
            self._held.append((payload, isBinary))
            return
        if self.handshake is None or self.handshake.phase is Phase.CLOSED:
            return
        try:
            message = decode(payload, isBinary)
            step = self.handshake.receive(message)
            if isinstance(step, Welcome):
                self._held = []
                Deferred.fromCoroutine(self._welcome(step))
                return
            if step is not None:
                assert self.handshake.peer is not None
                self.remote.nodeName = self.handshake.peer
                self.send(step)  # the hello
                return
            kind = message["type"]
            if kind == "state":
                self.remote._state(parseStatus(message))
            elif kind == "instance-key":
                self.remote._key(instanceField(message), message.get("jwk"))
            elif kind == "report":
                self.remote._report(parseReport(message), message.get("keys"))
            elif kind == "ack":
                self.remote._acked(text(message, "id"))
            elif kind == "logs-chunk":
                self.remote._questions.answer(*parseLogChunk(message))
            elif kind == "node-state":
                self.remote._nodeState(*parseNodeState(message))
            else:
                raise ProtocolError(f"unknown message type {kind!r}")
        except ProtocolError as e:
            self._close(CloseCode.PROTOCOL_ERROR, e.reason)
        except AuthRefused as e:
            self._close(CloseCode.AUTH_FAILED, e.reason)

    async def _welcome(self, welcome: Welcome) -> None:
        remote = self.remote
        assert self.handshake is not None
        try:
            await self.handshake.check(welcome, remote.nodeKeys)
        except AuthRefused as e:
            self._held = None
            self._close(CloseCode.AUTH_FAILED, e.reason)
            return
        if self.handshake.phase is not Phase.CHECKING:
            return  # closed meanwhile
        self._cancelTimer()
        self.handshake.opened()
        capacity = welcome.message.get("capacity")
        remote.capacity = capacity if isinstance(capacity, int) and capacity >= 0 else 0
        remote.accepting = welcome.message.get("accepting") is True
        remote._welcomed(self)
        held, self._held = self._held or [], None
        for payload, isBinary in held:
            self.onMessage(payload, isBinary)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self._cancelTimer()
        if self.handshake is not None:
            self.handshake.close()
        self.remote._closed(self, code, reason)


@implementer(INode)
class RemoteNode(MultiService):
    """A compute node across the network, as the scheduler drives it."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        url: str,
        schedulerId: str,
        key: PrivateKey,
        nodeKeys: IKeySource,
        *,
        name: str | None = None,
        trustRoots: str | None = None,
        grace: float = NODE_GRACE,
        retryPolicy: Any = None,
    ) -> None:
        """
        :param url: ``ws://host:port`` or ``wss://...`` (the path defaults to :data:`PATH`).
        :param nodeKeys: the node's public key (it must prove itself with it).
        :param name: the node's name, if it must be this one.
        :param grace: seconds the node may be away before its instances count as lost.
        """
        super().__init__()
        self.reactor = reactor
        if not url.startswith(("ws://", "wss://")):
            raise ValueError(f"a node's URL is ws:// or wss://, not {url!r}")
        if url.rstrip("/").count("/") == 2:
            url = url.rstrip("/") + PATH
        self.url = url
        self.schedulerId = schedulerId
        self.key = key
        self.nodeKeys = nodeKeys
        self.expectedName = name
        self.nodeName: str = name or url
        self.capacity = 0
        self.accepting = False
        self.grace = grace
        self._link: _SchedulerSide | None = None
        self._observers: list[INodeObserver] = []
        self._statuses: dict[str, InstanceStatus] = {}
        self._queue: list[dict[str, Any]] = []
        self._pending: dict[str, Deferred[None]] = {}
        #: Cool-downs and accepts sent on the current link, not yet acknowledged.
        self._nodeCommands: dict[str, Deferred[None]] = {}
        self._lost: set[str] = set()
        self._graceTimer: IDelayedCall | None = None
        self._lastError: str | None = None
        self._connected: list[Deferred[None]] = []
        #: Whether the node's report came since the link's welcome.
        self._reported = False
        self._reportWaiters: list[Deferred[None]] = []
        #: Questions about tools' output, open on the current link.
        self._questions = Questions(reactor)
        factory = WebSocketClientFactory(url, protocols=[SUBPROTOCOL], reactor=reactor)
        protocol: type[_SchedulerSide] = type("SchedulerSide", (_SchedulerSide,), {"remote": self})
        factory.protocol = protocol
        linkOptions(factory)
        endpoint = webSocketEndpoint(reactor, url, trustRoots=trustRoots)
        self._service = ClientService(
            endpoint, factory, retryPolicy=retryPolicy or backoff(maximum=10.0), clock=reactor
        )
        self._service.setServiceParent(self)

    @property
    def connected(self) -> bool:
        return self._link is not None

    def whenConnected(self) -> Deferred[None]:
        if self._link is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._connected.append(d)
        return d

    def whenReported(self) -> Deferred[None]:
        """Fires once the node is linked and has said what it holds (now, if it has)."""
        if self._link is not None and self._reported:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._reportWaiters.append(d)
        return d

    # -- INode -----------------------------------------------------------------------------------

    def load(self) -> int:
        return sum(1 for s in self._statuses.values() if s.state in ACTIVE)

    def instances(self) -> list[InstanceStatus]:
        return list(self._statuses.values())

    def subscribe(self, observer: INodeObserver) -> None:
        self._observers.append(observer)

    def start(
        self,
        instance: str,
        image: str,
        port: int | None,
        digest: str | None = None,
        token: str | None = None,
        limits: object = None,
    ) -> Deferred[None]:
        if not self.connected or not self.accepting or self.load() >= self.capacity:
            raise NodeFull(f"node {self.nodeName} takes no instances now")
        self._statuses[instance] = InstanceStatus(instance, State.STARTING)
        self._lost.discard(instance)
        params: dict[str, Any] = {"image": image, "port": port, "digest": digest}
        if token is not None:
            params["token"] = token
        if limits is not None:
            params["limits"] = limits  # as it came: the node checks it
        return self._command("start", instance, params)

    def stop(self, instance: str) -> Deferred[None]:
        return self._command("stop", instance)

    def save(self, instance: str) -> Deferred[None]:
        return self._command("save", instance)

    def discard(self, instance: str) -> Deferred[None]:
        return self._command("discard", instance)

    def resume(self, instance: str) -> Deferred[None]:
        return self._command("resume", instance)

    def setAccepting(self, accepting: bool) -> Deferred[None]:
        """
        Ask the node to cool down or take instances again; fires once it
        has (its ``node-state`` came, then the ack). Not queued while the
        node is away: that fails at once, and a node that comes back (or
        is started again) says for itself whether it takes instances.
        """
        link = self._link
        if link is None:
            return fail(NodeAway(f"The compute node {self.nodeName} is not linked to its scheduler now; try again once it is back."))
        commandId = secrets.token_urlsafe(12)
        d: Deferred[None] = Deferred()
        self._nodeCommands[commandId] = d
        link.send({"type": "node-command", "id": commandId, "op": "accept" if accepting else "cool-down"})
        return d

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        link = self._link
        return self._questions.ask(
            link.send if link is not None else lambda _: False, instance, offset, limit, f"The compute node {self.nodeName}"
        )

    def _command(self, op: str, instance: str, params: dict[str, Any] | None = None) -> Deferred[None]:
        command = Command(secrets.token_urlsafe(12), op, instance, params or {})
        message = command.toJSON()
        d: Deferred[None] = Deferred()
        self._pending[command.id] = d
        if self._link is None or not self._link.send(message):
            self._queue.append(message)  # sent when the node is back
        return d

    # -- what the node says ------------------------------------------------------------------------

    def _welcomed(self, link: _SchedulerSide) -> None:
        self._link = link
        self._reported = False
        self._lastError = None
        if self._graceTimer is not None and self._graceTimer.active():
            self._graceTimer.cancel()
        self._graceTimer = None
        self.log.info("linked to node {name} ({url})", name=self.nodeName, url=self.url)
        queued, self._queue = self._queue, []
        for message in queued:
            link.send(message)
        waiting, self._connected = self._connected, []
        for d in waiting:
            d.callback(None)
        self._changed()

    def _changed(self) -> None:
        for observer in self._observers:
            observer.nodeChanged(self)

    def _nodeState(self, capacity: int, accepting: bool) -> None:
        """The node's capacity, or its taking of new instances, changed (an administrator cooled it down)."""
        self.capacity, self.accepting = capacity, accepting
        self.log.info(
            "node {name} {what}", name=self.nodeName, what="takes instances" if accepting else "is cooling down"
        )
        self._changed()

    def _state(self, status: InstanceStatus) -> None:
        if status.instance in self._lost:
            return  # reported lost to the portal already; the report cleans it up
        if status.state == State.DISCARDED:
            self._statuses.pop(status.instance, None)
        else:
            self._statuses[status.instance] = status
        for observer in self._observers:
            observer.instanceState(self, status)

    def _key(self, instance: str, jwk: object) -> None:
        if not isinstance(jwk, dict) or privateMembers(jwk):
            self.log.warn("node {name} sent an unusable key for {instance}", name=self.nodeName, instance=instance)
            return
        for observer in self._observers:
            observer.instanceKey(self, instance, jwk)

    def _report(self, statuses: list[InstanceStatus], keys: object) -> None:
        known = {s.instance: s for s in statuses}
        for instance in list(self._lost):
            status = known.pop(instance, None)
            if status is not None and status.state in ACTIVE:
                # Reported lost while the node was away: it must not run on unseen.
                self.log.info("stopping {instance}, reported lost while node {name} was away", instance=instance, name=self.nodeName)
                self._command("stop", instance)
        self._lost.clear()
        previous = self._statuses
        self._statuses = dict(known)
        if isinstance(keys, dict):
            for instance, jwk in keys.items():
                if instance in known and known[instance].state in ACTIVE:
                    self._key(instance, jwk)
        for status in known.values():
            if previous.get(status.instance) != status:
                for observer in self._observers:
                    observer.instanceState(self, status)
        for instance, status in previous.items():
            if instance not in known and status.state == State.DISCARDING:
                # The node finished discarding it while the link was down (a
                # restarted node, before the link was back): its word was lost.
                for observer in self._observers:
                    observer.instanceState(self, InstanceStatus(instance, State.DISCARDED))
        self._reported = True
        waiting, self._reportWaiters = self._reportWaiters, []
        for d in waiting:
            d.callback(None)

    def _acked(self, commandId: str) -> None:
        d = self._pending.pop(commandId, None) or self._nodeCommands.pop(commandId, None)
        if d is not None:
            d.callback(None)

    @property
    def lastError(self) -> str | None:
        """Why the last attempt to link failed, if it did."""
        return self._lastError

    def _closed(self, link: _SchedulerSide, code: Any, reason: Any) -> None:
        if self._link is not link:
            if not link.welcomed and code not in (None, 1000) and self._lastError is None:
                self._lastError = f"{code} {reason}" if reason else str(code)
            return
        self._link = None
        self._questions.failAll(f"The link to compute node {self.nodeName} was lost.")
        self.accepting = False  # until it is back and says so
        self.log.warn("link to node {name} lost ({code} {reason})", name=self.nodeName, code=code, reason=reason or "")
        asked, self._nodeCommands = self._nodeCommands, {}
        for d in asked.values():
            d.errback(NodeAway(f"The link to compute node {self.nodeName} was lost; try again once it is back."))
        self._changed()
        if self.running and self._graceTimer is None:
            self._graceTimer = self.reactor.callLater(self.grace, self._gone)

    def _gone(self) -> None:
        self._graceTimer = None
        why = f"The compute node {self.nodeName} is unreachable."
        for status in list(self._statuses.values()):
            if status.state in ACTIVE:
                lost = replace(status, state=State.ERRORED, reason=why, url=None)
                self._statuses[status.instance] = lost
                for observer in self._observers:
                    observer.instanceState(self, lost)
                self._lost.add(status.instance)
        self.log.warn("node {name} away for {grace} s: its instances are lost", name=self.nodeName, grace=self.grace)

    def stopService(self) -> Deferred[None]:
        if self._graceTimer is not None and self._graceTimer.active():
            self._graceTimer.cancel()
        self._graceTimer = None
        link, self._link = self._link, None
        if link is not None:
            link.sendClose(1000, "scheduler stopping")
        d: Deferred[None] = Deferred.fromCoroutine(self._stop())
        return d

    async def _stop(self) -> None:
        await MultiService.stopService(self)
