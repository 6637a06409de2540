"""
The link between a scheduler and a compute node (docs/protocols.md, "The
node link").

The node listens (on a private network, or loopback); the scheduler dials
each node it is configured with and keeps one WebSocket open to it. Each
side proves who it is by signing the other's challenge with its own key,
and checks the other's proof against the public key it was configured
with, so neither needs a certificate authority (TLS, ``wss://``, adds
secrecy on a shared network). Commands go down; states, instance keys and
reports come up, in the shapes of the portal's channel
(:mod:`dit4c.scheduler.channel`), whose parsing both ends reuse.

- :class:`NodeLinkServer`: the node's end, in front of a :class:`~dit4c.node.node.Node`.
- :class:`~dit4c.node.remote.RemoteNode`: the scheduler's end; an
  :class:`~dit4c.channel.interfaces.INode`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from autobahn.twisted.websocket import (
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from autobahn.websocket.types import ConnectionDeny
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.channel.errors import AuthRefused, NodeFull, ProtocolError
from dit4c.channel.handshake import NODE_LINK, Dialled, Hello, Phase
from dit4c.channel.interfaces import INode, INodeObserver, startFrom
from dit4c.channel.nodewire import nodeStateMessage, parseLinkNodeCommand
from dit4c.channel.questions import answerTo
from dit4c.channel.wire import (
    CloseCode,
    Command,
    InstanceStatus,
    LogsRequest,
    decode,
    encode,
    linkOptions,
    parseCommand,
    parseLogsRequest,
)
from dit4c.common.keys import PrivateKey
from dit4c.common.life import State
from dit4c.common.service import ListeningService
from dit4c.common.tokens import IKeySource
from dit4c.node.errors import NotHere, RuntimeError_
from dit4c.node.node import Node

__all__ = ["NodeLinkServer", "SUBPROTOCOL", "PATH"]

SUBPROTOCOL = "dit4c-node.1"
PATH = "/.dit4c/node"
HANDSHAKE_TIMEOUT = 10.0
#: Seconds a node may be away before its instances are reported lost.
NODE_GRACE = 60.0


# -- the node's end ----------------------------------------------------------------------------


class _NodeSide(WebSocketServerProtocol):
    _log = Logger()
    server: NodeLinkServer
    handshake: Dialled | None = None
    _timer: IDelayedCall | None = None

    @property
    def scheduler(self) -> str | None:
        """The scheduler at the other end, once it proved itself."""
        return self.handshake.peer if self.handshake is not None else None

    def onConnect(self, request: Any) -> str:
        if request.path != PATH:
            raise ConnectionDeny(404, "not the node link")
        if SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(400, f"the node link speaks {SUBPROTOCOL}")
        return SUBPROTOCOL

    def onOpen(self) -> None:
        self.server.connections.add(self)
        self.handshake = Dialled(NODE_LINK, self.server.node.nodeName)
        self._timer = self.server.reactor.callLater(
            HANDSHAKE_TIMEOUT, self._close, CloseCode.HANDSHAKE_TIMEOUT, "handshake too slow"
        )
        self.send(self.handshake.challenge())

    def send(self, message: Mapping[str, Any]) -> None:
        if self.state == self.STATE_OPEN:
            self.sendMessage(encode(message), isBinary=False)

    def _close(self, code: int, reason: str) -> None:
        self._cancelTimer()
        if self.handshake is not None:
            self.handshake.close()
        self._log.warn("closing the link from a scheduler: {reason}", reason=reason)
        self.sendClose(int(code), reason)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.handshake is None or self.handshake.phase is Phase.CLOSED:
            return
        try:
            message = decode(payload, isBinary)
            hello = self.handshake.receive(message)
            if hello is not None:
                Deferred.fromCoroutine(self._hello(hello))
            elif message["type"] == "command":
                self.server._command(self, parseCommand(message))
            elif message["type"] == "logs":
                self.server._logs(self, parseLogsRequest(message))
            elif message["type"] == "node-command":
                self.server._nodeCommand(self, *parseLinkNodeCommand(message))
            else:
                raise ProtocolError(f"unknown message type {message['type']!r}")
        except ProtocolError as e:
            self._close(CloseCode.PROTOCOL_ERROR, e.reason)

    async def _hello(self, hello: Hello) -> None:
        assert self.handshake is not None
        try:
            await self.handshake.check(hello, self.server.schedulerKeys, clock=self.server.reactor)
        except AuthRefused as e:
            self._close(CloseCode.AUTH_FAILED, e.reason)
            return
        if self.handshake.phase is not Phase.CHECKING:
            return  # closed meanwhile
        self._cancelTimer()
        node = self.server.node
        welcome = self.handshake.welcome(
            hello.peer,
            {"capacity": node.capacity, "accepting": node.accepting},
            key=self.server.key,
            clock=self.server.reactor,
        )
        self.send(welcome)
        self.server._welcomed(self)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self._cancelTimer()
        if self.handshake is not None:
            self.handshake.close()
        self.server.connections.discard(self)
        self.server._closed(self)


@implementer(INodeObserver)
class NodeLinkServer(MultiService):
    """A node's end of the link: one scheduler at a time drives the node."""

    log = Logger()

    def __init__(self, reactor: Any, node: Node, key: PrivateKey, schedulerKeys: IKeySource) -> None:
        super().__init__()
        self.reactor = reactor
        self.node = node
        self.key = key
        self.schedulerKeys = schedulerKeys
        self.link: _NodeSide | None = None
        self.connections: set[_NodeSide] = set()
        node.subscribe(self)

    def factory(self, url: str = "ws://localhost/") -> WebSocketServerFactory:
        factory = WebSocketServerFactory(url, reactor=self.reactor)
        protocol: type[_NodeSide] = type("NodeSide", (_NodeSide,), {"server": self})
        factory.protocol = protocol
        linkOptions(factory)
        return factory

    def listen(self, endpoint: IStreamServerEndpoint) -> ListeningService:
        service = ListeningService(endpoint, self.factory(), "node link")
        service.setServiceParent(self)
        return service

    def stopService(self) -> Deferred[None]:
        for connection in list(self.connections):
            connection.sendClose(int(CloseCode.SHUTDOWN), "node stopping")
        d: Deferred[None] = Deferred.fromCoroutine(self._stopped())
        return d

    async def _stopped(self) -> None:
        await MultiService.stopService(self)

    def _welcomed(self, link: _NodeSide) -> None:
        old, self.link = self.link, link
        if old is not None:
            old.sendClose(int(CloseCode.REPLACED), "replaced by a newer link")
        self.log.info("scheduler {scheduler} linked", scheduler=link.scheduler)
        link.send(self._report())

    def _report(self) -> dict[str, Any]:
        return {
            "type": "report",
            "instances": [s.toJSON() for s in self.node.instances()],
            "keys": self.node.publicKeys(),
        }

    def _closed(self, link: _NodeSide) -> None:
        if self.link is link:
            self.link = None

    def _command(self, link: _NodeSide, command: Command) -> None:
        node = self.node
        try:
            if command.op == "start":
                d = startFrom(node, command)
            else:
                d = {"stop": node.stop, "save": node.save, "discard": node.discard, "resume": node.resume}[command.op](
                    command.instance
                )
        except NodeFull as e:
            link.send(InstanceStatus(command.instance, State.ERRORED, str(e)).toJSON() | {"type": "state"})
            d = succeed(None)
        if command.op == "start":
            d.addBoth(lambda _: link.send({"type": "ack", "id": command.id}))
        else:
            # Stopping takes a while; it is acknowledged once under way.
            link.send({"type": "ack", "id": command.id})
            d.addErrback(lambda f: self.log.failure("{op} {instance}", f, op=command.op, instance=command.instance))

    def _nodeCommand(self, link: _NodeSide, commandId: str, op: str) -> None:
        """
        Cool the node down or have it take instances again: the node's new
        ``node-state`` goes up the link (``nodeChanged``), then the ack.
        """
        self.node.setAccepting(op == "accept").addBoth(lambda _: link.send({"type": "ack", "id": commandId}))

    def _logs(self, link: _NodeSide, request: LogsRequest) -> None:
        """Answer a question about a tool's output on the link it came on."""
        asking = maybeDeferred(self.node.logs, request.instance, request.offset, request.limit)
        answerTo(request, asking, link.send, shown=(NotHere, RuntimeError_)).addErrback(
            lambda f: self.log.failure("reading the output of {instance}", f, instance=request.instance)
        )

    # -- INodeObserver ---------------------------------------------------------------------------

    def instanceState(self, node: INode, status: InstanceStatus) -> None:
        if self.link is not None:
            self.link.send({"type": "state", **status.toJSON()})

    def instanceKey(self, node: INode, instance: str, jwk: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.send({"type": "instance-key", "instance": instance, "jwk": jwk})

    def nodeChanged(self, node: INode) -> None:
        if self.link is not None:
            self.link.send(nodeStateMessage(self.node.capacity, self.node.accepting))
