"""
An instance's page in Chromium against a real ``dit4c-dev``: the tool's
output (what it wrote is there at once, what it writes next follows within
seconds, and the download holds it all), and a stop then a resume that
finds the person's work as they left it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from flows import logIn, openTool, startDev, startTool


@pytest_twisted.ensureDeferred
async def test_the_tools_output_follows_live_and_a_stopped_instance_resumes(processes: Any, browser: Any, devDir: Path) -> None:
    dev = await startDev(processes, devDir)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    url = await startTool(browser, dev.portal, "Notes")
    instance = url.split("//")[1].split(".")[0]

    await browser.click(f'#instances tr[data-instance="{instance}"] a.instance-page')
    await browser.waitFor("#output")
    toolLog = devDir / "node" / instance / "tool.log"
    first = toolLog.read_text().splitlines()[-1]
    await browser.waitForText("#output", first, 15)

    with open(toolLog, "a") as log:  # as the tool writes it
        log.write("a line written after the page opened\n")
    await browser.waitForText("#output", "a line written after the page opened", 15)

    cookies = {c["name"]: c["value"] for c in await browser.cookies()}
    response = await treq.get(f"{dev.portal}/instances/{instance}/output.txt", cookies=cookies)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-disposition") == [f'attachment; filename="{instance}.txt"']
    downloaded = await response.text()
    assert downloaded == toolLog.read_text()
    assert re.search(r"a line written after the page opened\n$", downloaded)

    # A note, a stop, a resume: the note is still there.
    await openTool(browser, url, "Hello, admin.")
    await browser.waitForText("#status", "connected", 15)
    await browser.fill("#note", "written before the stop")
    await browser.click("#add button")
    await browser.waitForText("#notes li", "written before the stop", 15)
    page = f"{dev.portal}/instances/{instance}"
    await browser.get(page)
    await browser.submit("#instances button.stop")
    await browser.waitFor('td.state[data-state="stopped"]', 60)
    await browser.submit("#instances button.resume")
    await browser.waitFor('td.state[data-state="running"]', 60)
    await browser.waitFor("td.url a", 30)
    await openTool(browser, url, "Hello, admin.")
    await browser.waitForText("#notes li", "written before the stop", 15)
