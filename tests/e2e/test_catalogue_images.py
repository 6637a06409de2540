"""
End to end, the catalogue's real tools under ``twistd dit4c-dev --runtime
podman``: each image ``scripts/build-images`` makes (``images/``) is offered
by the dev catalogue, started, and used in Chromium through the routing
server and its auth helper, with the person's storage at ``/mnt``:

- JupyterLab: a Python kernel round trip (``1+1`` gives ``2``) over the
  Jupyter REST API and the kernel's WebSocket, from the page with the
  browser's cookies; then saved, and started again from the saved image
  with the file it wrote in its home;
- R in JupyterLab: an R cell through IRkernel (``sum(1:10)`` gives 55);
- code-server: its editor (the workbench) loads;
- the desktop: noVNC connects, and a WebSocket to websockify gets the VNC
  server's RFB greeting.

Each instance writes a file under ``/mnt`` that the test finds in the
person's directory on the file server. The images are built first by
``scripts/test`` (``scripts/build-images``); each test asks for its image
again (seconds when built), so a build that fails fails the test with the
build's output. One instance runs at a time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from flows import logIn, startDev, startTool
from support.podman import cleanUpDev, podmanEnv, podmanUnavailable, requirePodman
from support.waiting import eventually
from twisted.internet import threads

from dit4c.dev.service import PODMAN_CATALOGUE

ROOT = Path(__file__).resolve().parents[2]
PREFIX = f"dit4c-cat{os.getpid()}"
#: Seconds a first build may take (code-server's is the longest, minutes).
BUILD_TIMEOUT = 1800


@pytest.fixture(scope="module")
def podman() -> None:
    noSshfs = None if shutil.which("sshfs") else "sshfs not installed (the person's storage)"
    requirePodman("the catalogue images' tests", podmanUnavailable() or noSshfs)


@pytest_twisted.async_yield_fixture
async def devDir(tmp_path: Path, podman: None, processes: Any) -> Any:
    yield tmp_path / "dev"
    await cleanUpDev(processes, tmp_path / "dev", PREFIX)


def built(name: str) -> str:
    """
    Blocking (a thread): ``scripts/build-images name`` (seconds if it is
    built); the image's catalogue reference. A failed build fails the test
    with the build's output.
    """
    result = subprocess.run(
        [str(ROOT / "scripts" / "build-images"), name],
        capture_output=True,
        timeout=BUILD_TIMEOUT,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/build-images {name} failed:\n{result.stdout.decode()}{result.stderr.decode()}")
    ref = f"localhost/dit4c/{name}:latest"
    assert ref in PODMAN_CATALOGUE, f"{ref} is not in the dev catalogue"
    return ref


def inTool(instance: str, script: str) -> str:
    """Blocking (a thread): ``sh -c script`` in the tool's container, as its own user; the output."""
    result = subprocess.run(
        ["podman", "exec", f"{PREFIX}-{instance}-tool", "sh", "-c", script],
        env=podmanEnv(), capture_output=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.decode()


def imageExists(ref: str) -> bool:
    """Blocking: whether podman on this node holds the image ``ref``."""
    return subprocess.run(["podman", "image", "exists", ref], env=podmanEnv(), timeout=60).returncode == 0


async def inStorage(dev: Any, name: str) -> str:
    """The file ``name`` in the administrator's directory on the file server, once it is there."""

    def found() -> str | None:
        files = list((dev.dataDir / "files" / "users").glob(f"*/{name}"))
        return files[0].read_text() if files else None

    text: str = await eventually(found, 30, what=f"{name} on the person's storage")
    return text


async def startCatalogueTool(processes: Any, browser: Any, devDir: Path, ref: str) -> tuple[Any, str, str]:
    """``dit4c-dev --runtime podman``, logged in as its administrator; the tool of ``ref`` started from the catalogue."""
    dev = await startDev(processes, devDir, "--runtime", "podman", "--podman-prefix", PREFIX)
    await logIn(browser, dev.portal, "admin", await dev.adminPassword())
    url = await startTool(browser, dev.portal, PODMAN_CATALOGUE[ref])
    instance = url.split("//")[1].split(".")[0]
    return dev, url, instance


#: In the page (its origin, its cookies): start a kernel of ``arguments[0]``
#: through the Jupyter REST API, run ``arguments[1]`` over the kernel's
#: WebSocket, and answer its result (``text/plain``), or its error.
KERNEL_ROUND_TRIP = """
const [kernelName, code] = arguments;
const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
const made = await fetch("/api/kernels", {
    method: "POST", headers: {"Content-Type": "application/json", "X-XSRFToken": decodeURIComponent(xsrf)},
    body: JSON.stringify({name: kernelName}),
});
if (!made.ok) { return "POST /api/kernels: " + made.status + " " + await made.text(); }
const kernel = await made.json();
const scheme = location.protocol === "https:" ? "wss:" : "ws:";
const ws = new WebSocket(`${scheme}//${location.host}/api/kernels/${kernel.id}/channels`);
const id = "dit4c-" + Math.random().toString(16).slice(2);
return await new Promise((resolve) => {
    const timer = setTimeout(() => resolve("no result within 90 s"), 90000);
    ws.onerror = () => resolve("the kernel's WebSocket failed");
    ws.onopen = () => ws.send(JSON.stringify({
        header: {msg_id: id, msg_type: "execute_request", username: "", session: id, version: "5.3", date: ""},
        parent_header: {}, metadata: {}, channel: "shell", buffers: [],
        content: {code, silent: false, store_history: false, user_expressions: {}, allow_stdin: false},
    }));
    ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.parent_header.msg_id !== id) { return; }
        // IRkernel shows a cell's value as display_data, ipykernel as execute_result.
        if (message.msg_type === "execute_result" || message.msg_type === "display_data") {
            clearTimeout(timer); ws.close(); resolve(message.content.data["text/plain"]);
        } else if (message.msg_type === "error") {
            clearTimeout(timer); ws.close(); resolve("error: " + message.content.ename + ": " + message.content.evalue);
        }
    };
});
"""


async def openJupyterLab(browser: Any, url: str) -> None:
    """The instance's URL until JupyterLab's page is up (its kernels may take a while to be listed)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    async def up() -> bool:
        try:
            await browser.get(url)
            await browser.waitFor("#jp-main-dock-panel", 15)
            return True
        except (TimeoutException, WebDriverException):
            return False

    await eventually(up, 120, interval=1, what=f"JupyterLab at {url}")


async def runInKernel(browser: Any, kernel: str, code: str) -> str:
    await browser.run(browser.driver.set_script_timeout, 120)
    result: str = await browser.execute(KERNEL_ROUND_TRIP, kernel, code)
    return result


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_jupyterlab_kernel_storage_and_a_save(processes: Any, browser: Any, devDir: Path) -> None:
    ref = await threads.deferToThread(built, "jupyterlab")
    dev, url, instance = await startCatalogueTool(processes, browser, devDir, ref)
    await openJupyterLab(browser, url)
    code = (
        "open('/mnt/from-jupyter.txt', 'w').write('written by the kernel\\n')\n"
        "open('/home/researcher/work.txt', 'w').write('kept by the save\\n')\n"
        "1+1"
    )
    assert await runInKernel(browser, "python3", code) == "2"
    assert await inStorage(dev, "from-jupyter.txt") == "written by the kernel\n"
    # The tool runs as its own user, not root.
    assert (await threads.deferToThread(inTool, instance, "id -u")).strip() == "1000"

    # Saved: the image goes to the image server and leaves the node.
    row = f'#instances tr[data-instance="{instance}"]'
    await browser.get(dev.portal + "/")
    await browser.click(f"{row} button.save")
    await browser.waitFor(f'{row} td.state[data-state="saved"]', 600)
    assert not await threads.deferToThread(imageExists, f"localhost/dit4c-saved/{instance}:latest")

    # Started again from the saved image: the file in its home is there.
    await browser.waitForText("#saved-images td", "JupyterLab (saved 20", 30)
    restored = await startTool(browser, dev.portal, "JupyterLab (saved")
    assert restored != url
    await openJupyterLab(browser, restored)
    assert await runInKernel(browser, "python3", "open('/home/researcher/work.txt').read()") == "'kept by the save\\n'"
    assert await runInKernel(browser, "python3", "open('/mnt/from-jupyter.txt').read()") == "'written by the kernel\\n'"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_an_r_cell_through_irkernel(processes: Any, browser: Any, devDir: Path) -> None:
    ref = await threads.deferToThread(built, "r-jupyterlab")
    dev, url, instance = await startCatalogueTool(processes, browser, devDir, ref)
    await openJupyterLab(browser, url)
    code = 'writeLines("written by R", "/mnt/from-r.txt")\nsum(1:10)'
    assert await runInKernel(browser, "ir", code) == "[1] 55"
    assert await inStorage(dev, "from-r.txt") == "written by R\n"


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_code_server_editor(processes: Any, browser: Any, devDir: Path) -> None:
    ref = await threads.deferToThread(built, "code-server")
    dev, url, instance = await startCatalogueTool(processes, browser, devDir, ref)
    from selenium.common.exceptions import TimeoutException, WebDriverException

    script = "echo written in code-server > /mnt/from-code-server.txt && echo hello > ~/made-in-the-container.txt"
    await threads.deferToThread(inTool, instance, script)
    assert await inStorage(dev, "from-code-server.txt") == "written in code-server\n"

    async def workbench() -> bool:
        try:
            await browser.get(url)
            await browser.waitFor(".monaco-workbench", 30)
            return True
        except (TimeoutException, WebDriverException):
            return False

    await eventually(workbench, 120, interval=1, what="code-server's workbench")
    # The explorer lists the folder it opened (~) through the editor's own
    # connection to its server, a WebSocket through the auth helper.
    await browser.waitForText(".explorer-folders-view", "made-in-the-container.txt", 60)


#: In the page: a WebSocket to websockify, and the VNC server's first bytes (its RFB greeting).
RFB_GREETING = """
return await new Promise((resolve) => {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/websockify`, ["binary"]);
    ws.binaryType = "arraybuffer";
    const timer = setTimeout(() => resolve("no greeting within 30 s"), 30000);
    ws.onerror = () => { clearTimeout(timer); resolve("the WebSocket failed"); };
    ws.onmessage = (event) => {
        clearTimeout(timer);
        const data = typeof event.data === "string" ? event.data : new TextDecoder().decode(event.data);
        ws.close();
        resolve(data);
    };
});
"""


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_desktop_over_novnc(processes: Any, browser: Any, devDir: Path) -> None:
    ref = await threads.deferToThread(built, "desktop")
    dev, url, instance = await startCatalogueTool(processes, browser, devDir, ref)
    await browser.get(url)  # the index page opens noVNC, which connects (and tries again until it does)
    await eventually(
        # The document may be between pages (the index page opens noVNC's): no element yet.
        lambda: browser.execute("return !!document.documentElement?.classList.contains('noVNC_connected')"),
        90,
        interval=0.5,
        what="noVNC connected to the desktop",
    )
    assert "vnc.html" in await browser.run(lambda: browser.driver.current_url)
    greeting = await browser.execute(RFB_GREETING)
    assert greeting.startswith("RFB 003.00"), greeting
    await threads.deferToThread(inTool, instance, "echo written on the desktop > /mnt/from-desktop.txt")
    assert await inStorage(dev, "from-desktop.txt") == "written on the desktop\n"
