"""
A person's storage from the portal (``/files`` and ``/api/v1/files``),
against a real file server on loopback: the portal as ``twistd
dit4c-portal --file-server ... --file-server-host-key ...`` builds it, the
file server asking it over a UNIX socket, each request an SSH login as the
person with a token the portal signed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_twisted
import treq
from portal_client import Browser, Client, csrfOf, logIn, tokenFor
from support.passwords import cheapHash
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from dit4c.fileserver.server import loadHostKey
from dit4c.fileserver.service import FileServerService
from dit4c.portal import files as filesModule
from dit4c.portal.app import PortalConfig
from dit4c.portal.service import PortalService

SECRET = "file-server-" + secrets.token_urlsafe(24)


async def startPortal(tmp_path: Path, **options: Any) -> PortalService:
    service = PortalService(
        reactor,
        database=f"sqlite:///{tmp_path / 'portal.db'}",
        dataDir=tmp_path / "data",
        config=PortalConfig(publicURL="http://portal.localhost"),
        endpoints=[
            serverFromString(reactor, "tcp:0:interface=127.0.0.1"),
            serverFromString(reactor, f"unix:{tmp_path / 'portal.sock'}:mode=600"),
        ],
        fileServerSecret=SECRET,
        **options,
    )
    service.startService()
    portal = await service.ready
    portal.testURL = f"http://127.0.0.1:{service.ports[0].port.getHost().port}"  # type: ignore[union-attr,attr-defined]
    store = portal.store
    await store.createUser("alice", password_hash=cheapHash("correct horse battery"))
    await store.createUser("bob", password_hash=cheapHash("bobs password!"))
    return service


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    """The portal and its file server; ``world.storageOf(name)`` is a person's directory there."""
    hostKey = loadHostKey(tmp_path / "files")
    files = FileServerService(
        reactor, endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")], dataDir=tmp_path / "files",
        portal=f"unix:{tmp_path / 'portal.sock'}", secret=SECRET,
    )  # fmt: skip
    files.startService()
    port = files.listeners[0].port.getHost().port  # type: ignore[union-attr]
    keyFile = tmp_path / "files" / "host_key.pub"
    assert keyFile.read_text().strip() == hostKey.public().toString("openssh").decode()
    service = await startPortal(tmp_path, fileServer=f"127.0.0.1:{port}", fileServerHostKey=str(keyFile))
    portal = service.portal
    assert portal is not None

    async def home(name: str) -> Path:
        user = await portal.store.userByName(name)
        return tmp_path / "files" / "users" / user.id  # type: ignore[union-attr]

    portal.storageOf = home  # type: ignore[attr-defined]
    portal.fileService = files  # type: ignore[attr-defined]
    yield portal
    await service.stopService()
    await files.stopService()


async def page(browser: Browser, path: str = "") -> str:
    response, text = await browser.get("/files" + (f"?path={path}" if path else ""))
    assert response.code == 200, text
    return text


async def upload(browser: Browser, folder: str, name: str, data: bytes, csrf: str | None = None) -> Any:
    if csrf is None:
        csrf = csrfOf(await page(browser, folder))
    response = await browser.http.post(
        browser.base + "/files/upload",
        data={"csrf": csrf, "folder": folder},
        files={"file": (name, "application/octet-stream", cast(Any, BytesIO(data)))},
        headers=cast(Any, browser._headers()),
        allow_redirects=False,
    )
    return response, await response.text()


@pytest_twisted.ensureDeferred
async def test_the_files_page_makes_uploads_lists_downloads_and_deletes(world: Any) -> None:
    alice = Browser(world)
    await logIn(alice)
    text = await page(alice)
    assert 'id="empty"' in text and 'href="/files" id="files-link"' in text
    csrf = csrfOf(text)

    response, _ = await alice.post("/files/folder", {"csrf": csrf, "folder": "", "name": "docs"})
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/files?done=folder"]
    data = os.urandom(300_000)  # more than one read of the file server's
    response, text = await upload(alice, "docs", "résumé.bin", data)
    assert response.code == 303, text
    assert response.headers.getRawHeaders("location") == ["/files?path=docs&done=uploaded"]
    home = await world.storageOf("alice")
    assert (home / "docs" / "résumé.bin").read_bytes() == data

    top = await page(alice)
    assert 'data-path="docs" class="folder"' in top
    listing = await page(alice, "docs")
    assert re.search(r'data-path="docs/résumé.bin" class="file">.*?<td class="size">300000</td>', listing, re.S)
    assert '<a href="/files?path=docs">docs</a>' in listing  # the breadcrumbs

    response = await alice.http.get(alice.base + "/files/download?path=docs/r%C3%A9sum%C3%A9.bin", headers=cast(Any, alice._headers()))
    assert response.code == 200
    assert await response.content() == data
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9.bin" in response.headers.getRawHeaders("content-disposition")[0]

    # A folder that is not empty stays; the first press only asks.
    response, text = await alice.post("/files/delete", {"csrf": csrf, "path": "docs/résumé.bin", "folder": "docs"})
    assert response.code == 200 and 'id="confirm-delete"' in text and (home / "docs" / "résumé.bin").exists()
    response, text = await alice.post("/files/delete", {"csrf": csrf, "path": "docs", "confirm": "yes"})
    assert response.code == 409 and "must be empty" in text and (home / "docs").is_dir()
    response, _ = await alice.post("/files/delete", {"csrf": csrf, "path": "docs/résumé.bin", "folder": "docs", "confirm": "yes"})
    assert response.code == 303 and not (home / "docs" / "résumé.bin").exists()
    response, _ = await alice.post("/files/delete", {"csrf": csrf, "path": "docs", "confirm": "yes"})
    assert response.code == 303 and not (home / "docs").exists()


@pytest_twisted.ensureDeferred
async def test_forms_without_the_csrf_token_and_paths_that_climb_change_nothing(world: Any) -> None:
    alice = Browser(world)
    await logIn(alice)
    csrf = csrfOf(await page(alice))
    response, text = await upload(alice, "", "x.txt", b"x", csrf="forged")
    assert response.code == 400 and "expired" in text
    response, _ = await alice.post("/files/folder", {"csrf": "forged", "name": "docs"})
    assert response.code == 400
    home = await world.storageOf("alice")
    assert not home.exists() or list(home.iterdir()) == []
    bob = await world.storageOf("bob")
    for folder in ("..", "../" + bob.name, "/etc", "a/../../b"):
        response, text = await upload(alice, folder, "x.txt", b"x", csrf=csrf)
        assert response.code == 400, (folder, text)
        response, _ = await alice.get(f"/files?path={folder}")
        assert response.code == 400
    for name in ("..", "a/..", ".."):
        response, text = await alice.post("/files/folder", {"csrf": csrf, "name": name})
        assert response.code == 400, (name, text)
    assert not bob.exists()
    # Not logged in: to the login page.
    response, _ = await Browser(world).get("/files")
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/login?next=/files"]


@pytest_twisted.ensureDeferred
async def test_the_api_writes_reads_lists_and_deletes_and_keeps_people_apart(world: Any) -> None:
    alice = Client(world, await tokenFor(world, "alice", "correct horse battery"))
    bob = Client(world, await tokenFor(world, "bob", "bobs password!"))
    code, made = await alice.call("POST", "/files/folders?path=data")
    assert code == 201 and made == {"path": "data"}
    data = os.urandom(1_000_000)
    response = await treq.put(world.testURL + "/api/v1/files/content?path=data/big.bin", data=data, headers=cast(Any, alice.headers))
    assert response.code == 201, await response.text()
    assert json.loads(await response.text()) == {"path": "data/big.bin", "size": len(data)}
    code, listing = await alice.call("GET", "/files?path=data")
    assert code == 200 and [(e["name"], e["type"], e["size"]) for e in listing["entries"]] == [("big.bin", "file", len(data))]
    code, top = await alice.call("GET", "/files")
    assert [(e["name"], e["type"]) for e in top["entries"]] == [("data", "folder")]
    response = await treq.get(world.testURL + "/api/v1/files/content?path=data/big.bin", headers=cast(Any, alice.headers))
    assert response.code == 200 and await response.content() == data

    # Bob sees his own storage only; alice's paths are not his, and climbing out is refused here.
    code, theirs = await bob.call("GET", "/files")
    assert code == 200 and theirs["entries"] == []
    code, error = await bob.call("GET", "/files/content?path=data/big.bin")
    assert code == 404 and error["error"] == "not_found"
    aliceHome = await world.storageOf("alice")
    for path in (f"../{aliceHome.name}/data/big.bin", f"/{aliceHome.name}/data/big.bin", "data/../../x"):
        code, error = await bob.call("GET", f"/files/content?path={path}")
        assert code == 400 and error["error"] == "bad_path", path
        code, error = await bob.call("DELETE", f"/files?path={path}")
        assert code == 400
    assert (aliceHome / "data" / "big.bin").exists()

    code, error = await alice.call("DELETE", "/files?path=data")
    assert code == 409 and (aliceHome / "data" / "big.bin").exists()
    code, done = await alice.call("DELETE", "/files?path=data/big.bin")
    assert code == 200 and done == {"deleted": "data/big.bin"}
    code, _ = await alice.call("DELETE", "/files?path=data")
    assert code == 200 and not (aliceHome / "data").exists()
    code, error = await alice.call("GET", "/files/content?path=data/big.bin")
    assert code == 404
    # Without a token, or a session's CSRF header: nothing.
    code, _ = await Client(world, None).call("GET", "/files")
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_an_upload_over_the_limit_is_refused(world: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(filesModule, "FILE_LIMIT", 1000)
    alice = Client(world, await tokenFor(world, "alice", "correct horse battery"))
    response = await treq.put(world.testURL + "/api/v1/files/content?path=a.bin", data=b"x" * 1001, headers=cast(Any, alice.headers))
    assert response.code == 400 and "at most" in (await response.json())["reason"]
    response = await treq.put(world.testURL + "/api/v1/files/content?path=a.bin", data=b"x" * 100_000, headers=cast(Any, alice.headers))
    assert response.code == 413
    assert not (await world.storageOf("alice")).joinpath("a.bin").exists()


@pytest_twisted.ensureDeferred
async def test_a_disabled_persons_token_reaches_no_storage(world: Any) -> None:
    token = await tokenFor(world, "bob", "bobs password!")
    bob = await world.store.userByName("bob")
    await world.store.updateUser(bob.id, disabled=True)
    code, _ = await Client(world, token).call("POST", "/files/folders?path=x")
    assert code in (401, 403)
    assert not (await world.storageOf("bob")).exists()


@pytest_twisted.ensureDeferred
async def test_without_a_file_server_the_page_says_so(tmp_path: Path) -> None:
    service = await startPortal(tmp_path)
    portal = service.portal
    try:
        alice = Browser(portal)  # type: ignore[arg-type]
        await logIn(alice)
        text = await page(alice)
        assert 'id="no-storage"' in text and "not available" in text
        code, error = await Client(portal, await tokenFor(portal, "alice", "correct horse battery")).call("GET", "/files")  # type: ignore[arg-type]
        assert code == 404 and error["error"] == "no_storage"
    finally:
        await service.stopService()


def test_paths_are_checked_before_they_leave_the_portal() -> None:
    from dit4c.portal.files import BadPath, cleanPath

    assert cleanPath("") == "" and cleanPath("a//b/./c/") == "a/b/c"
    for bad in ("/etc/passwd", "..", "a/../..", "a/..", "x\x00y", "x\ny", "a/" + "b" * 256):
        with pytest.raises(BadPath):
            cleanPath(bad)


@pytest_twisted.ensureDeferred
async def test_a_download_reads_the_file_server_only_as_fast_as_the_person_reads(world: Any) -> None:
    """
    A person who stops reading stops the portal reading: it asks the file
    server for the next chunk only while the person's connection takes
    more, so it never holds more than a few socket buffers of the file.
    """
    import socket

    from support.waiting import eventually
    from twisted.internet import threads

    token = await tokenFor(world, "alice", "correct horse battery")
    size = 24 * 1024 * 1024
    data = os.urandom(1024 * 1024) * 24
    response = await treq.put(world.testURL + "/api/v1/files/content?path=big.bin", data=data, headers=cast(Any, {"Authorization": f"Bearer {token}"}))
    assert response.code == 201
    metrics = world.fileService.metrics
    before = metrics.bytesRead

    host, port = world.testURL.removeprefix("http://").split(":")
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    reader.connect((host, int(port)))
    try:
        request = f"GET /api/v1/files/content?path=big.bin HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        reader.sendall(request.encode())
        # It reads some, then stops: what it read stays still while the person reads nothing.
        last: list[int] = []

        def settled() -> bool:
            last.append(metrics.bytesRead - before)
            return len(last) > 5 and last[-1] > 0 and last[-1] == last[-5]

        await eventually(settled, 20, interval=0.1, what=lambda: f"reads to settle (read {last[-1:]})")
        assert last[-1] < size // 2, f"the portal read {last[-1]} of {size} bytes for a person who read none"

        def readAll() -> bytes:
            chunks = []
            while chunk := reader.recv(1024 * 1024):
                chunks.append(chunk)
            return b"".join(chunks)

        answer = await threads.deferToThread(readAll)
    finally:
        reader.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == size and body == data


def test_the_portal_takes_the_file_server_and_its_host_key_together(tmp_path: Path) -> None:
    from twisted.python import usage

    from dit4c.portal.tap import Options

    line = loadHostKey(tmp_path).public().toString("openssh").decode()
    for bad in (["--file-server", "127.0.0.1:8700"], ["--file-server-host-key", line],
                ["--file-server", "127.0.0.1:8700", "--file-server-host-key", "not a key"],
                ["--file-server", "nowhere", "--file-server-host-key", line]):  # fmt: skip
        with pytest.raises(usage.UsageError):
            Options().parseOptions(["--data-dir", str(tmp_path / "portal"), *bad])
    for key in (line, str(tmp_path / "host_key.pub")):
        options = Options()
        options.parseOptions(["--data-dir", str(tmp_path / "portal"), "--file-server", "[::1]:8700", "--file-server-host-key", key])
        assert options["file-server"] == "[::1]:8700"
