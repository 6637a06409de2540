"""
An administrator removes a person: disabled first, their instances ended
(running ones stopped, those at rest discarded, through their scheduler),
then the person and what was theirs removed. On the API and in Chromium.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from portal_client import Browser, Client, logIn, tokenFor

from dit4c.portal.app import Portal


async def bobsWorld(api: Portal) -> tuple[Client, Client, str, str, str]:
    """Root's and bob's API clients, bob's id, his running instance and his saved image."""
    root = Client(api, await tokenFor(api, "root", "root password!"))
    bob = Client(api, await tokenFor(api, "bob", "bobs password!"))
    code, instance = await bob.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    assert code == 201, instance
    await api.store.updateInstance(instance["id"], state="running")
    bobUser = await api.store.userByName("bob")
    assert bobUser is not None
    saved = await api.store.createImage("bob's work", "https://images.example/i/1", owner_id=bobUser.id)
    return root, bob, bobUser.id, instance["id"], saved.id


async def nodeSays(api: Portal, instance: str, state: str) -> None:
    """What the node would report once the command it was sent is done."""
    await api.store.updateInstance(instance, state=state)


@pytest_twisted.ensureDeferred
async def test_a_person_is_removed_on_the_api_once_disabled_and_ended(api: Portal) -> None:
    root, bob, bobId, instance, saved = await bobsWorld(api)
    # Not while they may log in.
    code, body = await root.call("DELETE", f"/admin/users/{bobId}")
    assert (code, body["error"]) == (409, "conflict") and "Disable bob first" in body["reason"]
    code, _ = await root.call("PATCH", f"/admin/users/{bobId}", {"disabled": True})
    assert code == 200
    # Not while an instance of theirs is not discarded.
    code, body = await root.call("DELETE", f"/admin/users/{bobId}")
    assert code == 409 and "1 of their instances are not discarded" in body["reason"]

    # Ended: stopped through the scheduler; once at rest, discarded.
    code, body = await root.call("POST", f"/admin/users/{bobId}/end-instances")
    assert (code, body) == (200, {"stopped": 1, "discarded": 0})
    assert api.commands.sent[-1][1:3] == ("stop", instance)  # type: ignore[attr-defined]
    await nodeSays(api, instance, "stopped")
    code, body = await root.call("POST", f"/admin/users/{bobId}/end-instances")
    assert (code, body) == (200, {"stopped": 0, "discarded": 1})
    assert api.commands.sent[-1][1:3] == ("discard", instance)  # type: ignore[attr-defined]
    await nodeSays(api, instance, "discarded")

    code, body = await root.call("DELETE", f"/admin/users/{bobId}")
    assert (code, body) == (200, {"removed": bobId, "instances": 1, "images": 1})
    assert await api.store.userById(bobId) is None
    assert await api.store.instanceById(instance) is None
    assert (await api.store.imageById(saved)).deleted  # type: ignore[union-attr]
    assert (await bob.call("GET", "/me"))[0] == 401
    assert (await logIn(Browser(api), "bob", "bobs password!")).code == 401
    code, _ = await root.call("DELETE", f"/admin/users/{bobId}")
    assert code == 404
    # Only administrators remove anyone.
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    rootId = (await api.store.userByName("root")).id  # type: ignore[union-attr]
    assert (await alice.call("DELETE", f"/admin/users/{rootId}"))[0] == 403
    assert await api.store.userById(rootId) is not None
    # The page names only an id of the store's form.
    page = Browser(api)
    await logIn(page, "root", "root password!")
    _, html = await page.get("/admin/?done=removed&id=../../etc")
    assert 'id="message"' not in html and "../../etc" not in html


@pytest_twisted.ensureDeferred
async def test_a_person_is_removed_in_a_browser(api: Portal, browser: Any) -> None:
    """Chromium: disable, end the instances (twice: stop, then discard), remove; the page says what stays."""
    _, _, bobId, instance, _ = await bobsWorld(api)
    base = api.testURL  # type: ignore[attr-defined]
    await browser.logIn(base, "root", "root password!")
    await browser.get(base + "/admin/")
    row = 'tr[data-user="bob"]'
    assert await browser.execute(f"return document.querySelector('{row} .remove-person')") is None
    await browser.submit(f'{row} button[value="disable"]')
    await browser.waitForText(f"{row} .instances-left", "1 instance not discarded")
    await browser.submit(f"{row} .end-instances")
    await browser.waitForText("#message", "stopping")
    await nodeSays(api, instance, "stopped")
    await browser.submit(f"{row} .end-instances")
    await browser.waitForText("#message", "stopping")
    await nodeSays(api, instance, "discarded")
    await browser.get(base + "/admin/")
    await browser.submit(f"{row} .remove-person")
    await browser.waitForText("#message", f"Their storage on the file server is left: remove users/{bobId}/")
    assert await browser.execute(f"return document.querySelector('{row}')") is None
    assert await api.store.userById(bobId) is None
