"""
The portal's pages in a real browser (headless Chromium): what a person
does, with the portal serving on a real loopback socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString

from dit4c.portal import security
from dit4c.portal.app import PortalConfig
from dit4c.portal.service import PortalService


@pytest_twisted.async_yield_fixture
async def running(tmp_path: Path) -> Any:
    service = PortalService(
        reactor,
        database=f"sqlite:///{tmp_path / 'portal.db'}",
        dataDir=tmp_path / "data",
        config=PortalConfig(publicURL="http://portal.localhost"),
        endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
    )
    service.startService()
    portal = await service.ready
    await portal.store.createUser(
        "alice", password_hash=await security.hashPassword("correct horse battery"), display_name="Alice A."
    )
    port = service.ports[0].port.getHost().port  # type: ignore[union-attr]
    yield f"http://portal.localhost:{port}"
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_log_in_and_out_in_a_browser(running: str, browser: Any, tmp_path: Path) -> None:
    await browser.get(running + "/")
    await browser.waitFor("#username", 10)  # sent to the login page
    await browser.fill("#username", "alice")
    await browser.fill("#password", "wrong password")
    await browser.click("#submit")
    await browser.waitForText("#error", "Wrong user name or password", 10)

    await browser.fill("#password", "correct horse battery")
    await browser.click("#submit")
    await browser.waitForText("#who", "Alice A.", 10)
    await browser.waitFor("#no-instances", 10)
    # The session cookie is there but out of reach of scripts.
    cookies = {c["name"]: c for c in await browser.cookies()}
    assert cookies["dit4c_session"]["httpOnly"] is True
    assert "dit4c_session" not in await browser.execute("return document.cookie")
    await browser.screenshot(tmp_path / "home.png")

    await browser.click("#logout")
    await browser.waitFor("#username", 10)
    await browser.get(running + "/")
    await browser.waitFor("#username", 10)  # logged out for real
