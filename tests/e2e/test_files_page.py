"""
The Files page in Chromium, against ``twistd dit4c-dev`` (whose portal
reaches its own file server): a person makes a folder, uploads a file
chosen with the page's file input, sees it listed, downloads it (the
page's link, fetched with the browser's own session), and deletes it
after confirming; each step lands in the file server's directory of theirs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import logIn, startDev

from dit4c.node.processes import killRecorded


@pytest.fixture
def devDir(tmp_path: Path) -> Any:
    if shutil.which("sshfs") is None:
        pytest.skip("dit4c-dev runs its file server only where sshfs is installed")
    yield tmp_path / "dev"
    killRecorded(tmp_path / "dev")


@pytest_twisted.ensureDeferred
async def test_a_file_uploaded_on_the_page_is_listed_downloaded_and_deleted(
    processes: Any, browser: Any, devDir: Path, tmp_path: Path
) -> None:
    dev = await startDev(processes, devDir)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    await browser.get(dev.portal + "/")
    await browser.click("#files-link")
    await browser.waitFor("#empty")

    await browser.fill("#folder-name", "results")
    await browser.click("#folder-button")
    await browser.waitForText("#message", "The folder is made.")
    await browser.click('tr[data-path="results"] td.name a')
    await browser.waitFor("#empty")
    assert "results" in await browser.text("#crumbs")

    data = os.urandom(5000) + "données".encode()
    chosen = tmp_path / "run 1.bin"
    chosen.write_bytes(data)
    fileInput = await browser.find("#upload-file")
    await browser.run(fileInput.send_keys, str(chosen))
    await browser.click("#upload-button")
    await browser.waitForText("#message", "The file is uploaded.")
    row = 'tr[data-path="results/run 1.bin"]'
    assert await browser.text(f"{row} td.size") == str(len(data))
    (stored,) = (devDir / "files" / "users").glob("*/results/run 1.bin")
    assert stored.read_bytes() == data

    link = await browser.find(f"{row} a.download")
    href = await browser.run(link.get_attribute, "href")
    got = await browser.execute(
        "return fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => Array.from(new Uint8Array(b)));", href
    )
    assert bytes(got) == data

    await browser.click(f"{row} button.delete")
    await browser.waitFor("#confirm-delete")
    assert stored.exists()  # only asked, so far
    await browser.click("#confirm-delete-button")
    await browser.waitForText("#message", "Deleted.")
    await browser.waitFor("#empty")
    assert not stored.exists()
