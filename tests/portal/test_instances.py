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

import pytest_twisted
from portal_client import Browser, Held, logIn, postAndLeave
from support.waiting import eventually

from dit4c.common.life import State
from dit4c.portal.app import Portal
from dit4c.portal.events import AccessChange


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
