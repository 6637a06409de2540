"""
Fixtures for the image server's tests: a real portal (SQLite store, a test
clock) on a loopback port with the image server's secret set, people and
instances with keys, and image servers in this process that ask it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from imageserver_client import BASE, SECRET, World
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.server import Site

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    w = World()
    w.tmp = tmp_path
    w.servers = []
    w.clock = Clock()
    w.clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=w.clock)
    keys = KeyRing(tmp_path / "keys", issuer=BASE, clock=w.clock)
    w.portal = Portal(store, keys, PortalConfig(publicURL=BASE), w.clock)
    w.portal.reports.setImageServerSecret(SECRET)
    w.alice = await store.createUser("alice")
    w.bob = await store.createUser("bob")
    w.source = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest", port=8888)
    w.keyA, w.keyB = generatePrivateKey(), generatePrivateKey()
    w.a = await store.createInstance(w.alice.id, w.source.id, public_jwk=json.dumps(publicJWK(w.keyA)))
    w.a = await store.updateInstance(w.a.id, state="uploading")
    w.b = await store.createInstance(w.alice.id, w.source.id, public_jwk=json.dumps(publicJWK(w.keyB)))
    w.b = await store.updateInstance(w.b.id, state="running")
    site = Site(w.portal.app.resource())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    w.portalURL = f"http://127.0.0.1:{port.getHost().port}"
    yield w
    for service in w.servers:
        await service.stopService()
    await port.stopListening()
    await store.close()


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Everything logged during the test, formatted."""
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event) or "")
        lines.append(repr(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)
