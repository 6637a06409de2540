"""
End to end, as a new user meets DIT4C: ``twistd dit4c-dev`` run as a real
process, driven in headless Chromium. An administrator logs in, starts the
notes tool, watches it reach running, opens its URL (through the routing
server, the listener and the auth helper, with the portal's OAuth flow),
uses it (a WebSocket round trip), a second person is refused, and the
instance is stopped and discarded, leaving nothing running.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import addPerson, logIn, openTool, otherBrowser, refused, startDev, startTool, submit

from dit4c.node.processes import killRecorded, startTime
from dit4c.testing import deferLater


def podProcesses(dataDir: Path) -> list[int]:
    pids = []
    for pidFile in dataDir.glob("node/*/*.pid"):  # (not into the pods' storage mounts)
        pid = json.loads(pidFile.read_text())["pid"]
        if startTime(pid) is not None:
            pids.append(pid)
    return pids


@pytest.fixture
def devDir(tmp_path: Path) -> Iterator[Path]:
    """A data directory whose pods are killed afterwards, whatever happened (they outlive dit4c-dev)."""
    yield tmp_path / "dev"
    killRecorded(tmp_path / "dev")


@pytest_twisted.ensureDeferred
async def test_a_tool_in_the_browser_end_to_end(processes: Any, browser: Any, devDir: Path) -> None:
    dev = await startDev(processes, devDir)
    password = await dev.adminPassword()

    # The administrator logs in, and adds a second person.
    await logIn(browser, dev.portal, "admin", password)
    bobsPassword = await addPerson(browser, dev.portal, "bob")

    # Starts the notes tool and watches it reach running, with its URL.
    url = await startTool(browser, dev.portal, "Notes")
    assert re.fullmatch(rf"http://[a-z0-9]+\.localhost:{dev.httpPort}/", url), url
    instance = url.split("//")[1].split(".")[0]

    # Opens it: the auth helper sends the browser through the portal's OAuth
    # flow (already logged in there) and back, then to the tool.
    await browser.get(url)
    await browser.waitForText("#greeting", "Hello, admin.", 30)
    await browser.waitForText("#status", "connected", 15)
    # A WebSocket round trip: the note goes to the tool and comes back to the page.
    await browser.fill("#note", "hello through the tunnel")
    await browser.click("#add button")
    await browser.waitForText("#notes li", "hello through the tunnel", 15)
    cookies = {c["name"]: c for c in await browser.cookies()}
    session = [c for name, c in cookies.items() if name.startswith("dit4c_auth")]
    assert session and all(c["httpOnly"] for c in session), cookies
    assert all(c["domain"] == f"{instance}.localhost" for c in session)

    # Someone else is refused, with a page that says why.
    await refused(url, "bob", bobsPassword)

    # Stop and discard from the portal's page; nothing of it is left running.
    # The tool and the pod's one helper process (listener, auth helper and storage helper in one): both running.
    assert sorted(p.name for p in (dev.dataDir / "node" / instance).glob("*.pid")) == ["helpers.pid", "tool.pid"]
    assert len(podProcesses(dev.dataDir)) == 2
    await browser.get(dev.portal + "/")
    await browser.click(f'tr[data-instance="{instance}"] button.stop')
    await browser.waitFor(f'tr[data-instance="{instance}"] td.state[data-state="stopped"]', 30)
    assert podProcesses(dev.dataDir) == []
    await browser.click(f'tr[data-instance="{instance}"] button.discard')
    for _ in range(200):
        if not (dev.dataDir / "node" / instance).exists():
            break
        await deferLater(0.05)
    assert not (dev.dataDir / "node" / instance).exists()
    await browser.get(url)
    await browser.waitFor("body")
    assert "Hello, admin." not in await browser.execute("return document.body.innerText")

    # A plain static site: the instance's own files, served by the tool.
    static = await startTool(browser, dev.portal, "Static web site")
    await browser.get(static)
    await browser.waitForText("h1", "Directory listing for /", 30)


@pytest_twisted.ensureDeferred
async def test_save_and_start_again_in_the_browser(processes: Any, browser: Any, devDir: Path) -> None:
    """Save an instance; its image goes to the image server; a new instance from it has the work."""
    dev = await startDev(processes, devDir)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    url = await startTool(browser, dev.portal, "Notes")
    instance = url.split("//")[1].split(".")[0]
    await openTool(browser, url, "Hello, admin.")
    await browser.waitForText("#status", "connected", 15)
    await browser.fill("#note", "written before the save")
    await browser.click("#add button")
    await browser.waitForText("#notes li", "written before the save", 15)

    await browser.get(dev.portal + "/")
    await browser.click(f'tr[data-instance="{instance}"] button.save')
    await browser.waitFor(f'tr[data-instance="{instance}"] td.state[data-state="saved"]', 60)
    assert podProcesses(dev.dataDir) == []

    # The image server holds it under its digest, and the portal lists it as the admin's.
    stored = list((dev.dataDir / "images" / "sha256").iterdir())
    assert len(stored) == 1
    assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == stored[0].name
    restored = await startTool(browser, dev.portal, "Notes (a shared notepad) (saved")
    assert restored != url
    await openTool(browser, restored, "Hello, admin.")
    await browser.waitForText("#notes li", "written before the save", 15)

    # Shared with bob, who starts his own instance from it and finds the note.
    bobsPassword = await addPerson(browser, dev.portal, "bob")
    await browser.get(dev.portal + "/")
    await browser.fill("#saved-images form.share input[name=user]", "bob")
    await submit(browser, "#saved-images button.share-image")
    bob = await otherBrowser()
    try:
        await logIn(bob, dev.portal, "bob", bobsPassword)
        bobs = await startTool(bob, dev.portal, "Notes (a shared notepad) (saved")
        await openTool(bob, bobs, "Hello, bob.")
        await bob.waitForText("#notes li", "written before the save", 15)
    finally:
        await bob.stop()

    # The owner deletes it: nobody can start it any more.
    await browser.get(dev.portal + "/")
    await submit(browser, "#saved-images button.delete-image")
    names = await browser.execute("return [...document.querySelectorAll('#image option')].map(o => o.text)")
    assert not [name for name in names if "(saved" in name], names
