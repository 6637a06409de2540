"""
The portal's pages in a real browser (headless Chromium): what a person
does, with the portal serving on a real loopback socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest_twisted
from support.passwords import cheapHash
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString

from dit4c.common.life import State
from dit4c.portal.app import PortalConfig
from dit4c.portal.service import PortalService


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


@asynccontextmanager
async def portalAndScheduler(tmp_path: Path, browser: Any, **scheduler: Any) -> AsyncIterator[tuple[Any, Any, str]]:
    """
    A portal with alice and a catalogue entry, a scheduler stand-in that
    speaks the real channel (``scheduler``: its options), and ``browser``
    logged in as alice: the portal, the scheduler, and the page's base URL.
    """
    from dit4c.testing.scheduler import TestingScheduler, registerScheduler

    service = PortalService(
        reactor,
        database=f"sqlite:///{tmp_path / 'portal.db'}",
        dataDir=tmp_path / "data",
        config=PortalConfig(publicURL="http://portal.localhost"),
        endpoints=[serverFromString(reactor, "tcp:0:interface=127.0.0.1")],
    )
    service.startService()
    portal = await service.ready
    stand_in = None
    try:
        store = portal.store
        await store.createUser("alice", password_hash=cheapHash("correct horse battery"))
        await store.createImage("Notebook", "notebook:1", owner_id=None, port=8888)
        registered, key = await registerScheduler(store, "cluster")
        port = service.ports[0].port.getHost().port  # type: ignore[union-attr]
        stand_in = TestingScheduler(reactor, **scheduler)
        client = stand_in.connect(
            f"ws://127.0.0.1:{port}/.dit4c/channel", registered.id, key, issuer="http://portal.localhost"
        )
        await client.whenConnected()
        base = f"http://portal.localhost:{port}"
        await browser.get(base + "/login")
        await browser.fill("#username", "alice")
        await browser.fill("#password", "correct horse battery")
        await browser.click("#submit")
        await browser.waitFor("#start-button", 10)
        yield portal, stand_in, base
    finally:
        if stand_in is not None:
            await stand_in.stop()
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_start_watch_and_stop_an_instance_in_a_browser(tmp_path: Path, browser: Any) -> None:
    """
    Log in, start a tool against a scheduler stand-in that speaks the real
    channel, watch its state reach running on the page without reloading,
    then stop it.
    """
    async with portalAndScheduler(tmp_path, browser, delays={"start": 1.0, "stop": 0.5}) as (portal, scheduler, _):
        await browser.click("#start-button")
        await browser.waitFor('td.state[data-state="requested"], td.state[data-state="starting"]', 10)
        # Mark the page: a reload would lose the mark.
        await browser.execute("document.body.dataset.mark = 'same page'")
        await browser.waitFor('td.state[data-state="running"]', 15)
        await browser.waitFor("td.url a", 5)
        assert await browser.execute("return document.body.dataset.mark") == "same page"

        await browser.click("button.stop")
        await browser.waitFor('td.state[data-state="stopped"]', 15)
        [instance] = await portal.store.listInstancesOf((await portal.store.userByName("alice")).id)
        assert instance.state == "stopped"
        assert [op for op in (c.op for c in scheduler.handled)] == ["start", "stop"]


@pytest_twisted.ensureDeferred
async def test_a_row_discarded_before_the_pages_stream_started_leaves_the_page(
    tmp_path: Path, browser: Any, monkeypatch: Any
) -> None:
    """
    The page shows an instance; it is discarded (say, from another tab)
    before the page's event stream starts: the stream's snapshot no longer
    names it, and the page loads again without it.
    """
    async with portalAndScheduler(tmp_path, browser) as (portal, _, base):
        alice = await portal.store.userByName("alice")
        [image] = await portal.instances.images(alice)
        instance = await portal.store.createInstance(alice.id, image.id)
        gate: Deferred[None] = Deferred()
        serve = portal.streams.serve

        async def heldBack(request: Any, who: Any) -> None:
            await gate
            await serve(request, who)

        monkeypatch.setattr(portal.streams, "serve", heldBack)
        await browser.get(base + "/")
        await browser.waitFor(f'tr[data-instance="{instance.id}"]', 10)
        await portal.store.updateInstance(instance.id, state=State.DISCARDED)
        gate.callback(None)
        await browser.waitFor("#no-instances", 15)


@pytest_twisted.ensureDeferred
async def test_an_errored_instance_shows_why_and_can_be_discarded(tmp_path: Path, browser: Any) -> None:
    """
    A tool that fails: the page shows the reason with the tool's last
    output lines as they are (lines kept), the API says the same, and the
    only action the page offers is discard, which leaves nothing.
    """
    import json

    import treq

    reason = (
        "The tool exited with status 1.\n"
        "Traceback (most recent call last):\n"
        '  File "tool.py", line 3, in <module>\n'
        "PermissionError: [Errno 13] Permission denied: '/data/<results>'"
    )
    async with portalAndScheduler(tmp_path, browser, failures={"start": reason}) as (portal, scheduler, base):
        store = portal.store
        await browser.click("#start-button")
        await browser.waitFor('td.state[data-state="errored"] pre.reason', 15)
        shown = await browser.execute("return document.querySelector('td.state pre.reason').textContent")
        assert shown == reason  # every line, as the tool wrote it (and escaped: no markup)
        buttons = await browser.execute(
            "return Object.fromEntries([...document.querySelectorAll('td.actions button')]"
            ".filter(b => ['stop', 'save', 'discard'].some(a => b.classList.contains(a)))"
            ".map(b => [b.className.split(' ').pop(), b.disabled]))"
        )
        assert buttons == {"stop": True, "save": True, "discard": False}

        alice = await store.userByName("alice")
        [instance] = await store.listInstancesOf(alice.id)
        token = (await store.createApiToken(alice.id, "test"))[1]
        response = await treq.get(
            base.replace("portal.localhost", "127.0.0.1") + f"/api/v1/instances/{instance.id}",
            headers={"Authorization": f"Bearer {token}", "Host": base.split("//")[1]},
        )
        assert json.loads(await response.text())["reason"] == reason

        # Discard it: nothing is left.
        await browser.get(base + "/")
        await browser.click("button.discard")
        await browser.waitFor("#no-instances", 15)
        assert (await store.instanceById(instance.id)).state == "discarded"
        assert [c.op for c in scheduler.handled] == ["start", "discard"]
