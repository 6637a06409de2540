"""
The scheduler channel: the scheduler's end, and the wire format both ends share.

A scheduler dials out to the portal over a WebSocket (``ws://`` or
``wss://``), proves who it is by signing the portal's challenge with its
registered key, and then keeps the channel open: commands come down, instance
states and keys go up (docs/protocols.md, "The scheduler channel").

The first half of this module is the wire format (message names, limits,
close codes, parsing and validation); the portal's end
(:mod:`dit4c.portal.channel`) imports it from here, so the two ends cannot
disagree. The second half is :class:`ChannelClient`, the reusable client a
scheduler runs: a ``ClientService`` that reconnects with back-off and jitter,
answers the challenge, sends a full report after every (re)connect, hands
each command to an :class:`ISchedulerHandler` once (duplicates are acked,
not re-run) and acknowledges it when handled, and queues state changes
while the portal is away.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from hyperlink import URL
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from dit4c.common.keys import AnyKey, PrivateKey, public_jwk
from dit4c.common.tokens import INSTANCE_ID_RE, TokenSigner
from dit4c.listener.service import backoff

__all__ = [
    "AUDIENCE",
    "MAX_MESSAGE",
    "OPS",
    "PATH",
    "STATES",
    "SUBPROTOCOL",
    "ChannelClient",
    "CloseCode",
    "Command",
    "ISchedulerHandler",
    "InstanceStatus",
    "ProtocolError",
    "channelEndpoint",
    "channelURL",
    "decode",
    "encode",
    "instanceField",
    "parseCommand",
    "parseReport",
    "parseStatus",
    "privateMembers",
    "signProof",
    "text",
]

# -- the wire format (both ends) -----------------------------------------------------------

#: The WebSocket subprotocol both ends name; the portal refuses a client without it.
SUBPROTOCOL = "dit4c-channel.1"
#: Where the portal serves the channel.
PATH = "/.dit4c/channel"
#: The ``aud`` of a scheduler's proof.
AUDIENCE = "dit4c-portal-channel"
#: The largest message either end accepts (bytes); a larger one closes the channel (1009).
MAX_MESSAGE = 1024 * 1024
#: Seconds from the WebSocket opening to the end of the handshake (``welcome``).
HANDSHAKE_TIMEOUT = 10.0
#: Seconds between WebSocket pings, and without a pong before the peer is taken for dead.
PING_INTERVAL = 10.0
PING_TIMEOUT = 30.0
#: The longest a proof may live (``exp - iat``), in seconds.
PROOF_LIFETIME = 60
#: Every instance state (DESIGN.md, "Instance life"); the same as the portal store's.
STATES: tuple[str, ...] = (
    "requested", "starting", "running", "stopping", "saving", "uploading",
    "saved", "stopped", "discarded", "errored",
)  # fmt: skip
#: What a scheduler can be told to do.
OPS: tuple[str, ...] = ("start", "stop", "save", "discard")
#: JWK members that only a private key has (RFC 7518 section 6): never on the channel.
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

MAX_ID = 128
MAX_REASON = 1000
MAX_URL = 2048
MAX_NONCE = 256


class CloseCode(IntEnum):
    """WebSocket close codes (private range) the channel uses, beside 1000 and 1009."""

    #: Malformed JSON, an unknown type, a field of the wrong kind, a message out of turn.
    PROTOCOL_ERROR = 4000
    #: The scheduler's proof (or the scheduler itself) was refused.
    AUTH_FAILED = 4001
    #: The handshake did not finish within ``HANDSHAKE_TIMEOUT``.
    HANDSHAKE_TIMEOUT = 4002
    #: A newer channel of the same scheduler took over.
    REPLACED = 4003
    #: The portal is stopping.
    SHUTDOWN = 4004
    #: A bug, or the portal's database failed: reconnect later.
    INTERNAL_ERROR = 4005


class ProtocolError(Exception):
    """The peer broke the channel's protocol: the channel closes (``PROTOCOL_ERROR``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)

    @property
    def reason(self) -> str:
        return str(self.args[0])


def encode(message: Mapping[str, Any]) -> bytes:
    """A message as the UTF-8 JSON text of one WebSocket text frame."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _noConstant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(payload: bytes, isBinary: bool) -> dict[str, Any]:
    """
    A received message: a JSON object with a string ``type``.

    :raises ProtocolError: anything else.
    """
    if isBinary:
        raise ProtocolError("binary message (the channel speaks JSON text)")
    try:
        message = json.loads(payload.decode("utf-8"), parse_constant=_noConstant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError("malformed JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("message is not a JSON object")
    if not isinstance(message.get("type"), str):
        raise ProtocolError("message without a type")
    return message


def text(message: Mapping[str, Any], name: str, *, limit: int = MAX_ID, optional: bool = False) -> Any:
    """The string field ``name`` (None if ``optional`` and absent or null)."""
    value = message.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{message.get('type')}: {name} must be a non-empty string")
    if len(value) > limit:
        raise ProtocolError(f"{message.get('type')}: {name} longer than {limit} characters")
    return value


def instanceField(message: Mapping[str, Any], name: str = "instance") -> str:
    """An instance id field: one DNS label."""
    value = message.get(name)
    if not isinstance(value, str) or INSTANCE_ID_RE.fullmatch(value) is None:
        raise ProtocolError(f"{message.get('type')}: {name} is not an instance id")
    return value


def _url(message: Mapping[str, Any]) -> str | None:
    value = text(message, "url", limit=MAX_URL, optional=True)
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ProtocolError(f"{message.get('type')}: url must be an http(s) URL")
    return str(value)


@dataclass(frozen=True)
class InstanceStatus:
    """What a scheduler says about one instance: its state, why, and where to reach it."""

    instance: str
    #: One of ``STATES``.
    state: str
    #: Shown to the user: why it is in this state (chiefly for ``errored``).
    reason: str | None = None
    #: The tool's URL, once it works.
    url: str | None = None

    def toJSON(self) -> dict[str, Any]:
        return {"instance": self.instance, "state": self.state, "reason": self.reason, "url": self.url}


def parseStatus(message: Mapping[str, Any]) -> InstanceStatus:
    """A ``state`` message, or one entry of a ``report``."""
    if not isinstance(message, Mapping):
        raise ProtocolError("report: each instance must be a JSON object")
    state = message.get("state")
    if state not in STATES:
        raise ProtocolError(f"{message.get('type', 'report')}: state must be one of {', '.join(STATES)}")
    return InstanceStatus(
        instance=instanceField(message),
        state=state,
        reason=text(message, "reason", limit=MAX_REASON, optional=True),
        url=_url(message),
    )


def parseReport(message: Mapping[str, Any]) -> list[InstanceStatus]:
    """The instances of a ``report`` message."""
    instances = message.get("instances")
    if not isinstance(instances, list):
        raise ProtocolError("report: instances must be a list")
    return [parseStatus(each) for each in instances]


@dataclass(frozen=True)
class Command:
    """An instruction from the portal about one instance."""

    #: Unique; a command can arrive more than once (after a reconnect), with the same id.
    id: str
    #: One of ``OPS``.
    op: str
    instance: str
    #: For ``start``: ``image`` (reference), ``port`` (or null), ``digest`` (or null).
    params: Mapping[str, Any] = field(default_factory=dict)

    def toJSON(self) -> dict[str, Any]:
        return {"type": "command", "id": self.id, "op": self.op, "instance": self.instance, "params": dict(self.params)}


def parseCommand(message: Mapping[str, Any]) -> Command:
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"command: op must be one of {', '.join(OPS)}")
    params = message.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError("command: params must be a JSON object")
    return Command(text(message, "id"), op, instanceField(message), params)


def privateMembers(jwk: Mapping[str, Any]) -> set[str]:
    """The private-key members a JWK carries (it must carry none to cross the channel)."""
    return {name for name in jwk if name in PRIVATE_JWK_MEMBERS}


def signProof(
    key: PrivateKey,
    scheduler_id: str,
    nonce: str,
    portal: str,
    *,
    clock: IReactorTime | None = None,
    lifetime: float = PROOF_LIFETIME,
    audience: str = AUDIENCE,
) -> str:
    """
    The ``proof`` of a ``hello``: a JWT signed with the scheduler's key, for
    the portal's channel (``aud``), naming the scheduler (``sub``), the
    portal (``portal``) and answering one challenge (``nonce``).
    """
    signer = TokenSigner(key, clock=clock)
    claims = {"sub": scheduler_id, "nonce": nonce, "portal": portal}
    return signer.sign(claims, audience=audience, lifetime=lifetime)


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


class _Phase(Enum):
    CHALLENGE = "waiting for the challenge"
    WELCOME = "waiting for the welcome"
    OPEN = "open"
    CLOSED = "closed"


class _ClientProtocol(WebSocketClientProtocol):
    # Not "log": that name is autobahn's (txaio) logger.
    _log = Logger()
    phase = _Phase.CHALLENGE
    #: Whether the portal welcomed this channel.
    welcomed = False
    _timer: IDelayedCall | None = None

    @property
    def client(self) -> ChannelClient:
        client: ChannelClient = self.factory.client
        return client

    def onOpen(self) -> None:
        self._timer = self.client.reactor.callLater(self.client.handshakeTimeout, self._timedOut)

    def _timedOut(self) -> None:
        self._timer = None
        self.fail(CloseCode.HANDSHAKE_TIMEOUT, f"handshake not done within {self.client.handshakeTimeout} s")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if self.phase is _Phase.CLOSED:
            return
        try:
            self._dispatch(decode(payload, isBinary))
        except ProtocolError as e:
            self.fail(CloseCode.PROTOCOL_ERROR, e.reason)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if self.phase is _Phase.CHALLENGE:
            if kind != "challenge":
                raise ProtocolError(f"expected a challenge, not {kind!r}")
            nonce = text(message, "nonce", limit=MAX_NONCE)
            portal = text(message, "portal", limit=MAX_URL)
            self.phase = _Phase.WELCOME
            self.client._answer(self, nonce, portal)
        elif self.phase is _Phase.WELCOME:
            if kind != "welcome":
                raise ProtocolError(f"expected a welcome, not {kind!r}")
            self._cancelTimer()
            self.phase = _Phase.OPEN
            self.welcomed = True
            self.client._welcomed(self)
        elif kind == "command":
            self.client._command(parseCommand(message))
        else:
            raise ProtocolError(f"unknown message type {kind!r}")

    def sendJSON(self, message: Mapping[str, Any]) -> bool:
        """Send a message if the channel is up; whether it was sent."""
        if self.phase is _Phase.CLOSED or self.state != self.STATE_OPEN:
            return False
        self.sendMessage(encode(message), isBinary=False)
        return True

    def fail(self, code: CloseCode, reason: str) -> None:
        """Close the channel for ``reason``, logged."""
        if self.phase is _Phase.CLOSED:
            return
        self._log.warn("closing the channel to the portal: {reason}", reason=reason)
        self.phase = _Phase.CLOSED
        self._cancelTimer()
        self.client._lastError = reason
        self.sendClose(int(code), reason)

    def abort(self) -> None:
        self.phase = _Phase.CLOSED
        self._cancelTimer()
        self.dropConnection(abort=True)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.phase = _Phase.CLOSED
        self._cancelTimer()
        self.client._closed(self, self.welcomed, code, reason)


class _ClientFactory(WebSocketClientFactory):
    client: ChannelClient


def _trustRoot(path: str | Path | None) -> Any:
    if not path:
        return None
    p = Path(path)
    files = sorted(p.glob("*.pem")) + sorted(p.glob("*.crt")) if p.is_dir() else [p]
    return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read_bytes()) for f in files])


def channelURL(url: str) -> str:
    """``url`` with the channel's path if it names none: ``ws://host:8000`` → ``ws://host:8000/.dit4c/channel``."""
    parsed = URL.from_text(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.host:
        raise ValueError(f"the portal's channel URL must be ws:// or wss://, not {url!r}")
    if not [segment for segment in parsed.path if segment]:
        parsed = parsed.replace(path=PATH.strip("/").split("/"))
    return str(parsed.to_text())


def channelEndpoint(
    reactor: Any, url: str, *, trustRoots: str | Path | None = None, timeout: float = 30
) -> IStreamClientEndpoint:
    """The endpoint that reaches a ``ws://`` or ``wss://`` URL (TLS checking the host name)."""
    parsed = URL.from_text(url)
    secure = parsed.scheme == "wss"
    port = parsed.port or (443 if secure else 80)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, parsed.host, port, timeout=timeout)
    if secure:
        options = ssl.optionsForClientTLS(parsed.host, trustRoot=_trustRoot(trustRoots))
        endpoint = wrapClientTLS(options, endpoint)
    return endpoint


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
            endpoint = channelEndpoint(reactor, url, trustRoots=trustRoots, timeout=connectTimeout)
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
        factory.noisy = False
        factory.setProtocolOptions(
            maxFramePayloadSize=MAX_MESSAGE,
            maxMessagePayloadSize=MAX_MESSAGE,
            # autobahn's timers round down to whole seconds: give its bound on the
            # HTTP upgrade a second more (the channel's own timer is exact).
            openHandshakeTimeout=handshakeTimeout + 1,
            closeHandshakeTimeout=5,
            # A violation (a message too big, 1009) is answered with a close frame saying so.
            failByDrop=False,
            autoPingInterval=pingInterval,
            autoPingTimeout=pingTimeout,
        )
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
        status = InstanceStatus(instance, state, reason, url)
        try:
            parseStatus({"type": "state", **status.toJSON()})  # the portal would close the channel for a bad one
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
            jwk = public_jwk(key)
        try:
            instanceField({"type": "instance-key", "instance": instance})
        except ProtocolError as e:
            raise ValueError(e.reason) from None
        self._send({"type": "instance-key", "instance": instance, "jwk": jwk})

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

    def _answer(self, protocol: _ClientProtocol, nonce: str, portal: str) -> None:
        if self.issuer is not None and portal != self.issuer:
            protocol.fail(CloseCode.AUTH_FAILED, f"the challenge names portal {portal!r}, not {self.issuer!r}")
            return
        proof = signProof(self._key, self.schedulerId, nonce, portal, clock=self.reactor)
        protocol.sendMessage(encode({"type": "hello", "scheduler": self.schedulerId, "proof": proof}), isBinary=False)

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
        self.sendState(command.instance, "errored", f"The compute service could not {command.op} this instance.")
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
            protocol.phase = _Phase.CLOSED
            protocol.sendClose(1000, "scheduler stopping")
        return maybeDeferred(super().stopService)

