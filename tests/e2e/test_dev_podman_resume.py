"""
End to end, a container tool resumed: ``twistd dit4c-dev --runtime podman``
with its real helpers; the administrator starts a container image, the tool
writes a file in its container and one on the person's storage (``/mnt``),
the instance is stopped, ``dit4c-dev`` restarted, and the instance resumed
from the page: the tool answers in Chromium through the routing server and
the auth helper again, and both files are there as they were.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import logIn, openTool, startDev, startTool
from support.podman import (
    buildWebSocketToolImage,
    cleanUpDev,
    gccUnavailable,
    podmanEnv,
    podmanUnavailable,
    requirePodman,
)
from support.waiting import eventually
from twisted.internet import threads

PREFIX = f"dit4c-e2r{os.getpid()}"


@pytest.fixture(scope="module")
def podman() -> None:
    requirePodman("resuming a container tool under dit4c-dev", podmanUnavailable() or gccUnavailable())


@pytest_twisted.async_yield_fixture
async def devDir(tmp_path: Path, podman: None, processes: Any) -> Any:
    yield tmp_path / "dev"
    await cleanUpDev(processes, tmp_path / "dev", PREFIX)


def inTool(instance: str, script: str) -> str:
    """Blocking (a thread): ``sh -c script`` in the instance's tool container; its output."""
    result = subprocess.run(
        ["podman", "exec", f"{PREFIX}-{instance}-tool", "sh", "-c", script],
        env=podmanEnv(), capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


@pytest_twisted.ensureDeferred
async def test_a_container_tool_resumes_after_a_restart(processes: Any, browser: Any, devDir: Path) -> None:
    image = await buildWebSocketToolImage()
    dev = await startDev(processes, devDir, "--runtime", "podman", "--podman-prefix", PREFIX)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    await browser.get(dev.portal + "/admin/")
    await browser.fill("#image-name", "WS tool")
    await browser.fill("#image-ref", image)
    await browser.submit("#add-image button")

    url = await startTool(browser, dev.portal, "WS tool")
    instance = url.split("//")[1].split(".")[0]
    row = f'#instances tr[data-instance="{instance}"]'
    await openTool(browser, url, "Hello, admin.")
    storage = shutil.which("sshfs") is not None
    script = "echo in the container > /kept.txt" + (" && echo on the storage > /mnt/kept.txt" if storage else "")
    await threads.deferToThread(inTool, instance, script)

    await browser.get(dev.portal + "/")
    await browser.submit(f"{row} button.stop")
    await browser.waitFor(f'{row} td.state[data-state="stopped"]', 60)
    await dev.restart(processes, signal.SIGKILL)

    await browser.get(dev.portal + "/")
    await browser.waitFor(f'{row} td.state[data-state="stopped"]', 60)
    await browser.submit(f"{row} button.resume")
    await browser.waitFor(f'{row} td.state[data-state="running"]', 90)
    await openTool(browser, url, "Hello, admin.", timeout=90)
    await browser.waitForText("#status", "connected", 15)
    await browser.fill("#message", "after the resume")
    await browser.click("#send")
    await browser.waitForText("#echoes li", "after the resume", 15)
    assert await threads.deferToThread(inTool, instance, "cat /kept.txt") == "in the container\n"
    if storage:
        assert await threads.deferToThread(inTool, instance, "cat /mnt/kept.txt") == "on the storage\n"

    await browser.get(dev.portal + "/")
    await browser.submit(f"{row} button.stop")
    await browser.waitFor(f'{row} td.state[data-state="stopped"]', 60)
    await browser.submit(f"{row} button.discard")
    await eventually(lambda: not (dev.dataDir / "node" / instance).exists(), 60, what="the pod's directory gone")
