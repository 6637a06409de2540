"""
The scheduler's end of the scheduler channel (docs/protocols.md section 7).

A scheduler dials out to the portal over a WebSocket (``ws://`` or
``wss://``), proves who it is by signing the portal's challenge with its
registered key (:mod:`dit4c.channel.handshake`), and then keeps the channel
open: commands come down, instance states and keys go up, in the messages
of :mod:`dit4c.channel.wire`, which the portal's end shares.

:class:`ChannelClient` is the reusable client a scheduler runs: a
``ClientService`` that reconnects with back-off and jitter, sends a full
report after every (re)connect, hands each command to an
:class:`ISchedulerHandler` once (duplicates are acked, not re-run) and
acknowledges it when handled, and queues state changes while the portal is
away. A handler that also provides :class:`INodesHandler` tells the portal
about its compute nodes (``nodes``, after every report and whenever
``sendNodes`` is called) and takes administrators' requests about them
(``node-command``, docs/protocols.md 7.7).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hyperlink import URL
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from dit4c.channel.errors import AuthRefused, NodeAway, ProtocolError
from dit4c.channel.handshake import PORTAL_LINK, Dialler, Phase, Welcome
from dit4c.channel.nodewire import (
    NodeCommand,
    NodeDone,
    NodeSummary,
    nodesMessage,
    parseNodeCommand,
)
from dit4c.channel.questions import answerTo
from dit4c.channel.wire import (
    HANDSHAKE_TIMEOUT,
    MAX_MESSAGE,
    MAX_REASON,
    PATH,
    PING_INTERVAL,
    PING_TIMEOUT,
    SUBPROTOCOL,
    CloseCode,
    Command,
    LogChunk,
    LogsRequest,
    decode,
    encode,
    instanceField,
    linkOptions,
    parseCommand,
    parseLogsRequest,
    parseStatus,
    privateMembers,
)
from dit4c.common.keys import AnyKey, PrivateKey, publicJWK
from dit4c.common.life import State
from dit4c.common.websocket import webSocketEndpoint
from dit4c.listener.service import backoff

__all__ = ["ChannelClient", "INodesHandler", "ISchedulerHandler", "channelURL"]

# -- the scheduler's end -------------------------------------------------------------------


class ISchedulerHandler(Interface):
    """What a scheduler does with the channel: the real scheduler, or a test double."""

    def report() -> Any:
        """
        Every instance this scheduler knows, as an iterable of
        :class:`InstanceStatus` (or a Deferred of one). Called after every
        (re)connect; the portal takes an active instance missing from it
        for lost.
        """

    def command(command: Command) -> Deferred[None]:
        """
        Act on a command; fire when the scheduler has taken it on (not
        necessarily finished: report progress with ``sendState``). The
        command is acknowledged then. Called once per command id, however
        often the portal delivers it.
        """

    def logs(instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """
        Up to ``limit`` bytes of an instance's tool's output from byte
        ``offset`` (None: its last ``limit`` bytes), from the node that holds
        it; a failure's message is shown to the person.
        """


class INodesHandler(Interface):
    """A scheduler that tells the portal about its compute nodes and takes administrators' requests about them."""

    def nodeSummaries() -> list[NodeSummary]:
        """Every compute node it drives, as it is now."""

    def nodeCommand(node: str, op: str) -> Deferred[list[str]]:
        """
        Cool ``node`` down (``cool-down``, ``drain``) or have it take
        instances again (``accept``); fires once the node has, with (for a
        drain) the instances on it for the portal to stop. A
        ``LookupError`` or ``NodeAway`` says, for the administrator, why not.
        """


class _ClientProtocol(WebSocketClientProtocol):
    # Not "log": that name is autobahn's (txaio) logger.
    _log = Logger()
    #: Whether the portal welcomed this channel.
    welcomed = False
    _timer: IDelayedCall | None = None

    @property
    def client(self) -> ChannelClient:
        client: ChannelClient = self.factory.client
        return client

    def onOpen(self) -> None:
        self.handshake = self.client._dialler()
        self._timer = self.client.reactor.callLater(self.client.handshakeTimeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self.fail(CloseCode.HANDSHAKE_TIMEOUT, f"handshake not done within {self.client.handshakeTimeout} s")

    @property
    def closed(self) -> bool:
        return not hasattr(self, "handshake") or self.handshake.phase is Phase.CLOSED

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.closed:
            return
        try:
            self._dispatch(decode(payload, isBinary))
        except ProtocolError as e:
            self.fail(CloseCode.PROTOCOL_ERROR, e.reason)
        except AuthRefused as e:
            self.fail(CloseCode.AUTH_FAILED, e.reason)

    def _dispatch(self, message: dict[str, Any]) -> None:
        step = self.handshake.receive(message)
        if isinstance(step, Welcome):
            self._cancelTimer()
            self.welcomed = True
            self.client._welcomed(self)
        elif step is not None:
            self.sendJSON(step)  # the hello
        elif message["type"] == "command":
            self.client._command(parseCommand(message))
        elif message["type"] == "logs":
            self.client._logs(self, parseLogsRequest(message))
        elif message["type"] == "node-command":
            self.client._nodeCommand(self, parseNodeCommand(message))
        else:
            raise ProtocolError(f"unknown message type {message['type']!r}")

    def sendJSON(self, message: Mapping[str, Any]) -> bool:
        """Send a message if the channel is up; whether it was sent."""
        if self.closed or self.state != self.STATE_OPEN:
            return False
        self.sendMessage(encode(message), isBinary=False)
        return True

    def fail(self, code: CloseCode, reason: str) -> None:
        """Close the channel for ``reason``, logged."""
        if self.closed:
            return
        self._log.warn("closing the channel to the portal: {reason}", reason=reason)
        self.handshake.close()
        self._cancelTimer()
        self.client._lastError = reason
        self.sendClose(int(code), reason)

    def abort(self) -> None:
        if hasattr(self, "handshake"):
            self.handshake.close()
        self._cancelTimer()
        self.dropConnection(abort=True)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if hasattr(self, "handshake"):
            self.handshake.close()
        self._cancelTimer()
        self.client._closed(self, self.welcomed, code, reason)


class _ClientFactory(WebSocketClientFactory):
    client: ChannelClient


def channelURL(url: str) -> str:
    """``url`` with the channel's path if it names none: ``ws://host:8000`` → ``ws://host:8000/.dit4c/channel``."""
    parsed = URL.from_text(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.host:
        raise ValueError(f"the portal's channel URL must be ws:// or wss://, not {url!r}")
    if not [segment for segment in parsed.path if segment]:
        parsed = parsed.replace(path=PATH.strip("/").split("/"))
    return str(parsed.to_text())


class ChannelClient(MultiService):
    """
    A scheduler's channel to the portal, kept open while the service runs.

    ``portal`` is the channel's URL (``wss://portal.example.org/.dit4c/channel``;
    a URL without a path gets :data:`PATH`), or an endpoint to dial, with
    ``url`` then the URL to ask for over it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        portal: str | IStreamClientEndpoint,
        scheduler_id: str,
        private_key: PrivateKey,
        handler: ISchedulerHandler,
        *,
        url: str | None = None,
        issuer: str | None = None,
        trustRoots: str | Path | None = None,
        retryPolicy: Callable[[int], float] | None = None,
        queueLimit: int = 1000,
        seenLimit: int = 4096,
        handshakeTimeout: float = HANDSHAKE_TIMEOUT,
        pingInterval: float = PING_INTERVAL,
        pingTimeout: float = PING_TIMEOUT,
        connectTimeout: float = 30,
    ) -> None:
        """
        :param issuer: the portal's public URL, if known: a challenge naming
            another portal is refused (so no other portal can relay this
            scheduler's proofs). None takes what the challenge says.
        :param trustRoots: a PEM file or a directory of them, trusted for
            ``wss://`` instead of the system's roots.
        :param retryPolicy: seconds to wait before attempt N (default:
            exponential back-off from 0.5 s to 30 s, with jitter).
        :param queueLimit: states and keys kept while the portal is away;
            past it the oldest are dropped (the report after the reconnect
            tells the portal the current states anyway).
        :param seenLimit: command ids remembered to recognise duplicates.
        """
        super().__init__()
        self.reactor = reactor
        self.schedulerId = scheduler_id
        self.handler = handler
        self.issuer = issuer
        self.handshakeTimeout = handshakeTimeout
        self.queueLimit = queueLimit
        self.seenLimit = seenLimit
        self._key = private_key
        if isinstance(portal, str):
            url = channelURL(portal)
            endpoint = webSocketEndpoint(reactor, url, trustRoots=trustRoots, timeout=connectTimeout)
        else:
            url = channelURL(url or f"ws://localhost{PATH}")
            endpoint = portal
        self.url = url
        self._policy = retryPolicy or backoff()
        #: Connections in a row that ended before the welcome (refused, unreachable).
        self._failures = 0
        self._lastError: str | None = None
        self._protocol: _ClientProtocol | None = None
        self._queue: list[dict[str, Any]] = []
        self._dropped = 0
        #: Command id -> its handling (a Deferred) while under way, None once done.
        self._seen: OrderedDict[str, Deferred[None] | None] = OrderedDict()
        self._waiting: list[Deferred[None]] = []
        #: Whether the report after the latest welcome is still being made.
        self._reporting = False
        factory = _ClientFactory(url, protocols=[SUBPROTOCOL], reactor=reactor)
        factory.protocol = _ClientProtocol
        factory.client = self
        linkOptions(factory, handshakeTimeout=handshakeTimeout, pingInterval=pingInterval, pingTimeout=pingTimeout)
        self._service = ClientService(endpoint, factory, retryPolicy=self._retryDelay, clock=reactor)
        self._service.setServiceParent(self)

    # -- state ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the channel is up (welcomed by the portal)."""
        return self._protocol is not None

    @property
    def protocol(self) -> _ClientProtocol | None:
        """The live WebSocket protocol, if the channel is up (for tests and diagnostics)."""
        return self._protocol

    @property
    def lastError(self) -> str | None:
        """Why the last attempt failed or the last channel was closed, if it was not clean."""
        return self._lastError

    def whenConnected(self) -> Deferred[None]:
        """Fires once the channel is up and the report sent (now, if it is)."""
        if self._protocol is not None and not self._reporting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def _retryDelay(self, attempt: int) -> float:
        return self._policy(max(attempt, self._failures))

    # -- sending ---------------------------------------------------------------------------

    def sendState(self, instance: str, state: str, reason: str | None = None, url: str | None = None) -> None:
        """
        Tell the portal an instance's state (queued while the portal is away).

        :raises ValueError: not a state, instance id, reason or URL the
            portal would take.
        """
        message = {"type": "state", "instance": instance, "state": str(state), "reason": reason, "url": url}
        try:
            # Checked as the portal would: it would close the channel for a bad one.
            status = parseStatus(message)
        except ProtocolError as e:
            raise ValueError(e.reason) from None
        self._send({"type": "state", **status.toJSON()})

    def sendInstanceKey(self, instance: str, key: AnyKey | Mapping[str, Any]) -> None:
        """
        Publish an instance's public key through the portal (queued while it
        is away). ``key`` is a key object (only its public half is sent) or
        a public JWK; a JWK with private members is refused here.
        """
        if isinstance(key, Mapping):
            leaked = privateMembers(key)
            if leaked:
                raise ValueError(f"refusing to send private key members {sorted(leaked)}")
            jwk = dict(key)
        else:
            jwk = publicJWK(key)
        try:
            instanceField({"type": "instance-key", "instance": instance})
        except ProtocolError as e:
            raise ValueError(e.reason) from None
        self._send({"type": "instance-key", "instance": instance, "jwk": jwk})

    def sendNodes(self, summaries: list[NodeSummary]) -> None:
        """
        Tell the portal about the compute nodes, if the channel is up. Not
        queued: the report after every welcome is followed by them afresh.
        """
        protocol = self._protocol
        if protocol is not None and not self._reporting:
            protocol.sendJSON(nodesMessage(summaries))

    def _send(self, message: dict[str, Any]) -> None:
        protocol = self._protocol
        if protocol is not None and protocol.sendJSON(message):
            return
        if len(self._queue) >= self.queueLimit:
            self._queue.pop(0)
            self._dropped += 1
            if self._dropped == 1:
                self.log.warn(
                    "the portal is away and {limit} messages wait: dropping the oldest",
                    limit=self.queueLimit,
                )
        self._queue.append(message)

    def dropConnection(self) -> None:
        """Drop the channel at once, as a network failure would; it reconnects."""
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.abort()

    # -- the protocol's events ----------------------------------------------------------

    def _dialler(self) -> Dialler:
        """A new connection's handshake: this scheduler, proving itself to ``issuer`` (or any portal)."""
        return Dialler(PORTAL_LINK, self.schedulerId, self._key, clock=self.reactor, expected=self.issuer)

    def _welcomed(self, protocol: _ClientProtocol) -> None:
        self._failures = 0
        self._lastError = None
        self._protocol = protocol
        self.log.info("channel to the portal open ({url})", url=self.url)
        queued, self._queue = self._queue, []
        if self._dropped:
            self.log.warn("{count} messages were dropped while the portal was away", count=self._dropped)
            self._dropped = 0
        for message in queued:
            protocol.sendJSON(message)
        self._reporting = True
        Deferred.fromCoroutine(self._report(protocol))

    async def _report(self, protocol: _ClientProtocol) -> None:
        try:
            statuses = [status.toJSON() for status in await maybeDeferred(self.handler.report)]
        except Exception:
            self.log.failure("the scheduler could not list its instances; reconnecting to try again")
            if self._protocol is protocol:
                self._reporting = False
                self.dropConnection()
            return
        if self._protocol is not protocol:
            return
        payload = encode({"type": "report", "instances": statuses})
        if len(payload) > MAX_MESSAGE:
            self.log.error(
                "the report of {count} instances is larger than {limit} bytes; the portal would refuse it",
                count=len(statuses),
                limit=MAX_MESSAGE,
            )
        protocol.sendMessage(payload, isBinary=False)
        if INodesHandler.providedBy(self.handler):
            protocol.sendJSON(nodesMessage(self.handler.nodeSummaries()))
        self._reporting = False
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def _closed(self, protocol: _ClientProtocol, welcomed: bool, code: int | None, reason: str | None) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._reporting = False
        if not self.running:
            return  # stopping: this is the channel being closed on purpose
        why = f"{code} {reason}" if reason else f"{code}"
        if welcomed:
            if code not in (1000, None):
                self._lastError = why
            self.log.info("channel to the portal closed ({why})", why=why)
        else:
            self._failures += 1
            if code is not None and code != 1000:
                self._lastError = why
            self.log.warn("could not open the channel to the portal: {why}", why=self._lastError or why)

    def _command(self, command: Command) -> None:
        if command.id in self._seen:
            self._seen.move_to_end(command.id)
            if self._seen[command.id] is None:
                self._ack(command.id)  # handled before: the ack was lost
            return  # still under way: the ack follows when it is done
        d = maybeDeferred(self.handler.command, command)
        if d.called:
            # Handled at once; a Deferred that fired keeps no state worth holding.
            self._remember(command.id, None)
        else:
            self._remember(command.id, d)
        d.addCallbacks(lambda _: self._done(command), lambda f: self._failed(command, f))

    def _logs(self, protocol: _ClientProtocol, request: LogsRequest) -> None:
        """Answer a question about a tool's output on the channel it came on (never queued: it is asked afresh)."""
        asking = maybeDeferred(self.handler.logs, request.instance, request.offset, request.limit)
        answerTo(request, asking, protocol.sendJSON, shown=(LookupError,)).addErrback(
            lambda f: self.log.failure("reading the output of {instance}", f, instance=request.instance)
        )

    def _nodeCommand(self, protocol: _ClientProtocol, command: NodeCommand) -> None:
        """Do what an administrator asked of a node, and answer on the channel it came on (never queued)."""
        if INodesHandler.providedBy(self.handler):
            doing: Deferred[list[str]] = maybeDeferred(self.handler.nodeCommand, command.node, command.op)
        else:
            doing = fail(LookupError("This scheduler does not take requests about its compute nodes."))

        def done(stop: list[str]) -> None:
            protocol.sendJSON(NodeDone(command.id, None, tuple(stop)).toJSON())

        def failed(failure: Failure) -> None:
            told = failure.check(LookupError, NodeAway) is not None
            if not told:
                self.log.failure("{op} of node {node} failed", failure, op=command.op, node=command.node)
            why = failure.getErrorMessage() if told else "The scheduler failed to do this; its log says why."
            protocol.sendJSON(NodeDone(command.id, why[:MAX_REASON]).toJSON())

        doing.addCallbacks(done, failed)

    def _remember(self, commandId: str, handling: Deferred[None] | None) -> None:
        self._seen[commandId] = handling
        while len(self._seen) > self.seenLimit:
            self._seen.popitem(last=False)

    def _done(self, command: Command) -> None:
        if command.id in self._seen:
            self._seen[command.id] = None
        self._ack(command.id)

    def _failed(self, command: Command, failure: Failure) -> None:
        self.log.failure(
            "the scheduler failed to {op} instance {instance} (command {id})",
            failure,
            op=command.op,
            instance=command.instance,
            id=command.id,
        )
        self.sendState(command.instance, State.ERRORED, f"The compute service could not {command.op} this instance.")
        self._done(command)

    def _ack(self, commandId: str) -> None:
        # Not queued: an ack that cannot go now is answered when the portal
        # delivers the command again after the reconnect.
        if self._protocol is not None:
            self._protocol.sendJSON({"type": "ack", "id": commandId})

    # -- the service ---------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.handshake.close()
            protocol.sendClose(1000, "scheduler stopping")
        return maybeDeferred(super().stopService)

