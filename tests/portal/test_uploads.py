"""
A saved image uploaded as a file (``POST /api/v1/images``,
``dit4c.portal.uploads``), against a real portal and a real image server
on loopback: a file becomes a new image of the uploader's with the digest
the image server computed, downloadable and uploadable again; a file that
is not a whole saved image, for an unknown tool, over the limit, or broken
off leaves nothing behind (no record, no bytes at the image server); only
its owner sees it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import tarfile
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from portal_client import Client, tokenFor
from support.backend import PATTERN
from support.sockets import RawClient
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.internet.protocol import Factory, Protocol

from dit4c.imageserver.service import ImageServerService
from dit4c.portal.app import Portal
from dit4c.portal.http import portalSite
from dit4c.portal.uploads import ImageUploads

SECRET = "image-server-" + secrets.token_urlsafe(24)


def processArchive(tool: str = "tool:latest", size: int = 300_000) -> bytes:
    """A saved image as the process runtime makes it: its description first, then the files."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        described = json.dumps({"format": "dit4c-process-archive/1", "tool": tool}).encode()
        info = tarfile.TarInfo(".dit4c-image.json")
        info.size = len(described)
        tar.addfile(info, io.BytesIO(described))
        data = os.urandom(size)
        info = tarfile.TarInfo("notes/today.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def ociArchive() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", b'{"manifests": []}')]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest_twisted.async_yield_fixture
async def world(api: Portal, tmp_path: Path) -> Any:
    """``api`` served again with uploads to a real image server that asks it."""
    uploads = ImageUploads(api.store, api.keys, api.clock, "http://127.0.0.1:1", limit=4 * 1024 * 1024)
    api.api.uploads = uploads
    port = reactor.listenTCP(0, portalSite(api.app.resource(), reactor, uploads=uploads), interface="127.0.0.1")
    api.testURL = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    api.reports.setImageServerSecret(SECRET)
    images = ImageServerService(
        reactor, endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
        portal=api.testURL, secret=SECRET, dataDir=tmp_path / "images",  # type: ignore[attr-defined]
    )  # fmt: skip
    images.startService()
    await eventually(lambda: images.listeners[0].port is not None, 10)
    uploads.imageServer = f"http://127.0.0.1:{images.listeners[0].port.getHost().port}"  # type: ignore[union-attr]
    api.images = images  # type: ignore[attr-defined]
    api.imageDir = tmp_path / "images"  # type: ignore[attr-defined]
    api.alice = await tokenFor(api, "alice", "correct horse battery")  # type: ignore[attr-defined]
    yield api
    await images.stopService()
    await port.stopListening()


async def upload(portal: Any, data: bytes, token: str | None = None, **params: str) -> tuple[int, Any]:
    response = await treq.post(
        f"{portal.testURL}/api/v1/images", data=data, params=params,
        headers={"Authorization": f"Bearer {token or portal.alice}", "Content-Type": "application/x-tar"},
    )  # fmt: skip
    text = await response.text()
    return response.code, json.loads(text) if text.startswith("{") else text


def stored(portal: Any) -> list[str]:
    """The images the image server holds, and what it is still receiving."""
    directory = portal.imageDir
    return sorted(p.name for p in (directory / "sha256").iterdir()) + sorted(
        "tmp/" + p.name for p in (directory / "tmp").iterdir()
    )


@pytest_twisted.ensureDeferred
async def test_a_file_becomes_a_new_image_with_its_digest_and_comes_back_whole(world: Any) -> None:
    data = processArchive()
    code, image = await upload(world, data, filename="my notes.oci.tar")
    assert code == 201, image
    assert image == {
        "id": image["id"], "name": "my notes", "ref": image["ref"], "port": 8888, "digest": sha(data), "mine": True,
        "limits": {"cpus": None, "memory": None, "idle": None, "idle_action": "stop"},  # its tool's
    }  # fmt: skip
    assert stored(world) == [sha(data).removeprefix("sha256:")]
    alice = Client(world, world.alice)
    assert image in (await alice.call("GET", "/images"))[1]
    # Downloaded, and uploaded again: a second image with the same digest, the bytes kept once.
    response = await treq.get(f"{world.testURL}/api/v1/images/{image['id']}/download", headers=alice.headers)
    downloaded = await response.content()
    assert downloaded == data
    code, again = await upload(world, downloaded, name="copy")
    assert code == 201 and again["digest"] == image["digest"] and again["id"] != image["id"] and again["name"] == "copy"
    assert stored(world) == [sha(data).removeprefix("sha256:")]
    # Nobody else sees it.
    bob = Client(world, await tokenFor(world, "bob", "bobs password!"))
    assert image["id"] not in [i["id"] for i in (await bob.call("GET", "/images"))[1]]
    assert (await bob.call("GET", f"/images/{image['id']}/download"))[0] == 404
    # With no name given, it is named for its tool.
    code, unnamed = await upload(world, data)
    assert code == 201 and unnamed["name"].startswith("Tool (uploaded ")


@pytest_twisted.ensureDeferred
async def test_what_is_not_a_whole_saved_image_leaves_nothing(world: Any) -> None:
    data = processArchive()
    damaged = bytearray(data)
    damaged[1024 + 10] ^= 0xFF  # the second member's header
    cases = {
        "truncated": data[: len(data) // 2],
        "damaged": bytes(damaged),
        "not a tar": os.urandom(20_000),
        "a tar of something else": ociArchive()[:1024] + b"\0" * 9216,
    }
    for what, body in cases.items():
        code, answer = await upload(world, body, tool="Tool")
        assert (code, answer["error"]) == (400, "not_an_image"), (what, answer)
        assert answer["reason"].startswith("The file is"), answer
    code, answer = await upload(world, data, **{})
    assert code == 201
    before = stored(world)
    # The digest the uploader named, not the file's.
    response = await treq.post(
        f"{world.testURL}/api/v1/images", data=processArchive(),
        headers={"Authorization": f"Bearer {world.alice}", "X-DIT4C-Digest": sha(data)},
    )  # fmt: skip
    assert response.code == 400 and (await response.json())["error"] == "digest_mismatch"
    alice = await world.store.userByName("alice")
    assert [i.id for i in await world.store.listImagesOf(alice.id)] == [answer["id"]]
    assert stored(world) == before


@pytest_twisted.ensureDeferred
async def test_a_tool_not_in_the_catalogue_is_refused(world: Any) -> None:
    code, answer = await upload(world, processArchive(), tool="no-such-tool")
    assert (code, answer["error"]) == (400, "unknown_tool")
    code, answer = await upload(world, processArchive(tool="elsewhere:1"))
    assert (code, answer["error"]) == (400, "unknown_tool") and "elsewhere:1" in answer["reason"]
    # A file that names its tool is restored as that tool, not another.
    await world.store.createImage("Other", "other:1", port=9000)
    code, answer = await upload(world, processArchive(), tool="Other")
    assert (code, answer["error"]) == (400, "wrong_tool")
    # An OCI archive names no tool: one of the catalogue's is chosen.
    code, answer = await upload(world, ociArchive())
    assert (code, answer["error"]) == (400, "missing_tool")
    code, answer = await upload(world, ociArchive(), tool="tool:latest")
    assert code == 201 and answer["port"] == 8888
    alice = await world.store.userByName("alice")
    assert [i.id for i in await world.store.listImagesOf(alice.id)] == [answer["id"]]
    assert stored(world) == [sha(ociArchive()).removeprefix("sha256:")]


@pytest_twisted.ensureDeferred
async def test_over_the_limit_and_without_a_login_is_refused(world: Any) -> None:
    big = processArchive(size=5 * 1024 * 1024)
    code, answer = await upload(world, big)
    assert code == 413, answer
    # Chunked (no length): cut at the limit.
    client = RawClient()
    port = int(world.testURL.rsplit(":", 1)[1])
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"POST /api/v1/images HTTP/1.1\r\nHost: portal.test\r\nAuthorization: Bearer {world.alice}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    for start in range(0, len(big), 256 * 1024):
        part = big[start : start + 256 * 1024]
        client.transport.write(b"%x\r\n%s\r\n" % (len(part), part))
        if b"413" in bytes(client.received):
            break
    await eventually(lambda: b"HTTP/1.1 413" in bytes(client.received), 10, what="413")
    assert b'"too_large"' in bytes(client.received)
    client.transport.loseConnection()
    code, answer = await upload(world, processArchive(), token="dit4c_nothing")
    assert code == 401
    await eventually(lambda: stored(world) == [], 10, what="nothing left at the image server")
    alice = await world.store.userByName("alice")
    assert await world.store.listImagesOf(alice.id) == []


@pytest_twisted.ensureDeferred
async def test_an_upload_broken_off_leaves_nothing(world: Any) -> None:
    data = processArchive(size=3 * 1024 * 1024)
    client = RawClient()
    port = int(world.testURL.rsplit(":", 1)[1])
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    client.transport.write(
        f"POST /api/v1/images HTTP/1.1\r\nHost: portal.test\r\nAuthorization: Bearer {world.alice}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode() + data[: 2 * 1024 * 1024]
    )
    # The image server is receiving it as it comes (not once it is all in) ...
    await eventually(lambda: any(name.startswith("tmp/") for name in stored(world)), 10, what="an upload under way")
    client.transport.abortConnection()  # type: ignore[attr-defined]
    # ... and drops it when the person goes away.
    await eventually(lambda: stored(world) == [], 10, what="nothing left at the image server")
    alice = await world.store.userByName("alice")
    assert await world.store.listImagesOf(alice.id) == []


@pytest_twisted.ensureDeferred
async def test_only_the_portal_sends_the_image_server_a_new_image(world: Any) -> None:
    from dit4c.portal.importtokens import importToken

    url = world.api.uploads.imageServer + "/images"
    data = processArchive(size=1000)
    for authorization in (f"Bearer {world.alice}", "Bearer not-a-token", None):
        headers = {"Authorization": authorization} if authorization else {}
        response = await treq.post(url, data=data, headers=headers)
        assert response.code == 403, (authorization, await response.text())
    alice = await world.store.userByName("alice")
    response = await treq.post(url, data=data, headers={"Authorization": f"Bearer {importToken(world.keys, alice.id)}"})
    assert response.code == 201 and (await response.json())["digest"] == sha(data)


@pytest_twisted.ensureDeferred
async def test_the_upload_form_in_a_browser(world: Any, browser: Any, tmp_path: Path) -> None:
    """Chromium: a file chosen on the home page becomes a saved image in its list; a truncated one is refused there."""
    from selenium.webdriver.common.by import By

    data = processArchive()
    whole, cut = tmp_path / "from the laptop.oci.tar", tmp_path / "cut.oci.tar"
    whole.write_bytes(data)
    cut.write_bytes(data[:5000])
    await browser.logIn(world.testURL, "alice", "correct horse battery")
    await browser.get(world.testURL + "/")

    async def choose(path: Path) -> None:
        element = await browser.find("#upload-file")
        await browser.run(element.send_keys, str(path))

    await choose(cut)
    await browser.click("#upload-button")
    await browser.waitForText("#upload-status", "not a whole saved image", 15)
    alice = await world.store.userByName("alice")
    assert await world.store.listImagesOf(alice.id) == []
    # The image server drops its partial file when the portal breaks the upload off, which the browser need not wait for.
    await eventually(lambda: stored(world) == [], 10, what="nothing left at the image server")

    await choose(whole)
    await browser.click("#upload-button")
    await browser.waitForText("#saved-images td", "from the laptop", 15)
    [image] = await world.store.listImagesOf(alice.id)
    assert (image.name, image.digest, image.port) == ("from the laptop", sha(data), 8888)
    # The page was loaded again with a GET: a reload sends nothing twice.
    assert await browser.execute("return location.pathname") == "/"
    await browser.run(browser.driver.refresh)
    await browser.waitForText("#saved-images td", "from the laptop", 15)
    assert len(await world.store.listImagesOf(alice.id)) == 1
    assert await browser.run(lambda: len(browser.driver.find_elements(By.CSS_SELECTOR, "#saved-images tr[data-image]"))) == 1


class StoppedImageServer(Protocol):
    """A stand-in image server that reads the portal's upload only when told to, then stores it as named."""

    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.received = 0
        self.tail = b""
        self.reading = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def read(self) -> None:
        self.reading = True
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.tail = (self.tail + data)[-16:]
        if self.tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end: the portal ended it
            body = json.dumps({"digest": self.digest, "size": 1, "url": f"http://127.0.0.1:1/images/{self.digest}"})
            self.transport.write(
                b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body.encode())
            )


def bigOCIArchive(size: int) -> list[bytes]:
    """An OCI archive with a blob of ``size`` bytes of the pattern, in parts (the pattern's part repeated, not copied)."""
    parts = []
    for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", b"{}")]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        parts.append(info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512))
    info = tarfile.TarInfo("blobs/sha256/" + "0" * 64)
    info.size = size
    return [*parts, info.tobuf(format=tarfile.GNU_FORMAT), *[PATTERN] * (size // len(PATTERN)), b"\0" * 10240]


class Sender:
    """``parts``, written while the connection takes them."""

    def __init__(self, transport: Any, parts: list[bytes]) -> None:
        self.transport = transport
        self.parts = parts
        self.length = sum(len(p) for p in parts)
        self.sent = 0
        self.paused = False
        self.index = 0

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.index < len(self.parts):
            part = self.parts[self.index]
            self.index += 1
            self.sent += len(part)
            self.transport.write(part)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.index = len(self.parts)


@pytest_twisted.ensureDeferred
async def test_an_image_server_that_stops_reading_pauses_the_uploader(world: Any) -> None:
    size = 128 * 1024 * 1024
    parts = bigOCIArchive(size)
    whole = hashlib.sha256()
    for part in parts:
        whole.update(part)
    standIn = StoppedImageServer("sha256:" + whole.hexdigest())
    port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(Factory.forProtocol(lambda: standIn))
    world.api.uploads.imageServer = f"http://127.0.0.1:{port.getHost().port}"
    world.api.uploads.limit = 2 * size
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", int(world.testURL.rsplit(":", 1)[1])), client)
    sender = Sender(client.transport, parts)
    client.transport.write(
        f"POST /api/v1/images?tool=Tool&name=big HTTP/1.1\r\nHost: portal.test\r\nAuthorization: Bearer {world.alice}\r\n"
        f"Content-Length: {sender.length}\r\n\r\n".encode()
    )
    client.transport.registerProducer(sender, True)  # type: ignore[attr-defined]
    sender.resumeProducing()
    # The image server reads nothing: the uploader is held at the socket buffers on the way.
    await eventually(
        lambda: standIn.transport is not None and sender.paused and sender.sent > 1024 * 1024, 30, what="the uploader paused"
    )
    assert sender.sent < size // 4, sender.sent
    standIn.read()
    await eventually(lambda: b"HTTP/1.1 201" in bytes(client.received), 120, what="the upload stored")
    assert sender.index == len(sender.parts) and standIn.received > size
    answer = json.loads(re.search(rb"\{.*\}", bytes(client.received)).group(0))  # type: ignore[union-attr]
    assert (answer["name"], answer["digest"]) == ("big", standIn.digest)
    client.transport.loseConnection()
    await port.stopListening()
