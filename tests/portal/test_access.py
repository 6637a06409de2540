"""
Where access ends (``dit4c.portal.access``): a logout and a person
disabled by an administrator take their sessions away and tell every
watcher, even when the browser that asked goes away half-way (the form
posted over a real socket, its second step held until the portal has
noticed the client gone).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from portal_client import Browser, Held, logIn, postAndLeave
from support.waiting import eventually

from dit4c.portal import security
from dit4c.portal.app import Portal
from dit4c.portal.events import AccessChange
from dit4c.portal.store.ids import hashToken


async def loggedOut(browser: Browser) -> bool:
    response, _ = await browser.get("/")
    return response.code == 303 and response.headers.getRawHeaders("location", [""])[0].startswith("/login")


@pytest_twisted.ensureDeferred
async def test_a_logout_whose_browser_left_is_still_told_to_every_watcher(
    api: Portal, monkeypatch: Any, requestsLost: list[object]
) -> None:
    alice = Browser(api)
    await logIn(alice)
    session = alice.cookies[security.SESSION_COOKIE.decode()]
    heard: list[AccessChange] = []
    api.events.subscribeAccess(heard.append)
    held = Held(api.store.deleteSession)
    monkeypatch.setattr(api.store, "deleteSession", held)
    await postAndLeave(api, alice, "/logout", held, requestsLost)
    await eventually(lambda: heard)
    aliceUser = await api.store.userByName("alice")
    assert heard == [AccessChange(user=aliceUser.id, session=hashToken(session))]
    assert await loggedOut(alice)


@pytest_twisted.ensureDeferred
async def test_a_person_disabled_by_a_browser_that_left_loses_every_session(
    api: Portal, monkeypatch: Any, requestsLost: list[object]
) -> None:
    root, bob = Browser(api), Browser(api)
    await logIn(root, "root", "root password!")
    await logIn(bob, "bob", "bobs password!")
    bobUser = await api.store.userByName("bob")
    heard: list[AccessChange] = []
    api.events.subscribeAccess(heard.append)
    held = Held(api.store.deleteSessionsOfUser)
    monkeypatch.setattr(api.store, "deleteSessionsOfUser", held)
    await postAndLeave(api, root, f"/admin/users/{bobUser.id}", held, requestsLost, action="disable")
    await eventually(lambda: heard)
    assert heard == [AccessChange(user=bobUser.id)]
    assert (await api.store.userByName("bob")).disabled
    assert await loggedOut(bob)
