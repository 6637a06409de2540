"""
What a scheduler reports, applied to the store (``dit4c.portal.channelupdates``):
the compare-and-set is on the state, so what others wrote meanwhile (the
listener's report of the instance's URL) must survive a state applied from
an older read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor

from dit4c.channel.wire import InstanceStatus
from dit4c.common.life import State
from dit4c.portal.channelupdates import InstanceUpdates
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.store import openStore
from dit4c.testing.scheduler import registerScheduler


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    store = await openStore(f"sqlite://{tmp_path}/portal.db", reactor)
    scheduler, _ = await registerScheduler(store, "hpc")
    user = await store.createUser("alice")
    image = await store.createImage("Notes", "notes", port=8888)
    instance = await store.createInstance(user.id, image.id, scheduler_id=scheduler.id)
    starting = await store.updateInstance(instance.id, state=State.STARTING)
    events = InstanceEvents()
    heard: list[InstanceEvent] = []
    events.subscribeChanges(None, heard.append)
    try:
        yield store, InstanceUpdates(store, events), scheduler.id, starting, heard
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_running_applied_from_an_older_read_keeps_the_url_reported_meanwhile(world: Any) -> None:
    """
    The node says ``running`` (with no URL: the listener reports it) while
    the listener's report lands: the URL stays, in the store and in what
    the pages hear, and the page shows the link.
    """
    store, updates, schedulerId, starting, heard = world
    url = f"http://{starting.id}.localhost/"
    await store.updateInstance(starting.id, url=url, expected_state=list(State))
    await updates.applyStatus(schedulerId, InstanceStatus(starting.id, State.RUNNING), known=starting)
    stored = await store.instanceById(starting.id)
    assert (stored.state, stored.url) == (State.RUNNING, url)
    assert (heard[-1].instance.state, heard[-1].instance.url) == (State.RUNNING, url)


@pytest_twisted.ensureDeferred
async def test_a_state_that_ends_serving_clears_the_url(world: Any) -> None:
    store, updates, schedulerId, starting, _ = world
    running = await store.updateInstance(starting.id, state=State.RUNNING, url="http://a.localhost/")
    await updates.applyStatus(schedulerId, InstanceStatus(running.id, State.STOPPING), known=running)
    assert (await store.instanceById(running.id)).url is None


@pytest_twisted.ensureDeferred
async def test_a_url_the_scheduler_names_is_stored(world: Any) -> None:
    store, updates, schedulerId, starting, _ = world
    await updates.applyStatus(
        schedulerId, InstanceStatus(starting.id, State.RUNNING, url="http://b.localhost/"), known=starting
    )
    assert (await store.instanceById(starting.id)).url == "http://b.localhost/"


@pytest_twisted.ensureDeferred
async def test_why_a_stop_or_save_was_asked_for_stays_unless_the_node_says_why(world: Any) -> None:
    store, updates, schedulerId, starting, _ = world
    why = "Stopped after 30 min without use."
    await store.updateInstance(starting.id, state=State.STOPPING, reason=why)
    await updates.applyStatus(schedulerId, InstanceStatus(starting.id, State.STOPPED))
    assert ((await store.instanceById(starting.id)).state, (await store.instanceById(starting.id)).reason) == (State.STOPPED, why)
    # A save carries it to the end too; a node's own reason replaces it.
    await store.updateInstance(starting.id, state=State.SAVING, reason="Saved after 5 min without use.")
    await updates.applyStatus(schedulerId, InstanceStatus(starting.id, State.UPLOADING))
    await updates.applyStatus(schedulerId, InstanceStatus(starting.id, State.SAVED))
    assert (await store.instanceById(starting.id)).reason == "Saved after 5 min without use."
    await store.updateInstance(starting.id, state=State.STOPPING, reason=why)
    await updates.applyStatus(schedulerId, InstanceStatus(starting.id, State.ERRORED, "The tool would not stop."))
    assert (await store.instanceById(starting.id)).reason == "The tool would not stop."
