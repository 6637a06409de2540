"""Which people may run instances on which scheduler."""

from __future__ import annotations

import pytest
import pytest_twisted

from dit4c.portal.store import IStore, NotFound


@pytest_twisted.ensureDeferred
async def test_schedulers_are_open_to_all_until_restricted(store: IStore) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    open_ = await store.createScheduler("open", "{}")
    private = await store.createScheduler("private", "{}")
    off = await store.createScheduler("off", "{}")
    await store.updateScheduler(off.id, disabled=True)
    assert [s.name for s in await store.schedulersFor(bob.id)] == ["open", "private"]

    await store.setSchedulerUsers(private.id, [alice.id])
    assert await store.schedulerUsers(private.id) == [alice.id]
    assert [s.name for s in await store.schedulersFor(alice.id)] == ["open", "private"]
    assert [s.name for s in await store.schedulersFor(bob.id)] == ["open"]

    await store.setSchedulerUsers(private.id, [])
    assert [s.name for s in await store.schedulersFor(bob.id)] == ["open", "private"]
    assert open_.id != private.id
    with pytest.raises(NotFound):
        await store.setSchedulerUsers("nope", [alice.id])
