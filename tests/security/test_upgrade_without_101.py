"""
Upgrade without a 101, the path people use: a browser → the routing server
→ the tunnel → the listener → the auth helper → the Notes tool, with a real
portal and alice logged in, on real loopback sockets. The auth helper runs
both ways a node runs it: on each tunnel stream in the listener's process
(the pod helper) and as its own server the listener connects to.

The attack: with a valid session, ``GET /`` asking to switch to a protocol
the tool does not speak (``Upgrade: foo``); the tool answers 200, and the
next request on the same connection carries a forged ``X-DIT4C-User``.
Before the fronts read the tool's status line, both switched to a raw pipe
at the first request, and Notes greeted "IMPERSONATED-OWNER".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support.sockets import rawRequest
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, clientFromString

from dit4c.listener.service import ListenerService, backoff
from dit4c.tools.notes import site as notesSite

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, logIn, makeWorld  # noqa: E402


@pytest_twisted.async_yield_fixture(params=["pod helper", "separate auth helper"])
async def notes(request: Any, tmp_path: Path, routing: Any, signing: Any) -> Any:
    """The whole path to Notes, alice logged in through it (``w.cookie``)."""
    w = await makeWorld(tmp_path)
    tool = reactor.listenTCP(0, notesSite(tmp_path), interface="127.0.0.1")
    w.ports.append(tool)
    await w.startAuth(tool=f"tcp:host=127.0.0.1:port={tool.getHost().port}")
    instance = w.instance.id
    if request.param == "pod helper":
        listener = ListenerService(
            reactor,
            clientFromString(reactor, routing.tunnelEndpoint()),
            w.auth.listening.factory,
            lambda: signing.token(instance),
            retryPolicy=backoff(initial=0.05, maximum=0.5),
        )
        listener.startService()
        routing.listeners.append(listener)
        await listener.whenRegistered().addTimeout(15, reactor)
    else:
        await routing.listen(lambda: signing.token(instance), f"tcp:host=127.0.0.1:port={w.authPort}")
    w.authPort = routing.httpPort  # from here on, through the routing server
    w.instance = await w.store.updateInstance(instance, url=w.instanceURL)
    browser = Browser(w)
    assert (await logIn(browser, "alice")).code == 303
    w.cookie = "; ".join(f"{k}={v}" for k, v in browser.instanceCookies().items())
    yield w
    await closeWorld(w)


def greetings(answer: bytes) -> list[str]:
    return [line.decode() for line in answer.split(b"\n") if b'id="greeting"' in line]


@pytest.mark.parametrize("ask", ["Upgrade: foo\r\nConnection: Upgrade", "Upgrade: websocket\r\nConnection: keep-alive, Upgrade"])
@pytest_twisted.ensureDeferred
async def test_a_forged_user_after_an_upgrade_answered_200_never_reaches_the_tool(notes: Any, ask: str) -> None:
    w = notes
    forged = "X-DIT4C-User: IMPERSONATED-OWNER\r\nX-Forwarded-For: 6.6.6.6\r\n"
    answer = await rawRequest(
        w.authPort,
        (
            f"GET / HTTP/1.1\r\nHost: {w.host}\r\nCookie: {w.cookie}\r\n{ask}\r\n\r\n"
            f"GET / HTTP/1.1\r\nHost: {w.host}\r\nCookie: {w.cookie}\r\n{forged}\r\n"
            f"GET / HTTP/1.1\r\nHost: {w.host}\r\nCookie: {w.cookie}\r\n{forged}Connection: close\r\n\r\n"
        ).encode(),
    )
    assert answer.count(b"HTTP/1.1 200 OK") == 3, answer[:300]
    assert greetings(answer) == ['<p id="greeting">Hello, alice.</p>'] * 3
    assert b"IMPERSONATED" not in answer


@pytest_twisted.ensureDeferred
async def test_the_notes_websocket_still_works_through_the_whole_path(notes: Any) -> None:
    w = notes
    got: defer.Deferred[bytes] = defer.Deferred()

    class Client(WebSocketClientProtocol):
        def onOpen(self) -> None:
            self.sendMessage(json.dumps({"note": "through every front"}).encode())

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            if not got.called:
                got.callback(payload)
            self.sendClose()

    factory = WebSocketClientFactory(f"ws://{w.host}/ws", headers={"Cookie": w.cookie})
    factory.protocol = Client
    await TCP4ClientEndpoint(reactor, "127.0.0.1", w.authPort).connect(factory)
    assert json.loads(await got.addTimeout(15, reactor)) == {"note": "through every front"}
