"""
A person's actions on instances (``dit4c.portal.instances``) run to their
end once the portal has begun them, even if the browser that asked goes
away meanwhile: a page that reloads itself, a tab closed, a network lost.
Before, the route's cancellation stopped a start between claiming the
instance and storing its command, and the instance stayed ``requested``
with nothing sent to any scheduler.

Each test posts the page's form over a real socket, holds the step after
the first one until the client has closed its connection, then lets it go.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from portal_client import Browser, csrfOf, logIn
from support.sockets import RawClient
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.common.httpsite import FrontRequest
from dit4c.common.life import State
from dit4c.portal.app import Portal
from dit4c.portal.events import AccessChange


class Held:
    """Calls to a coroutine function held until :meth:`release`, then made."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.waiting: list[Deferred[None]] = []
        self.made: list[Any] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        waiter: Deferred[None] = Deferred()
        self.waiting.append(waiter)
        await waiter
        self.made.append(args)
        return await self.call(*args, **kwargs)

    def release(self) -> None:
        for waiter in self.waiting:
            if not waiter.called:
                waiter.callback(None)


@pytest.fixture
def requestsLost(monkeypatch: Any) -> list[object]:
    """The portal's requests whose client went away before their answer, as the portal notices it."""
    lost: list[object] = []
    noticed = FrontRequest.connectionLost

    def connectionLost(request: FrontRequest, reason: Any) -> None:
        lost.append(request)
        noticed(request, reason)

    monkeypatch.setattr(FrontRequest, "connectionLost", connectionLost)
    return lost


async def postAndLeave(
    portal: Portal, browser: Browser, path: str, held: Held, lost: list[object], **fields: str
) -> None:
    """
    Post the home page's form to ``path`` and close the connection while
    ``held`` holds the action; let it go once the portal has noticed.
    """
    _, page = await browser.get("/")
    body = urlencode({"csrf": csrfOf(page), **fields}).encode()
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    client = RawClient()
    port = int(portal.testURL.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"POST {path} HTTP/1.1\r\nHost: portal.test\r\nCookie: {cookie}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await eventually(lambda: held.waiting)
    client.transport.loseConnection()
    await eventually(lambda: lost)
    held.release()


@pytest_twisted.ensureDeferred
async def test_a_start_whose_browser_left_still_reaches_its_scheduler(api: Portal, monkeypatch: Any, requestsLost: list[object]) -> None:
    alice = Browser(api)
    await logIn(alice)
    commands = api.commands  # type: ignore[attr-defined]
    held = Held(commands.send)
    monkeypatch.setattr(commands, "send", held)
    await postAndLeave(api, alice, "/instances", held, requestsLost, image=api.image.id)  # type: ignore[attr-defined]
    await eventually(lambda: commands.sent)
    [instance] = await api.store.listInstancesOf((await api.store.userByName("alice")).id)
    assert [(op, instanceId) for _, op, instanceId, _ in commands.sent] == [("start", instance.id)]
    assert instance.state == State.REQUESTED


@pytest_twisted.ensureDeferred
async def test_a_stop_whose_browser_left_still_reaches_its_scheduler(api: Portal, monkeypatch: Any, requestsLost: list[object]) -> None:
    alice = Browser(api)
    await logIn(alice)
    aliceUser = await api.store.userByName("alice")
    scheduler = next(iter(api.commands.connectedIds))  # type: ignore[attr-defined]
    instance = await api.store.createInstance(aliceUser.id, api.image.id, scheduler_id=scheduler)  # type: ignore[attr-defined]
    await api.store.updateInstance(instance.id, state=State.RUNNING)
    commands = api.commands  # type: ignore[attr-defined]
    held = Held(commands.send)
    monkeypatch.setattr(commands, "send", held)
    await postAndLeave(api, alice, f"/instances/{instance.id}/stop", held, requestsLost)
    await eventually(lambda: commands.sent)
    assert [(op, instanceId) for _, op, instanceId, _ in commands.sent] == [("stop", instance.id)]
    assert (await api.store.instanceById(instance.id)).state == State.STOPPING


@pytest_twisted.ensureDeferred
async def test_an_unshare_whose_browser_left_is_still_told_to_every_watcher(api: Portal, monkeypatch: Any, requestsLost: list[object]) -> None:
    alice = Browser(api)
    await logIn(alice)
    aliceUser, bobUser = await api.store.userByName("alice"), await api.store.userByName("bob")
    instance = await api.store.createInstance(aliceUser.id, api.image.id)  # type: ignore[attr-defined]
    await api.store.shareInstance(instance.id, bobUser.id)
    heard: list[AccessChange] = []
    api.events.subscribeAccess(heard.append)
    held = Held(api.store.unshareInstance)
    monkeypatch.setattr(api.store, "unshareInstance", held)
    await postAndLeave(api, alice, f"/instances/{instance.id}/unshare", held, requestsLost, user="bob")
    await eventually(lambda: heard)
    assert heard == [AccessChange(user=bobUser.id, instance=instance.id)]
    assert not await api.store.mayUseInstance(bobUser.id, instance.id)
