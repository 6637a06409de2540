"""
The image server over real HTTP on loopback, asking a real portal: uploads
with the instance's token, downloads and deletes by the people the portal
allows, and everything it must refuse, early.
"""

from __future__ import annotations

import hashlib
import json
import resource

import pytest_twisted
import treq
from imageserver_client import (
    SECRET,
    PatternBody,
    World,
    bearer,
    get,
    peakRSS,
    put,
    resetPeakRSS,
    stored,
    urlOf,
)
from support.backend import PATTERN
from support.sockets import RawClient, refusedPort
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.common.keys import generatePrivateKey
from dit4c.portal.reports import imageReadToken

MiB = 1024 * 1024


# -- uploads --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upload_then_the_owner_downloads_it(world: World, logged: list[str]) -> None:
    w = world
    server = await w.imageServer()
    body = PatternBody(50 * MiB)
    # The peak of this process (the client's side included) from now on.
    fresh = resetPeakRSS()
    before = peakRSS() if fresh else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    token = w.uploadToken(body.digest)
    response, answer = await put(server, body.digest, body, token)
    assert response.code == 201, answer
    url = urlOf(server, f"/images/{body.digest}")
    assert answer == {"digest": body.digest, "size": 50 * MiB, "url": url}
    assert response.headers.getRawHeaders("location") == [url]
    assert stored(server) == [body.digest[7:]]
    path = server.storage.path(body.digest)
    with path.open("rb") as f:
        hashed = hashlib.sha256()
        while chunk := f.read(MiB):
            hashed.update(chunk)
    assert "sha256:" + hashed.hexdigest() == body.digest

    # The portal now knows the image (the upload helper reports it): alice reads it.
    image = await w.store.createImage("Saved", url, owner_id=w.alice.id, digest=body.digest)
    _, aliceToken = await w.store.createApiToken(w.alice.id, "cli")
    response, digest, size = await get(server, body.digest, **bearer(aliceToken))
    assert response.code == 200
    assert (digest, size) == (body.digest, 50 * MiB)
    assert response.headers.getRawHeaders("content-type") == ["application/octet-stream"]
    assert response.headers.getRawHeaders("x-dit4c-digest") == [body.digest]
    assert response.length == 50 * MiB
    # Neither the upload nor the download held the image in memory.
    after = peakRSS() if fresh else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert after - before < 24 * MiB, (before, after)

    # With her portal session too; HEAD has the headers and no body.
    session = await w.store.createSession(w.alice.id, 3600)
    response, _, size = await get(server, body.digest, "HEAD", Cookie=f"x=1; dit4c_session={session.id}")
    assert (response.code, size) == (200, 0)
    assert response.headers.getRawHeaders("x-dit4c-digest") == [body.digest]
    # A range, for resumable downloads.
    response = await treq.get(url, headers={**bearer(aliceToken), "Range": "bytes=65536-65545"})
    assert response.code == 206
    assert await response.content() == PATTERN[:10]

    # The same image again: 200, the same answer, no second copy.
    response, again = await put(server, body.digest, PatternBody(50 * MiB), w.uploadToken(body.digest))
    assert (response.code, again) == (200, answer)
    assert stored(server) == [body.digest[7:]]

    # Nothing secret was logged.
    text = "\n".join(logged)
    for secret in (SECRET, token, aliceToken, session.id):
        assert secret not in text
    assert image.digest == body.digest


@pytest_twisted.ensureDeferred
async def test_a_chunked_upload(world: World) -> None:
    w = world
    server = await w.imageServer()
    body = PatternBody(3 * MiB + 17, chunked=True)
    response, answer = await put(server, body.digest, body, w.uploadToken(body.digest))
    assert response.code == 201, answer
    assert answer["size"] == 3 * MiB + 17
    # An empty image is an image too.
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    response, answer = await put(server, empty, b"", w.uploadToken(empty))
    assert (response.code, answer["size"]) == (201, 0)
    assert stored(server) == sorted([body.digest[7:], empty[7:]])


@pytest_twisted.ensureDeferred
async def test_a_digest_mismatch_stores_nothing(world: World) -> None:
    w = world
    server = await w.imageServer()
    claimed = PatternBody(MiB).digest
    response, answer = await put(server, claimed, PatternBody(MiB + 1), w.uploadToken(claimed))
    assert response.code == 400
    assert answer["error"] == "digest_mismatch"
    assert answer["digest"] == claimed
    assert answer["received"] == PatternBody(MiB + 1).digest
    assert stored(server) == []


@pytest_twisted.ensureDeferred
async def test_an_upload_that_breaks_off_stores_nothing(world: World, logged: list[str]) -> None:
    w = world
    server = await w.imageServer()
    digest = PatternBody(10 * MiB).digest
    client = RawClient()
    port = server.listeners[0].port.getHost().port  # type: ignore[union-attr]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"PUT /images/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n"
        f"Authorization: Bearer {w.uploadToken(digest)}\r\n\r\n".encode()
    )
    for _ in range(32):
        client.transport.write(PATTERN)
    # The upload is under way: its temporary file is there.
    await eventually(lambda: any(name.startswith("tmp/") for name in stored(server)))
    client.transport.abortConnection()  # type: ignore[attr-defined]
    await client.done
    await eventually(lambda: stored(server) == [])
    assert any("broke off after" in line for line in logged)


@pytest_twisted.ensureDeferred
async def test_too_large(world: World) -> None:
    w = world
    server = await w.imageServer(maxSize=MiB)
    # Said in the head: refused before the portal is asked or the body read.
    body = PatternBody(64 * MiB)
    response, answer = await put(server, body.digest, body, w.uploadToken(body.digest))
    assert (response.code, answer["error"]) == (413, "too_large")
    assert body.produced < 16 * MiB
    # Found out on the way (chunked): refused as soon as it is too much.
    body = PatternBody(64 * MiB, chunked=True)
    response, answer = await put(server, body.digest, body, w.uploadToken(body.digest))
    assert (response.code, answer["error"]) == (413, "too_large")
    assert body.produced < 16 * MiB
    await eventually(lambda: stored(server) == [])
    # Up to the limit is fine.
    body = PatternBody(MiB)
    response, _ = await put(server, body.digest, body, w.uploadToken(body.digest))
    assert response.code == 201


@pytest_twisted.ensureDeferred
async def test_uploads_the_portal_refuses_are_refused_after_their_head(world: World) -> None:
    w = world
    server = await w.imageServer()
    digest = PatternBody(256 * MiB).digest
    other = PatternBody(1).digest
    cases = {
        "no token": None,
        "a forged token (another key)": w.uploadToken(digest, key=generatePrivateKey()),
        "another instance's key in a's name": w.uploadToken(digest, key=w.keyB),
        "a token for another digest": w.uploadToken(other),
        "an instance that is not saving": w.uploadToken(digest, key=w.keyB, instance=w.b),
        "a token for a person's API token": (await w.store.createApiToken(w.alice.id, "cli"))[1],
    }
    for case, token in cases.items():
        body = PatternBody(256 * MiB)
        response, answer = await put(server, digest, body, token)
        assert response.code == 403, (case, answer)
        assert answer["error"] == "forbidden", case
        assert answer["reason"], case
        # Answered long before the client could send it all.
        assert body.produced < 32 * MiB, (case, body.produced)
    await eventually(lambda: stored(server) == [])


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_waits_for_the_portal(world: World) -> None:
    w = world
    server = await w.imageServer()
    port = server.listeners[0].port.getHost().port  # type: ignore[union-attr]
    data = b"an image"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def send(token: str) -> bytes:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(
            f"PUT /images/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n"
            f"Expect: 100-continue\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        await eventually(lambda: b"\r\n\r\n" in client.received)
        if client.received.startswith(b"HTTP/1.1 100"):
            client.transport.write(data)
        return await client.done

    refused = await send(w.uploadToken(digest, key=generatePrivateKey()))
    assert refused.startswith(b"HTTP/1.1 403 ")
    assert b"100 Continue" not in refused
    allowed = await send(w.uploadToken(digest))
    assert allowed.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 ")
    assert f'"digest": "{digest}"'.encode() in allowed


# -- reads and deletes -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_reads_and_deletes_as_the_portal_says(world: World) -> None:
    w = world
    server = await w.imageServer()
    data = b"saved image bytes" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    response, _ = await put(server, digest, data, w.uploadToken(digest))
    assert response.code == 201
    image = await w.store.createImage("Saved", urlOf(server, f"/images/{digest}"), owner_id=w.alice.id, digest=digest)
    _, aliceToken = await w.store.createApiToken(w.alice.id, "cli")
    _, bobToken = await w.store.createApiToken(w.bob.id, "cli")

    # Nobody, bob: refused, with the portal's reason.
    for headers in ({}, bearer(bobToken), bearer("dit4c_not-a-token")):
        response, _, _ = await get(server, digest, **headers)
        assert response.code == 403, headers
    response = await treq.get(urlOf(server, f"/images/{digest}"), headers=bearer(bobToken))
    assert json.loads(await response.text()) == {"error": "forbidden", "reason": "Bob may not use this image."}
    # A read token the portal signed for the image (a node starting from it).
    response, got, _ = await get(server, digest, **bearer(imageReadToken(w.portal, image)))
    assert (response.code, got) == (200, digest)
    # An upload token does not read, nor does a read token delete.
    response, _, _ = await get(server, digest, **bearer(w.uploadToken(digest)))
    assert response.code == 403
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=bearer(imageReadToken(w.portal, image)))
    assert response.code == 403
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=bearer(bobToken))
    assert response.code == 403
    assert stored(server) == [digest[7:]]

    # The owner deletes it: gone, then 404 (the portal still knows the record).
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=bearer(aliceToken))
    assert response.code == 204
    assert stored(server) == []
    response, _, _ = await get(server, digest, **bearer(aliceToken))
    assert response.code == 404
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=bearer(aliceToken))
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_the_portal_down_or_confused_is_503(world: World) -> None:
    w = world
    with refusedPort() as closed:
        down = await w.imageServer(portal=f"http://127.0.0.1:{closed}", name="down")
        digest = PatternBody(1).digest
        response, _, _ = await get(down, digest)
        assert response.code == 503
        body = PatternBody(64 * MiB)
        response, answer = await put(down, body.digest, body, w.uploadToken(body.digest))
        assert (response.code, answer["error"]) == (503, "portal_unavailable")
        assert body.produced < 32 * MiB
    # A portal that does not know this server's secret answers, but not the question.
    w.portal.reports.setImageServerSecret("another secret, sixteen bytes or more")
    confused = await w.imageServer(name="confused")
    response, _, _ = await get(confused, digest)
    assert response.code == 503


@pytest_twisted.ensureDeferred
async def test_a_portal_that_does_not_answer_in_time_is_503(world: World) -> None:
    from twisted.internet.protocol import Factory, Protocol

    w = world
    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        server = await w.imageServer(portal=f"http://127.0.0.1:{silent.getHost().port}", name="silent", portalTimeout=0.3)
        response, _, _ = await get(server, PatternBody(1).digest)
        assert response.code == 503
    finally:
        await silent.stopListening()


# -- paths, methods, health -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_paths_methods_and_health(world: World) -> None:
    w = world
    server = await w.imageServer()
    response = await treq.get(urlOf(server, "/health"))
    assert (response.code, json.loads(await response.text())) == (200, {"status": "ok"})
    good = "sha256:" + "ab" * 32
    cases = [
        ("GET", "/", 404),
        ("GET", "/images/", 400),
        ("GET", "/images/sha256:" + "AB" * 32, 400),
        ("GET", "/images/sha256:" + "ab" * 31, 400),
        ("GET", "/images/md5:" + "ab" * 16, 400),
        ("PUT", "/images/sha256:abc", 400),
        ("PUT", "/elsewhere", 404),
        ("PUT", "/health", 405),
        ("POST", f"/images/{good}", 405),
        ("PATCH", f"/images/{good}", 405),
        ("DELETE", "/health", 405),
    ]
    for method, path, status in cases:
        response = await treq.request(method, urlOf(server, path), data=b"x" * 100)
        text = await response.text()
        assert response.code == status, (method, path, text)
        assert "error" in json.loads(text)
        if status == 405:
            assert response.headers.getRawHeaders("allow")
    # A body where none is wanted: a little is dropped, a lot refused.
    response = await treq.get(urlOf(server, "/health"), data=b"x" * 1000)
    assert response.code == 200
    body = PatternBody(16 * MiB)
    response = await treq.request("GET", urlOf(server, "/health"), data=body)
    assert response.code == 413
    assert body.produced < 8 * MiB


@pytest_twisted.ensureDeferred
async def test_deleting_a_saved_image_removes_its_bytes_unless_another_has_them(world: World) -> None:
    """The portal asks the image server to remove the bytes of an image nobody keeps any more."""
    from dit4c.common.tokens import TokenSigner
    from dit4c.portal.reports import DELETE_AUDIENCE

    w = world
    server = await w.imageServer()
    data = b"work worth keeping" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    response, _ = await put(server, digest, data, w.uploadToken(digest))
    assert response.code == 201
    ref = urlOf(server, f"/images/{digest}")
    alices = await w.store.createImage("Saved", ref, owner_id=w.alice.id, digest=digest)
    bobs = await w.store.createImage("Same bytes", ref, owner_id=w.bob.id, digest=digest)

    # A delete token while a saved image still has the digest: refused.
    live = w.portal.keys.signer().sign({"sub": digest, "digest": digest}, audience=DELETE_AUDIENCE, lifetime=60)
    response = await treq.delete(ref, headers=bearer(live))
    assert response.code == 403 and stored(server) == [digest[7:]]

    # Alice deletes hers: bob's has the same bytes, so they stay.
    await w.portal.sharing.deleteImage(w.alice, alices.id)
    assert stored(server) == [digest[7:]]
    # A delete token signed by anyone but the portal is no delete token.
    forged = TokenSigner(generatePrivateKey(), issuer=w.portal.keys.issuer, clock=w.clock).sign(
        {"sub": digest, "digest": digest}, audience=DELETE_AUDIENCE, lifetime=60
    )
    await w.store.deleteImage(bobs.id)
    response = await treq.delete(ref, headers=bearer(forged))
    assert response.code == 403 and stored(server) == [digest[7:]]

    # The last record gone (through the portal): so are the bytes.
    bobs2 = await w.store.createImage("Same bytes", ref, owner_id=w.bob.id, digest=digest)
    await w.portal.sharing.deleteImage(w.bob, bobs2.id)
    assert stored(server) == []

