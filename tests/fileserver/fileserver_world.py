"""
The world of the file server's tests: a real portal (SQLite store, served
on loopback) holding instances of alice and bob with keys, and a file server
asking it, on a real loopback port.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from twisted.conch.ssh import keys
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.web.server import Site

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.fileserver.service import FileServerService
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore

SECRET = "file-server-" + secrets.token_urlsafe(24)


class World:
    """The portal, its people and instances, the file server."""

    portal: Portal
    portalURL: str
    tmp: Path
    alice: Any
    bob: Any
    a: Any  # alice's, running
    b: Any  # alice's, running
    c: Any  # bob's, running
    d: Any  # alice's, stopped
    keyA: Any
    keyB: Any
    keyC: Any
    keyD: Any
    server: FileServerService
    port: int
    hostKey: keys.Key
    services: list[FileServerService]

    @property
    def store(self) -> Any:
        return self.portal.store

    def home(self, user: Any) -> Path:
        return self.tmp / "files" / "users" / user.id

    def startServer(self, **options: Any) -> FileServerService:
        """Another file server on the same data directory (other limits)."""
        service = FileServerService(
            reactor, endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
            dataDir=self.tmp / "files", portal=self.portalURL, secret=SECRET, **options,
        )  # fmt: skip
        service.startService()
        self.services.append(service)
        return service


def portOf(service: FileServerService) -> int:
    port = service.listeners[0].port
    assert port is not None
    return int(port.getHost().port)  # type: ignore[attr-defined]


async def makeWorld(tmp_path: Path) -> Any:
    """An async generator: the world, then its teardown."""
    w = World()
    w.tmp = tmp_path
    w.services = []
    clock = Clock()
    clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=clock)
    w.portal = Portal(store, KeyRing(tmp_path / "keys", issuer="http://portal.test", clock=clock), PortalConfig(publicURL="http://portal.test"), clock)
    w.portal.reports.setFileServerSecret(SECRET)
    w.alice = await store.createUser("alice")
    w.bob = await store.createUser("bob")
    scheduler = await store.createScheduler("cluster", json.dumps(publicJWK(generatePrivateKey())))
    image = await store.createImage("Tool", "tool:latest", port=8888)
    for name, owner, state in (("a", w.alice, "running"), ("b", w.alice, "running"), ("c", w.bob, "running"), ("d", w.alice, "stopped")):
        key = generatePrivateKey()
        instance = await store.createInstance(owner.id, image.id, scheduler_id=scheduler.id, public_jwk=json.dumps(publicJWK(key)))
        instance = await store.updateInstance(instance.id, state=state)
        setattr(w, name, instance)
        setattr(w, "key" + name.upper(), key)
    site = Site(w.portal.app.resource())
    listening = reactor.listenTCP(0, site, interface="127.0.0.1")
    w.portalURL = f"http://127.0.0.1:{listening.getHost().port}"
    w.server = w.startServer()
    w.port = portOf(w.server)
    w.hostKey = w.server.factory.hostKey.public()
    yield w
    for service in w.services:
        await service.stopService()
    await listening.stopListening()
    await store.close()
