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
import signal
from pathlib import Path
from typing import Any

import pytest_twisted
from flows import (
    DEV_PORTS,
    addPerson,
    logIn,
    openTool,
    otherBrowser,
    refused,
    startDev,
    startTool,
)
from support.sockets import RawClient, rawRequest
from support.waiting import eventually

from dit4c.node.processes import startTime


def podProcesses(dataDir: Path) -> list[int]:
    pids = []
    for pidFile in dataDir.glob("node/*/*.pid"):  # (not into the pods' storage mounts)
        pid = json.loads(pidFile.read_text())["pid"]
        if startTime(pid) is not None:
            pids.append(pid)
    return pids


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
    await eventually(lambda: not (dev.dataDir / "node" / instance).exists(), what="the discarded pod's directory is gone")
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

    # The image server holds it under its digest, and the page lists it as
    # the admin's at once (no reload by hand), under a name that says when.
    stored = list((dev.dataDir / "images" / "sha256").iterdir())
    assert len(stored) == 1
    assert hashlib.sha256(stored[0].read_bytes()).hexdigest() == stored[0].name
    await browser.waitForText("#saved-images td", "Notes (a shared notepad) (saved 20", 15)
    # Renamed by its owner; started again by its new name.
    await browser.fill("#saved-images form.rename input[name=name]", "My notes")
    await browser.submit("#saved-images button.rename-image")
    await browser.waitForText("#saved-images td", "My notes")
    restored = await startTool(browser, dev.portal, "My notes")
    assert restored != url
    await openTool(browser, restored, "Hello, admin.")
    await browser.waitForText("#notes li", "written before the save", 15)

    # Shared with bob, who starts his own instance from it and finds the note.
    bobsPassword = await addPerson(browser, dev.portal, "bob")
    await browser.get(dev.portal + "/")
    await browser.fill("#saved-images form.share input[name=user]", "bob")
    await browser.submit("#saved-images button.share-image")
    bob = await otherBrowser()
    try:
        await logIn(bob, dev.portal, "bob", bobsPassword)
        bobs = await startTool(bob, dev.portal, "My notes")
        await openTool(bob, bobs, "Hello, bob.")
        await bob.waitForText("#notes li", "written before the save", 15)
    finally:
        await bob.stop()

    # The owner deletes it: nobody can start it any more.
    await browser.get(dev.portal + "/")
    await browser.submit("#saved-images button.delete-image")
    names = await browser.execute("return [...document.querySelectorAll('#image option')].map(o => o.text)")
    assert "My notes" not in names, names


async def banner(port: int) -> bytes:
    """What a server says first, unasked (an SSH server's version line)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    await eventually(lambda: b"\n" in client.received, 5, what=lambda: f"a line from port {port}: {client.received!r}")
    client.transport.loseConnection()
    return bytes(client.received)


async def serves(ports: dict[str, int]) -> None:
    """Each part of dit4c-dev answers on the port it reported, as what it is."""
    portal = await rawRequest(ports["--portal-port"], b"GET /.well-known/jwks.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 200 ", portal) and b'"keys"' in portal, portal[:300]
    routing = await rawRequest(ports["--http-port"], b"GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n")
    assert routing.startswith(b"HTTP/1.1 404 ") and b"nobody.localhost" in routing, routing[:300]
    images = await rawRequest(ports["--image-port"], b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 200 ", images) and b'"ok"' in images, images[:300]
    # The tunnel port speaks the tunnel protocol: an HTTP request is no HELLO, and is dropped.
    assert not (await rawRequest(ports["--tunnel-port"], b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/")
    if "--file-port" in ports:
        assert (await banner(ports["--file-port"])).startswith(b"SSH-2.0-")


@pytest_twisted.ensureDeferred
async def test_every_port_0_serves_and_reports_its_ports(processes: Any, devDir: Path) -> None:
    """
    ``dit4c-dev`` with every port 0: each part listens on a port of its own,
    logs it as the separate servers do, serves there, and the URLs name the
    ports got; started again with those ports, it comes back on them.
    """
    dev = await startDev(processes, devDir, handOver=False)
    given = dev.process.args
    assert all(given[given.index(option) + 1] == "0" for option in DEV_PORTS)
    ports = dev.ports
    assert set(ports) >= {"--portal-port", "--http-port", "--tunnel-port", "--image-port"}
    assert 0 not in ports.values() and len(set(ports.values())) == len(ports), ports
    portal, http = ports["--portal-port"], ports["--http-port"]
    assert f"DIT4C is up: open http://localhost:{portal} (instances at http://<id>.localhost:{http}/)" in dev.process.log()
    await serves(ports)

    await dev.restart(processes, signal.SIGINT)  # asserts it came back on the same ports
    await serves(ports)


def test_a_port_taken_is_named_with_the_option_that_moves_it(tmp_path: Path) -> None:
    """Another program on the portal's port: one line that says which port, why, and the option to give."""
    import socket
    import subprocess

    from support.processes import TWISTD

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*TWISTD, "-n", "--pidfile=", "dit4c-dev", "--data-dir", str(tmp_path / "dev"), "--portal-port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"dit4c-dev: cannot listen on 127.0.0.1:{port} for the portal (Address already in use): another program "
        "has it, or dit4c-dev runs already. Give another port with --portal-port N (0 takes any free one)."
    ), result.stderr
