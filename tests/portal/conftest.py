"""
Fixtures for the portal's tests: a portal served on a real loopback port
with an SQLite store and a test clock, and clients that keep cookies or
carry an API token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from portal_client import serve, startService
from support.passwords import cheapHash
from support.portal import RecordingCommands
from twisted.internet import reactor
from twisted.internet.task import Clock

from dit4c.common.httpsite import FrontRequest
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore

BASE = "http://portal.test"


@pytest_twisted.async_yield_fixture
async def portal(tmp_path: Path) -> Any:
    clock = Clock()
    clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=clock)
    keys = KeyRing(tmp_path / "keys", issuer=BASE, clock=clock)
    portal = Portal(store, keys, PortalConfig(publicURL=BASE, loginLimit=3), clock)
    password = cheapHash("correct horse battery")
    await store.createUser("alice", password_hash=password, display_name="Alice A.")
    port = serve(portal)
    yield portal
    await port.stopListening()
    await store.close()


@pytest_twisted.async_yield_fixture
async def running(tmp_path: Path) -> Any:
    """The portal as ``twistd dit4c-portal`` makes it, at ``http://portal.localhost:PORT``, with alice."""
    service = await startService(tmp_path, "http://portal.localhost")
    await service.portal.store.createUser(
        "alice", password_hash=cheapHash("correct horse battery"), display_name="Alice A."
    )
    yield f"http://portal.localhost:{service.ports[0].port.getHost().port}"
    await service.stopService()


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path) -> Any:
    clock = Clock()
    clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=clock)
    commands = RecordingCommands()
    portal = Portal(
        store,
        KeyRing(tmp_path / "keys", issuer="http://portal.test", clock=clock),
        PortalConfig(publicURL="http://portal.test", defaultQuota=2),
        clock,
        commands,
    )
    portal.commands = commands  # type: ignore[attr-defined]
    await store.createUser("alice", password_hash=cheapHash("correct horse battery"))
    await store.createUser("bob", password_hash=cheapHash("bobs password!"))
    await store.createUser("root", password_hash=cheapHash("root password!"), is_admin=True)
    scheduler = await store.createScheduler("cluster", json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}))
    commands.connectedIds.add(scheduler.id)
    portal.image = await store.createImage("Tool", "tool:latest", owner_id=None, port=8888)  # type: ignore[attr-defined]
    port = serve(portal)
    yield portal
    await port.stopListening()
    await store.close()


@pytest.fixture
def requestsLost(monkeypatch: Any) -> list[object]:
    """The portal's requests whose client went away before their answer, as the portal notices it."""
    lost: list[object] = []
    noticed = FrontRequest.connectionLost

    def connectionLost(request: FrontRequest, reason: Any) -> None:
        lost.append(request)
        noticed(request, reason)

    monkeypatch.setattr(FrontRequest, "connectionLost", connectionLost)
    return lost
