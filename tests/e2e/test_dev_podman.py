"""
End to end with the podman runtime: ``twistd dit4c-dev --runtime podman``,
an administrator adds a container image to the catalogue, starts it, and
uses the tool in Chromium (a WebSocket round trip into the container); a
second person is refused; stop and discard leave no pod behind.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import addPerson, logIn, openTool, refused, startDev, startTool
from support.podman import (
    buildWebSocketToolImage,
    cleanUpDev,
    gccUnavailable,
    podmanEnv,
    podmanUnavailable,
    requirePodman,
)
from support.waiting import eventually

PREFIX = f"dit4c-e2e{os.getpid()}"


@pytest.fixture(scope="module")
def podman() -> None:
    requirePodman("a container tool under dit4c-dev", podmanUnavailable() or gccUnavailable())


@pytest_twisted.async_yield_fixture
async def devDir(tmp_path: Path, podman: None, processes: Any) -> Any:
    yield tmp_path / "dev"
    await cleanUpDev(processes, tmp_path / "dev", PREFIX)


def pods() -> list[str]:
    result = subprocess.run(
        ["podman", "pod", "ps", "--quiet", "--filter", f"label=dit4c.prefix={PREFIX}"],
        env=podmanEnv(),
        capture_output=True,
        timeout=60,
        check=True,
    )
    return result.stdout.decode().split()


@pytest_twisted.ensureDeferred
async def test_a_container_tool_in_the_browser(processes: Any, browser: Any, devDir: Path) -> None:
    image = await buildWebSocketToolImage()
    dev = await startDev(processes, devDir, "--runtime", "podman", "--podman-prefix", PREFIX)
    password = await dev.adminPassword()

    await logIn(browser, dev.portal, "admin", password)
    bobsPassword = await addPerson(browser, dev.portal, "bob")
    # The catalogue of a podman node is the administrator's: add the image
    # (no port given: the image's exposed one).
    await browser.fill("#image-name", "WS tool")
    await browser.fill("#image-ref", image)
    await browser.submit("#add-image button")

    url = await startTool(browser, dev.portal, "WS tool")
    assert re.fullmatch(rf"http://[a-z0-9]+\.localhost:{dev.httpPort}/", url), url
    instance = url.split("//")[1].split(".")[0]
    assert pods() != []

    await openTool(browser, url, "Hello, admin.")
    await browser.waitForText("#status", "connected", 15)
    await browser.fill("#message", "into the container and back")
    await browser.click("#send")
    await browser.waitForText("#echoes li", "into the container and back", 15)

    await refused(url, "bob", bobsPassword)

    # The person's storage is at /mnt in the container: what the tool writes
    # there is on the file server, in the administrator's own directory.
    if shutil.which("sshfs"):
        tool = f"{PREFIX}-{instance}-tool"
        result = subprocess.run(
            ["podman", "exec", tool, "sh", "-c", "echo from the container > /mnt/note.txt"],
            env=podmanEnv(), capture_output=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        [written] = list((dev.dataDir / "files" / "users").glob("*/note.txt"))
        assert written.read_text() == "from the container\n"

    await browser.get(dev.portal + "/")
    await browser.click(f'tr[data-instance="{instance}"] button.stop')
    await browser.waitFor(f'tr[data-instance="{instance}"] td.state[data-state="stopped"]', 60)
    await browser.click(f'tr[data-instance="{instance}"] button.discard')
    await eventually(lambda: not pods(), 30, what=lambda: f"pods left: {pods()}")
    assert not (dev.dataDir / "node" / instance).exists()
