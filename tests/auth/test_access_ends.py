"""
When a person's access to an instance ends, it ends for the connections
they hold open too (docs/protocols.md 6.6), against a real portal, a real
auth helper and the tool on loopback:

- alice shares her instance with bob, or gives him a share link; bob and
  alice each hold a WebSocket open through the auth helper, and bob an
  event stream at the portal;
- the access ends the way a person ends it, through the portal's API or
  pages: an unshare, the link revoked, bob disabled by an administrator,
  bob logging out of the portal;
- within the bound (:data:`BOUND`) bob's WebSocket is closed, his event
  stream (where his session ended) too, and his next page load is refused;
  alice's WebSocket still echoes.

The helper here is given a periodic recheck of an hour: only the portal's
watch can end bob's access within the bound.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest_twisted
import treq
from auth_client import Browser, location, logIn
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from support.sockets import RawClient
from support.waiting import eventually
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

#: Seconds from the portal's answer to the request that ended the access
#: to bob's connections closed (docs/protocols.md 6.6).
BOUND = 5.0


class _Socket(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        waiting, self.factory.waiting = self.factory.waiting, None
        if waiting is not None:
            waiting.callback(payload)

    def onClose(self, wasClean: bool, code: int, reason: str) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class Socket:
    """A WebSocket to the tool's echo service, through the auth helper, as ``browser``'s person."""

    def __init__(self, factory: Any, protocol: _Socket) -> None:
        self.factory = factory
        self.protocol = protocol

    @property
    def closed(self) -> defer.Deferred[Any]:
        return self.factory.closed  # type: ignore[no-any-return]

    async def echo(self, message: bytes) -> bytes:
        self.factory.waiting = defer.Deferred()
        self.protocol.sendMessage(message, isBinary=True)
        return await self.factory.waiting.addTimeout(10, reactor)  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self.closed.called:
            self.protocol.transport.loseConnection()


async def openSocket(browser: Browser) -> Socket:
    world = browser.world
    cookie = "; ".join(f"{k}={v}" for k, v in browser.instanceCookies().items())
    factory = WebSocketClientFactory(f"ws://{world.host}/ws", headers={"Cookie": cookie})
    factory.protocol = _Socket
    factory.opened, factory.closed, factory.waiting = defer.Deferred(), defer.Deferred(), None
    await TCP4ClientEndpoint(reactor, "127.0.0.1", world.authPort).connect(factory)
    protocol = await factory.opened.addTimeout(10, reactor)
    socket = Socket(factory, protocol)
    assert await socket.echo(b"hello") == b"hello"
    return socket


async def openEvents(browser: Browser) -> RawClient:
    """``GET /events`` at the portal with ``browser``'s portal session, read as it streams."""
    world = browser.world
    host = world.portalURL.split("//", 1)[1]
    cookies = "; ".join(f"{k}={v}" for k, v in browser.jars.get(host, {}).items())
    stream = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(host.rsplit(":", 1)[1])), stream)
    stream.transport.write(f"GET /events HTTP/1.1\r\nHost: {host}\r\nCookie: {cookies}\r\n\r\n".encode())
    await eventually(lambda: b"watching" in stream.received, what=lambda: repr(bytes(stream.received)))
    return stream


async def ended(stream: RawClient) -> None:
    """Until the event stream's answer is complete (its last chunk), within the bound."""
    await eventually(
        lambda: stream.received.endswith(b"\r\n0\r\n\r\n") or stream.done.called,
        BOUND,
        what=lambda: f"the event stream to end: {bytes(stream.received[-200:])!r}",
    )


async def api(world: Any, token: str, method: str, path: str, body: Any = None) -> Any:
    response = await treq.request(
        method,
        f"{world.portalURL}/api/v1{path}",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None,
    )
    answer = await response.json()
    assert response.code in (200, 201), answer
    return answer


async def apiToken(world: Any, name: str) -> str:
    _, token = await world.store.createApiToken(world.users[name].id, "test")
    return str(token)


async def watching(world: Any) -> None:
    """Until the helper's watch at the portal is open."""
    await eventually(
        lambda: world.auth.watch.state == "watching", what=lambda: f"the helper to watch: {world.auth.watch.state}"
    )


async def bobAndAliceConnected(world: Any) -> tuple[Browser, Socket, Browser, Socket]:
    await world.startAuth(recheck=3600, unwatchedRecheck=3600)
    await watching(world)
    alice, bob = Browser(world), Browser(world)
    assert (await logIn(alice, "alice")).code == 303
    assert (await logIn(bob, "bob")).code == 303
    return alice, await openSocket(alice), bob, await openSocket(bob)


async def refused(bob: Browser, status: int) -> Any:
    """Bob's next page load, refused with ``status``; the tool never sees it."""
    world = bob.world
    seen = world.toolSaw.count(b"/headers")
    response = await bob.get(world.instanceURL + "headers")
    assert response.code == status, (response.code, await response.text())
    assert world.toolSaw.count(b"/headers") == seen
    return response


async def aliceStillIn(alice: Browser, socket: Socket) -> None:
    assert not socket.closed.called
    assert await socket.echo(b"still here") == b"still here"
    response = await alice.get(alice.world.instanceURL + "headers", accept="*/*")
    assert response.code == 200
    socket.close()


@pytest_twisted.ensureDeferred
async def test_unshare_closes_the_websocket_and_refuses_the_next_page(world: Any) -> None:
    await world.store.shareInstance(world.instance.id, world.users["bob"].id)
    alice, aliceSocket, bob, bobSocket = await bobAndAliceConnected(world)

    await api(world, await apiToken(world, "alice"), "DELETE", f"/instances/{world.instance.id}/shares/bob")
    await bobSocket.closed.addTimeout(BOUND, reactor)
    response = await refused(bob, 403)
    assert "You may not use this instance" in await response.text()
    await aliceStillIn(alice, aliceSocket)


@pytest_twisted.ensureDeferred
async def test_a_revoked_share_link_closes_the_websocket_and_refuses_the_next_page(world: Any) -> None:
    token = await apiToken(world, "alice")
    link = await api(world, token, "POST", f"/instances/{world.instance.id}/links")
    await world.startAuth(recheck=3600, unwatchedRecheck=3600)
    await watching(world)
    alice, bob = Browser(world), Browser(world)
    assert (await logIn(alice, "alice")).code == 303
    await bob.logInAtPortal("bob")
    followed = await bob.get(link["url"])
    assert followed.code == 303 and location(followed) == "/"
    assert (await logIn(bob, "bob")).code == 303
    aliceSocket, bobSocket = await openSocket(alice), await openSocket(bob)

    await api(world, token, "DELETE", f"/instances/{world.instance.id}/links/{link['id']}")
    await bobSocket.closed.addTimeout(BOUND, reactor)
    await refused(bob, 403)
    await aliceStillIn(alice, aliceSocket)


@pytest_twisted.ensureDeferred
async def test_a_disabled_person_loses_the_websocket_the_pages_and_the_event_stream(world: Any) -> None:
    await world.store.shareInstance(world.instance.id, world.users["bob"].id)
    await world.store.updateUser(world.users["carol"].id, is_admin=True)
    alice, aliceSocket, bob, bobSocket = await bobAndAliceConnected(world)
    events = await openEvents(bob)

    await api(world, await apiToken(world, "carol"), "PATCH", f"/admin/users/{world.users['bob'].id}", {"disabled": True})
    await bobSocket.closed.addTimeout(BOUND, reactor)
    await ended(events)
    await refused(bob, 403)
    await aliceStillIn(alice, aliceSocket)


@pytest_twisted.ensureDeferred
async def test_logging_out_of_the_portal_ends_the_instance_session_too(world: Any) -> None:
    await world.store.shareInstance(world.instance.id, world.users["bob"].id)
    alice, aliceSocket, bob, bobSocket = await bobAndAliceConnected(world)
    events = await openEvents(bob)
    aliceEvents = await openEvents(alice)

    home = await bob.get(world.portalURL + "/")
    csrf = re.search(r'name="csrf" value="([^"]+)"', await home.text())
    assert csrf
    response = await bob.request("POST", world.portalURL + "/logout", data={"csrf": csrf.group(1)})
    assert response.code == 303
    await bobSocket.closed.addTimeout(BOUND, reactor)
    await ended(events)
    # Not refused: no longer logged in. A page load goes to log in again, and
    # the portal asks for a password: bob's portal session is gone.
    response = await refused(bob, 303)
    authorize = location(response)
    assert authorize.startswith(world.portalURL + "/oauth/authorize?")
    assert "dit4c_auth" not in bob.instanceCookies()
    response = await bob.get(authorize)
    assert response.code == 303 and "/login?" in location(response)

    assert not aliceEvents.received.endswith(b"\r\n0\r\n\r\n") and not aliceEvents.done.called
    await aliceStillIn(alice, aliceSocket)
    aliceEvents.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_without_the_watch_the_helper_asks_often_and_still_closes(world: Any) -> None:
    """A portal that refuses the watch (here: it holds no key for the instance): open sessions are asked about every ``unwatchedRecheck`` seconds."""
    await world.store.updateInstance(world.instance.id, public_jwk=None)
    await world.store.shareInstance(world.instance.id, world.users["bob"].id)
    await world.startAuth(recheck=3600, unwatchedRecheck=1)
    alice, bob = Browser(world), Browser(world)
    assert (await logIn(alice, "alice")).code == 303
    assert (await logIn(bob, "bob")).code == 303
    aliceSocket, bobSocket = await openSocket(alice), await openSocket(bob)
    assert world.auth.watch.state != "watching"

    await api(world, await apiToken(world, "alice"), "DELETE", f"/instances/{world.instance.id}/shares/bob")
    await bobSocket.closed.addTimeout(BOUND, reactor)
    await refused(bob, 403)
    await aliceStillIn(alice, aliceSocket)


@pytest_twisted.ensureDeferred
async def test_the_instance_page_lists_who_may_use_it_and_ends_their_access(world: Any, browser: Any) -> None:
    """
    In Chromium, alice's instance page: she shares it with bob by name and
    makes a share link, which carol follows; the page lists both by name
    and how they came in. Unshare ends bob's open WebSocket and his next
    page; Revoke ends carol's. Alice's own connection carries on.
    """
    await world.startAuth(recheck=3600, unwatchedRecheck=3600)
    await watching(world)
    page = f"{world.portalURL}/instances/{world.instance.id}"
    await browser.get(world.portalURL + "/login?next=" + page[len(world.portalURL):])
    await browser.fill("#username", "alice")
    await browser.fill("#password", "correct horse battery")
    await browser.submit("#submit")
    await browser.waitFor("#no-access")

    await browser.fill("#share-user", "bob")
    await browser.submit("#share-form button.share")
    await browser.waitForText('#access tr[data-person="bob"] .how', "named by you")
    await browser.submit("button.link")
    link = await browser.text("#new-link")

    alice, bob, carol = Browser(world), Browser(world), Browser(world)
    await carol.logInAtPortal("carol")
    followed = await carol.get(link)
    assert followed.code == 303
    for person, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        assert (await logIn(person, name)).code == 303
    aliceSocket, bobSocket, carolSocket = await openSocket(alice), await openSocket(bob), await openSocket(carol)

    await browser.get(page)
    await browser.waitForText('#access tr[data-person="carol"] .how', "followed share link 1")
    assert await browser.text("#links .followers") == "carol"

    await browser.submit('#access tr[data-person="bob"] button.unshare')
    await bobSocket.closed.addTimeout(BOUND, reactor)
    await refused(bob, 403)
    assert await browser.execute("return document.querySelector('#access tr[data-person=\"bob\"]') === null")

    await browser.submit("#links button.revoke")
    await carolSocket.closed.addTimeout(BOUND, reactor)
    await refused(carol, 403)
    await browser.waitFor("#no-access")
    await browser.waitFor("#no-links")
    await aliceStillIn(alice, aliceSocket)
