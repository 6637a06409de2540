"""What a person does in the browser, for the end-to-end tests."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from support.browser import POLL
from support.processes import announcedPort
from support.waiting import eventually
from twisted.internet import threads

from dit4c.common.listening import listeningSocket
from dit4c.dev.service import SOCKET_NAMES
from dit4c.dev.tap import PORTS as DEV_PORTS

#: dit4c-dev's port options, and the field of its configuration each sets.
DEV_ATTRIBUTES = {
    "--portal-port": "portalPort",
    "--http-port": "httpPort",
    "--tunnel-port": "tunnelPort",
    "--image-port": "imagePort",
    "--file-port": "filePort",
}


async def logIn(browser: Any, portal: str, name: str, password: str) -> None:
    await browser.logIn(portal, name, password)


async def startTool(browser: Any, portal: str, toolName: str) -> str:
    """
    Start the catalogue entry whose name begins with ``toolName``; the new
    instance's URL once it runs (the page's row that was not there before).
    """
    row = f'#instances tr[data-instance="{await submitStart(browser, portal, toolName)}"]'
    await browser.waitFor(f'{row} td.state[data-state="running"]', 90)
    await browser.waitFor(f"{row} td.url a", 30)
    url: str = await browser.execute(f"return document.querySelector('{row} td.url a').href")
    return url


async def submitStart(browser: Any, portal: str, toolName: str) -> str:
    """Start the catalogue entry whose name begins with ``toolName`` from the home page; the new instance's id."""
    await browser.get(portal + "/")
    await browser.waitFor("#start-button")
    before = await browser.execute("return [...document.querySelectorAll('#instances tr[data-instance]')].map(r => r.dataset.instance)")
    chosen = await browser.execute(
        "const o = [...document.querySelectorAll('#image option')].find(o => o.text.startsWith(arguments[0]));"
        "if (o) { document.getElementById('image').value = o.value; } return !!o;",
        toolName,
    )
    assert chosen, f"no {toolName} in the catalogue"
    await browser.click("#start-button")
    instance = await eventually(
        lambda: browser.execute(
            "return [...document.querySelectorAll('#instances tr[data-instance]')]"
            ".map(r => r.dataset.instance).find(i => !arguments[0].includes(i)) || null",
            before or [],
        ),
        15,
        POLL,
        what="a new instance on the page",
    )
    return str(instance)


async def otherBrowser() -> Any:
    from support.browser import startBrowser

    return await threads.deferToThread(startBrowser)


async def openTool(browser: Any, url: str, greeting: str, timeout: float = 60) -> None:
    """Open the instance's URL until the tool greets the person (it may be coming back)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    async def greets() -> bool:
        try:
            await browser.get(url)
            await browser.waitForText("#greeting", greeting, 5)
            return True
        except (TimeoutException, WebDriverException):  # not yet, or refused
            return False

    await eventually(greets, timeout, interval=0.5, what=f"{url} greets with {greeting!r}")


def devArguments(dataDir: Path, ports: Mapping[str, int], *extra: str) -> list[str]:
    """``dit4c-dev``'s arguments: each port from ``ports`` (by option), else 0 (any free one)."""
    chosen = [argument for option in DEV_PORTS for argument in (option, str(ports.get(option, 0)))]
    return ["dit4c-dev", "--data-dir", str(dataDir), *chosen, *extra]


async def devPorts(process: Any) -> dict[str, int]:
    """The ports a ``dit4c-dev`` that is up got, by option (no file port if it runs no file server)."""
    await process.waitForLog("DIT4C is up", timeout=60)
    announced = {option: announcedPort(process.log(), what) for option, what in DEV_PORTS.items()}
    return {option: port for option, port in announced.items() if port is not None}


class Dev:
    """A running ``twistd dit4c-dev``, the ports it got, and what it printed."""

    def __init__(
        self, process: Any, dataDir: Path, extra: tuple[str, ...], ports: dict[str, int], sockets: dict[str, socket.socket]
    ) -> None:
        self.process = process
        self.dataDir = dataDir
        self.ports = ports
        #: To start it again as it was: on the ports it got (its instances' URLs name them).
        self.arguments = devArguments(dataDir, ports, *extra)
        #: Its listening sockets by name, held to hand over at every start (none: it binds its ports itself).
        self.sockets = sockets
        self.portal = f"http://localhost:{ports['--portal-port']}"
        self.httpPort = ports["--http-port"]

    async def adminPassword(self) -> str:
        match = await self.process.waitForLog(r"password:\s+(\S+)", timeout=30)
        return str(match.group(1))

    async def restart(self, processes: Any, how: int) -> None:
        """Stop it with signal ``how`` (``SIGINT``, ``SIGKILL``) and start it again as it was."""
        self.process.signal(how)
        await threads.deferToThread(self.process.proc.wait, 60)
        self.process = _dev(processes, self.arguments, self.sockets)
        assert await devPorts(self.process) == self.ports, "dit4c-dev came back on other ports"


def devSockets() -> dict[str, socket.socket]:
    """A listening loopback socket (port 0) for each part of ``dit4c-dev``, by the name it looks it up by."""
    return {name: listeningSocket() for name in SOCKET_NAMES.values()}


def handOver(sockets: dict[str, socket.socket]) -> dict[str, Any]:
    """A server's ``sockets=`` and ``socketNames=``: a duplicate of each of ``sockets`` (the originals stay held)."""
    return {"sockets": [sock.dup() for sock in sockets.values()], "socketNames": list(sockets)}


def _dev(processes: Any, arguments: list[str], sockets: dict[str, socket.socket]) -> Any:
    """``twistd dit4c-dev``, handed ``sockets`` (see :func:`handOver`)."""
    return processes(*arguments, name="dev", **handOver(sockets))


async def startDev(processes: Any, dataDir: Path, *extra: str, handOver: bool = True) -> Dev:
    """
    ``twistd dit4c-dev`` once it is up; the ports it got. Handed a listening
    socket (port 0) for each part, as systemd's socket activation hands
    them, which the test holds until its end: started again, it gets the
    same sockets, so its ports are never free for another process to take
    meanwhile. ``handOver=False``: every port option 0, bound by dit4c-dev.
    """
    sockets = devSockets() if handOver else {}
    processes.hold(sockets.values())
    process = _dev(processes, devArguments(dataDir, {}, *extra), sockets)
    ports = await devPorts(process)
    if sockets:
        held = {option: sockets[SOCKET_NAMES[DEV_ATTRIBUTES[option]]].getsockname()[1] for option in ports}
        assert ports == held, f"dit4c-dev listens on {ports}, not on the sockets handed to it ({held})"
    return Dev(process, dataDir, extra, ports, sockets)


async def addPerson(browser: Any, portal: str, name: str) -> str:
    """An administrator adds someone on the admin page; their password, shown once."""
    await browser.get(portal + "/admin/")
    await browser.fill("#new-name", name)
    await browser.submit("#add-user-submit")
    await browser.waitFor("#new-password", 15)
    password: str = await browser.text("#new-password")
    return password


async def refused(url: str, name: str, password: str) -> None:
    """In a browser of their own, ``name`` opens the instance, logs in, and gets the auth helper's 403 page."""
    other = await otherBrowser()
    try:
        await other.get(url)
        await other.waitFor("#username", 30)  # sent to the portal to log in
        await other.fill("#username", name)
        await other.fill("#password", password)
        await other.click("#submit")
        await other.waitForText("#title", "You may not use this instance", 30)
    finally:
        await other.stop()


