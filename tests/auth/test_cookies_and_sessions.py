"""
Logging in through the real portal, and who the auth helper lets through:
the owner, a person shared with (until unshared), nobody with a forged,
tampered or foreign token, nobody who brings another browser's answer.
Sessions survive a restart of the helper.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from auth_client import Browser, location, logIn, query, startLogin
from support.waiting import eventually

from dit4c.auth.service import audienceFor
from dit4c.common.keys import generatePrivateKey
from dit4c.common.tokens import TokenSigner


async def headersSeen(browser: Browser, **headers: str) -> dict[str, list[str]]:
    response = await browser.get(browser.world.instanceURL + "headers", headers=headers, accept="*/*")
    assert response.code == 200, await response.text()
    seen = (await response.json())["headers"]
    return {k.lower(): v for k, v in seen.items()}


@pytest_twisted.ensureDeferred
async def test_owner_logs_in_and_reaches_the_tool(world: Any) -> None:
    await world.startAuth()
    browser = Browser(world)
    authorize = await startLogin(browser, "/headers?x=1")
    params = query(authorize)
    assert params["client_id"] == world.instance.id
    assert params["redirect_uri"] == world.instanceURL + ".dit4c/callback"
    assert params["response_type"] == "code" and params["code_challenge_method"] == "S256"
    assert len(params["code_challenge"]) == 43
    flowCookie = next(c for c in browser.setCookies if c.startswith("dit4c_auth_flow="))
    assert "HttpOnly" in flowCookie and "SameSite=Lax" in flowCookie and "Path=/" in flowCookie
    assert "Domain" not in flowCookie and "Secure" not in flowCookie
    assert world.toolSaw == []

    callback = await logIn(browser, "alice", "/headers?x=1")
    assert callback.code == 303
    assert location(callback) == "/headers?x=1"
    session = next(c for c in browser.setCookies if c.startswith("dit4c_auth="))
    assert "HttpOnly" in session and "SameSite=Lax" in session and "Path=/" in session
    assert "Domain" not in session and "Secure" not in session
    assert "dit4c_auth_flow" not in browser.instanceCookies()  # spent

    # The tool sees the person, other cookies, and never the helper's cookies.
    browser.instanceCookies()["theme"] = "dark"
    seen = await headersSeen(browser, **{"X-DIT4C-User": "bob"})
    assert seen["x-dit4c-user"] == ["alice"]
    assert seen["cookie"] == ["theme=dark"]
    del browser.instanceCookies()["theme"]
    seen = await headersSeen(browser)
    assert "cookie" not in seen
    assert world.toolSaw[-1] == b"/headers"


@pytest_twisted.ensureDeferred
async def test_secure_cookies_when_the_routing_server_saw_https(world: Any) -> None:
    await world.startAuth()
    browser = Browser(world)
    response = await browser.get(world.instanceURL, headers={"X-Forwarded-Proto": "https"})
    assert response.code == 303
    assert query(location(response))["redirect_uri"] == f"https://{world.host}/.dit4c/callback"
    assert "Secure" in response.headers.getRawHeaders("set-cookie")[0]


@pytest_twisted.ensureDeferred
async def test_bob_is_refused_until_shared_and_again_after_unshare(world: Any) -> None:
    await world.startAuth(recheck=0.3)
    bob = Browser(world)
    refused = await logIn(bob, "bob")
    assert refused.code == 403
    page = await refused.text()
    assert "You may not use this instance" in page and "Ask its owner to share it" in page
    assert world.portalURL in page
    assert "dit4c_auth" not in bob.instanceCookies()

    await world.store.shareInstance(world.instance.id, world.users["bob"].id)
    response = await logIn(bob, "bob")
    assert response.code == 303
    assert (await headersSeen(bob))["x-dit4c-user"] == ["bob"]

    await world.store.unshareInstance(world.instance.id, world.users["bob"].id)
    # Until the helper's answer for bob's session is no longer fresh (the
    # recheck is due, or the portal told of the change): the next request asks.
    session = bob.instanceCookies()["dit4c_auth"]
    await eventually(lambda: world.auth.sessions.known(session) is None, what="bob's answer to go stale")
    response = await bob.get(world.instanceURL + "headers")
    assert response.code == 403
    assert "You may not use this instance" in await response.text()
    assert "dit4c_auth" not in bob.instanceCookies()  # cleared
    assert world.toolSaw.count(b"/headers") == 1


@pytest_twisted.ensureDeferred
async def test_requests_without_a_session_never_reach_the_tool(world: Any) -> None:
    await world.startAuth()
    browser = Browser(world)
    response = await browser.get(world.instanceURL + "headers", accept="application/json")
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate")
    response = await browser.request("POST", world.instanceURL + "sink", data=b"x" * 100000)
    assert response.code == 401
    response = await browser.get(
        world.instanceURL, headers={"Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
    )
    assert response.code == 401
    response = await browser.get(world.instanceURL, headers={"Sec-Fetch-Mode": "navigate"})
    assert response.code == 303
    assert world.toolSaw == []


@pytest_twisted.ensureDeferred
async def test_forged_tampered_and_foreign_tokens_are_refused(world: Any) -> None:
    await world.startAuth()
    alice = Browser(world)
    await logIn(alice, "alice")
    good = alice.instanceCookies()["dit4c_auth"]
    header, payload, signature = good.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
    other = world.portal.keys.signer().sign(
        {"sub": world.users["alice"].id, "name": "alice"}, audience=audienceFor("someoneelse"), lifetime=600
    )
    forger = TokenSigner(generatePrivateKey(), issuer=world.portalURL)
    forged = forger.sign({"sub": world.users["alice"].id, "name": "alice"}, audience=audienceFor(world.instance.id), lifetime=600)
    for bad in ("garbage", tampered, other, forged, good + "x"):
        browser = Browser(world)
        browser.instanceCookies()["dit4c_auth"] = bad
        response = await browser.get(world.instanceURL + "headers", accept="application/json")
        assert response.code == 401, bad
        assert any(c.startswith("dit4c_auth=;") and "Max-Age=0" in c for c in browser.setCookies)
    assert world.toolSaw == []
    assert (await headersSeen(alice))["x-dit4c-user"] == ["alice"]


@pytest_twisted.ensureDeferred
async def test_an_answer_meant_for_another_browser_is_refused(world: Any) -> None:
    """Login CSRF / code injection: the state is bound to the browser by the flow cookie."""
    await world.startAuth()
    mallory = Browser(world)
    mallory.jars  # noqa: B018
    authorize = await startLogin(mallory)
    await mallory.logInAtPortal("carol")
    await world.store.shareInstance(world.instance.id, world.users["carol"].id)
    response = await mallory.get(authorize)
    callback = location(response)

    # The victim never started this login: no flow cookie.
    victim = Browser(world)
    response = await victim.get(callback)
    assert response.code == 400
    assert "browser" in await response.text()
    # The victim started a login of its own: the states differ.
    await startLogin(victim)
    response = await victim.get(callback)
    assert response.code == 400
    assert "dit4c_auth" not in victim.instanceCookies()
    # A tampered state in mallory's own browser fails too.
    params = query(callback)
    response = await mallory.get(
        f"{world.instanceURL}.dit4c/callback?code={params['code']}&state=x{params['state']}"
    )
    assert response.code == 400
    assert world.toolSaw == []


@pytest_twisted.ensureDeferred
async def test_a_session_survives_a_restart_of_the_helper(world: Any) -> None:
    await world.startAuth()
    alice = Browser(world)
    await logIn(alice, "alice")
    assert (await headersSeen(alice))["x-dit4c-user"] == ["alice"]
    port = world.authPort
    await world.stopAuth()
    await world.startAuth(port=port)
    assert (await headersSeen(alice))["x-dit4c-user"] == ["alice"]
    # A login started before the restart can be finished after it.
    bob = Browser(world)
    await world.store.shareInstance(world.instance.id, world.users["bob"].id)
    authorize = await startLogin(bob)
    await world.stopAuth()
    await world.startAuth(port=port)
    await bob.logInAtPortal("bob")
    response = await bob.get(location(await bob.get(authorize)))
    assert response.code == 303
    assert (await headersSeen(bob))["x-dit4c-user"] == ["bob"]


@pytest_twisted.ensureDeferred
async def test_access_denied_and_other_errors_at_the_callback(world: Any) -> None:
    await world.startAuth()
    browser = Browser(world)
    authorize = await startLogin(browser)
    state = query(authorize)["state"]
    response = await browser.get(f"{world.instanceURL}.dit4c/callback?error=server_error&state={state}")
    assert response.code == 400
    assert "server_error" in await response.text()
    authorize = await startLogin(browser)
    state = query(authorize)["state"]
    response = await browser.get(f"{world.instanceURL}.dit4c/callback?code=bogus&state={state}")
    assert response.code == 400
    text = await response.text()
    assert "invalid_grant" in text and "Traceback" not in text
    response = await browser.get(f"{world.instanceURL}.dit4c/elsewhere")
    assert response.code == 404
