"""
The routing server and listener together, in this process, on real loopback
sockets: what a browser and a tool see through a tunnel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
import treq
from support.backend import patternDigest
from support.routing import startRouting, stopRouting
from support.sockets import RawClient, rawRequest, refusedPort
from support.waiting import eventually
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher

from dit4c.listener.report import routingToken
from dit4c.listener.service import ListenerService, backoff
from dit4c.routing.front import FrontLimits
from dit4c.tunnel.errors import ErrorCode, HandshakeRefused


async def get(routing: Any, host: str, path: str, **kw: Any) -> Any:
    headers = dict(kw.pop("headers", {}), Host=host)
    return await treq.get(f"http://127.0.0.1:{routing.httpPort}{path}", headers=headers, **kw)


@pytest_twisted.ensureDeferred
async def test_get_and_post_through_the_tunnel(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("abc1"), backend.endpoint)
    response = await get(routing, "abc1.localhost", "/bytes?n=1000000")
    assert response.code == 200
    body = await response.content()
    assert hashlib.sha256(body).hexdigest() == patternDigest(1000000)

    payload = bytes(range(256)) * 20000
    response = await treq.post(
        f"http://127.0.0.1:{routing.httpPort}/sink", data=payload, headers={"Host": "abc1.localhost"}
    )
    assert await response.json() == {"length": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


@pytest_twisted.ensureDeferred
async def test_forwarding_headers_are_set_and_client_copies_dropped(
    routing: Any, signing: Any, backend: Any
) -> None:
    await routing.listen(signing.token("fwd"), backend.endpoint)
    response = await get(
        routing,
        "fwd.localhost",
        "/headers",
        headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Forwarded-Host": "evil"},
    )
    seen = (await response.json())["headers"]
    lower = {k.lower(): v for k, v in seen.items()}
    assert lower["x-forwarded-for"] == ["127.0.0.1"]
    assert lower["x-forwarded-proto"] == ["http"]
    assert lower["x-forwarded-host"] == ["fwd.localhost"]
    assert "forwarded" not in lower


@pytest_twisted.ensureDeferred
async def test_chunked_body_is_reframed_and_pipelining_works(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("chunky"), backend.endpoint)
    body = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    request = (
        b"POST /sink HTTP/1.1\r\nHost: chunky.localhost\r\nTransfer-Encoding: chunked\r\n\r\n" + body
        + b"GET /headers HTTP/1.1\r\nHost: chunky.localhost\r\nConnection: close\r\n\r\n"
    )  # fmt: skip
    answer = await rawRequest(routing.httpPort, request)
    assert answer.count(b"HTTP/1.1 200") == 2
    expected = {"length": 12, "sha256": hashlib.sha256(b"hello, world").hexdigest()}
    assert json.dumps(expected).encode() in answer


@pytest_twisted.ensureDeferred
async def test_unknown_host_gets_404_page(routing: Any) -> None:
    answer = await rawRequest(routing.httpPort, b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"nobody.localhost" in answer
    answer = await rawRequest(routing.httpPort, b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a.localhost\r\nHost: b.localhost\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a.localhost\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: a.localhost\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nHost: a.localhost\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", b"431"),
        (b"CONNECT a.localhost:443 HTTP/1.1\r\nHost: a.localhost\r\n\r\n", b"405"),
    ],
    ids=["no-host", "garbage", "two-hosts", "cl-and-te", "too-many-headers", "huge-head", "connect"],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_clear_answers(routing: Any, request_bytes: bytes, status: bytes) -> None:
    answer = await rawRequest(routing.httpPort, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]


@pytest_twisted.ensureDeferred
async def test_a_second_host_on_one_connection_is_misdirected(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("one"), backend.endpoint)
    await routing.listen(signing.token("two"), backend.endpoint)
    answer = await rawRequest(
        routing.httpPort,
        b"GET /headers HTTP/1.1\r\nHost: one.localhost\r\n\r\nGET /headers HTTP/1.1\r\nHost: two.localhost\r\n\r\n",
    )
    # The first request is answered in full, then the routing server says
    # why it closes; the second request never reaches instance one.
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer[answer.index(b"HTTP/1.1 ", 1):].startswith(b"HTTP/1.1 421 Misdirected Request")


@pytest_twisted.ensureDeferred
async def test_slow_request_head_times_out(signing: Any) -> None:
    routing = await startRouting(signing, limits=FrontLimits(headTimeout=0.3, idleTimeout=0.5))
    try:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort), client)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: a.local")  # and never the rest
        answer = await client.done
        assert answer.startswith(b"HTTP/1.1 408")
        # A connection that never sends anything is closed too.
        silent = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort), silent)
        assert (await silent.done).startswith(b"HTTP/1.1 408")
    finally:
        await stopRouting(routing)


@pytest_twisted.ensureDeferred
async def test_a_connection_over_the_cap_is_told_503_and_the_tunnels_still_come(signing: Any, backend: Any) -> None:
    routing = await startRouting(signing, limits=FrontLimits(headTimeout=5, idleTimeout=5, maxConnections=2))
    held: list[RawClient] = []
    try:
        for _ in range(2):
            client = RawClient()
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort), client)
            held.append(client)
        await eventually(lambda: routing.server.metrics.open == 2)
        # The third is answered at once, with when to come back, and closed.
        turned = await rawRequest(routing.httpPort, b"GET / HTTP/1.1\r\nHost: capped.localhost\r\n\r\n")
        assert turned.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert b"\r\nRetry-After: 5\r\n" in turned
        assert routing.server.metrics.errors.get("too_many_connections") == 1
        # A tunnel is no public connection: an instance still registers.
        await routing.listen(signing.token("capped"), backend.endpoint)
        # One held goes: the next is served.
        held.pop().transport.loseConnection()
        await eventually(lambda: routing.server.metrics.open == 1)
        answer = await rawRequest(routing.httpPort, b"GET /headers HTTP/1.1\r\nHost: capped.localhost\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for client in held:
            client.transport.loseConnection()
        await stopRouting(routing)


@pytest_twisted.ensureDeferred
async def test_idle_keepalive_connection_is_closed(signing: Any, backend: Any) -> None:
    routing = await startRouting(signing, limits=FrontLimits(headTimeout=5, idleTimeout=0.4))
    try:
        await routing.listen(signing.token("idle"), backend.endpoint)
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort), client)
        client.transport.write(b"GET /headers HTTP/1.1\r\nHost: idle.localhost\r\n\r\n")
        answer = await client.done  # closed by the idle timeout, after the answer
        assert answer.startswith(b"HTTP/1.1 200")
        assert routing.server.metrics.errors.get("idle_timeout") == 1
    finally:
        await stopRouting(routing)


@pytest_twisted.ensureDeferred
async def test_502_when_the_tool_refuses(routing: Any, signing: Any) -> None:
    with refusedPort() as closed:
        await routing.listen(signing.token("down"), f"tcp:host=127.0.0.1:port={closed}")
        answer = await rawRequest(routing.httpPort, b"GET / HTTP/1.1\r\nHost: down.localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway")
    assert b"not answering" in answer


@pytest_twisted.ensureDeferred
async def test_502_when_the_tunnel_goes_away_before_an_answer(routing: Any, signing: Any) -> None:
    silentServer = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
    try:
        listener = await routing.listen(
            signing.token("gone"), f"tcp:host=127.0.0.1:port={silentServer.getHost().port}"
        )
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort), client)
        client.transport.write(b"GET / HTTP/1.1\r\nHost: gone.localhost\r\n\r\n")
        await eventually(lambda: routing.server.registry.resolve("gone.localhost").streamCount)
        await listener.stopService()
        answer = await client.done
        assert answer.startswith(b"HTTP/1.1 502 Bad Gateway")
    finally:
        await silentServer.stopListening()


@pytest_twisted.ensureDeferred
async def test_websocket_echo_through_the_tunnel(routing: Any, signing: Any, backend: Any) -> None:
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol

    await routing.listen(signing.token("ws"), backend.endpoint)
    got: defer.Deferred[list[bytes]] = defer.Deferred()

    class Client(WebSocketClientProtocol):
        messages: list[bytes] = []

        def onOpen(self) -> None:
            self.sendMessage(b"x" * 100000, isBinary=True)
            self.sendMessage(b"hello", isBinary=False)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            self.messages.append(payload)
            if len(self.messages) == 2:
                got.callback(self.messages)
                self.sendClose()

    factory = WebSocketClientFactory(f"ws://ws.localhost:{routing.httpPort}/ws")
    factory.protocol = Client
    await TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort).connect(factory)
    assert await got == [b"x" * 100000, b"hello"]


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_a_thousand_concurrent_streams_on_one_tunnel(routing: Any, signing: Any, backend: Any) -> None:
    listener = await routing.listen(signing.token("many"), backend.endpoint)
    n = 1000
    clients = [RawClient() for _ in range(n)]
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort)
    await defer.gatherResults([connectProtocol(endpoint, c) for c in clients])
    # Every request is sent before any answer is read: all streams open at once.
    for c in clients:
        c.transport.write(b"GET /bytes?n=20000 HTTP/1.1\r\nHost: many.localhost\r\nConnection: close\r\n\r\n")
    session = routing.server.registry.resolve("many.localhost")
    peak = 0

    def finished() -> bool:
        nonlocal peak
        peak = max(peak, session.streamCount)  # sampled as the streams run
        return all(c.done.called for c in clients)

    await eventually(finished, timeout=120, interval=0.005, what=lambda: f"{sum(c.done.called for c in clients)} of {n} done")
    from collections import Counter

    outcomes = Counter(
        "ok" if a.startswith(b"HTTP/1.1 200") and len(a.split(b"\r\n\r\n", 1)[1]) == 20000 else bytes(a[:40])
        for a in (c.received for c in clients)
    )
    assert outcomes == {"ok": n}
    tunnel = await listener.whenRegistered()
    assert tunnel.session.streamsOpened >= n
    assert peak > 100  # many really were open together


@pytest_twisted.ensureDeferred
async def test_a_stalled_reader_does_not_slow_the_others(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("stall"), backend.endpoint)
    stalled = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort), stalled)
    stalled.transport.pauseProducing()  # this client stops reading
    size = 64 * 1024 * 1024
    stalled.transport.write(f"GET /bytes?n={size} HTTP/1.1\r\nHost: stall.localhost\r\n\r\n".encode())
    session = routing.server.registry.resolve("stall.localhost")
    await eventually(lambda: session.streamCount and session.bytesIn >= 1024 * 1024)

    # Another download on the same tunnel completes in full meanwhile.
    response = await get(routing, "stall.localhost", "/bytes?n=30000000")
    digest = hashlib.sha256()
    await treq.collect(response, digest.update)
    assert digest.hexdigest() == patternDigest(30000000)

    # What the stalled stream made the routing server hold stays bounded by
    # its window (plus the client socket's buffer), not by the 64 MB asked for.
    stream = min(session.streams(), key=lambda s: s.id)  # the stalled one came first
    assert stream.recvBuffered <= stream.recvWindow <= session.settings.maxWindow
    assert len(stalled.received) < size // 4

    # And the stalled one resumes and completes correctly.
    stalled.transport.resumeProducing()
    await eventually(lambda: len(stalled.received) >= size, timeout=60)
    head, body = bytes(stalled.received).split(b"\r\n\r\n", 1)
    assert hashlib.sha256(body).hexdigest() == patternDigest(size)
    stalled.transport.loseConnection()


@pytest.mark.parametrize(
    "make_token, reason",
    [
        (lambda s: _expired(s, "x1"), "expired"),
        (lambda s: s.signer.sign({"sub": "x1"}, audience="someone-else", lifetime=60), "audience"),
        (lambda s: _forged("x1"), "key"),
        (lambda s: _algNone("x1"), "algorithm"),
        (lambda s: s.token("Not_A_Label"), "instance"),
        (lambda s: "not.a.token", ""),
        (lambda s: s.signer.sign({"sub": "x1"}, audience="dit4c-routing", lifetime=60), "missing jti claim"),
        (lambda s: s.token("x1", lifetime=301), "token lifetime 301 s is longer than the 300 s allowed"),
        (lambda s: s.token("x1", lifetime=10 * 365 * 86400), "is longer than the 300 s allowed"),
    ],
    ids=["expired", "audience", "forged", "alg-none", "bad-instance", "garbage", "no-jti", "301s", "ten-years"],
)
@pytest_twisted.ensureDeferred
async def test_bad_tokens_are_refused(routing: Any, signing: Any, backend: Any, make_token: Any, reason: str) -> None:
    listener = await routing.listen(make_token(signing), backend.endpoint, wait=False)
    await eventually(lambda: listener.lastError is not None)
    error = listener.lastError
    assert isinstance(error, HandshakeRefused)
    info = pytest.ExceptionInfo.from_exc_info((type(error), error, None))
    assert info.value.code == ErrorCode.AUTH_FAILED
    assert reason.lower() in info.value.reason.lower()
    assert len(routing.server.registry) == 0


def _expired(signing: Any, instance: str) -> str:
    import time

    from twisted.internet.task import Clock

    from dit4c.common.tokens import TokenSigner

    past = Clock()
    past.advance(time.time() - 7200)
    return TokenSigner(signing.key, clock=past).sign({"sub": instance}, audience="dit4c-routing", lifetime=60)


def _forged(instance: str) -> str:
    from dit4c.common.keys import generatePrivateKey
    from dit4c.common.tokens import TokenSigner

    return TokenSigner(generatePrivateKey()).sign({"sub": instance}, audience="dit4c-routing", lifetime=60)


def _algNone(instance: str) -> str:
    import base64
    import time

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    now = int(time.time())
    claims = {"sub": instance, "aud": "dit4c-routing", "iat": now, "exp": now + 60}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


@pytest_twisted.ensureDeferred
async def test_a_token_grants_only_its_own_name_and_a_reconnect_replaces(
    routing: Any, signing: Any, backend: Any
) -> None:
    first = await routing.listen(signing.token("mine"), backend.endpoint)
    firstTunnel = await first.whenRegistered()
    assert firstTunnel.welcome["host"] == "mine.localhost"
    assert firstTunnel.welcome["url"] == f"http://mine.localhost:{routing.httpPort}/"

    # Another listener with a token for another instance gets its own name only.
    other = await routing.listen(signing.token("yours"), backend.endpoint)
    assert (await other.whenRegistered()).welcome["host"] == "yours.localhost"

    # The same instance connecting again takes over at once; the old tunnel
    # is told to go away and every request meanwhile is answered.
    second = await routing.listen(signing.token("mine"), backend.endpoint)
    secondTunnel = await second.whenRegistered()
    owner = routing.server.registry.resolve("mine.localhost")
    assert owner.peerAddress.port == secondTunnel.transport.getHost().port
    for _ in range(20):
        response = await get(routing, "mine.localhost", "/headers")
        assert response.code == 200
        await response.content()
    await firstTunnel.closed
    assert firstTunnel.session.peerGoingAway


@pytest_twisted.ensureDeferred
async def test_admin_health_and_metrics(signing: Any, backend: Any) -> None:
    from twisted.internet.endpoints import serverFromString

    from dit4c.common.service import ListeningService
    from dit4c.routing.admin import adminSite

    routing = await startRouting(signing)
    admin = ListeningService(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), adminSite(routing.server))
    admin.setServiceParent(routing.server)
    try:
        await routing.listen(signing.token("metered"), backend.endpoint)
        await (await get(routing, "metered.localhost", "/bytes?n=5000")).content()
        await rawRequest(routing.httpPort, b"GET / HTTP/1.1\r\nHost: unknown.localhost\r\n\r\n")
        base = f"http://127.0.0.1:{admin.port.getHost().port}"
        health = await (await treq.get(base + "/health")).json()
        assert health == {"status": "ok", "tunnels": 1}
        metrics = (await (await treq.get(base + "/metrics")).text()).splitlines()
        assert "dit4c_routing_tunnels 1.0" in metrics
        assert 'dit4c_routing_errors_total{kind="unknown_host"} 1.0' in metrics
        out = [line for line in metrics if line.startswith('dit4c_routing_bytes_total{direction="out"}')]
        assert float(out[0].split()[-1]) > 5000
    finally:
        await stopRouting(routing)


# -- a token opens one tunnel only ---------------------------------------------------------


class LogLines:
    """Everything logged while it is installed, formatted."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event) or "")

    def __enter__(self) -> LogLines:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


def recordingTokens(signing: Any, instance: str) -> tuple[Callable[[], str], list[str]]:
    """The listener's own token source (a fresh token for every dial), keeping a copy of each."""
    source = routingToken(signing.key, instance, scoped=False)
    sent: list[str] = []

    def token() -> str:
        sent.append(source())
        return sent[-1]

    return token, sent


@pytest_twisted.ensureDeferred
async def test_a_replayed_token_is_refused_and_the_tunnel_keeps_its_name(
    routing: Any, signing: Any, backend: Any, replay: Any
) -> None:
    token, sent = recordingTokens(signing, "genuine")
    listener = await routing.listen(token, backend.endpoint)
    tunnel = await listener.whenRegistered()

    with LogLines() as log:
        refused = await replay(routing.tunnelPort, sent[0])
    assert refused.code == ErrorCode.AUTH_FAILED
    assert refused.reason == "token already used"
    assert routing.server.metrics.errors == {"tunnel_auth": 1, "tunnel_replay": 1}
    assert any("a used token for genuine came again from" in line for line in log.lines), log.lines
    assert any("refused: token already used" in line for line in log.lines), log.lines
    assert not any(sent[0].split(".")[2] in line for line in log.lines)  # never the token

    # The genuine tunnel was not touched: it holds the name, was never told
    # to go, and the instance answers through the routing server.
    owner = routing.server.registry.resolve("genuine.localhost")
    assert owner.peerAddress.port == tunnel.transport.getHost().port
    assert listener.tunnel is tunnel and not tunnel.session.peerGoingAway
    for _ in range(5):
        response = await get(routing, "genuine.localhost", "/headers")
        assert response.code == 200
        await response.content()
    assert len(sent) == 1


@pytest_twisted.ensureDeferred
async def test_the_same_token_is_refused_even_after_its_tunnel_closed(
    routing: Any, signing: Any, backend: Any, replay: Any
) -> None:
    token = signing.token("once")
    first = await routing.listen(token, backend.endpoint)
    await first.stopService()
    await eventually(lambda: len(routing.server.registry) == 0)
    assert (await replay(routing.tunnelPort, token)).reason == "token already used"
    assert len(routing.server.registry) == 0


@pytest_twisted.ensureDeferred
async def test_a_stale_duplicate_listener_does_not_take_the_name_for_good(
    routing: Any, signing: Any, backend: Any
) -> None:
    """
    Two listeners of one instance, each signing fresh tokens with its key
    (as a stale duplicate would): each one replaced dials again, at once and
    then more slowly; requests are answered throughout, and once the
    duplicate stops the genuine one holds the name.
    """

    def start() -> tuple[ListenerService, list[str]]:
        token, sent = recordingTokens(signing, "twin")
        listener = ListenerService(
            reactor,
            clientFromString(reactor, routing.tunnelEndpoint()),
            clientFromString(reactor, backend.endpoint),
            token,
            retryPolicy=backoff(initial=0.05, maximum=0.5),
            replacedPolicy=backoff(initial=0.05, maximum=0.4),
        )
        listener.startService()
        routing.listeners.append(listener)
        return listener, sent

    genuine, genuineSent = start()
    await genuine.whenRegistered().addTimeout(10, reactor)
    duplicate, duplicateSent = start()

    answered: list[int] = []
    while genuine.replacements.count < 3 or duplicate.replacements.count < 3:
        response = await get(routing, "twin.localhost", "/headers")
        answered.append(response.code)
        await response.content()
    assert len(answered) > 3 and set(answered) == {200}
    # Every dial carried a token of its own.
    assert len(set(genuineSent + duplicateSent)) == len(genuineSent) + len(duplicateSent) >= 6
    assert routing.server.metrics.errors.get("tunnel_auth", 0) == 0

    await duplicate.stopService()
    await genuine.whenRegistered().addTimeout(10, reactor)
    response = await get(routing, "twin.localhost", "/headers")
    assert response.code == 200
    await response.content()
    tunnel = await genuine.whenRegistered()
    assert len(routing.server.registry) == 1
    owner = routing.server.registry.resolve("twin.localhost")
    assert owner.peerAddress.port == tunnel.transport.getHost().port
