"""
``dit4c-dev`` restarted while instances that use the person's storage run:
with SIGINT (a person's Ctrl-C) and with SIGKILL (a crash, which leaves
every sshfs mount dead until the file server in the restarted process is
back). The portal answers again, every instance is taken back and answers
at its URL, and stop, save, discard and a start from the saved image all
work afterwards. In the end no process and no mount of any of the pods is
left, and no pod directory.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import logIn, openTool, startDev, startTool
from support.waiting import eventually
from test_dev_storage import mounted

from dit4c.common.mounts import mountPoints
from dit4c.node.process import builtinTools
from dit4c.node.processes import killRecorded, podProcesses


@pytest.fixture
def devDir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "dev"
    killRecorded(tmp_path / "dev")


def row(instance: str) -> str:
    return f'#instances tr[data-instance="{instance}"]'


async def state(browser: Any, instance: str, wanted: str, timeout: float = 60) -> None:
    await browser.waitFor(f'{row(instance)} td.state[data-state="{wanted}"]', timeout)


async def gone(path: Path, timeout: float = 60) -> None:
    await eventually(lambda: not path.exists(), timeout, what=f"{path} is gone")


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
@pytest_twisted.ensureDeferred
async def test_a_restart_strands_nothing(processes: Any, browser: Any, devDir: Path, how: int) -> None:
    dev = await startDev(processes, devDir)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    tools = ["Notes", "Static web site"] + (["JupyterLab"] if "jupyter/lab" in builtinTools() else [])
    instances: dict[str, str] = {}
    urls: dict[str, str] = {}
    for tool in tools:
        url = await startTool(browser, dev.portal, tool)
        instances[tool] = url.split("//")[1].split(".")[0]
        urls[tool] = url
    pods = devDir / "node"
    for instance in instances.values():
        await mounted(pods / instance / "mnt")

    before = dev.process
    await dev.restart(processes, how)
    if how == signal.SIGINT:
        # Ctrl-C says what keeps running, and that it is found again.
        said = before.log()
        assert f"dit4c-dev stopped; {len(instances)} instances keep running" in said, said[-2000:]
        assert all(instance in said for instance in instances.values())

    # The portal answers, and every instance is taken back: running, and answering.
    await browser.get(dev.portal + "/")
    for instance in instances.values():
        await state(browser, instance, "running")
    await openTool(browser, urls["Notes"], "Hello, admin.", timeout=90)
    for instance in instances.values():
        await mounted(pods / instance / "mnt", timeout=60)
    assert "could not take back" not in dev.process.log()  # no instance's recovery failed

    # Stop, save and discard work afterwards.
    notes, static = instances["Notes"], instances["Static web site"]
    await browser.get(dev.portal + "/")
    await browser.click(f"{row(notes)} button.save")
    await state(browser, notes, "saved", 120)
    for tool, instance in instances.items():
        if tool != "Notes":
            await browser.get(dev.portal + "/")
            await browser.click(f"{row(instance)} button.stop")
            await state(browser, instance, "stopped")
    for instance in instances.values():
        await browser.get(dev.portal + "/")
        # Until the answer has come: the next page opened at once would cancel the form's post.
        await browser.submit(f"{row(instance)} button.discard")
    for instance in instances.values():
        await gone(pods / instance)

    # A start from the saved image works too.
    again = (await startTool(browser, dev.portal, "Notes (a shared notepad) (saved")).split("//")[1].split(".")[0]
    await browser.click(f"{row(again)} button.stop")
    await state(browser, again, "stopped")
    await browser.click(f"{row(again)} button.discard")
    await gone(pods / again)

    # Nothing of any pod is left: no process, no mount.
    for instance in [*instances.values(), again]:
        assert podProcesses(pods / instance, instance) == [], instance
    assert [point for point in mountPoints() if point.startswith(str(devDir))] == []
    assert static not in str(list(pods.iterdir()))
