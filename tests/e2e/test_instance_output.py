"""
The tool's output on an instance's page, in Chromium against a real
``dit4c-dev``: what the tool wrote is there at once, what it writes next
follows within seconds, and the download holds it all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from flows import logIn, startDev, startTool


@pytest_twisted.ensureDeferred
async def test_the_tools_output_follows_live_on_its_page(processes: Any, browser: Any, devDir: Path) -> None:
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
