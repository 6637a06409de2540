"""
An instance access token lasts only as long as the portal session it was
issued in (docs/protocols.md 6.4, 6.5): logging out of the portal ends it
at the helper's next question, a code whose session ended cannot be
exchanged, and a token that names no session is refused.
"""

# ruff: noqa: F811 (each test takes the imported ``world`` fixture as a parameter)

from __future__ import annotations

import jwt
import pytest_twisted
from test_oauth import (
    World,
    accessToken,
    authorize,
    exchange,
    loggedIn,
    pkce,
    token,
    userinfo,
    world,  # noqa: F401 (the fixture; the tests' parameters name it)
)

from dit4c.portal import security
from dit4c.portal.oauth import audienceFor
from dit4c.portal.store import hashToken

SESSION = security.SESSION_COOKIE.decode()


@pytest_twisted.ensureDeferred
async def test_the_token_names_its_session_and_ends_with_it(world: World) -> None:
    w = world
    laptop, phone = await loggedIn(w), await loggedIn(w)
    fromLaptop = await accessToken(w, laptop, w.a)
    fromPhone = await accessToken(w, phone, w.a)
    claims = jwt.decode(fromLaptop, options={"verify_signature": False})
    assert claims["sid"] == hashToken(laptop.cookies[SESSION])
    assert (await userinfo(w, fromLaptop, w.a.id))[0] == 200

    _, page = await laptop.get("/")
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    response, _ = await laptop.post("/logout", {"csrf": csrf})
    assert response.code == 303
    status, body, response = await userinfo(w, fromLaptop, w.a.id)
    assert status == 401 and body["error"] == "invalid_token"
    assert "session" in body["error_description"]
    # The other session's token is untouched; logging in again does not revive the old one.
    assert (await userinfo(w, fromPhone, w.a.id))[0] == 200
    await laptop.logIn()
    assert (await userinfo(w, fromLaptop, w.a.id))[0] == 401


@pytest_twisted.ensureDeferred
async def test_a_code_from_an_ended_session_is_not_exchanged(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    await w.store.deleteSession(browser.cookies[SESSION])
    status, body, _ = await token(w, **exchange(w.a, code, verifier))
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "session" in body["error_description"]


@pytest_twisted.ensureDeferred
async def test_a_token_that_names_no_live_session_is_refused(world: World) -> None:
    w = world
    signer = w.portal.keys.signer()
    for claims in ({"sub": w.alice.id, "name": "alice"}, {"sub": w.alice.id, "name": "alice", "sid": "0" * 64}):
        forged = signer.sign(claims, audience=audienceFor(w.a.id), lifetime=600)
        status, body, _ = await userinfo(w, forged, w.a.id)
        assert (status, body["error"]) == (401, "invalid_token")
