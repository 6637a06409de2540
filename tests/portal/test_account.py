"""
A person's own page, ``/account/``: personal API tokens made, listed and
revoked without any scraping, and a password changed (the current one
first; every other session ends). In Chromium, and on the wire.
"""

from __future__ import annotations

import re
from typing import Any

import pytest_twisted
from portal_client import Browser, Client, csrfOf, logIn

from dit4c.portal.app import Portal


def tokenOf(page: str) -> str:
    match = re.search(r'<code id="new-token">([^<]+)</code>', page)
    assert match, page
    return match.group(1)


@pytest_twisted.ensureDeferred
async def test_a_token_is_made_shown_once_used_and_revoked(api: Portal) -> None:
    alice = Browser(api)
    await logIn(alice)
    response, page = await alice.get("/account/")
    assert response.code == 200 and 'id="no-tokens"' in page

    response, page = await alice.post("/account/tokens", {"csrf": "forged", "name": "laptop"})
    assert response.code == 400 and 'id="no-tokens"' in page
    response, page = await alice.post("/account/tokens", {"csrf": csrfOf(page), "name": " "})
    assert response.code == 400 and "Name the token" in page
    response, page = await alice.post("/account/tokens", {"csrf": csrfOf(page), "name": "laptop"})
    assert response.code == 200
    token = tokenOf(page)
    code, me = await Client(api, token).call("GET", "/me")
    assert code == 200 and me["name"] == "alice"

    # Listed (never again shown), used, and revoked with a redirect back.
    response, page = await alice.get("/account/")
    assert token not in page and "laptop" in page and 'id="new-token"' not in page
    [tokenId] = re.findall(r'data-token="([^"]+)"', page)
    response, _ = await alice.post(f"/account/tokens/{tokenId}/revoke", {"csrf": csrfOf(page)})
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/account/?done=revoked"]
    code, _ = await Client(api, token).call("GET", "/me")
    assert code == 401

    # Someone else's token is not theirs to revoke.
    _, page = await alice.post("/account/tokens", {"csrf": csrfOf(page), "name": "script"})
    [aliceToken] = re.findall(r'data-token="([^"]+)"', page)
    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    _, bobsPage = await bob.get("/account/")
    response, _ = await bob.post(f"/account/tokens/{aliceToken}/revoke", {"csrf": csrfOf(bobsPage)})
    assert response.code == 404
    assert (await Client(api, tokenOf(page)).call("GET", "/me"))[0] == 200

    response, _ = await Browser(api).get("/account/")
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/login?next=/account/"]


@pytest_twisted.ensureDeferred
async def test_a_password_change_needs_the_current_one_and_ends_the_other_sessions(api: Portal) -> None:
    here, elsewhere = Browser(api), Browser(api)
    await logIn(here)
    await logIn(elsewhere)
    _, page = await here.get("/account/")

    def change(current: str, new: str, repeat: str | None = None) -> Any:
        form = {"csrf": csrfOf(page), "current": current, "new": new, "repeat": new if repeat is None else repeat}
        return here.post("/account/password", form)

    for current, new, repeat, why in [
        ("wrong password!", "a new password", None, "current password is not that"),
        ("correct horse battery", "short", None, "at least 10 characters"),
        ("correct horse battery", "a new password", "another one!", "differ"),
    ]:
        response, answer = await change(current, new, repeat)
        assert response.code == 400 and why in answer, why
    assert (await logIn(Browser(api))).code == 303  # unchanged

    response, _ = await change("correct horse battery", "a new password")
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/account/?done=password"]
    response, page = await here.get("/account/?done=password")
    assert response.code == 200 and "other sessions ended" in page
    response, _ = await elsewhere.get("/")
    assert response.code == 303  # to the login page: that session ended
    assert (await logIn(Browser(api))).code != 303
    assert (await logIn(Browser(api), "alice", "a new password")).code == 303


@pytest_twisted.ensureDeferred
async def test_the_account_page_in_a_browser(api: Portal, browser: Any) -> None:
    """Chromium: from the name in the header to a token made and revoked, and the password changed."""
    base = api.testURL  # type: ignore[attr-defined]
    await browser.get(base + "/login")
    await browser.fill("#username", "alice")
    await browser.fill("#password", "correct horse battery")
    await browser.submit("#submit")
    await browser.click("#who")
    await browser.waitFor("#no-tokens")

    await browser.fill("#token-name", "my laptop")
    await browser.submit("#make-token-submit")
    token = await browser.text("#new-token")
    assert (await Client(api, token).call("GET", "/me"))[0] == 200
    # The answer that showed the token is the page's own address in the
    # history: a reload makes no second token and shows none.
    assert await browser.execute("return location.pathname + location.search") == "/account/"
    await browser.run(browser.driver.refresh)
    await browser.waitForText("#tokens .name", "my laptop")
    assert await browser.execute("return document.querySelectorAll('#new-token, #tokens .name').length") == 1
    alice = await api.store.userByName("alice")
    assert len(await api.store.listApiTokens(alice.id)) == 1
    await browser.submit("#tokens button.revoke")
    await browser.waitFor("#no-tokens")
    assert (await Client(api, token).call("GET", "/me"))[0] == 401

    await browser.fill("#current", "correct horse battery")
    await browser.fill("#new", "a new password")
    await browser.fill("#repeat", "a new password")
    await browser.submit("#change-password-submit")
    await browser.waitForText("#message", "Your password is changed")
    assert (await logIn(Browser(api), "alice", "a new password")).code == 303


async def resetByRoot(api: Portal, name: str) -> str:
    """An administrator resets ``name``'s password on the admin page; the one shown."""
    root = Browser(api)
    assert (await logIn(root, "root", "root password!")).code == 303
    _, page = await root.get("/admin/")
    userId = (await api.store.userByName(name)).id
    response, page = await root.post(f"/admin/users/{userId}", {"csrf": csrfOf(page), "action": "reset-password"})
    assert response.code == 200 and "choose their own at their next login" in page
    match = re.search(r'<code id="new-password">([^<]+)</code>', page)
    assert match
    return match.group(1)


@pytest_twisted.ensureDeferred
async def test_a_reset_password_ends_the_sessions_and_is_changed_at_the_next_login(api: Portal) -> None:
    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    given = await resetByRoot(api, "bob")
    response, _ = await bob.get("/")
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/login"]  # session ended
    assert (await logIn(Browser(api), "bob", "bobs password!")).code == 401

    response = await logIn(bob, "bob", given)
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/account/"]
    for page in ("/", "/instances/anything"):
        response, _ = await bob.get(page)
        assert response.headers.getRawHeaders("location") == ["/account/"], page
    _, page = await bob.get("/account/")
    assert 'id="choose-password"' in page
    form = {"csrf": csrfOf(page), "current": given, "new": "bobs own password", "repeat": "bobs own password"}
    response, _ = await bob.post("/account/password", form)
    assert response.code == 303
    response, page = await bob.get("/")
    assert response.code == 200 and "Your instances" in page
    assert not (await api.store.userByName("bob")).password_reset


@pytest_twisted.ensureDeferred
async def test_a_reset_password_in_a_browser(api: Portal, browser: Any) -> None:
    """Chromium: bob logs in with what an administrator gave him, lands on his account page, and chooses his own."""
    given = await resetByRoot(api, "bob")
    base = api.testURL  # type: ignore[attr-defined]
    await browser.get(base + "/login")
    await browser.fill("#username", "bob")
    await browser.fill("#password", given)
    await browser.submit("#submit")
    await browser.waitFor("#choose-password")
    await browser.fill("#current", given)
    await browser.fill("#new", "bobs own password")
    await browser.fill("#repeat", "bobs own password")
    await browser.submit("#change-password-submit")
    await browser.waitForText("#message", "Your password is changed")
    await browser.get(base + "/")
    await browser.waitForText("h1", "Your instances")
