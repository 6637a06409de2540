"""A catalogue entry's limits, kept by its saved images, and when traffic last reached an instance."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from dit4c.common.life import State
from dit4c.common.limits import ToolLimits
from dit4c.portal.store import IStore, NotFound

LIMITS = ToolLimits(cpus=1.5, memory=2048, idle=30, idleAction="save")


@pytest_twisted.ensureDeferred
async def test_limits_are_kept_with_the_entry_and_its_saved_images(store: IStore) -> None:
    alice = await store.createUser("alice")
    plain = await store.createImage("Notes", "notes")
    assert plain.limits == ToolLimits() and (await store.imageById(plain.id)).limits == ToolLimits()  # type: ignore[union-attr]
    limited = await store.createImage("Lab", "lab", port=8888, limits=LIMITS)
    assert (await store.imageById(limited.id)).limits == LIMITS  # type: ignore[union-attr]
    assert [i.limits for i in await store.listCatalogue()] == [LIMITS, ToolLimits()]

    instance = await store.createInstance(alice.id, limited.id)
    await store.updateInstance(instance.id, state=State.UPLOADING)
    saved, created = await store.saveInstanceImage(
        instance.id, "Lab (saved)", "http://images/sha256:" + "a" * 64, "sha256:" + "a" * 64, states=("uploading",)
    )
    assert created and saved.limits == LIMITS
    assert (await store.imageById(saved.id)).limits == LIMITS  # type: ignore[union-attr]

    changed = await store.setImageLimits(limited.id, ToolLimits(memory=512))
    assert changed.limits == ToolLimits(memory=512) == (await store.imageById(limited.id)).limits  # type: ignore[union-attr]
    assert (await store.setImageLimits(limited.id, ToolLimits())).limits == ToolLimits()
    with pytest.raises(NotFound):
        await store.setImageLimits("nope", LIMITS)


@pytest_twisted.ensureDeferred
async def test_traffic_is_kept_as_its_latest_time_and_idle_limits_are_found(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    lab = await store.createImage("Lab", "lab", limits=ToolLimits(idle=30))
    capped = await store.createImage("Capped", "capped", limits=ToolLimits(cpus=2.0))
    one, two, three = [await store.createInstance(alice.id, i.id) for i in (lab, lab, capped)]
    assert (await store.instanceById(one.id)).active_at is None  # type: ignore[union-attr]
    assert await store.markActive(one.id, 100.0)
    assert not await store.markActive(one.id, 50.0)  # an older report changes nothing
    assert (await store.instanceById(one.id)).active_at == 100.0  # type: ignore[union-attr]
    assert await store.listRunningWithIdleLimits() == []
    for instance in (one, two, three):
        await store.updateInstance(instance.id, state=State.RUNNING)
    found = await store.listRunningWithIdleLimits()
    assert sorted((i.id, i.active_at or 0, limits.idle) for i, limits in found) == sorted(
        [(one.id, 100.0, 30), (two.id, 0, 30)]
    )
