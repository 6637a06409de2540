"""Commands for schedulers: kept in order until acknowledged (the scheduler channel's queue)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from dit4c.portal.store import Conflict, IStore, NotFound
from dit4c.portal.store.interfaces import Command

JWK = json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})


async def _setup(store: IStore) -> tuple[str, str, list[str]]:
    alice = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest", port=8888)
    hpc = await store.createScheduler("hpc", JWK)
    cloud = await store.createScheduler("cloud", JWK)
    instances = [
        (await store.createInstance(alice.id, image.id, scheduler_id=hpc.id)).id for _ in range(3)
    ]
    return hpc.id, cloud.id, instances


@pytest_twisted.ensureDeferred
async def test_create_and_pending_in_order(store: IStore, clock: Clock) -> None:
    hpc, cloud, (i1, i2, _) = await _setup(store)
    start = await store.createCommand(hpc, i1, "start", {"image": "quay.io/x", "port": 8888})
    assert start == Command(
        start.id, hpc, i1, 1, "start", {"image": "quay.io/x", "port": 8888}, clock.seconds(), None
    )
    clock.advance(1)
    stop = await store.createCommand(hpc, i2, "stop")
    discard = await store.createCommand(hpc, i1, "discard", {})
    assert (stop.seq, discard.seq, stop.params) == (2, 3, {})
    assert await store.pendingCommands(hpc) == [start, stop, discard]
    assert await store.pendingCommands(hpc, limit=2) == [start, stop]
    assert await store.pendingCommands(cloud) == []
    assert await store.commandById(stop.id) == stop
    assert await store.commandById("nope") is None
    assert await store.commandedInstances(hpc) == {i1: True, i2: True}
    assert await store.commandedInstances(cloud) == {}
    # Each instance's latest command, acknowledged or not (the same second: in order made).
    assert (await store.latestCommandOp(i1), await store.latestCommandOp(i2)) == ("discard", "stop")
    await store.ackCommand(hpc, discard.id)
    await store.createCommand(hpc, i2, "save")
    assert (await store.latestCommandOp(i1), await store.latestCommandOp(i2)) == ("discard", "save")
    assert await store.latestCommandOp("nothing") is None


@pytest_twisted.ensureDeferred
async def test_ack(store: IStore, clock: Clock) -> None:
    hpc, cloud, (i1, i2, _) = await _setup(store)
    first = await store.createCommand(hpc, i1, "start")
    second = await store.createCommand(hpc, i2, "start")
    clock.advance(5)
    # Another scheduler cannot acknowledge it; unknown ids change nothing.
    assert await store.ackCommand(cloud, first.id) is False
    assert await store.ackCommand(hpc, "nope") is False
    assert await store.ackCommand(hpc, first.id) is True
    # Again is harmless, and says it changed nothing.
    assert await store.ackCommand(hpc, first.id) is False
    acked = await store.commandById(first.id)
    assert acked is not None and acked.acked == clock.seconds()
    assert await store.pendingCommands(hpc) == [second]
    assert await store.commandedInstances(hpc) == {i1: False, i2: True}
    # Sequence numbers keep growing after acknowledged commands.
    third = await store.createCommand(hpc, i1, "stop")
    assert third.seq == 3


@pytest_twisted.ensureDeferred
async def test_delete_acked(store: IStore, clock: Clock) -> None:
    hpc, _, (i1, i2, _) = await _setup(store)
    old = await store.createCommand(hpc, i1, "start")
    await store.ackCommand(hpc, old.id)
    clock.advance(100)
    newer = await store.createCommand(hpc, i2, "start")
    await store.ackCommand(hpc, newer.id)
    pending = await store.createCommand(hpc, i1, "stop")
    assert await store.deleteAckedCommands(clock.seconds() - 50) == 1
    assert await store.commandById(old.id) is None
    assert await store.commandById(newer.id) is not None
    assert await store.pendingCommands(hpc) == [pending]
    # All acknowledged ones gone: new commands still come after the pending one.
    assert await store.deleteAckedCommands(clock.seconds() + 1) == 1
    later = await store.createCommand(hpc, i2, "stop")
    assert later.seq > pending.seq


@pytest_twisted.ensureDeferred
async def test_refusals(store: IStore) -> None:
    hpc, cloud, (i1, _, _) = await _setup(store)
    with pytest.raises(ValueError, match="not a command"):
        await store.createCommand(hpc, i1, "explode")
    with pytest.raises(ValueError, match="JSON"):
        await store.createCommand(hpc, i1, "start", {"when": object()})
    with pytest.raises(ValueError, match="JSON"):
        await store.createCommand(hpc, i1, "start", {"x": float("nan")})
    with pytest.raises(ValueError, match="larger"):
        await store.createCommand(hpc, i1, "start", {"x": "y" * 70000})
    with pytest.raises(NotFound, match="no scheduler"):
        await store.createCommand("nope", i1, "start")
    with pytest.raises(NotFound, match="no instance"):
        await store.createCommand(hpc, "nope", "start")
    with pytest.raises(Conflict, match="not placed on scheduler"):
        await store.createCommand(cloud, i1, "start")
    assert await store.pendingCommands(hpc) == []


@pytest_twisted.ensureDeferred
async def test_concurrent_commands_take_distinct_seqs(store: IStore) -> None:
    hpc, _, instances = await _setup(store)
    made: list[Any] = await gatherResults(
        [store.createCommand(hpc, instances[n % 3], "start", {"n": n}) for n in range(20)]
    )
    assert sorted(c.seq for c in made) == list(range(1, 21))
    pending = await store.pendingCommands(hpc)
    assert [c.seq for c in pending] == list(range(1, 21))
