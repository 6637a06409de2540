"""
Each person's storage in their instances, through ``twistd dit4c-dev``:
the file server (SFTP, authenticated by each instance's published key)
mounted by the storage helper (sshfs) beside each instance's working
directory, its path given to the tool as ``DIT4C_STORAGE``. What one of
alice's instances writes there, another of hers reads; bob's sees none of
it. The Files page shows the same storage: a file uploaded there is in
the instances' mounts. Discarding an instance unmounts it and leaves the files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import addPerson, logIn, otherBrowser, startDev, startTool
from support.waiting import eventually

from dit4c.node.processes import killRecorded


@pytest.fixture
def devDir(tmp_path: Path, fuse: None) -> Iterator[Path]:
    yield tmp_path / "dev"
    killRecorded(tmp_path / "dev")


async def mounted(path: Path, timeout: float = 30) -> None:
    await eventually(lambda: os.path.ismount(path), timeout, what=f"{path} mounted")


def found(read: Callable[[], str]) -> Callable[[], str | None]:
    """``read``, None while what it reads is not there."""

    def reading() -> str | None:
        try:
            return read()
        except FileNotFoundError:
            return None

    return reading


def toolEnvironment(pod: Path) -> dict[str, str]:
    pid = json.loads((pod / "tool.pid").read_text())["pid"]
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest_twisted.ensureDeferred
async def test_a_persons_storage_is_theirs_in_every_instance(processes: Any, browser: Any, devDir: Path) -> None:
    dev = await startDev(processes, devDir)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    bobsPassword = await addPerson(browser, dev.portal, "bob")
    first = (await startTool(browser, dev.portal, "Notes")).split("//")[1].split(".")[0]
    second = (await startTool(browser, dev.portal, "Static web site")).split("//")[1].split(".")[0]
    bob = await otherBrowser()
    try:
        await logIn(bob, dev.portal, "bob", bobsPassword)
        bobs = (await startTool(bob, dev.portal, "Notes")).split("//")[1].split(".")[0]
    finally:
        await bob.stop()
    pods = devDir / "node"
    for instance in (first, second, bobs):
        await mounted(pods / instance / "mnt")

    # The tool is told where the storage is.
    assert toolEnvironment(pods / first)["DIT4C_STORAGE"] == str(pods / first / "mnt")

    (pods / first / "mnt" / "results").mkdir()
    (pods / first / "mnt" / "results" / "run1.csv").write_text("a,b\n1,2\n")
    # Another mount sees it once its directory cache (a few seconds) expires.
    seen = found(lambda: (pods / second / "mnt" / "results" / "run1.csv").read_text())
    assert await eventually(seen, 20, interval=0.2, what="the file in the second instance's mount") == "a,b\n1,2\n"
    assert list((pods / bobs / "mnt").iterdir()) == []
    (pods / bobs / "mnt" / "bobs.txt").write_text("bob's own")
    assert not (pods / first / "mnt" / "bobs.txt").exists()

    # The Files page shows what an instance wrote; what is uploaded there, the instances see.
    await browser.get(dev.portal + "/files?path=results")
    await browser.waitFor('tr[data-path="results/run1.csv"]')
    chosen = devDir.parent / "from the page.txt"
    chosen.write_text("uploaded on the Files page\n")
    fileInput = await browser.find("#upload-file")
    await browser.run(fileInput.send_keys, str(chosen))
    await browser.click("#upload-button")
    await browser.waitForText("#message", "The file is uploaded.")
    uploaded = found(lambda: (pods / second / "mnt" / "results" / "from the page.txt").read_text())
    assert await eventually(uploaded, 20, interval=0.2, what="the uploaded file in an instance's mount") == "uploaded on the Files page\n"
    assert not (pods / bobs / "mnt" / "results").exists()

    # Discarding the first instance unmounts its storage; the files stay the person's.
    await browser.get(dev.portal + "/")
    await browser.click(f'tr[data-instance="{first}"] button.stop')
    await browser.waitFor(f'tr[data-instance="{first}"] td.state[data-state="stopped"]', 30)
    await browser.click(f'tr[data-instance="{first}"] button.discard')
    await eventually(lambda: not (pods / first).exists(), what="the discarded pod's directory is gone")
    assert (pods / second / "mnt" / "results" / "run1.csv").read_text() == "a,b\n1,2\n"
