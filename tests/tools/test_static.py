"""The static site tool: a directory as a web site, the person's storage under /storage/ when the runtime links it."""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
import treq
from twisted.internet import reactor

from dit4c.node.processlaunch import linkStorage
from dit4c.tools.static import site


@pytest_twisted.ensureDeferred
async def test_the_site_serves_its_directory_and_a_folder_of_the_persons_storage(tmp_path: Path) -> None:
    work, storage = tmp_path / "pod" / "work", tmp_path / "pod" / "mnt"
    work.mkdir(parents=True)
    (storage / "www").mkdir(parents=True)
    (work / "index.html").write_text("<h1>the instance's own</h1>")
    (storage / "www" / "index.html").write_text("<h1>uploaded on the Files page</h1>")
    linkStorage(work)
    port = reactor.listenTCP(0, site(work), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        assert await (await treq.get(base + "/", persistent=False)).text() == "<h1>the instance's own</h1>"
        shared = await treq.get(base + "/storage/www/", persistent=False)
        assert shared.code == 200 and await shared.text() == "<h1>uploaded on the Files page</h1>"
    finally:
        await port.stopListening()
