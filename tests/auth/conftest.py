"""
Fixtures for the auth helper's tests: a REAL portal (SQLite store, its own
keys, served on loopback with the real clock), alice, bob and carol, an
instance of alice's, the test backend as the tool, and the auth helper in
this process (see auth_client.World).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from auth_client import PASSWORDS, World, countingSite
from twisted.internet import defer, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from dit4c.common.keys import generate_private_key, save_private_key
from dit4c.portal import security
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore
from dit4c.testing import Backend, backendSite


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    # The portal learns its public URL only once it listens.
    site = Site(Resource())
    site.noisy = False
    portalPort = reactor.listenTCP(0, site, interface="127.0.0.1")
    portalURL = f"http://127.0.0.1:{portalPort.getHost().port}"
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=reactor)
    keys = KeyRing(tmp_path / "keys", issuer=portalURL, clock=reactor)
    portal = Portal(store, keys, PortalConfig(publicURL=portalURL, loginLimit=100), reactor)
    site.resource = portal.app.resource()
    users = {}
    for name, password in PASSWORDS.items():
        users[name] = await store.createUser(name, password_hash=await security.hashPassword(password))
    image = await store.createImage("Tool", "tool:latest", owner_id=None, port=8888)
    instance = await store.createInstance(users["alice"].id, image.id)
    instance = await store.updateInstance(instance.id, state="running")
    keyFile = tmp_path / "instance.pem"
    save_private_key(generate_private_key(), keyFile)
    seen: list[bytes] = []
    toolPort = reactor.listenTCP(0, countingSite(seen), interface="127.0.0.1")
    w = World(portal, portalURL, store, users, instance, keyFile, Backend(toolPort, backendSite()), seen)
    yield w
    for service in list(w.services):
        await defer.maybeDeferred(service.stopService)
    await defer.maybeDeferred(toolPort.stopListening)
    await defer.maybeDeferred(portalPort.stopListening)
    await store.close()


