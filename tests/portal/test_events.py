"""
The portal's one event bus (dit4c.portal.events.InstanceEvents): a change
made outside a request (the scheduler channel, a passed deadline) reaches
those who follow that instance or its owner, the key directory, and every
page, through the same bus; with a real (SQLite) store and a test clock.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from portal_client import Browser

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.common.life import DEADLINES, State
from dit4c.portal.app import Portal
from dit4c.portal.channel import ChannelHub
from dit4c.portal.deadlines import DeadlineWatch
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.store.model import Instance


async def _instance(portal: Portal, state: State, scheduler: str = "hpc") -> Instance:
    """An instance of alice's, with a key, on a new ``scheduler``, in ``state``."""
    store = portal.store
    alice = await store.userByName("alice")
    image = await store.createImage("Tool", "tool", owner_id=None)
    placed = await store.createScheduler(scheduler, json.dumps(publicJWK(generatePrivateKey())))
    instance: Instance = await store.createInstance(
        alice.id, image.id, scheduler_id=placed.id, public_jwk=json.dumps(publicJWK(generatePrivateKey()))
    )
    updated: Instance = await store.updateInstance(instance.id, state=state)
    return updated


@pytest_twisted.ensureDeferred
async def test_a_change_reaches_its_followers_then_every_instance_subscriber(portal: Portal) -> None:
    instance = await _instance(portal, State.STARTING)
    running = await portal.store.updateInstance(instance.id, state=State.RUNNING)
    bus = InstanceEvents()
    heard: list[tuple[str, Any]] = []
    byInstance = bus.subscribeChanges(instance.id, lambda e: heard.append(("instance", e)))
    bus.subscribeChanges(instance.owner_id, lambda e: heard.append(("owner", e)))
    bus.subscribeChanges(None, lambda e: heard.append(("all", e)))
    bus.subscribeChanges("someone else", lambda e: heard.append(("other", e)))
    bus.subscribe(lambda i: heard.append(("page", i)))

    event = InstanceEvent(running, instance, "state")
    bus.changed(event)
    assert heard == [("instance", event), ("owner", event), ("all", event), ("page", running)]

    heard.clear()
    byInstance()
    bus.changed(event)
    assert [who for who, _ in heard] == ["owner", "all", "page"]


@pytest_twisted.ensureDeferred
async def test_the_hub_publishes_on_the_bus_it_is_given(portal: Portal) -> None:
    """The scheduler channel's subscribers are the bus's: one set of subscribers, not two."""
    instance = await _instance(portal, State.STARTING)
    hub = ChannelHub(portal.clock, portal.store, issuer="http://portal.test", events=portal.events, pollInterval=None)
    fromHub: list[InstanceEvent] = []
    hub.subscribe(instance.owner_id, fromHub.append)
    event = InstanceEvent(instance, instance, "key")
    portal.events.changed(event)
    assert fromHub == [event]


@pytest_twisted.ensureDeferred
async def test_a_change_on_the_bus_has_the_key_directory_read_afresh(portal: Portal) -> None:
    """A key published (or withdrawn) through the channel is in the JWKS at once, not after its 10 s."""
    instance = await _instance(portal, State.RUNNING)
    await Browser(portal).get("/.well-known/jwks.json")
    second = await _instance(portal, State.STARTING, "hpc2")

    async def kids() -> list[str]:
        _, body = await Browser(portal).get("/.well-known/jwks.json")
        return [k["kid"] for k in json.loads(body)["keys"]]

    assert f"instance:{instance.id}" in await kids() and f"instance:{second.id}" not in await kids()
    portal.events.publish(second)  # a page's own change: the directory keeps its 10 s
    assert f"instance:{second.id}" not in await kids()
    portal.events.changed(InstanceEvent(second, second, "key"))
    assert f"instance:{second.id}" in await kids()


@pytest_twisted.ensureDeferred
async def test_a_passed_deadline_goes_on_the_bus_with_what_the_instance_was(portal: Portal) -> None:
    instance = await _instance(portal, State.STOPPING)
    changes: list[InstanceEvent] = []
    pages: list[Instance] = []
    portal.events.subscribeChanges(instance.id, changes.append)
    portal.events.subscribe(pages.append)
    watch = DeadlineWatch(portal.clock, portal.store, events=portal.events, grace=60)
    portal.clock.advance(DEADLINES[State.STOPPING] + 61)  # type: ignore[attr-defined]
    [errored] = await watch.sweep()
    assert [(e.instance, e.previous.state, e.change) for e in changes] == [(errored, State.STOPPING, "state")]
    assert errored.state == State.ERRORED and pages == [errored]
