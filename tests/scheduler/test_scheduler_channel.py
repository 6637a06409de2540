"""
The scheduler's end of the channel: the wire format, and ChannelClient
against a scripted portal on a real loopback WebSocket (plain and TLS).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from support.tls import makeCertificate
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dit4c.channel.errors import ProtocolError
from dit4c.channel.handshake import signProof
from dit4c.channel.wire import (
    AUDIENCE,
    OPS,
    PATH,
    SUBPROTOCOL,
    CloseCode,
    Command,
    InstanceStatus,
    LogChunk,
    decode,
    encode,
    parseCommand,
    parseReport,
    parseStatus,
    privateMembers,
)
from dit4c.common.errors import InvalidToken
from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.common.tokens import StaticKeySource, TokenVerifier
from dit4c.portal.store.interfaces import COMMAND_OPS
from dit4c.scheduler.channel import ChannelClient, ISchedulerHandler, channelURL
from dit4c.testing.scheduler import TestingScheduler

PORTAL = "https://portal.example"
SCHEDULER = "sched-1"


# -- the wire format -----------------------------------------------------------------------


def test_ops_match_the_store() -> None:
    assert OPS == COMMAND_OPS


@pytest.mark.parametrize(
    "payload, binary, reason",
    [
        (b"{}", True, "binary message"),
        (b"\xff", False, "malformed JSON"),
        (b"{", False, "malformed JSON"),
        (b'{"type": "x", "n": Infinity}', False, "malformed JSON"),
        (b"[" * 100000, False, "malformed JSON"),
        (b'"text"', False, "not a JSON object"),
        (b'{"type": 3}', False, "without a type"),
    ],
)
def test_decode_refuses(payload: bytes, binary: bool, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        decode(payload, binary)


def test_encode_decode() -> None:
    message = {"type": "state", "instance": "abc", "state": "running", "reason": "é", "url": None}
    assert decode(encode(message), False) == message
    assert encode(message).decode("utf-8").count(" ") == 0


def test_parse_status() -> None:
    assert parseStatus({"instance": "abc", "state": "running", "url": "https://abc.example/x"}) == InstanceStatus(
        "abc", "running", None, "https://abc.example/x"
    )
    for bad, reason in [
        ({"instance": "ABC", "state": "running"}, "not an instance id"),
        ({"instance": "a" * 64, "state": "running"}, "not an instance id"),
        ({"instance": "abc", "state": "paused"}, "state must be one of"),
        ({"instance": "abc", "state": "running", "reason": 5}, "reason must be"),
        ({"instance": "abc", "state": "running", "reason": "x" * 1001}, "longer than 1000"),
        ({"instance": "abc", "state": "running", "url": "file:///etc/passwd"}, "http"),
        ({"instance": "abc", "state": "running", "url": "https://" + "a" * 2050}, "longer than 2048"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            parseStatus(bad)
    with pytest.raises(ProtocolError, match="must be a JSON object"):
        parseReport({"type": "report", "instances": ["abc"]})
    assert parseReport({"type": "report", "instances": []}) == []


def test_parse_command() -> None:
    message = {"type": "command", "id": "c1", "op": "start", "instance": "abc", "params": {"image": "x"}}
    command = parseCommand(message)
    assert command == Command("c1", "start", "abc", {"image": "x"})
    assert command.toJSON() == message
    assert parseCommand({"type": "command", "id": "c1", "op": "stop", "instance": "abc"}).params == {}
    for bad, reason in [
        ({"id": "c1", "op": "explode", "instance": "abc"}, "op must be one of"),
        ({"id": "", "op": "stop", "instance": "abc"}, "id must be"),
        ({"id": "c1", "op": "stop", "instance": "abc", "params": []}, "params must be"),
    ]:
        with pytest.raises(ProtocolError, match=reason):
            parseCommand({"type": "command", **bad})


def test_private_members() -> None:
    key = generatePrivateKey()
    assert privateMembers(publicJWK(key)) == set()
    assert privateMembers({**publicJWK(key), "d": "x"}) == {"d"}
    assert privateMembers({"kty": "oct", "k": "secret"}) == {"k"}


def test_channel_url() -> None:
    assert channelURL("ws://portal:8000") == f"ws://portal:8000{PATH}"
    assert channelURL("wss://portal.example/") == f"wss://portal.example{PATH}"
    assert channelURL("wss://portal.example/x/channel") == "wss://portal.example/x/channel"
    with pytest.raises(ValueError, match="ws:// or wss://"):
        channelURL("https://portal.example/")


@pytest_twisted.ensureDeferred
async def test_sign_proof() -> None:
    key = generatePrivateKey()
    clock = Clock()
    clock.advance(1_700_000_000)
    proof = signProof(key, SCHEDULER, "n0nce", PORTAL, clock=clock)
    verifier = TokenVerifier(StaticKeySource.fromKeys(key), audience=AUDIENCE, clock=clock)
    claims = await verifier.verify(proof)
    assert claims["sub"] == SCHEDULER and claims["nonce"] == "n0nce" and claims["portal"] == PORTAL
    assert claims["exp"] - claims["iat"] == 60
    with pytest.raises(InvalidToken):
        await TokenVerifier(StaticKeySource.fromKeys(generatePrivateKey()), audience=AUDIENCE).verify(proof)


# -- a scripted portal -------------------------------------------------------------------------


class _FakeProtocol(WebSocketServerProtocol):
    def onConnect(self, request: Any) -> str:
        assert request.path == PATH
        assert SUBPROTOCOL in request.protocols
        return SUBPROTOCOL

    def onOpen(self) -> None:
        portal: FakePortal = self.factory.portal
        portal.connections.append(self)
        self.nonce = f"nonce-{len(portal.connections)}"
        if portal.challenge:
            self.sendJSON({"type": "challenge", "nonce": self.nonce, "portal": portal.issuer})

    def sendJSON(self, message: Any) -> None:
        self.sendMessage(encode(message) if not isinstance(message, bytes) else message, isBinary=False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        portal: FakePortal = self.factory.portal
        message = decode(payload, isBinary)
        portal._received(self, message)
        if message["type"] == "hello" and portal.welcome:
            portal._hello(self, message)

    def roundTrip(self) -> Deferred[None]:
        """
        A ping answered: the scheduler has handled every message sent before
        it (it reads them in order and handles each as it comes).
        """
        self._pong: Deferred[None] = Deferred()
        self.sendPing(b"round trip")
        return self._pong.addTimeout(5, reactor)

    def onPong(self, payload: bytes) -> None:
        if payload == b"round trip":
            self._pong.callback(None)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        portal: FakePortal = self.factory.portal
        portal.closes.append((self, code, reason))
        for d in portal._closeWaiters:
            d.callback((code, reason))
        portal._closeWaiters.clear()


class FakePortal:
    """A portal that says what the test tells it to and records everything."""

    def __init__(self, key: Any, issuer: str = PORTAL) -> None:
        self.key = key
        self.issuer = issuer
        self.challenge = True
        self.welcome = True
        self.connections: list[_FakeProtocol] = []
        self.received: list[tuple[_FakeProtocol, dict[str, Any]]] = []
        self.closes: list[tuple[_FakeProtocol, int | None, str | None]] = []
        self.claims: list[dict[str, Any]] = []
        self._waiters: list[tuple[str, Deferred[dict[str, Any]]]] = []
        self._closeWaiters: list[Deferred[Any]] = []
        self.factory = WebSocketServerFactory(reactor=reactor)
        self.factory.protocol = _FakeProtocol
        self.factory.portal = self
        self.factory.setProtocolOptions(failByDrop=False)

    @property
    def live(self) -> _FakeProtocol:
        return self.connections[-1]

    def _received(self, protocol: _FakeProtocol, message: dict[str, Any]) -> None:
        self.received.append((protocol, message))
        for waiter in list(self._waiters):
            if waiter[0] == message["type"]:
                self._waiters.remove(waiter)
                waiter[1].callback(message)
                break

    def _hello(self, protocol: _FakeProtocol, message: dict[str, Any]) -> None:
        verifier = TokenVerifier(StaticKeySource.fromKeys(self.key), audience=AUDIENCE)

        def ok(claims: dict[str, Any]) -> None:
            assert claims["nonce"] == protocol.nonce and claims["sub"] == message["scheduler"]
            self.claims.append(claims)
            protocol.sendJSON({"type": "welcome", "scheduler": message["scheduler"], "ping": 10, "timeout": 30})

        verifier.verify(message["proof"]).addCallback(ok)

    def next(self, kind: str) -> Deferred[dict[str, Any]]:
        """The next message of this type to arrive."""
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append((kind, d))
        return d.addTimeout(5, reactor)

    def closed(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._closeWaiters.append(d)
        return d.addTimeout(5, reactor)

    def types(self, protocol: _FakeProtocol | None = None) -> list[str]:
        return [m["type"] for p, m in self.received if protocol is None or p is protocol]


@implementer(ISchedulerHandler)
class Handler:
    def __init__(self) -> None:
        self.statuses: list[InstanceStatus] = []
        self.commands: list[Command] = []
        self.results: dict[str, Deferred[None]] = {}
        self.fail = False

    def report(self) -> list[InstanceStatus]:
        return list(self.statuses)

    def command(self, command: Command) -> Deferred[None]:
        self.commands.append(command)
        if self.fail:
            raise RuntimeError("no such image")
        return self.results.get(command.id) or succeed(None)

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        if instance == "gone":
            raise LookupError("No compute node of this scheduler holds instance gone.")
        if instance == "broken":
            raise OSError("/var/lib/secret/path: permission denied")
        return succeed(LogChunk.fromBytes(offset or 0, b"output of " + instance.encode()))


@pytest.fixture
def logged() -> Iterator[list[str]]:
    messages: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        messages.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield messages
    globalLogPublisher.removeObserver(observer)


def fast(attempt: int) -> float:
    return 0.02


class Setup:
    def __init__(self, portal: FakePortal, url: str, key: Any) -> None:
        self.portal = portal
        self.url = url
        self.key = key
        self.clients: list[ChannelClient] = []

    def client(self, handler: Any, **kw: Any) -> ChannelClient:
        kw.setdefault("retryPolicy", fast)
        client = ChannelClient(reactor, self.url, SCHEDULER, self.key, handler, **kw)
        self.clients.append(client)
        return client


async def _listen(portal: FakePortal, description: str) -> Any:
    return await serverFromString(reactor, description).listen(portal.factory)


@pytest_twisted.async_yield_fixture
async def setup() -> Any:
    key = generatePrivateKey()
    portal = FakePortal(key)
    port = await _listen(portal, "tcp:0:interface=127.0.0.1")
    s = Setup(portal, f"ws://127.0.0.1:{port.getHost().port}", key)
    try:
        yield s
    finally:
        for client in s.clients:
            if client.running:
                await client.stopService()
        await port.stopListening()
        for protocol in portal.connections:
            protocol.dropConnection(abort=True)


# -- ChannelClient -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_handshake_and_report(setup: Setup) -> None:
    handler = Handler()
    handler.statuses = [InstanceStatus("abc", "running", None, "https://abc.example/"), InstanceStatus("def", "stopped")]
    client = setup.client(handler, issuer=PORTAL)
    assert verifyObject(ISchedulerHandler, handler)
    assert not client.connected
    client.startService()
    report = await setup.portal.next("report")
    assert report["instances"] == [s.toJSON() for s in handler.statuses]
    await client.whenConnected()
    assert client.connected and client.lastError is None
    [claims] = setup.portal.claims
    assert (claims["sub"], claims["portal"], claims["aud"]) == (SCHEDULER, PORTAL, AUDIENCE)
    assert claims["exp"] - claims["iat"] <= 60
    assert setup.portal.types() == ["hello", "report"]


@pytest_twisted.ensureDeferred
async def test_states_wait_for_the_portal(setup: Setup, logged: list[str]) -> None:
    handler = Handler()
    client = setup.client(handler, queueLimit=3)
    key = generatePrivateKey()
    for state in ("requested", "starting", "running"):
        client.sendState("abc", state)
    client.sendInstanceKey("abc", key)
    client.startService()
    await client.whenConnected()
    await setup.portal.next("report") if "report" not in setup.portal.types() else None
    received = [m for _, m in setup.portal.received]
    # The oldest was dropped (the limit is 3); what waited goes before the report.
    assert [m["type"] for m in received] == ["hello", "state", "state", "instance-key", "report"]
    assert [m["state"] for m in received if m["type"] == "state"] == ["starting", "running"]
    assert received[3]["jwk"] == publicJWK(key)
    assert any("dropping the oldest" in line for line in logged)
    assert any("1 messages were dropped" in line for line in logged)
    # Once up, a state goes at once.
    client.sendState("abc", "stopping", reason="asked to")
    state = await setup.portal.next("state")
    assert (state["state"], state["reason"]) == ("stopping", "asked to")


def test_sending_refuses_bad_input() -> None:
    client = ChannelClient(reactor, "ws://127.0.0.1:9/", SCHEDULER, generatePrivateKey(), Handler())
    with pytest.raises(ValueError, match="state must be one of"):
        client.sendState("abc", "paused")
    with pytest.raises(ValueError, match="not an instance id"):
        client.sendState("../etc", "running")
    key = generatePrivateKey()
    with pytest.raises(ValueError, match=r"private key members \['d'\]"):
        client.sendInstanceKey("abc", {**publicJWK(key), "d": "secret"})
    with pytest.raises(ValueError, match="not an instance id"):
        client.sendInstanceKey("A B", key)
    client.sendInstanceKey("abc", key)  # a private key object: only its public half goes
    [message] = client._queue
    assert message["jwk"] == publicJWK(key) and "d" not in message["jwk"]


@pytest_twisted.ensureDeferred
async def test_commands_handled_once_and_acked(setup: Setup) -> None:
    handler = Handler()
    client = setup.client(handler)
    client.startService()
    await client.whenConnected()
    command = {"type": "command", "id": "c1", "op": "start", "instance": "abc", "params": {"image": "x"}}
    slow: Deferred[None] = Deferred()
    handler.results["c1"] = slow
    setup.portal.live.sendJSON(command)
    setup.portal.live.sendJSON(command)  # delivered again while under way
    await setup.portal.live.roundTrip()
    assert [c.id for c in handler.commands] == ["c1"]
    assert "ack" not in setup.portal.types()
    slow.callback(None)
    ack = await setup.portal.next("ack")
    assert ack == {"type": "ack", "id": "c1"}
    # Delivered again after it was handled (the ack was lost): acked, not redone.
    setup.portal.live.sendJSON(command)
    await setup.portal.next("ack")
    assert [c.id for c in handler.commands] == ["c1"]
    assert setup.portal.types().count("ack") == 2


@pytest_twisted.ensureDeferred
async def test_seen_commands_are_bounded(setup: Setup) -> None:
    handler = Handler()
    client = setup.client(handler, seenLimit=2)
    client.startService()
    await client.whenConnected()
    for n in range(3):
        setup.portal.live.sendJSON({"type": "command", "id": f"c{n}", "op": "stop", "instance": "abc"})
        await setup.portal.next("ack")
    assert list(client._seen) == ["c1", "c2"]


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_failed_command_errors_the_instance_and_is_acked(setup: Setup) -> None:
    handler = Handler()
    handler.fail = True
    client = setup.client(handler)
    client.startService()
    await client.whenConnected()
    setup.portal.live.sendJSON({"type": "command", "id": "c1", "op": "start", "instance": "abc"})
    state = await setup.portal.next("state")
    assert (state["instance"], state["state"]) == ("abc", "errored")
    assert "could not start" in state["reason"] and "no such image" not in state["reason"]
    assert await setup.portal.next("ack") == {"type": "ack", "id": "c1"}


@pytest_twisted.ensureDeferred
async def test_reconnects_and_reports_again(setup: Setup, logged: list[str]) -> None:
    handler = Handler()
    client = setup.client(handler)
    client.startService()
    await client.whenConnected()
    first = setup.portal.live
    handler.statuses = [InstanceStatus("abc", "running")]
    first.dropConnection(abort=True)
    report = await setup.portal.next("report")
    assert setup.portal.live is not first
    assert report["instances"] == [InstanceStatus("abc", "running").toJSON()]
    assert len(setup.portal.claims) == 2  # a fresh proof for the fresh challenge
    assert setup.portal.claims[0]["nonce"] != setup.portal.claims[1]["nonce"]


@pytest_twisted.ensureDeferred
async def test_protocol_error_from_the_portal(setup: Setup, logged: list[str]) -> None:
    client = setup.client(Handler())
    client.startService()
    await client.whenConnected()
    closed = setup.portal.closed()
    setup.portal.live.sendJSON({"type": "explode"})
    code, reason = await closed
    assert code == CloseCode.PROTOCOL_ERROR and "unknown message type 'explode'" in (reason or "")
    assert any("closing the channel to the portal: unknown message type" in line for line in logged)
    await setup.portal.next("report")  # and it comes back
    await client.whenConnected()


@pytest_twisted.ensureDeferred
async def test_challenge_for_another_portal_refused(setup: Setup) -> None:
    # No second attempt while the test looks: the first refusal is counted once.
    client = setup.client(Handler(), issuer="https://the-real-portal.example", retryPolicy=lambda n: 60.0)
    closed = setup.portal.closed()
    client.startService()
    code, reason = await closed
    assert code == CloseCode.AUTH_FAILED and "the-real-portal" in (reason or "")
    assert "hello" not in setup.portal.types()
    assert client.lastError is not None and "the portal says it is" in client.lastError
    # The client hears its close acknowledged a moment later.
    await eventually(lambda: client._failures)
    assert client._failures == 1


@pytest_twisted.ensureDeferred
async def test_handshake_timeout(setup: Setup) -> None:
    setup.portal.challenge = False
    client = setup.client(Handler(), handshakeTimeout=0.2)
    closed = setup.portal.closed()  # within 5 s: not the default 10 s
    client.startService()
    code, reason = await closed
    assert code == CloseCode.HANDSHAKE_TIMEOUT
    assert reason == "handshake not done within 0.2 s"  # the timeout it was given


def test_retry_delay_counts_refusals() -> None:
    client = ChannelClient(
        reactor, "ws://127.0.0.1:9/", SCHEDULER, generatePrivateKey(), Handler(), retryPolicy=lambda n: float(n)
    )
    assert client._retryDelay(2) == 2.0
    client._failures = 5  # five refusals in a row: wait as long as after five failed attempts
    assert client._retryDelay(0) == 5.0


@pytest_twisted.ensureDeferred
async def test_stop_closes_the_channel(setup: Setup) -> None:
    client = setup.client(Handler())
    client.startService()
    await client.whenConnected()
    closed = setup.portal.closed()
    await client.stopService()
    code, reason = await closed
    assert (code, reason) == (1000, "scheduler stopping")
    assert not client.connected


@pytest_twisted.ensureDeferred
async def test_wss_checks_the_portal_certificate(tmp_path: Path) -> None:
    key = generatePrivateKey()
    portal = FakePortal(key)
    keyPath, certPath = makeCertificate(tmp_path / "ca", "localhost")
    port = await _listen(portal, f"ssl:0:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}")
    url = f"wss://localhost:{port.getHost().port}"
    otherKey, otherCert = makeCertificate(tmp_path / "other-ca", "localhost")
    clients: list[ChannelClient] = []
    try:
        good = ChannelClient(reactor, url, SCHEDULER, key, Handler(), trustRoots=tmp_path / "ca", retryPolicy=fast)
        clients.append(good)
        good.startService()
        await good.whenConnected().addTimeout(5, reactor)
        # Trusting another CA, the same server is refused.
        bad = ChannelClient(
            reactor, url, SCHEDULER, key, Handler(), trustRoots=tmp_path / "other-ca", retryPolicy=lambda n: 0.1
        )
        clients.append(bad)
        bad.startService()
        # Refused, and refused again when it dials anew.
        await eventually(lambda: bad._failures >= 2, what=lambda: f"two refusals ({bad.lastError})")
        assert not bad.connected
        assert len(portal.claims) == 1
    finally:
        for client in clients:
            await client.stopService()
        await port.stopListening()
        for protocol in portal.connections:
            protocol.dropConnection(abort=True)


def test_testing_scheduler_is_a_handler() -> None:
    assert verifyObject(ISchedulerHandler, TestingScheduler(reactor))


def test_report_is_json() -> None:
    statuses = [InstanceStatus("abc", "errored", "it broke")]
    assert json.loads(encode({"type": "report", "instances": [s.toJSON() for s in statuses]}))["instances"] == [
        {"instance": "abc", "state": "errored", "reason": "it broke", "url": None}
    ]


@pytest.mark.allow_logged_errors
@pytest_twisted.ensureDeferred
async def test_a_question_about_a_tools_output_is_answered_on_the_channel(setup: Setup, logged: list[str]) -> None:
    """
    The portal asks; the scheduler answers with the node's piece, or with
    why not: its own words for an instance it does not hold, plain ones for
    a fault (whose message may name paths of this machine), which is logged.
    """
    client = setup.client(Handler())
    client.startService()
    await client.whenConnected()
    for question, (text, error) in [
        ("abc", ("output of abc", None)),
        ("gone", ("", "No compute node of this scheduler holds instance gone.")),
        ("broken", ("", "The tool's output could not be read.")),
    ]:
        setup.portal.live.sendJSON({"type": "logs", "id": "q-" + question, "instance": question, "offset": 5, "limit": 100})
        answer = await setup.portal.next("logs-chunk")
        assert (answer["id"], answer["text"], answer["error"]) == ("q-" + question, text, error)
    assert any("reading the output of broken" in line for line in logged)
    answers = [m for _, m in setup.portal.received if m["type"] == "logs-chunk"]
    assert not any("secret/path" in (m["error"] or "") for m in answers)
    # A malformed question closes the channel as any malformed message does.
    setup.portal.live.sendJSON({"type": "logs", "id": "q", "instance": "abc", "offset": -1, "limit": 100})
    await setup.portal.closed()
