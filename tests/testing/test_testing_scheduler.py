"""
The stand-in scheduler (``dit4c.testing.scheduler``) used as its
documentation shows: registered in a real portal served on a loopback port,
connected to the portal's URL, it makes the instances a REST API client
starts run (with a URL), and a failure set on it reaches the client as the
instance's ``errored`` state and reason.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from support.passwords import cheapHash
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.life import State
from dit4c.testing.scheduler import TestingScheduler, registerScheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "portal"))
from portal_client import Client, startService, tokenFor  # noqa: E402

PASSWORD = "correct horse battery"


@pytest_twisted.ensureDeferred
async def test_a_portal_client_sees_instances_live_behind_the_stand_in(tmp_path: Path) -> None:
    service = await startService(tmp_path, "http://portal.test")
    portal = service.portal
    sim = TestingScheduler(reactor, failures={"save": "disk full"})
    try:
        await portal.store.createUser("alice", password_hash=cheapHash(PASSWORD))
        image = await portal.store.createImage("Notebook", "notebook:1", port=8888)
        scheduler, key = await registerScheduler(portal.store, "cluster")
        assert await portal.store.schedulerById(scheduler.id) is not None

        client = sim.connect(portal.testURL.replace("http://", "ws://"), scheduler.id, key)
        await client.whenConnected().addTimeout(10, reactor)
        alice = Client(portal, await tokenFor(portal, "alice", PASSWORD))

        code, started = await alice.call("POST", "/instances", {"image": image.id})
        assert code == 201 and started["scheduler"] == scheduler.id
        await sim.whenState(started["id"], State.RUNNING).addTimeout(10, reactor)

        async def seen(state: State) -> Any:
            code, instance = await alice.call("GET", f"/instances/{started['id']}")
            assert code == 200
            return instance if instance["state"] == state else None

        running = await eventually(lambda: seen(State.RUNNING), what="the portal sees the instance running")
        assert running["url"] == f"http://{started['id']}.localhost/"

        code, _ = await alice.call("POST", f"/instances/{started['id']}/save")
        assert code == 200
        errored = await eventually(lambda: seen(State.ERRORED), what="the portal sees the failed save")
        assert errored["reason"] == "disk full"
        assert (started["id"], State.SAVING) in sim.history
    finally:
        await sim.stop()
        await service.stopService()
