"""
The routing server's public side as the shared front (dit4c.common.frontconn)
on real sockets, through a tunnel to the test backend: a request that asks
to switch protocols and is answered 200 leaves the connection HTTP (the
client's ``X-Forwarded-*`` of every later request still dropped), a real
WebSocket still switches, pipelining and keep-alive go on, and the heads
docs/protocols.md section 3 refuses are refused.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from support.sockets import rawRequest, responses, seenHeaders

HOST = "front.localhost"


FORGED = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nForwarded: for=6.6.6.6\r\n"


@pytest_twisted.ensureDeferred
async def test_an_upgrade_answered_200_leaves_every_later_request_filtered(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("front"), backend.endpoint)
    answer = await rawRequest(
        routing.httpPort,
        (
            f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: foo\r\nConnection: upgrade\r\n{FORGED}\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\n{FORGED}\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {HOST}\r\n{FORGED}Connection: close\r\n\r\n"
        ).encode(),
    )
    got = responses(answer)
    assert [status for status, _ in got] == [200, 200, 200]
    for _, body in got:
        seen = seenHeaders(body)
        assert seen["x-forwarded-for"] == ["127.0.0.1"]
        assert seen["x-forwarded-proto"] == ["http"]
        assert seen["x-forwarded-host"] == [HOST]
        assert "forwarded" not in seen
    assert b"6.6.6.6" not in answer and b"evil.example" not in answer


@pytest_twisted.ensureDeferred
async def test_a_websocket_still_switches_after_plain_requests(routing: Any, signing: Any, backend: Any) -> None:
    from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint

    await routing.listen(signing.token("wsfront"), backend.endpoint)
    got: defer.Deferred[bytes] = defer.Deferred()

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.sendMessage(b"through the pipe", isBinary=True)

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            got.callback(payload)
            self.sendClose()

    factory = WebSocketClientFactory(f"ws://wsfront.localhost:{routing.httpPort}/ws")
    factory.protocol = Client
    await TCP4ClientEndpoint(reactor, "127.0.0.1", routing.httpPort).connect(factory)
    assert await got.addTimeout(15, reactor) == b"through the pipe"


@pytest_twisted.ensureDeferred
async def test_head_and_keep_alive_and_pipelining(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("front"), backend.endpoint)
    n = 50
    pipelined = (
        f"HEAD /bytes?n=1000 HTTP/1.1\r\nHost: {HOST}\r\n\r\n"
        + "".join(f"GET /bytes?n={i} HTTP/1.1\r\nHost: {HOST}\r\n\r\n" for i in range(1, n))
        + f"POST /sink HTTP/1.1\r\nHost: {HOST}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        "3\r\nabc\r\n0\r\n\r\n"
    )
    answer = await rawRequest(routing.httpPort, pipelined.encode())
    # The answer to HEAD: a length, no body (a response parser cannot tell by itself).
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1000" in head
    got = responses(rest)
    assert len(got) == n
    assert [len(body) for _, body in got[: n - 1]] == list(range(1, n))
    assert json.loads(got[n - 1][1])["length"] == 3


@pytest.mark.parametrize(
    "head",
    [
        b"GET /headers HTTP/1.1\r\nHost: front.localhost\r\nX-A: a\r\n b\r\n\r\n",
        b"POST /sink HTTP/1.1\r\nHost: front.localhost\r\nUpgrade: foo\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\nabc",
        b"GET /headers HTTP/1.1\r\nHost: front.localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
    ids=["obs-fold", "upgrade-with-body", "two-lengths"],
)
@pytest_twisted.ensureDeferred
async def test_heads_no_front_can_pass_on_safely_are_400(routing: Any, signing: Any, backend: Any, head: bytes) -> None:
    listener = await routing.listen(signing.token("front"), backend.endpoint)
    answer = await rawRequest(routing.httpPort, head)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    # Nothing of it reached the instance.
    assert (await listener.whenRegistered()).session.streamsOpened == 0


@pytest_twisted.ensureDeferred
async def test_a_refusal_behind_a_forwarded_request_comes_after_its_answer(routing: Any, signing: Any, backend: Any) -> None:
    await routing.listen(signing.token("front"), backend.endpoint)
    answer = await rawRequest(
        routing.httpPort,
        f"GET /bytes?n=100000 HTTP/1.1\r\nHost: {HOST}\r\n\r\nGARBAGE\r\n\r\n".encode(),
    )
    first, _, rest = answer.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    # The whole first body, then the refusal.
    assert rest[100000:].startswith(b"HTTP/1.1 400 Bad Request\r\n")
