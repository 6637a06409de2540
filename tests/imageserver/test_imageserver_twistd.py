"""
``twistd -n dit4c-imageserver`` as a user runs it, asking a real portal:
a 64 MiB image goes in and out while the server's peak memory stays far
below the image's size.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
import treq
from imageserver_client import SECRET, PatternBody, World, bearer, get, peakRSS, put, resetPeakRSS
from support.processes import Process
from support.waiting import eventually

from dit4c.imageserver.storage import DirectoryStorage

MiB = 1024 * 1024


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_the_plugin_streams_images_through(world: World, processes: Any) -> None:
    w = world
    secretFile = w.tmp / "image-server.secret"
    secretFile.write_text(SECRET + "\n")
    dataDir = w.tmp / "images"
    # A crash left an unfinished upload behind: start-up removes it.
    (dataDir / "tmp").mkdir(parents=True)
    (dataDir / "tmp" / "left-over.part").write_bytes(b"half an image")
    proc: Process = processes(
        "dit4c-imageserver",
        "--listen", "tcp:0:interface=127.0.0.1",
        "--data-dir", str(dataDir),
        "--portal", w.portalURL,
        "--secret-file", str(secretFile),
        "--public-url", "https://images.example.org/",
    )  # fmt: skip
    await proc.waitForLog(r"image server listening on")
    port = proc.port("image server")
    remote = f"http://127.0.0.1:{port}"
    # The port is bound (and said so) before the service starts, where the
    # left-over goes: the reactor serves nobody before then.
    await proc.waitForLog(r"removing 1 unfinished upload\(s\)")
    # (Said before it is done: the directory goes, and comes back empty.)
    def emptied() -> bool:
        try:
            return not any((dataDir / "tmp").iterdir())
        except FileNotFoundError:
            return False

    await eventually(emptied, what="the left-over upload removed")

    response = await treq.get(f"http://127.0.0.1:{port}/health")
    assert json.loads(await response.text()) == {"status": "ok"}

    fresh = resetPeakRSS(proc.pid)
    before = peakRSS(proc.pid)
    body = PatternBody(64 * MiB)
    response, answer = await put(remote, body.digest, body, w.uploadToken(body.digest))
    assert response.code == 201, answer
    assert answer["url"] == f"https://images.example.org/images/{body.digest}"
    assert DirectoryStorage(dataDir).path(body.digest).stat().st_size == 64 * MiB

    await w.store.createImage("Saved", answer["url"], owner_id=w.alice.id, digest=body.digest)
    _, token = await w.store.createApiToken(w.alice.id, "cli")
    response, digest, size = await get(remote, body.digest, **bearer(token))
    assert (response.code, digest, size) == (200, body.digest, 64 * MiB)
    after = peakRSS(proc.pid)
    # The image is 64 MiB; the server's peak grew by a small fraction of it.
    assert after - before < 24 * MiB, (fresh, before, after)

    # Bob may not; the log names no token and no secret.
    _, bobToken = await w.store.createApiToken(w.bob.id, "cli")
    response, _, _ = await get(remote, body.digest, **bearer(bobToken))
    assert response.code == 403
    log = proc.log()
    for secret in (SECRET, token, bobToken):
        assert secret not in log
    assert "refused: Bob may not use this image." in log
