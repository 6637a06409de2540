"""
The image server's Prometheus figures (``--metrics``): real uploads,
downloads and deletes over loopback, asking a real portal, then a scrape of
``/metrics`` over a real socket shows each counted once, by how it ended.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from imageserver_client import SECRET, PatternBody, World, bearer, get, put, stored, urlOf
from support.backend import PATTERN
from support.metrics import Figures, scrape
from support.processes import Process
from support.sockets import RawClient, rawRequest, refusedPort
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.python import usage

from dit4c.common.keys import generatePrivateKey
from dit4c.imageserver.metrics import DELETE_OUTCOMES, DOWNLOAD_OUTCOMES, UPLOAD_OUTCOMES
from dit4c.imageserver.service import ImageServerService
from dit4c.imageserver.tap import Options

MiB = 1024 * 1024





def uploads(figures: Figures, outcome: str) -> float:
    return figures[("dit4c_images_uploads_total", (("outcome", outcome),))]


def downloads(figures: Figures, method: str, outcome: str) -> float:
    return figures[("dit4c_images_downloads_total", (("method", method), ("outcome", outcome)))]


def deletes(figures: Figures, outcome: str) -> float:
    return figures[("dit4c_images_deletes_total", (("outcome", outcome),))]


def auth(token: str) -> dict[Any, Any]:
    """An ``Authorization`` header, typed as treq takes headers."""
    return dict(bearer(token))


def single(figures: Figures, name: str) -> float:
    return figures[(name, ())]


def changed(before: Figures, after: Figures) -> dict[Any, float]:
    """What a scrape says moved since the one before (``_created`` samples aside)."""
    return {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}


async def metricsServer(w: World, **kwargs: Any) -> tuple[ImageServerService, int]:
    """An image server in this process with its figures on a loopback port of their own: it and that port."""
    server = await w.imageServer(metricsEndpoint=serverFromString(reactor, "tcp:0:interface=127.0.0.1"), **kwargs)
    assert server.metricsListener is not None and server.metricsListener.port is not None
    return server, server.metricsListener.port.getHost().port  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_uploads_are_counted_by_how_they_ended(world: World) -> None:
    w = world
    server, port = await metricsServer(w, maxSize=4 * MiB)
    first = await scrape(port)
    # Every outcome is there from the start, at 0 (so that a rate starts from somewhere).
    assert {uploads(first, o) for o in UPLOAD_OUTCOMES} == {0}
    assert single(first, "dit4c_images_uploads_in_progress") == 0
    assert single(first, "dit4c_images_upload_bytes_stored_total") == 0

    # A real image, stored.
    body = PatternBody(MiB + 17)
    response, _ = await put(server, body.digest, body, w.uploadToken(body.digest))
    assert response.code == 201
    after = await scrape(port)
    assert changed(first, after) == {
        ("dit4c_images_uploads_total", (("outcome", "stored"),)): 1,
        ("dit4c_images_upload_bytes_received_total", ()): MiB + 17,
        ("dit4c_images_upload_bytes_stored_total", ()): MiB + 17,
    }
    # The same bytes again: stored (as they were), and counted as received and stored again.
    response, _ = await put(server, body.digest, PatternBody(MiB + 17), w.uploadToken(body.digest))
    assert response.code == 200
    before, after = after, await scrape(port)
    assert uploads(after, "stored") == 2
    assert single(after, "dit4c_images_upload_bytes_stored_total") == 2 * (MiB + 17)

    # Another image's bytes under this digest: received, not stored.
    claimed = PatternBody(MiB).digest
    response, answer = await put(server, claimed, PatternBody(MiB + 1), w.uploadToken(claimed))
    assert (response.code, answer["error"]) == (400, "digest_mismatch")
    before, after = after, await scrape(port)
    assert changed(before, after) == {
        ("dit4c_images_uploads_total", (("outcome", "digest_mismatch"),)): 1,
        ("dit4c_images_upload_bytes_received_total", ()): MiB + 1,
    }

    # Refused by the portal (a token nobody's key signed): nothing of its body taken in.
    refused = PatternBody(3 * MiB)
    response, answer = await put(server, refused.digest, refused, w.uploadToken(refused.digest, key=generatePrivateKey()))
    assert response.code == 403
    before, after = after, await scrape(port)
    assert changed(before, after) == {("dit4c_images_uploads_total", (("outcome", "refused"),)): 1}

    # Too large: said in the head, and found out on the way (chunked), each counted once.
    big = PatternBody(64 * MiB)
    response, _ = await put(server, big.digest, big, w.uploadToken(big.digest))
    assert response.code == 413
    chunked = PatternBody(64 * MiB, chunked=True)
    response, _ = await put(server, chunked.digest, chunked, w.uploadToken(chunked.digest))
    assert response.code == 413
    before, after = after, await scrape(port)
    assert uploads(after, "too_large") == 2
    assert single(after, "dit4c_images_upload_bytes_stored_total") == single(before, "dit4c_images_upload_bytes_stored_total")
    assert single(after, "dit4c_images_uploads_in_progress") == 0

    # Not an image's address.
    response = await treq.put(urlOf(server, "/images/sha256:abc"), data=b"x")
    assert response.code == 400
    await response.content()
    before, after = after, await scrape(port)
    assert changed(before, after) == {("dit4c_images_uploads_total", (("outcome", "invalid"),)): 1}
    await eventually(lambda: stored(server) == [body.digest[7:]])


@pytest_twisted.ensureDeferred
async def test_an_upload_under_way_then_cut_off(world: World) -> None:
    w = world
    server, port = await metricsServer(w)
    digest = PatternBody(10 * MiB).digest
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.listeners[0].port.getHost().port), client)  # type: ignore[union-attr]
    client.transport.write(
        f"PUT /images/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {10 * MiB}\r\n"
        f"Authorization: Bearer {w.uploadToken(digest)}\r\n\r\n".encode()
    )
    for _ in range(32):
        client.transport.write(PATTERN)

    async def underWay() -> Figures | None:
        figures = await scrape(port)
        return figures if single(figures, "dit4c_images_upload_bytes_received_total") > 0 else None

    during = await eventually(underWay, what="the upload's first bytes taken in")
    assert single(during, "dit4c_images_uploads_in_progress") == 1
    assert uploads(during, "cut_off") == 0
    client.transport.abortConnection()
    await client.done

    async def ended() -> Figures | None:
        figures = await scrape(port)
        return figures if uploads(figures, "cut_off") == 1 else None

    after = await eventually(ended, what="the upload counted as cut off")
    assert single(after, "dit4c_images_uploads_in_progress") == 0
    assert {uploads(after, o) for o in UPLOAD_OUTCOMES if o != "cut_off"} == {0}
    assert single(after, "dit4c_images_upload_bytes_stored_total") == 0
    await eventually(lambda: stored(server) == [])


@pytest_twisted.ensureDeferred
async def test_downloads_and_deletes_are_counted_with_the_bytes_sent(world: World) -> None:
    w = world
    server, port = await metricsServer(w)
    data = b"saved image bytes" * 10000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    response, _ = await put(server, digest, data, w.uploadToken(digest))
    assert response.code == 201
    await w.store.createImage("Saved", urlOf(server, f"/images/{digest}"), owner_id=w.alice.id, digest=digest)
    _, alice = await w.store.createApiToken(w.alice.id, "cli")
    _, bob = await w.store.createApiToken(w.bob.id, "cli")
    first = await scrape(port)
    assert {downloads(first, m, o) for m in ("GET", "HEAD") for o in DOWNLOAD_OUTCOMES} == {0}
    assert {deletes(first, o) for o in DELETE_OUTCOMES} == {0}

    # Alice downloads it whole, part of it, its headers; bob may not.
    response, got, size = await get(server, digest, **auth(alice))
    assert (response.code, got, size) == (200, digest, len(data))
    response = await treq.get(urlOf(server, f"/images/{digest}"), headers={**auth(alice), "Range": "bytes=10-19"})
    assert (response.code, await response.content()) == (206, data[10:20])
    response, _, _ = await get(server, digest, "HEAD", **auth(alice))
    assert response.code == 200
    response, _, _ = await get(server, digest, **auth(bob))
    assert response.code == 403
    response, _, _ = await get(server, digest, **auth(alice), **{"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"})
    assert response.code == 304
    response, _, _ = await get(server, digest, **auth(alice), Range=f"bytes={len(data) + 5}-")
    assert response.code == 416
    after = await scrape(port)
    assert changed(first, after) == {
        ("dit4c_images_downloads_total", (("method", "GET"), ("outcome", "sent"))): 2,
        ("dit4c_images_downloads_total", (("method", "HEAD"), ("outcome", "sent"))): 1,
        ("dit4c_images_downloads_total", (("method", "GET"), ("outcome", "refused"))): 1,
        ("dit4c_images_downloads_total", (("method", "GET"), ("outcome", "not_modified"))): 1,
        ("dit4c_images_downloads_total", (("method", "GET"), ("outcome", "range_not_satisfiable"))): 1,
        ("dit4c_images_download_bytes_sent_total", ()): len(data) + 10,
    }

    # Bob may not delete it; alice does; then it is not there to read or delete.
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=auth(bob))
    assert response.code == 403
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=auth(alice))
    assert response.code == 204
    response = await treq.delete(urlOf(server, f"/images/{digest}"), headers=auth(alice))
    assert response.code == 404
    response, _, _ = await get(server, digest, **auth(alice))
    assert response.code == 404
    before, after = after, await scrape(port)
    assert changed(before, after) == {
        ("dit4c_images_deletes_total", (("outcome", "refused"),)): 1,
        ("dit4c_images_deletes_total", (("outcome", "deleted"),)): 1,
        ("dit4c_images_deletes_total", (("outcome", "not_found"),)): 1,
        ("dit4c_images_downloads_total", (("method", "GET"), ("outcome", "not_found"))): 1,
    }
    # /health there too, and the figures are not on the public port.
    health = await treq.get(f"http://127.0.0.1:{port}/health")
    assert json.loads(await health.text()) == {"status": "ok"}
    assert (await treq.get(urlOf(server, "/metrics"))).code == 404


@pytest_twisted.ensureDeferred
async def test_the_portal_unreachable_is_counted(world: World) -> None:
    w = world
    with refusedPort() as closed:
        server, port = await metricsServer(w, portal=f"http://127.0.0.1:{closed}", name="down")
        body = PatternBody(4 * MiB)
        response, _ = await put(server, body.digest, body, w.uploadToken(body.digest))
        assert response.code == 503
        response, _, _ = await get(server, body.digest)
        assert response.code == 503
        response = await treq.delete(urlOf(server, f"/images/{body.digest}"))
        assert response.code == 503
    figures = await scrape(port)
    assert uploads(figures, "portal_unavailable") == 1
    assert downloads(figures, "GET", "portal_unavailable") == 1
    assert deletes(figures, "portal_unavailable") == 1
    assert single(figures, "dit4c_images_uploads_in_progress") == 0


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_figures_on_their_own_endpoint(world: World, processes: Any) -> None:
    w = world
    secretFile = w.tmp / "image-server.secret"
    secretFile.write_text(SECRET + "\n")
    proc: Process = processes(
        "dit4c-imageserver",
        "--listen", "tcp:0:interface=127.0.0.1",
        "--data-dir", str(w.tmp / "images"),
        "--portal", w.portalURL,
        "--secret-file", str(secretFile),
        "--metrics", "tcp:0:interface=127.0.0.1",
    )  # fmt: skip
    port = await proc.waitForPort("image server metrics")
    public = await proc.waitForPort("image server")
    assert port != public
    remote = f"http://127.0.0.1:{public}"
    body = PatternBody(2 * MiB)
    response, answer = await put(remote, body.digest, body, w.uploadToken(body.digest))
    assert response.code == 201, answer
    claimed = PatternBody(MiB).digest
    response, _ = await put(remote, claimed, PatternBody(MiB + 1), w.uploadToken(claimed))
    assert response.code == 400
    await w.store.createImage("Saved", answer["url"], owner_id=w.alice.id, digest=body.digest)
    _, token = await w.store.createApiToken(w.alice.id, "cli")
    response, digest, size = await get(remote, body.digest, **auth(token))
    assert (response.code, digest, size) == (200, body.digest, 2 * MiB)

    figures = await scrape(port)
    assert uploads(figures, "stored") == 1
    assert uploads(figures, "digest_mismatch") == 1
    assert single(figures, "dit4c_images_upload_bytes_stored_total") == 2 * MiB
    assert single(figures, "dit4c_images_upload_bytes_received_total") == 3 * MiB + 1
    assert downloads(figures, "GET", "sent") == 1
    assert single(figures, "dit4c_images_download_bytes_sent_total") == 2 * MiB
    assert single(figures, "dit4c_images_uploads_in_progress") == 0
    assert (await (await treq.get(f"http://127.0.0.1:{port}/health")).json()) == {"status": "ok"}
    # Not on the public port.
    answer = await rawRequest(public, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404 ")


def test_the_option(tmp_path: Path) -> None:
    secretFile = tmp_path / "secret"
    secretFile.write_text(SECRET)
    base = ["--portal", "http://127.0.0.1:8000", "--secret-file", str(secretFile)]
    options = Options()
    options.parseOptions(base)
    assert options["metrics"] is None
    options = Options()
    options.parseOptions([*base, "--metrics", "tcp:9103:interface=127.0.0.1"])
    assert options["metrics"] == "tcp:9103:interface=127.0.0.1"
    with pytest.raises(usage.UsageError, match="--metrics"):
        Options().parseOptions([*base, "--metrics", "tcp:notaport"])
    with pytest.raises(usage.UsageError, match="--metrics"):
        Options().parseOptions([*base, "--metrics", "nosuchkind:1"])
