"""
The auth helper as a proxy, with a logged-in session: WebSockets, large
bodies both ways, chunked bodies and keep-alive; and its limits and
timeouts, each with its answer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import pytest_twisted
import treq
from auth_client import Browser, logIn, query, startLogin
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support.backend import patternDigest
from support.sockets import RawClient, rawRequest, refusedPort
from support.waiting import deferLater, eventually
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.common.httpfront import FrontLimits


async def aliceIn(world: Any, **auth: Any) -> Browser:
    await world.startAuth(**auth)
    alice = Browser(world)
    response = await logIn(alice, "alice")
    assert response.code == 303
    return alice


def cookieHeader(browser: Browser) -> str:
    return "; ".join(f"{k}={v}" for k, v in browser.instanceCookies().items())


# -- WebSocket -------------------------------------------------------------------------------


class _Echo(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append(payload)
        if len(self.factory.messages) == self.factory.expect:
            self.factory.done.callback(self.factory.messages)


async def webSocket(world: Any, cookie: str, messages: list[bytes]) -> list[bytes]:
    factory = WebSocketClientFactory(f"ws://{world.host}/ws", headers={"Cookie": cookie} if cookie else {})
    factory.protocol = _Echo
    factory.opened, factory.done, factory.messages, factory.expect = defer.Deferred(), defer.Deferred(), [], len(messages)
    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", world.authPort).connect(factory)
    client = await factory.opened.addTimeout(10, reactor)
    for message in messages:
        client.sendMessage(message, isBinary=True)
    received = await factory.done.addTimeout(10, reactor)
    proto.transport.loseConnection()
    return received  # type: ignore[no-any-return]


@pytest_twisted.ensureDeferred
async def test_websocket_round_trip_with_a_session_only(world: Any) -> None:
    alice = await aliceIn(world)
    messages = [b"hello", bytes(range(256)) * 4096]
    assert await webSocket(world, cookieHeader(alice), messages) == messages

    head = (
        f"GET /ws HTTP/1.1\r\nHost: {world.host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    answer = await rawRequest(world.authPort, head)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:100]
    assert world.toolSaw.count(b"/ws") == 1


# -- bodies ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_50_mib_up_and_down_streamed(world: Any) -> None:
    alice = await aliceIn(world)
    size = 50 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)
    response = await alice.request("POST", world.instanceURL + "sink", data=payload, accept="*/*")
    assert response.code == 200
    assert await response.json() == {"length": size, "sha256": hashlib.sha256(payload).hexdigest()}
    del payload

    response = await alice.get(world.instanceURL + f"bytes?n={size}", accept="*/*", unbuffered=True)
    digest = hashlib.sha256()
    await treq.collect(response, digest.update)
    assert digest.hexdigest() == patternDigest(size)


@pytest_twisted.ensureDeferred
async def test_chunked_bodies_and_keep_alive(world: Any) -> None:
    alice = await aliceIn(world)
    cookie = cookieHeader(alice)
    body = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    request = (
        f"POST /sink HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookie}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + body
        + f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n".encode()
    )
    answer = await rawRequest(world.authPort, request)
    assert answer.count(b"HTTP/1.1 200") == 2
    expected = {"length": 12, "sha256": hashlib.sha256(b"hello, world").hexdigest()}
    assert json.dumps(expected).encode() in answer
    assert b'"X-Dit4c-User": ["alice"]' in answer or b'"X-DIT4C-User": ["alice"]' in answer


@pytest_twisted.ensureDeferred
async def test_a_refused_request_with_a_body_closes_the_connection(world: Any) -> None:
    await world.startAuth()
    request = (
        f"POST /sink HTTP/1.1\r\nHost: {world.host}\r\nContent-Length: 5\r\n\r\nhello".encode()
        + f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\n\r\n".encode()
    )
    answer = await rawRequest(world.authPort, request)
    assert answer.startswith(b"HTTP/1.1 401 ")
    assert answer.count(b"HTTP/1.1") == 1
    assert world.toolSaw == []


# -- limits and timeouts ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_huge_head_gets_431(world: Any) -> None:
    await world.startAuth()
    answer = await rawRequest(
        world.authPort, f"GET / HTTP/1.1\r\nHost: {world.host}\r\nX-Big: {'a' * 70000}\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    answer = await rawRequest(world.authPort, b"GARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


async def _openRaw(port: int) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


@pytest_twisted.ensureDeferred
async def test_a_slow_head_gets_408_and_an_idle_connection_is_closed(world: Any) -> None:
    alice = await aliceIn(world, limits=FrontLimits(headTimeout=0.3, idleTimeout=0.6))
    slow = await _openRaw(world.authPort)
    slow.transport.write(b"GET / HTTP/1.1\r\nHost: ")
    answer = await slow.done.addTimeout(5, reactor)
    assert answer.startswith(b"HTTP/1.1 408 ")

    metrics = world.auth.config.metrics
    # Alone: alice's browser's kept connection has gone idle and been closed.
    await eventually(lambda: metrics.open == 0, what=lambda: f"{metrics.open} connections open")
    idleBefore = metrics.errors.get("idle_timeout", 0)
    idle = await _openRaw(world.authPort)
    idle.transport.write(
        f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookieHeader(alice)}\r\n\r\n".encode()
    )
    answer = await idle.done.addTimeout(5, reactor)
    assert answer.startswith(b"HTTP/1.1 200 ")  # answered, kept alive, then closed when idle:
    assert metrics.errors.get("idle_timeout", 0) == idleBefore + 1  # by the idle timer, not after the answer


@pytest_twisted.ensureDeferred
async def test_an_unreachable_tool_gets_a_502_page(world: Any) -> None:
    with refusedPort() as port:  # nothing listens there
        alice = await aliceIn(world, tool=f"tcp:host=127.0.0.1:port={port}")
        response = await alice.get(world.instanceURL + "headers")
        assert response.code == 502
        assert "tool" in await response.text()


@pytest.mark.parametrize("how", ["refused", "hangs"])
@pytest_twisted.ensureDeferred
async def test_an_unreachable_portal_at_the_callback_gets_a_502_page(world: Any, how: str) -> None:
    silent = None
    with refusedPort() as port:
        if how == "hangs":
            silent = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
            port = silent.getHost().port
        try:
            await world.startAuth(portalInternal=f"http://127.0.0.1:{port}", timeout=0.5)
            browser = Browser(world)
            state = query(await startLogin(browser))["state"]
            response = await defer.ensureDeferred(
                browser.get(f"{world.instanceURL}.dit4c/callback?code=abc&state={state}")
            ).addTimeout(10, reactor)
            assert response.code == 502
            text = await response.text()
            # Answered (a portal that hangs: once the helper's timeout is up), saying why in words.
            assert "portal" in text and "Traceback" not in text and "Failure" not in text
            if how == "hangs":
                assert "no answer in time" in text
        finally:
            if silent is not None:
                await silent.stopListening()
            await deferLater(0)
