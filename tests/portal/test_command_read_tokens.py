"""
A saved image's read token (docs/protocols.md 7.3, 8.5) is made as its
``start`` command is sent down the scheduler channel, never stored: the
portal runs as ``PortalService`` on a loopback port, the testing scheduler
(the real channel client) dials ``/.dit4c/channel`` on it, and the image
server's question (``POST /reports/image-access``) is asked as the image
server asks it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from portal_client import startService
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from dit4c.portal.service import PortalService
from dit4c.testing.scheduler import TestingScheduler, registerScheduler

ISSUER = "http://portal.test"
SECRET = "image-server-secret-0123456789"
DIGEST = "sha256:" + "ab" * 32


@dataclass
class World:
    service: PortalService
    database: Path
    base: str
    alice: Any
    saved: Any
    scheduler: Any
    key: Any
    sims: list[TestingScheduler]

    @property
    def portal(self) -> Any:
        return self.service.portal

    async def connect(self) -> TestingScheduler:
        sim = TestingScheduler(reactor)
        self.sims.append(sim)
        client = sim.connect(self.base.replace("http", "ws") + "/.dit4c/channel", self.scheduler.id, self.key, issuer=ISSUER)
        await client.whenConnected().addTimeout(10, reactor)
        return sim

    async def reads(self, token: str) -> tuple[int, Any]:
        """What the portal answers the image server asking whether ``token`` may read the saved image."""
        response = await treq.post(
            self.base + "/reports/image-access",
            data=json.dumps({"method": "GET", "image": DIGEST, "headers": {"authorization": f"Bearer {token}"}}).encode(),
            headers=Headers({"X-DIT4C-Image-Server": [SECRET], "Content-Type": ["application/json"]}),
        )
        return response.code, await response.json()

    def storedCommands(self) -> list[tuple[str, str]]:
        with sqlite3.connect(self.database) as db:
            return [(op, params) for op, params in db.execute("SELECT op, params FROM commands ORDER BY seq")]


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    service = await startService(tmp_path, ISSUER, imageServerSecret=SECRET)
    w: World | None = None
    try:
        portal = service.portal
        store = portal.store
        alice = await store.createUser("alice")
        saved = await store.createImage("Saved", f"http://images.test/images/{DIGEST}", owner_id=alice.id, digest=DIGEST)
        scheduler, key = await registerScheduler(store, "cluster")
        w = World(service, tmp_path / "portal.db", portal.testURL, alice, saved, scheduler, key, [])
        yield w
    finally:
        for sim in w.sims if w else []:
            await sim.stop()
        await service.stopService()


async def startCommand(sim: TestingScheduler) -> Any:
    starts = await eventually(lambda: [c for c in sim.handled if c.op == "start"], what=lambda: repr(sim.handled))
    return starts[0]


@pytest_twisted.ensureDeferred
async def test_the_scheduler_gets_a_read_token_the_store_never_holds(world: World) -> None:
    sim = await world.connect()
    await world.portal.instances.start(world.alice, world.saved.id)
    command = await startCommand(sim)
    token = command.params["token"]
    assert command.params["image"] == world.saved.ref and command.params["digest"] == DIGEST

    # The token the node gets reads the image ...
    code, answer = await world.reads(token)
    assert (code, answer["allowed"], answer["via"]) == (200, True, "read-token")

    # ... and the store keeps no token at all: nothing there reads the image.
    stored = world.storedCommands()
    assert [op for op, _ in stored] == ["start"]
    params = json.loads(stored[0][1])
    assert params == {"image": world.saved.ref, "port": world.saved.port, "digest": DIGEST}
    assert token not in stored[0][1] and "eyJ" not in stored[0][1]


@pytest_twisted.ensureDeferred
async def test_a_command_that_waited_gets_its_token_when_it_is_sent(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started while the scheduler is away: the token is made as it connects, not when the command was stored."""
    await world.portal.instances.start(world.alice, world.saved.id)
    # A minute on for the portal's keys, after the command was stored.
    later = Clock()
    later.advance(reactor.seconds() + 60)
    monkeypatch.setattr(world.portal.keys, "clock", later)
    sim = await world.connect()
    command = await startCommand(sim)
    claims = jwt.decode(command.params["token"], options={"verify_signature": False})
    assert claims["iat"] == int(later.seconds()) and claims["image"] == world.saved.id
    assert "token" not in json.loads(world.storedCommands()[0][1])


@pytest_twisted.ensureDeferred
async def test_no_token_for_a_catalogue_image(world: World) -> None:
    catalogue = await world.portal.store.createImage("Notebook", "quay.io/jupyter/base-notebook", port=8888)
    sim = await world.connect()
    await world.portal.instances.start(world.alice, catalogue.id)
    command = await startCommand(sim)
    assert "token" not in command.params


@pytest_twisted.ensureDeferred
async def test_an_image_deleted_before_the_command_went_gets_no_token(world: World) -> None:
    await world.portal.instances.start(world.alice, world.saved.id)
    await world.portal.store.deleteImage(world.saved.id)
    sim = await world.connect()
    command = await startCommand(sim)
    assert "token" not in command.params
