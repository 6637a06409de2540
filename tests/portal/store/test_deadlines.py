"""
The portal's watch over transient states (dit4c.portal.deadlines), on
SQLite and PostgreSQL: an instance stuck past its deadline is errored with
the reason, once, and can then be discarded.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from support.waiting import eventually
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dit4c.common.life import DEADLINES, TRANSIENT, Life, State, expiredReason
from dit4c.portal.deadlines import DeadlineWatch
from dit4c.portal.store import IStore

GRACE = 60.0


async def _instances(store: IStore, states: list[State]) -> dict[State, str]:
    alice = await store.createUser("alice")
    image = await store.createImage("Notes", "dit4c/notes")
    scheduler = await store.createScheduler("s", "{}")
    made = {}
    for state in states:
        instance = await store.createInstance(alice.id, image.id, scheduler_id=scheduler.id)
        await store.updateInstance(instance.id, state=state, url="http://x.localhost/")
        made[state] = instance.id
    return made


@pytest_twisted.ensureDeferred
async def test_stuck_instances_are_errored_with_the_reason(store: IStore, clock: Clock) -> None:
    made = await _instances(store, [*sorted(TRANSIENT), State.RUNNING, State.STOPPED, State.REQUESTED])
    published: list[Any] = []
    watch = DeadlineWatch(clock, store, published.append, grace=GRACE)

    # Within every deadline: nothing happens.
    clock.advance(min(DEADLINES.values()))
    assert await watch.sweep() == []

    # Past the shortest (stopping) plus the grace: only that one.
    clock.advance(GRACE + 1)
    errored = await watch.sweep()
    assert [i.id for i in errored] == [made[State.STOPPING]]
    stopped = await store.instanceById(made[State.STOPPING])
    assert (stopped.state, stopped.reason, stopped.url) == (
        State.ERRORED,
        expiredReason(State.STOPPING),
        None,
    )
    assert published == errored

    # Past every deadline: each transient one, once; states at rest are never touched.
    clock.advance(max(DEADLINES.values()))
    errored += await watch.sweep()
    assert sorted(i.id for i in errored) == sorted(made[s] for s in TRANSIENT)
    assert await watch.sweep() == []
    for state in (State.RUNNING, State.STOPPED, State.REQUESTED):
        assert (await store.instanceById(made[state])).state is state
    for state in TRANSIENT:
        instance = await store.instanceById(made[state])
        assert instance.reason == expiredReason(state)
        # An errored instance can always be discarded.
        assert Life(instance.state).act("discard") is State.DISCARDING


@pytest_twisted.ensureDeferred
async def test_a_word_from_the_node_restarts_the_clock_and_wins(store: IStore, clock: Clock) -> None:
    made = await _instances(store, [State.UPLOADING])
    instance = made[State.UPLOADING]
    watch = DeadlineWatch(clock, store, lambda _: None, grace=GRACE)
    # Progress keeps coming: the upload is not stuck however long it takes.
    for sent in range(5):
        clock.advance(DEADLINES[State.UPLOADING] / 2)
        await store.updateInstance(instance, state=State.UPLOADING, reason=f"{sent} MB sent")
        assert await watch.sweep() == []
    # The node's word arrives between the look and the change: the node wins.
    clock.advance(DEADLINES[State.UPLOADING] + GRACE + 1)
    stale = await store.listInstancesIn([State.UPLOADING], clock.seconds() - DEADLINES[State.UPLOADING])
    assert [i.id for i in stale] == [instance]
    await store.updateInstance(instance, state=State.SAVED, reason=None)
    assert await watch._expire(stale[0], State.UPLOADING) is None
    assert (await store.instanceById(instance)).state is State.SAVED


@pytest_twisted.ensureDeferred
async def test_the_watch_looks_while_it_runs(store: IStore, clock: Clock) -> None:
    made = await _instances(store, [State.DISCARDING])
    published: list[Any] = []
    watch = DeadlineWatch(clock, store, published.append, interval=30, grace=GRACE)
    # Each look the running watch makes, once it has ended (against a real database).
    looks: list[list[Any]] = []
    look = watch.sweep

    async def looked() -> list[Any]:
        errored = await look()
        looks.append(errored)
        return errored

    def counted() -> Any:
        return Deferred.fromCoroutine(looked())

    watch.sweep = counted  # type: ignore[method-assign]
    watch.startService()
    try:
        await eventually(lambda: len(looks) == 1, what="the first look, at once")
        assert published == []  # nothing is stuck yet
        clock.advance(DEADLINES[State.DISCARDING] + GRACE)
        await eventually(lambda: len(looks) == 2, what="a look as the deadline passes")
        clock.advance(30)
        await eventually(lambda: len(looks) == 3, what="the next look")
        assert [i.id for i in published] == [made[State.DISCARDING]]
    finally:
        watch.stopService()
