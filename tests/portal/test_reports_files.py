"""
The file server's question to the portal (``POST /reports/file-access``):
whose storage may an instance reach? Over real HTTP on loopback with an
SQLite store: the owner's while the instance is active, nobody's otherwise,
and only the file server (its shared secret) may ask.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.web.server import Site

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore
from dit4c.portal.tap import Options

BASE = "http://portal.test"
SECRET = "file-server-" + secrets.token_urlsafe(24)


class FileWorld:
    portal: Portal
    base: str
    alice: Any
    bob: Any
    a: Any
    c: Any

    @property
    def store(self) -> Any:
        return self.portal.store


@pytest_twisted.async_yield_fixture
async def fworld(tmp_path: Path) -> Any:
    w = FileWorld()
    clock = Clock()
    clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=clock)
    w.portal = Portal(store, KeyRing(tmp_path / "keys", issuer=BASE, clock=clock), PortalConfig(publicURL=BASE), clock)
    w.portal.reports.setFileServerSecret(SECRET)
    w.alice = await store.createUser("alice")
    w.bob = await store.createUser("bob")
    image = await store.createImage("Tool", "tool:latest", port=8888)
    jwk = json.dumps(publicJWK(generatePrivateKey()))
    w.a = await store.createInstance(w.alice.id, image.id, public_jwk=jwk)
    w.a = await store.updateInstance(w.a.id, state="running")
    w.c = await store.createInstance(w.bob.id, image.id, public_jwk=jwk)
    port = reactor.listenTCP(0, Site(w.portal.app.resource()), interface="127.0.0.1")
    w.base = f"http://127.0.0.1:{port.getHost().port}"
    yield w
    await port.stopListening()
    await store.close()


async def ask(w: FileWorld, body: Any, secret: str | None = SECRET, contentType: str = "application/json") -> tuple[int, Any]:
    headers = {"Content-Type": contentType}
    if secret is not None:
        headers["X-DIT4C-File-Server"] = secret
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    response = await treq.post(w.base + "/reports/file-access", data=data, headers=headers)
    text = await response.text()
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    return response.code, json.loads(text)


@pytest_twisted.ensureDeferred
async def test_an_active_instance_reaches_its_owners_storage(fworld: FileWorld) -> None:
    w = fworld
    status, body = await ask(w, {"instance": w.a.id})
    assert status == 200, body
    assert body["allowed"] is True and body["user"] == w.alice.id and body["instance"] == w.a.id
    # Every active state counts: bob's instance is still "requested".
    status, body = await ask(w, {"instance": w.c.id})
    assert (status, body["user"]) == (200, w.bob.id)
    for state in ("starting", "stopping", "saving", "uploading"):
        await w.store.updateInstance(w.c.id, state=state)
        assert (await ask(w, {"instance": w.c.id}))[0] == 200, state


@pytest_twisted.ensureDeferred
async def test_an_instance_not_active_reaches_nothing(fworld: FileWorld) -> None:
    w = fworld
    for state in ("stopped", "saved", "errored", "discarded"):
        await w.store.updateInstance(w.a.id, state=state)
        status, body = await ask(w, {"instance": w.a.id})
        assert (status, body["allowed"]) == (403, False), state
        assert "user" not in body
    status, body = await ask(w, {"instance": "nosuchinstance"})
    assert (status, body["allowed"]) == (403, False)


@pytest_twisted.ensureDeferred
async def test_a_disabled_owner_reaches_nothing(fworld: FileWorld) -> None:
    w = fworld
    await w.store.updateUser(w.alice.id, disabled=True)
    status, body = await ask(w, {"instance": w.a.id})
    assert (status, body["allowed"]) == (403, False)


@pytest_twisted.ensureDeferred
async def test_only_the_file_server_may_ask(fworld: FileWorld) -> None:
    w = fworld
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observer)
    try:
        for secret in (None, "", "wrong", SECRET + "x", SECRET[:-1], SECRET.upper()):
            status, body = await ask(w, {"instance": w.a.id}, secret=secret)
            assert (status, body["error"]) == (403, "forbidden"), secret
        # Nor is the image server's header (or secret) the file server's.
        w.portal.reports.setImageServerSecret(SECRET)
        response = await treq.post(
            w.base + "/reports/file-access", data=json.dumps({"instance": w.a.id}).encode(),
            headers={"Content-Type": "application/json", "X-DIT4C-Image-Server": SECRET},
        )  # fmt: skip
        assert response.code == 403
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("file server secret" in line for line in seen)
    assert not any(SECRET in line for line in seen)
    assert SECRET.encode() not in repr(vars(w.portal.reports)).encode()

    w.portal.reports.setFileServerSecret(None)
    status, body = await ask(w, {"instance": w.a.id})
    assert (status, body["error"]) == (404, "not_found")
    with pytest.raises(ValueError):
        w.portal.reports.setFileServerSecret("short")


@pytest_twisted.ensureDeferred
async def test_malformed_questions(fworld: FileWorld) -> None:
    w = fworld
    for case in ("not json", "[]", {}, {"instance": 1}, {"instance": "Not An Id"}, {"instance": "../x"}):
        status, body = await ask(w, case)
        assert (status, body["error"]) == (400, "invalid_request"), case
    assert (await ask(w, {"instance": w.a.id}, contentType="text/plain"))[0] == 415
    assert (await ask(w, " " * (16 * 1024 + 1)))[0] == 413
    response = await treq.get(w.base + "/reports/file-access", headers={"X-DIT4C-File-Server": SECRET})
    assert response.code == 405


def test_the_portal_takes_a_file_server_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path), "--file-server-secret-file", str(secret)])
    assert options["file-server-secret"] == SECRET
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path)])
    assert options["file-server-secret"] is None
    secret.write_text("short")
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--file-server-secret-file", str(secret)])
    with pytest.raises(usage.UsageError):
        Options().parseOptions(["--file-server-secret-file", str(tmp_path / "missing")])
