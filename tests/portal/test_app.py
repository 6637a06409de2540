"""
The portal's pages and well-known documents over real HTTP on loopback,
with a real (SQLite) store and a test clock: login, sessions, CSRF, rate
limits, keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted
from portal_client import Browser, csrfOf, logIn, serve
from support.passwords import cheapHash
from twisted.internet import reactor
from twisted.internet.task import Clock

from dit4c.common.tokens import StaticKeySource, TokenVerifier
from dit4c.portal.app import Portal, PortalConfig, safeNext
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore

BASE = "http://portal.test"


@pytest_twisted.ensureDeferred
async def test_login_sets_a_safe_session_cookie_and_shows_the_home_page(portal: Portal) -> None:
    browser = Browser(portal)
    response, _ = await browser.get("/")
    assert response.code == 303 and response.headers.getRawHeaders("location") == ["/login"]

    response = await logIn(browser)
    assert response.code == 303
    [cookie] = [c for c in response.headers.getRawHeaders("set-cookie") if c.startswith("dit4c_session=")]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; see the https test

    response, page = await browser.get("/")
    assert response.code == 200
    assert "Alice A." in page
    assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]


@pytest_twisted.ensureDeferred
async def test_cookies_are_secure_when_the_portal_is_on_https(tmp_path: Path) -> None:
    clock = Clock()
    store = await openStore(f"sqlite:///{tmp_path / 'p.db'}", reactor, clock=clock)
    try:
        portal = Portal(store, KeyRing(tmp_path / "k", issuer="https://p.test"), PortalConfig("https://p.test"), clock)
        await store.createUser("bob", password_hash=cheapHash("bobs password!"), display_name="")
        port = serve(portal)
        try:
            browser = Browser(portal)
            response = await logIn(browser, "bob", "bobs password!")
            assert response.code == 303
            cookies = response.headers.getRawHeaders("set-cookie")
            assert all("Secure" in c for c in cookies)
            # Named __Host-: a browser takes them only from this host, never for a parent domain.
            assert {c.split("=", 1)[0] for c in cookies} == {"__Host-dit4c_session", "__Host-dit4c_login"}
            assert all("Path=/" in c and "Domain" not in c for c in cookies)
            response, _ = await browser.get("/")
            assert response.code == 200
        finally:
            await port.stopListening()
    finally:
        await store.close()


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_look_the_same(portal: Portal) -> None:
    browser = Browser(portal)
    response = await logIn(browser, "alice", "wrong")
    assert response.code == 401
    response = await logIn(browser, "nobody", "wrong")
    assert response.code == 401
    assert "dit4c_session" not in browser.cookies


@pytest_twisted.ensureDeferred
async def test_login_without_the_csrf_token_is_refused(portal: Portal) -> None:
    browser = Browser(portal)
    await browser.get("/login")
    response, page = await browser.post(
        "/login", {"csrf": "forged", "username": "alice", "password": "correct horse battery"}
    )
    assert response.code == 400
    assert "dit4c_session" not in browser.cookies
    # A token from the form but no matching cookie (a cross-site post) fails too.
    other = Browser(portal)
    _, form = await other.get("/login")
    stranger = Browser(portal)
    response, _ = await stranger.post(
        "/login", {"csrf": csrfOf(form), "username": "alice", "password": "correct horse battery"}
    )
    assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_login_attempts_are_rate_limited(portal: Portal) -> None:
    browser = Browser(portal)
    for _ in range(3):
        assert (await logIn(browser, "alice", "wrong")).code == 401
    # Even the right password is refused while the limit holds.
    response = await logIn(browser, "alice", "correct horse battery")
    assert response.code == 429
    portal.clock.advance(portal.config.loginWindow + 1)  # type: ignore[attr-defined]
    assert (await logIn(browser)).code == 303


@pytest_twisted.ensureDeferred
async def test_session_rotates_at_login_and_logout_needs_csrf(portal: Portal) -> None:
    browser = Browser(portal)
    browser.cookies["dit4c_session"] = "planted-by-an-attacker"
    await logIn(browser)
    assert browser.cookies["dit4c_session"] != "planted-by-an-attacker"
    _, home = await browser.get("/")
    csrf = csrfOf(home)

    response, _ = await browser.post("/logout", {"csrf": "wrong"})
    assert response.code == 400
    response, _ = await browser.get("/")
    assert response.code == 200  # still logged in

    token = browser.cookies["dit4c_session"]
    response, _ = await browser.post("/logout", {"csrf": csrf})
    assert response.code == 303
    # The old session is gone on the server, not just forgotten by the browser.
    replay = Browser(portal)
    replay.cookies["dit4c_session"] = token
    response, _ = await replay.get("/")
    assert response.code == 303


@pytest_twisted.ensureDeferred
async def test_sessions_expire(portal: Portal) -> None:
    browser = Browser(portal)
    await logIn(browser)
    portal.clock.advance(portal.config.sessionLifetime + 1)  # type: ignore[attr-defined]
    response, _ = await browser.get("/")
    assert response.code == 303


@pytest.mark.parametrize(
    "given, expected",
    [("/instances", "/instances"), ("//evil.example/", "/"), ("https://evil.example/", "/"), ("/\\evil", "/"), (None, "/")],
)
def test_next_is_only_ever_a_local_path(given: str | None, expected: str) -> None:
    assert safeNext(given) == expected


@pytest_twisted.ensureDeferred
async def test_jwks_and_discovery(portal: Portal) -> None:
    browser = Browser(portal)
    response, body = await browser.get("/.well-known/jwks.json")
    import json

    jwks = json.loads(body)
    assert [k["kid"] for k in jwks["keys"]]
    assert all("d" not in k for k in jwks["keys"])
    # A token the portal signs verifies against what it publishes.
    token = portal.keys.signer().sign({"sub": "x"}, audience="someone", lifetime=60)
    claims = await TokenVerifier(StaticKeySource(jwks), audience="someone", clock=portal.clock).verify(token)
    assert claims["iss"] == BASE
    response, body = await browser.get("/.well-known/openid-configuration")
    discovery = json.loads(body)
    assert discovery["jwks_uri"] == BASE + "/.well-known/jwks.json"
    assert discovery["code_challenge_methods_supported"] == ["S256"]


@pytest_twisted.ensureDeferred
async def test_key_rotation_keeps_old_keys_published_for_a_while(portal: Portal) -> None:
    old = portal.keys.signer().sign({"sub": "x"}, audience="a", lifetime=3600)
    portal.keys.rotate()
    browser = Browser(portal)
    import json

    _, body = await browser.get("/.well-known/jwks.json")
    assert len(json.loads(body)["keys"]) == 2
    await TokenVerifier(StaticKeySource(json.loads(body)), audience="a", clock=portal.clock).verify(old)
    portal.clock.advance(portal.keys.retain + 1)  # type: ignore[attr-defined]
    _, body = await browser.get("/.well-known/jwks.json")
    assert len(json.loads(body)["keys"]) == 1


@pytest_twisted.ensureDeferred
async def test_unknown_page_is_a_404_page(portal: Portal) -> None:
    response, page = await Browser(portal).get("/no/such/page")
    assert response.code == 404
    assert "Not Found" in page


@pytest_twisted.ensureDeferred
async def test_jwks_publishes_scheduler_and_live_instance_keys(portal: Portal) -> None:
    import json

    from dit4c.common.keys import generatePrivateKey, publicJWK
    from dit4c.common.tokens import TokenSigner

    store = portal.store
    schedulerKey = generatePrivateKey()
    scheduler = await store.createScheduler("hpc", json.dumps(publicJWK(schedulerKey)))
    alice = await store.userByName("alice")
    image = await store.createImage("Tool", "tool", owner_id=None)
    instanceKey = generatePrivateKey()
    instance = await store.createInstance(
        alice.id, image.id, scheduler_id=scheduler.id, public_jwk=json.dumps(publicJWK(instanceKey))
    )
    await store.updateInstance(instance.id, state="running")

    _, body = await Browser(portal).get("/.well-known/jwks.json")
    jwks = json.loads(body)
    kids = [k["kid"] for k in jwks["keys"]]
    assert f"scheduler:{scheduler.id}" in kids and f"instance:{instance.id}" in kids
    assert all("d" not in k for k in jwks["keys"])
    # What an instance signs (a report, an upload) verifies against the JWKS.
    token = TokenSigner(instanceKey, kid=f"instance:{instance.id}").sign({"sub": instance.id}, audience="x", lifetime=60)
    await TokenVerifier(StaticKeySource(jwks), audience="x").verify(token)

    # Once the instance is discarded its key is withdrawn.
    await store.updateInstance(instance.id, state="discarded")
    portal.clock.advance(11)  # type: ignore[attr-defined]
    _, body = await Browser(portal).get("/.well-known/jwks.json")
    assert f"instance:{instance.id}" not in [k["kid"] for k in json.loads(body)["keys"]]

    # The document is kept 10 s, but a key coming (told by the channel) is published at once.
    second = await store.createInstance(
        alice.id, image.id, scheduler_id=scheduler.id, public_jwk=json.dumps(publicJWK(generatePrivateKey()))
    )
    await store.updateInstance(second.id, state="starting")
    _, body = await Browser(portal).get("/.well-known/jwks.json")
    assert f"instance:{second.id}" not in [k["kid"] for k in json.loads(body)["keys"]]
    portal.keysChanged()
    _, body = await Browser(portal).get("/.well-known/jwks.json")
    assert f"instance:{second.id}" in [k["kid"] for k in json.loads(body)["keys"]]


def test_login_continuing_an_authorization_may_go_back_to_the_instance() -> None:
    """CSP form-action covers the login form's redirects: back to the instance's callback."""
    from urllib.parse import urlencode

    from dit4c.portal.app import continuationOrigins

    authorize = "/oauth/authorize?" + urlencode(
        {"client_id": "abc", "redirect_uri": "http://abc.localhost:8080/.dit4c/callback", "state": "s"}
    )
    assert continuationOrigins(authorize) == ("http://abc.localhost:8080",)
    assert continuationOrigins("/instances") == ()
    for bad in (
        "javascript:alert(1)",
        "http://u:p@abc.localhost/",
        "http://abc.localhost:99999/",
        "http://a'b.localhost/",
        "data:text/html,x",
    ):
        assert continuationOrigins("/oauth/authorize?" + urlencode({"redirect_uri": bad})) == (), bad
    twice = "/oauth/authorize?redirect_uri=http://a.localhost/&redirect_uri=http://b.localhost/"
    assert continuationOrigins(twice) == ()
