"""
Reports from instances' helpers (the instance's URL, a saved image) and the
image server's question, over real HTTP on loopback with an SQLite store and
a test clock: the happy paths, and the forgeries and replays they must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.server import Site

from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.common.tokens import TokenSigner
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.reportrules import (
    READ_AUDIENCE,
    REPORT_AUDIENCE,
    UPLOAD_AUDIENCE,
    checkInstanceURL,
    imageReadToken,
)
from dit4c.portal.reports import Reports
from dit4c.portal.store import openStore

BASE = "http://portal.test"
SECRET = "image-server-" + secrets.token_urlsafe(24)
DIGEST = "sha256:" + "5e" * 32
OTHER_DIGEST = "sha256:" + "0f" * 32
IMAGES = "https://images.example.org/v1/"


# -- a portal, people, instances with keys ---------------------------------------------------------


class World:
    portal: Portal
    clock: Clock
    base: str
    alice: Any
    bob: Any
    carol: Any
    source: Any
    a: Any
    b: Any
    keyA: Any
    keyB: Any
    events: list[Any]

    @property
    def store(self) -> Any:
        return self.portal.store


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    w = World()
    w.clock = Clock()
    w.clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=w.clock)
    keys = KeyRing(tmp_path / "keys", issuer=BASE, clock=w.clock)
    w.portal = Portal(store, keys, PortalConfig(publicURL=BASE), w.clock)
    w.portal.reports.setImageServerSecret(SECRET)
    w.alice = await store.createUser("alice")
    w.bob = await store.createUser("bob")
    w.carol = await store.createUser("carol")
    w.source = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest", port=8888)
    w.keyA, w.keyB = generatePrivateKey(), generatePrivateKey()
    w.a = await store.createInstance(w.alice.id, w.source.id, public_jwk=json.dumps(publicJWK(w.keyA)))
    w.a = await store.updateInstance(w.a.id, state="running")
    w.b = await store.createInstance(w.alice.id, w.source.id, public_jwk=json.dumps(publicJWK(w.keyB)))
    w.b = await store.updateInstance(w.b.id, state="running")
    w.events = []
    unsubscribe = w.portal.events.subscribe(w.events.append)
    port = reactor.listenTCP(0, Site(w.portal.app.resource()), interface="127.0.0.1")
    w.base = f"http://127.0.0.1:{port.getHost().port}"
    yield w
    unsubscribe()
    await port.stopListening()
    await store.close()


def sign(
    w: World, key: Any, instance: Any, audience: str = REPORT_AUDIENCE, lifetime: float = 60,
    jti: str | None = "", **claims: Any,
) -> str:  # fmt: skip
    """A token as a helper signs it: ``sub`` the instance id, a fresh ``jti``."""
    body: dict[str, Any] = {"sub": instance if isinstance(instance, str) else instance.id}
    if jti is not None:
        body["jti"] = jti or secrets.token_urlsafe(16)
    body.update(claims)
    return TokenSigner(key, clock=w.clock).sign(body, audience=audience, lifetime=lifetime)


async def post(w: World, path: str, body: bytes | str, contentType: str = "application/jwt", **headers: str) -> tuple[int, Any]:
    if isinstance(body, str):
        body = body.encode()
    response = await treq.post(
        w.base + path, data=body, headers={"Content-Type": contentType, **headers}, allow_redirects=False
    )
    text = await response.text()
    assert response.headers.getRawHeaders("content-type") == ["application/json"], text
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    return response.code, json.loads(text)


def urlOf(instance: Any) -> str:
    return f"http://{instance.id}.localhost:8080/"


async def reportURL(w: World, token: str) -> tuple[int, Any]:
    return await post(w, "/reports/url", token)


# -- POST /reports/url --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_instance_reports_its_url(world: World) -> None:
    w = world
    status, body = await reportURL(w, sign(w, w.keyA, w.a, url=urlOf(w.a)))
    assert status == 200, body
    assert body == {"instance": w.a.id, "url": urlOf(w.a), "state": "running"}
    assert (await w.store.instanceById(w.a.id)).url == urlOf(w.a)
    # Pages watching the instance hear of it.
    assert [(e.id, e.url) for e in w.events] == [(w.a.id, urlOf(w.a))]

    # A new URL (another routing server) replaces it; the same again changes nothing.
    https = f"https://{w.a.id}.tunnels.example.org/"
    assert (await reportURL(w, sign(w, w.keyA, w.a, url=https)))[0] == 200
    assert (await reportURL(w, sign(w, w.keyA, w.a, url=https)))[0] == 200
    assert (await w.store.instanceById(w.a.id)).url == https
    assert len(w.events) == 2


@pytest_twisted.ensureDeferred
async def test_a_forged_report_is_refused(world: World) -> None:
    w = world
    forged = sign(w, generatePrivateKey(), w.a, url=urlOf(w.a))
    status, body = await reportURL(w, forged)
    assert status == 401 and body["error"] == "invalid_token", body
    assert "unknown key" in body["reason"]
    assert (await w.store.instanceById(w.a.id)).url is None
    assert w.events == []


@pytest_twisted.ensureDeferred
async def test_one_instance_cannot_report_for_another(world: World) -> None:
    w = world
    # B's key, A's name, A's URL.
    status, body = await reportURL(w, sign(w, w.keyB, w.a, url=urlOf(w.a)))
    assert status == 401 and body["error"] == "invalid_token", body
    # B's key and B's name, but A's URL.
    status, body = await reportURL(w, sign(w, w.keyB, w.b, url=urlOf(w.a)))
    assert status == 403 and body["error"] == "wrong_host", body
    # A kid header naming nothing, or another instance's key, is no help either.
    token = jwt.encode(
        {"sub": w.a.id, "jti": "x", "aud": REPORT_AUDIENCE, "iat": int(w.clock.seconds()),
         "exp": int(w.clock.seconds()) + 60, "url": urlOf(w.a)},
        w.keyB, algorithm="ES256",
    )  # fmt: skip
    status, body = await reportURL(w, token)
    assert status == 401, body
    assert (await w.store.instanceById(w.a.id)).url is None


@pytest_twisted.ensureDeferred
async def test_an_expired_report_is_refused(world: World) -> None:
    w = world
    token = sign(w, w.keyA, w.a, lifetime=60, url=urlOf(w.a))
    w.clock.advance(60 + 30)  # past exp and the leeway
    status, body = await reportURL(w, token)
    assert (status, body["error"]) == (401, "invalid_token")
    assert "expired" in body["reason"]


@pytest_twisted.ensureDeferred
async def test_a_replayed_report_is_refused(world: World) -> None:
    w = world
    token = sign(w, w.keyA, w.a, url=urlOf(w.a))
    assert (await reportURL(w, token))[0] == 200
    # Someone changes the URL meanwhile; the old report replayed must not undo it.
    newer = f"http://{w.a.id}.other.localhost/"
    assert (await reportURL(w, sign(w, w.keyA, w.a, url=newer)))[0] == 200
    status, body = await reportURL(w, token)
    assert (status, body["error"]) == (401, "replayed")
    assert (await w.store.instanceById(w.a.id)).url == newer
    # Even long after, while the token verifies (leeway included), it stays spent.
    w.clock.advance(85)
    assert (await reportURL(w, token))[1]["error"] == "replayed"
    # The same jti from another instance is another token.
    assert (await reportURL(w, sign(w, w.keyB, w.b, jti="shared", url=urlOf(w.b))))[0] == 200
    assert (await reportURL(w, sign(w, w.keyA, w.a, jti="shared", url=urlOf(w.a))))[0] == 200


@pytest_twisted.ensureDeferred
async def test_tokens_for_another_audience_are_refused(world: World) -> None:
    w = world
    for audience in ("dit4c-routing", UPLOAD_AUDIENCE, READ_AUDIENCE, f"dit4c-instance:{w.a.id}"):
        status, body = await reportURL(w, sign(w, w.keyA, w.a, audience=audience, url=urlOf(w.a)))
        assert (status, body["reason"]) == (401, "The token was refused: wrong audience."), audience


def hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 token made by hand (PyJWT will not use a key that looks like a JWK as a secret)."""

    def part(data: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=")

    signed = part({"alg": "HS256", "typ": "JWT"}) + b"." + part(claims)
    mac = base64.urlsafe_b64encode(hmac.new(secret, signed, hashlib.sha256).digest()).rstrip(b"=")
    return (signed + b"." + mac).decode()


@pytest_twisted.ensureDeferred
async def test_unsigned_and_badly_made_tokens_are_refused(world: World) -> None:
    w = world
    now = int(w.clock.seconds())
    claims = {"sub": w.a.id, "jti": "j1", "aud": REPORT_AUDIENCE, "iat": now, "exp": now + 60, "url": urlOf(w.a)}

    def es256(**changes: Any) -> str:
        """``claims`` with ``changes`` (None: left out), signed by A's key."""
        changed = {k: v for k, v in {**claims, **changes}.items() if v is not None}
        return jwt.encode(changed, w.keyA, algorithm="ES256")

    cases = {
        "alg none": (jwt.encode(claims, None, algorithm="none"), "algorithm not allowed"),  # type: ignore[arg-type]
        "HS256 with the public key as secret": (
            hs256(claims, json.dumps(publicJWK(w.keyA)).encode()), "algorithm not allowed"
        ),
        "no exp": (es256(exp=None), "missing exp claim"),
        "exp more than 5 minutes after iat": (es256(exp=now + 301), "at most 300 s after its iat"),
        "no jti": (es256(jti=None), "needs a jti claim"),
        "empty jti": (es256(jti=""), "needs a jti claim"),
        "jti too long": (es256(jti="j" * 256), "needs a jti claim"),
        "no sub": (es256(sub=None), "sub claim must be an instance id"),
        "sub not an instance id": (es256(sub="A.B"), "sub claim must be an instance id"),
        "unknown instance": (es256(sub="zzzzzzzzzzzzzzzzz"), "unknown, or has no key"),
        "issued in the future": (es256(iat=now + 120, exp=now + 180), "not yet valid"),
        "not a JWT": ("hello", "malformed token"),
        "empty": ("", "must be a JWT"),
    }
    for what, (token, reason) in cases.items():
        status, body = await reportURL(w, token)
        assert status == 401 and body["error"] == "invalid_token", (what, body)
        assert reason in body["reason"], (what, body)
    assert (await w.store.instanceById(w.a.id)).url is None
    # The exact 5 minutes is fine.
    good = jwt.encode({**claims, "exp": now + 300}, w.keyA, algorithm="ES256")
    assert (await reportURL(w, good))[0] == 200


@pytest_twisted.ensureDeferred
async def test_a_url_for_another_host_name_is_refused(world: World) -> None:
    w = world
    host = f"{w.a.id}.localhost"
    forbidden = [
        f"http://{w.b.id}.localhost/",
        "http://evil.example.org/",
        f"http://{w.a.id}evil.localhost/",
        f"http://x{w.a.id}.localhost/",
        f"http://evil.{host}/",
        f"http://{w.a.id}/",
        "http://127.0.0.1/",
    ]
    malformed = [
        f"ftp://{host}/",
        f"javascript://{host}/",
        f"http://user@{host}/",
        f"http://{w.b.id}.localhost@{host}/",
        f"http://{host}@evil.example.org/",
        f"http://{host}/?x=1",
        f"http://{host}/#x",
        f"http://{w.a.id.upper()}.localhost/",
        f"http://{host}:/",
        f"http://{host}:99999/",
        f"http://{host}./",
        f"http://{host}/ x",
        f"http://{host}/\u00e9",
        f"http://{host}/" + "x" * 2048,
        "",
        42,
    ]
    for url in forbidden:
        status, body = await reportURL(w, sign(w, w.keyA, w.a, url=url))
        assert (status, body["error"]) == (403, "wrong_host"), (url, body)
    for url in malformed:
        status, body = await reportURL(w, sign(w, w.keyA, w.a, url=url))
        assert (status, body["error"]) == (400, "invalid_request"), (url, body)
    status, body = await reportURL(w, sign(w, w.keyA, w.a))
    assert (status, body["reason"]) == (400, "The url claim is missing.")
    assert (await w.store.instanceById(w.a.id)).url is None
    assert w.events == []


def test_instance_url_rules() -> None:
    assert checkInstanceURL("https://abc.example.org", "abc") == "https://abc.example.org"
    assert checkInstanceURL("http://abc.localhost:8080/x/", "abc") == "http://abc.localhost:8080/x/"
    assert checkInstanceURL("https://abc.r1.example.org/", "abc", ["r1.example.org"])
    with pytest.raises(Exception, match="routing domains"):
        checkInstanceURL("https://abc.example.org/", "abc", ["r1.example.org"])


@pytest_twisted.ensureDeferred
async def test_only_active_instances_take_a_url(world: World) -> None:
    w = world
    for state in ("discarded", "errored", "saved", "stopped"):
        await w.store.updateInstance(w.a.id, state=state, url=None)
        status, body = await reportURL(w, sign(w, w.keyA, w.a, url=urlOf(w.a)))
        assert (status, body["error"]) == (409, "wrong_state"), state
        assert state in body["reason"]
        assert (await w.store.instanceById(w.a.id)).url is None
    for state in ("requested", "starting", "running", "stopping", "saving", "uploading"):
        await w.store.updateInstance(w.a.id, state=state, url=None)
        assert (await reportURL(w, sign(w, w.keyA, w.a, url=urlOf(w.a))))[0] == 200, state


@pytest_twisted.ensureDeferred
async def test_an_instance_without_a_key_cannot_report(world: World) -> None:
    w = world
    await w.store.updateInstance(w.a.id, public_jwk=None)
    status, body = await reportURL(w, sign(w, w.keyA, w.a, url=urlOf(w.a)))
    assert (status, body["error"]) == (401, "invalid_token")


@pytest_twisted.ensureDeferred
async def test_report_bodies_are_small_jwts(world: World) -> None:
    w = world
    token = sign(w, w.keyA, w.a, url=urlOf(w.a))
    status, body = await post(w, "/reports/url", token, "application/json")
    assert (status, body["error"]) == (415, "unsupported_media_type")
    status, body = await post(w, "/reports/url", "x" * (16 * 1024 + 1))
    assert (status, body["error"]) == (413, "too_large")
    # A token the size of the limit is read, and refused as a token.
    status, body = await post(w, "/reports/url", "x" * (16 * 1024))
    assert status == 401
    status, body = await post(w, "/reports/url", b"\xff\xfe")
    assert status == 401
    response = await treq.get(w.base + "/reports/url")
    assert response.code == 405
    assert json.loads(await response.text())["error"] == "method_not_allowed"
    # A trailing newline is fine.
    assert (await post(w, "/reports/url", token + "\n"))[0] == 200


# -- POST /reports/image ----------------------------------------------------------------------------


async def reportImage(w: World, token: str) -> tuple[int, Any]:
    return await post(w, "/reports/image", token)


def imageClaims(digest: str = DIGEST, **more: Any) -> dict[str, Any]:
    return {"image_url": IMAGES + digest, "digest": digest, **more}


@pytest_twisted.ensureDeferred
async def test_an_instance_reports_its_saved_image(world: World) -> None:
    w = world
    await w.store.updateInstance(w.a.id, state="uploading")
    status, body = await reportImage(w, sign(w, w.keyA, w.a, **imageClaims(name="My analysis")))
    assert status == 201, body
    assert body["created"] is True and body["digest"] == DIGEST and body["name"] == "My analysis"
    image = await w.store.imageById(body["image"])
    assert (image.owner_id, image.ref, image.digest, image.port) == (w.alice.id, IMAGES + DIGEST, DIGEST, 8888)
    assert [i.id for i in await w.store.listImagesOf(w.alice.id)] == [image.id]
    assert [e.id for e in w.events] == [w.a.id]

    # The helper retries (its answer was lost): a new token, the same digest.
    status, again = await reportImage(w, sign(w, w.keyA, w.a, **imageClaims()))
    assert status == 200, again
    assert (again["image"], again["created"]) == (image.id, False)
    assert len(await w.store.listImagesOf(w.alice.id)) == 1

    # The very same token again is a replay.
    token = sign(w, w.keyA, w.a, **imageClaims(OTHER_DIGEST))
    assert (await reportImage(w, token))[0] == 201
    assert (await reportImage(w, token))[1]["error"] == "replayed"
    assert len(await w.store.listImagesOf(w.alice.id)) == 2


@pytest_twisted.ensureDeferred
async def test_a_saved_image_gets_a_name(world: World) -> None:
    w = world
    await w.store.updateInstance(w.a.id, state="saving")
    status, body = await reportImage(w, sign(w, w.keyA, w.a, **imageClaims()))
    assert status == 201
    assert body["name"] == "Jupyter (saved 2027-01-15 08:00 UTC)"


@pytest_twisted.ensureDeferred
async def test_an_image_report_in_a_wrong_state_is_refused(world: World) -> None:
    w = world
    for state in ("running", "stopping", "saved", "stopped", "discarded", "errored"):
        await w.store.updateInstance(w.a.id, state=state)
        status, body = await reportImage(w, sign(w, w.keyA, w.a, **imageClaims()))
        assert (status, body["error"]) == (409, "wrong_state"), state
    assert await w.store.listImagesOf(w.alice.id) == []
    assert w.events == []


@pytest_twisted.ensureDeferred
async def test_image_reports_are_checked(world: World) -> None:
    w = world
    await w.store.updateInstance(w.a.id, state="saving")
    bad = [
        imageClaims(digest="sha256:" + "5E" * 32),
        imageClaims(digest="md5:" + "5e" * 16),
        {**imageClaims(), "digest": None},
        {**imageClaims(), "image_url": None},
        {**imageClaims(), "image_url": "file:///etc/passwd"},
        {**imageClaims(), "image_url": "https://user:pw@images.example.org/x"},
        imageClaims(name="x" * 201),
        imageClaims(name="bad\nname"),
        imageClaims(name=7),
    ]
    for claims in bad:
        status, body = await reportImage(w, sign(w, w.keyA, w.a, **claims))
        assert (status, body["error"]) == (400, "invalid_request"), (claims, body)
    # Signed by another instance, or by nobody in particular.
    assert (await reportImage(w, sign(w, w.keyB, w.a, **imageClaims())))[0] == 401
    assert (await reportImage(w, sign(w, generatePrivateKey(), w.a, **imageClaims())))[0] == 401
    # Only a report token: an upload token is for the image server.
    assert (await reportImage(w, sign(w, w.keyA, w.a, audience=UPLOAD_AUDIENCE, **imageClaims())))[0] == 401
    assert await w.store.listImagesOf(w.alice.id) == []


@pytest_twisted.ensureDeferred
async def test_image_urls_can_be_held_to_the_image_servers(world: World) -> None:
    w = world
    w.portal.reports = Reports(w.portal, imageServerURLs=["https://images.example.org/v1"])
    await w.store.updateInstance(w.a.id, state="saving")
    elsewhere = {**imageClaims(), "image_url": "https://images.example.org/v10/x"}
    status, body = await reportImage(w, sign(w, w.keyA, w.a, **elsewhere))
    assert (status, body["error"]) == (403, "wrong_image_server")
    assert (await reportImage(w, sign(w, w.keyA, w.a, **imageClaims())))[0] == 201


# -- POST /reports/image-access ----------------------------------------------------------------------


class Saved:
    """alice's saved image, and the credentials of the people asking."""

    image: Any
    aliceToken: str
    bobToken: str
    carolToken: str
    aliceCookie: str


@pytest_twisted.async_yield_fixture
async def saved(world: World) -> Any:
    w = world
    s = Saved()
    s.image = await w.store.createImage("Saved", IMAGES + DIGEST, owner_id=w.alice.id, digest=DIGEST)
    _, s.aliceToken = await w.store.createApiToken(w.alice.id, "cli")
    _, s.bobToken = await w.store.createApiToken(w.bob.id, "cli")
    _, s.carolToken = await w.store.createApiToken(w.carol.id, "cli")
    session = await w.store.createSession(w.alice.id, 3600)
    s.aliceCookie = f"other=1; dit4c_session={session.id}"
    yield s


async def ask(
    w: World, method: str, image: str, headers: dict[str, str] | None = None, secret: str | None = SECRET,
) -> tuple[int, Any]:  # fmt: skip
    extra = {"X-DIT4C-Image-Server": secret} if secret is not None else {}
    body = json.dumps({"method": method, "image": image, "headers": headers or {}})
    return await post(w, "/reports/image-access", body, "application/json", **extra)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest_twisted.ensureDeferred
async def test_the_owner_may_read(world: World, saved: Saved) -> None:
    w, s = world, saved
    for reference in (s.image.id, s.image.ref, DIGEST):
        status, body = await ask(w, "GET", reference, bearer(s.aliceToken))
        assert status == 200, body
        assert body == {"allowed": True, "user": w.alice.id, "via": "api-token", "reason": "alice owns it."}
    status, body = await ask(w, "HEAD", DIGEST, {"cookie": s.aliceCookie})
    assert (status, body["user"], body["via"]) == (200, w.alice.id, "session")
    # Header names in any case.
    status, body = await ask(w, "get", DIGEST, {"Authorization": f"bearer {s.aliceToken}"})
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_shared_yes_stranger_no_revoked_no(world: World, saved: Saved) -> None:
    w, s = world, saved
    status, body = await ask(w, "GET", DIGEST, bearer(s.bobToken))
    assert (status, body) == (403, {"allowed": False, "reason": "Bob may not use this image."})
    await w.store.shareImage(s.image.id, w.bob.id)
    status, body = await ask(w, "GET", DIGEST, bearer(s.bobToken))
    assert (status, body["user"], body["reason"]) == (200, w.bob.id, "bob may use it.")
    status, body = await ask(w, "GET", DIGEST, bearer(s.carolToken))
    assert status == 403 and body["allowed"] is False
    await w.store.unshareImage(s.image.id, w.bob.id)
    status, body = await ask(w, "GET", DIGEST, bearer(s.bobToken))
    assert status == 403 and body["allowed"] is False
    # A revoked API token, a disabled owner, a logged-out session: no.
    await w.store.shareImage(s.image.id, w.bob.id)
    [record] = await w.store.listApiTokens(w.bob.id)
    await w.store.revokeApiToken(record.id)
    status, body = await ask(w, "GET", DIGEST, bearer(s.bobToken))
    assert (status, body["reason"]) == (403, "The API token is not valid.")
    await w.store.deleteSessionsOfUser(w.alice.id)
    status, body = await ask(w, "GET", DIGEST, {"cookie": s.aliceCookie})
    assert (status, body["reason"]) == (403, "The portal session is not valid.")


@pytest_twisted.ensureDeferred
async def test_no_credentials_or_no_image_is_no(world: World, saved: Saved) -> None:
    w, s = world, saved
    status, body = await ask(w, "GET", DIGEST)
    assert status == 403 and "Bearer" in body["reason"]
    status, body = await ask(w, "GET", OTHER_DIGEST, bearer(s.aliceToken))
    assert (status, body["reason"]) == (403, "The portal knows no such image.")
    await w.store.deleteImage(s.image.id)
    status, body = await ask(w, "GET", DIGEST, bearer(s.aliceToken))
    assert status == 403


@pytest_twisted.ensureDeferred
async def test_a_read_token_from_the_portal_reads_its_image_only(world: World, saved: Saved) -> None:
    w, s = world, saved
    token = imageReadToken(w.portal, s.image, lifetime=600)
    for reference in (s.image.id, s.image.ref, DIGEST):
        status, body = await ask(w, "GET", reference, bearer(token))
        assert (status, body["via"], body["user"]) == (200, "read-token", None), body
    # Not another image.
    other = await w.store.createImage("Other", IMAGES + OTHER_DIGEST, owner_id=w.bob.id, digest=OTHER_DIGEST)
    status, body = await ask(w, "GET", other.id, bearer(token))
    assert (status, body["reason"]) == (403, "The read token is for another image.")
    # Not for writing or deleting.
    assert (await ask(w, "PUT", DIGEST, bearer(token)))[0] == 403
    assert (await ask(w, "DELETE", DIGEST, bearer(token)))[0] == 403
    # Not one signed by another key, for another audience, or expired.
    forged = TokenSigner(generatePrivateKey(), issuer=BASE, clock=w.clock).sign(
        {"image": s.image.id}, audience=READ_AUDIENCE, lifetime=600
    )
    status, body = await ask(w, "GET", DIGEST, bearer(forged))
    assert (status, body["reason"]) == (403, "The read token was refused: unknown key.")
    wrong = w.portal.keys.signer().sign({"image": s.image.id}, audience="dit4c-routing", lifetime=600)
    assert (await ask(w, "GET", DIGEST, bearer(wrong)))[0] == 403
    w.clock.advance(600 + 30)
    status, body = await ask(w, "GET", DIGEST, bearer(token))
    assert (status, body["reason"]) == (403, "The read token was refused: token expired.")
    # And not once the image is deleted.
    fresh = imageReadToken(w.portal, s.image)
    await w.store.deleteImage(s.image.id)
    assert (await ask(w, "GET", s.image.id, bearer(fresh)))[0] == 403
    with pytest.raises(ValueError):
        imageReadToken(w.portal, await w.store.imageById(s.image.id))
    with pytest.raises(ValueError):
        imageReadToken(w.portal, other, lifetime=2 * 86400)


@pytest_twisted.ensureDeferred
async def test_writes_need_the_saving_instance(world: World, saved: Saved) -> None:
    w, s = world, saved
    await w.store.updateInstance(w.a.id, state="uploading")
    upload = sign(w, w.keyA, w.a, audience=UPLOAD_AUDIENCE, jti=None, digest=DIGEST)
    for method in ("PUT", "POST"):
        status, body = await ask(w, method, DIGEST, bearer(upload))
        assert status == 200, body
        assert body == {
            "allowed": True, "user": w.alice.id, "via": "upload-token", "instance": w.a.id,
            "reason": f"Instance {w.a.id} is saving this image.",
        }  # fmt: skip
    # An image the portal does not know yet (the usual case: it is being uploaded).
    other = sign(w, w.keyA, w.a, audience=UPLOAD_AUDIENCE, digest=OTHER_DIGEST)
    assert (await ask(w, "PUT", OTHER_DIGEST, bearer(other)))[0] == 200

    refusals = {
        "for another digest": (OTHER_DIGEST, bearer(upload)),
        "named by id, not digest": (s.image.id, bearer(upload)),
        "signed by another key": (DIGEST, bearer(sign(w, generatePrivateKey(), w.a, audience=UPLOAD_AUDIENCE, digest=DIGEST))),
        "signed by another instance": (DIGEST, bearer(sign(w, w.keyB, w.a, audience=UPLOAD_AUDIENCE, digest=DIGEST))),
        "a report token": (DIGEST, bearer(sign(w, w.keyA, w.a, digest=DIGEST))),
        "a long-lived token": (DIGEST, bearer(sign(w, w.keyA, w.a, audience=UPLOAD_AUDIENCE, lifetime=301, digest=DIGEST))),
        "no digest claim": (DIGEST, bearer(sign(w, w.keyA, w.a, audience=UPLOAD_AUDIENCE))),
        "the owner's API token": (DIGEST, bearer(s.aliceToken)),
        "the owner's session": (DIGEST, {"cookie": s.aliceCookie}),
        "a read token": (DIGEST, bearer(imageReadToken(w.portal, s.image))),
        "nothing": (DIGEST, {}),
    }
    for what, (reference, headers) in refusals.items():
        status, body = await ask(w, "PUT", reference, headers)
        assert (status, body["allowed"]) == (403, False), (what, body)

    # Stopping on the way to a save (the node's word that it saves may come later than its helper's upload).
    scheduler = await w.store.createScheduler("cluster", json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}))
    await w.store.updateInstance(w.a.id, state="stopping", scheduler_id=scheduler.id)
    await w.store.createCommand(scheduler.id, w.a.id, "stop")
    status, body = await ask(w, "PUT", DIGEST, bearer(upload))
    assert (status, body["reason"]) == (403, f"Instance {w.a.id} is stopping, not saving or uploading.")
    await w.store.createCommand(scheduler.id, w.a.id, "save")
    assert (await ask(w, "PUT", DIGEST, bearer(upload)))[0] == 200
    # Only while the instance saves.
    await w.store.updateInstance(w.a.id, state="saved")
    status, body = await ask(w, "PUT", DIGEST, bearer(upload))
    assert (status, body["reason"]) == (403, f"Instance {w.a.id} is saved, not saving or uploading.")
    await w.store.updateInstance(w.a.id, state="uploading")
    w.clock.advance(60 + 30)
    status, body = await ask(w, "PUT", DIGEST, bearer(upload))
    assert (status, body["reason"]) == (403, "Upload token: The token was refused: token expired.")


@pytest_twisted.ensureDeferred
async def test_only_the_owner_may_delete(world: World, saved: Saved) -> None:
    w, s = world, saved
    await w.store.shareImage(s.image.id, w.bob.id)
    assert (await ask(w, "DELETE", DIGEST, bearer(s.bobToken)))[0] == 403
    assert (await ask(w, "DELETE", DIGEST, bearer(s.carolToken)))[0] == 403
    assert (await ask(w, "DELETE", DIGEST))[0] == 403
    status, body = await ask(w, "DELETE", s.image.id, bearer(s.aliceToken))
    assert (status, body["user"]) == (200, w.alice.id)
    assert (await ask(w, "DELETE", DIGEST, {"cookie": s.aliceCookie}))[0] == 200
    # A digest that someone else saved too is not one person's to delete.
    await w.store.createImage("Bob's copy", IMAGES + "bob", owner_id=w.bob.id, digest=DIGEST)
    status, body = await ask(w, "DELETE", DIGEST, bearer(s.aliceToken))
    assert (status, body["reason"]) == (403, "Alice does not own this image.")
    # Nor is a catalogue image anybody's.
    assert (await ask(w, "DELETE", w.source.ref, bearer(s.aliceToken)))[0] == 403


@pytest_twisted.ensureDeferred
async def test_only_the_image_server_may_ask(world: World, saved: Saved) -> None:
    w, s = world, saved
    seen: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        seen.append(formatEvent(event) + repr(event))

    globalLogPublisher.addObserver(observer)
    try:
        for secret in (None, "", "wrong", SECRET + "x", SECRET[:-1], SECRET.upper()):
            status, body = await ask(w, "GET", DIGEST, bearer(s.aliceToken), secret=secret)
            assert (status, body["error"]) == (403, "forbidden"), secret
        assert (await ask(w, "GET", DIGEST, bearer(s.aliceToken)))[0] == 200
    finally:
        globalLogPublisher.removeObserver(observer)
    assert any("image server secret" in line for line in seen)
    # Neither the secret nor the credentials passed along are ever logged.
    for line in seen:
        assert SECRET not in line and s.aliceToken not in line
    assert SECRET.encode() not in repr(vars(w.portal.reports)).encode()

    # No secret configured: no such endpoint, whatever is sent.
    w.portal.reports.setImageServerSecret(None)
    status, body = await ask(w, "GET", DIGEST, bearer(s.aliceToken))
    assert (status, body["error"]) == (404, "not_found")
    assert (await ask(w, "GET", DIGEST, bearer(s.aliceToken), secret=None))[0] == 404
    with pytest.raises(ValueError):
        w.portal.reports.setImageServerSecret("short")


@pytest_twisted.ensureDeferred
async def test_malformed_questions(world: World, saved: Saved) -> None:
    w = world
    header = {"X-DIT4C-Image-Server": SECRET}
    cases: list[Any] = [
        "not json",
        [],
        {"method": "PATCH", "image": DIGEST},
        {"method": "GET"},
        {"method": "GET", "image": ""},
        {"method": "GET", "image": DIGEST, "headers": {"authorization": 1}},
        {"method": "GET", "image": DIGEST, "headers": []},
        {"method": 1, "image": DIGEST},
    ]
    for case in cases:
        body = case if isinstance(case, str) else json.dumps(case)
        status, answer = await post(w, "/reports/image-access", body, "application/json", **header)
        assert (status, answer["error"]) == (400, "invalid_request"), case
    status, answer = await post(w, "/reports/image-access", "{}", "text/plain", **header)
    assert status == 415
    status, answer = await post(w, "/reports/image-access", " " * (16 * 1024 + 1), "application/json", **header)
    assert status == 413
    response = await treq.get(w.base + "/reports/image-access", headers=header)
    assert response.code == 405


def test_a_saved_images_name_says_its_tool_and_when_once() -> None:
    """An image saved from a restored one is named for the tool and its own save, not every save before."""
    from dit4c.portal.reportrules import savedName

    assert savedName("Notes", "2026-12-06 16:40 UTC") == "Notes (saved 2026-12-06 16:40 UTC)"
    twice = "Notes (a shared notepad) (saved 2026-12-05 23:04 UTC) (saved 2026-12-06 01:00 UTC)"
    assert savedName(twice, "2026-12-06 16:40 UTC") == "Notes (a shared notepad) (saved 2026-12-06 16:40 UTC)"
    assert len(savedName("x" * 500, "2026-12-06 16:40 UTC")) <= 200
