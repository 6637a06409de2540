"""
The portal's OAuth 2 authorization server (authorization code + PKCE) for
the instances' auth helpers, over real HTTP on loopback with an SQLite
store and a test clock: the happy path, and the attacks it must refuse.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest_twisted
import treq
from support.passwords import cheapHash
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.server import Site

from dit4c.common.keys import generatePrivateKey
from dit4c.common.tokens import StaticKeySource, TokenSigner, TokenVerifier
from dit4c.portal.app import Portal, PortalConfig, safeNext
from dit4c.portal.keys import KeyRing
from dit4c.portal.oauth import redirectURIFor
from dit4c.portal.store import openStore

BASE = "http://portal.test"
PASSWORD = "correct horse battery"


# -- a portal, people, instances ---------------------------------------------------------------


class World:
    """A running portal, its people and two of alice's instances (A and B)."""

    portal: Portal
    clock: Clock
    base: str
    alice: Any
    bob: Any
    a: Any
    b: Any

    @property
    def store(self) -> Any:
        return self.portal.store


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    w = World()
    w.clock = Clock()
    w.clock.advance(1_800_000_000)
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=w.clock)
    keys = KeyRing(tmp_path / "keys", issuer=BASE, clock=w.clock)
    w.portal = Portal(store, keys, PortalConfig(publicURL=BASE), w.clock)
    password = cheapHash(PASSWORD)
    w.alice = await store.createUser("alice", password_hash=password, display_name="Alice A.")
    w.bob = await store.createUser("bob", password_hash=password)
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest")
    w.a = await store.createInstance(w.alice.id, image.id)
    w.a = await store.updateInstance(w.a.id, state="running", url=f"http://{w.a.id}.localhost:8080/")
    w.b = await store.createInstance(w.alice.id, image.id)
    w.b = await store.updateInstance(w.b.id, state="running", url=f"http://{w.b.id}.localhost:8080/")
    port = reactor.listenTCP(0, Site(w.portal.app.resource()), interface="127.0.0.1")
    w.base = f"http://127.0.0.1:{port.getHost().port}"
    yield w
    await port.stopListening()
    await store.close()


def callback(instance: Any) -> str:
    return f"http://{instance.id}.localhost:8080/.dit4c/callback"


class Browser:
    """An HTTP client that keeps cookies, as a browser would."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.cookies: dict[str, str] = {}

    def _headers(self) -> dict[str, str]:
        if not self.cookies:
            return {}
        return {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}

    def _keep(self, response: Any) -> None:
        for raw in response.headers.getRawHeaders("set-cookie", []):
            name, _, rest = raw.partition("=")
            if "Max-Age=0" in raw:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = rest.split(";", 1)[0]

    async def get(self, path: str) -> tuple[Any, str]:
        response = await treq.get(self.base + path, headers=self._headers(), allow_redirects=False)
        self._keep(response)
        return response, (await response.text())

    async def post(self, path: str, data: dict[str, str]) -> tuple[Any, str]:
        response = await treq.post(self.base + path, data=data, headers=self._headers(), allow_redirects=False)
        self._keep(response)
        return response, (await response.text())

    async def logIn(self, name: str = "alice", next: str = "/") -> Any:
        _, page = await self.get("/login?" + urlencode({"next": next}))
        match = re.search(r'name="csrf" value="([^"]+)"', page)
        assert match, page
        response, _ = await self.post(
            "/login", {"csrf": match.group(1), "username": name, "password": PASSWORD, "next": next}
        )
        assert response.code == 303
        return response


async def loggedIn(w: World, name: str = "alice") -> Browser:
    browser = Browser(w.base)
    await browser.logIn(name)
    return browser


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 challenge, computed here independently of the portal."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorizeQuery(instance: Any, challenge: str, state: str = "s-1", **override: str | None) -> str:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": instance.id,
        "redirect_uri": callback(instance),
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(override)
    return "/oauth/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})


def location(response: Any) -> str:
    [value] = response.headers.getRawHeaders("location")
    return value  # type: ignore[no-any-return]


def queryOf(uri: str) -> dict[str, str]:
    parsed = parse_qs(urlsplit(uri).query, keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in parsed.values()), parsed
    return {k: v[0] for k, v in parsed.items()}


async def authorize(browser: Browser, instance: Any, challenge: str, state: str = "s-1") -> str:
    """A code for ``instance``, checking the redirect on the way."""
    response, _ = await browser.get(authorizeQuery(instance, challenge, state))
    assert response.code == 303
    target = location(response)
    assert target.startswith(callback(instance) + "?")
    query = queryOf(target)
    assert set(query) == {"code", "state"} and query["state"] == state
    return query["code"]


async def token(w: World, **params: str) -> tuple[int, dict[str, Any], Any]:
    """A token request as an auth helper makes it: server to server, no cookies."""
    response = await treq.post(w.base + "/oauth/token", data=params, allow_redirects=False)
    return response.code, json.loads(await response.text()), response


def exchange(instance: Any, code: str, verifier: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": callback(instance),
        "client_id": instance.id,
        "code_verifier": verifier,
    }


async def accessToken(w: World, browser: Browser, instance: Any) -> str:
    verifier, challenge = pkce()
    code = await authorize(browser, instance, challenge)
    status, body, _ = await token(w, **exchange(instance, code, verifier))
    assert status == 200, body
    return body["access_token"]  # type: ignore[no-any-return]


async def userinfo(w: World, accessToken: str | None, instance: str | None) -> tuple[int, dict[str, Any], Any]:
    headers = {"Authorization": f"Bearer {accessToken}"} if accessToken is not None else {}
    query = "?" + urlencode({"instance": instance}) if instance is not None else ""
    response = await treq.get(w.base + "/oauth/userinfo" + query, headers=headers, allow_redirects=False)
    return response.code, json.loads(await response.text()), response


# -- the happy path --------------------------------------------------------------------------------


def test_redirect_uri_rules() -> None:
    assert redirectURIFor("http://abc.localhost:8080/") == "http://abc.localhost:8080/.dit4c/callback"
    assert redirectURIFor("https://abc.example.org") == "https://abc.example.org/.dit4c/callback"


@pytest_twisted.ensureDeferred
async def test_authorize_token_userinfo(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    state = "x y&z=1/?#%~" + "s" * 400  # any visible ASCII, returned exactly
    response, _ = await browser.get(authorizeQuery(w.a, challenge, state))
    assert response.code == 303
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert response.headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    target = location(response)
    assert target.startswith(callback(w.a) + "?")
    query = queryOf(target)
    assert query["state"] == state
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", query["code"])

    status, body, response = await token(w, **exchange(w.a, query["code"], verifier))
    assert status == 200, body
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600

    # The access token is a JWT the portal signed, checkable against its JWKS.
    jwks = json.loads(await (await treq.get(w.base + "/.well-known/jwks.json")).text())
    claims = await TokenVerifier(
        StaticKeySource(jwks), audience=f"dit4c-instance:{w.a.id}", issuer=BASE, clock=w.clock
    ).verify(body["access_token"])
    assert claims["sub"] == w.alice.id and claims["name"] == "alice"
    assert claims["iss"] == BASE and claims["exp"] - claims["iat"] == 3600

    status, info, response = await userinfo(w, body["access_token"], w.a.id)
    assert status == 200
    assert info == {"sub": w.alice.id, "name": "alice", "instance": w.a.id, "allowed": True}
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]


@pytest_twisted.ensureDeferred
async def test_not_logged_in_goes_to_login_and_comes_back(world: World) -> None:
    w = world
    browser = Browser(w.base)
    verifier, challenge = pkce()
    asked = authorizeQuery(w.a, challenge, "back again")
    response, _ = await browser.get(asked)
    assert response.code == 303
    target = location(response)
    assert target.startswith("/login?")
    next = queryOf(target)["next"]
    assert safeNext(next) == next  # a local path, so the login page keeps it
    assert urlsplit(next).path == "/oauth/authorize" and queryOf(next) == queryOf(asked)

    # The login form carries it, and logging in goes back to the same request.
    _, page = await browser.get(target)
    assert f'name="next" value="{html.escape(next)}"' in page
    response = await browser.logIn("alice", next)
    assert location(response) == next
    response, _ = await browser.get(next)
    query = queryOf(location(response))
    assert location(response).startswith(callback(w.a) + "?") and query["state"] == "back again"
    status, body, _ = await token(w, **exchange(w.a, query["code"], verifier))
    assert status == 200, body


@pytest_twisted.ensureDeferred
async def test_userinfo_sees_key_rotations(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    before = await accessToken(w, browser, w.a)
    w.portal.keys.rotate()
    after = await accessToken(w, browser, w.a)
    assert (await userinfo(w, before, w.a.id))[0] == 200
    assert (await userinfo(w, after, w.a.id))[0] == 200


# -- no open redirect ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_no_redirect_but_to_the_instance_own_callback(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    _, challenge = pkce()
    good = callback(w.a)
    host = f"{w.a.id}.localhost"
    bad = [
        "https://evil.example/.dit4c/callback",
        good + "/../x",
        good + "/",
        good + "?x=1",
        good + "#x",
        good[:-1],
        good.replace("http://", "https://"),
        good.replace(":8080", ":8081"),
        good.replace(":8080", ""),
        good.replace(host, host.upper()),
        good.replace(host, host + ".evil.example"),
        good.replace(host, f"evil.example/{host}"),
        f"http://evil.example@{host}:8080/.dit4c/callback",
        f"http://{host}:8080/.dit4c/%63allback",
        f"//{host}:8080/.dit4c/callback",
        "/.dit4c/callback",
        callback(w.b),  # another instance's callback
        good + "x" * 3000,
    ]
    for uri in bad:
        response, page = await browser.get(authorizeQuery(w.a, challenge, redirect_uri=uri))
        assert response.code == 400, uri
        assert response.headers.getRawHeaders("location") is None, uri
        assert "not the instance" in page, uri

    unknown = [
        {"redirect_uri": None},
        {"client_id": None},
        {"client_id": "nosuchinstance"},
        {"client_id": "Not An Id"},
        {"client_id": w.b.id},  # A's callback for B
    ]
    for override in unknown:
        response, _ = await browser.get(authorizeQuery(w.a, challenge, **override))
        assert response.code == 400, override
        assert response.headers.getRawHeaders("location") is None, override

    # An instance with no public URL yet, or discarded, has no redirect URI at all.
    await w.store.updateInstance(w.b.id, url=None)
    response, _ = await browser.get(authorizeQuery(w.b, challenge, redirect_uri="http://x/.dit4c/callback"))
    assert response.code == 400 and response.headers.getRawHeaders("location") is None
    await w.store.updateInstance(w.a.id, state="discarded")
    response, _ = await browser.get(authorizeQuery(w.a, challenge))
    assert response.code == 400 and response.headers.getRawHeaders("location") is None


@pytest_twisted.ensureDeferred
async def test_bad_client_is_refused_before_login(world: World) -> None:
    """A stranger's link never even asks anyone to log in on its behalf."""
    w = world
    _, challenge = pkce()
    response, _ = await Browser(w.base).get(
        authorizeQuery(w.a, challenge, redirect_uri="https://evil.example/.dit4c/callback")
    )
    assert response.code == 400 and response.headers.getRawHeaders("location") is None


@pytest_twisted.ensureDeferred
async def test_malformed_authorization_requests_are_refused_with_a_page(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    _, challenge = pkce()
    cases: list[dict[str, str | None]] = [
        {"code_challenge_method": "plain"},
        {"code_challenge_method": None},
        {"code_challenge": None},
        {"code_challenge": challenge[:-1]},
        {"code_challenge": challenge + "A"},
        {"code_challenge": challenge[:-1] + "="},
        {"state": None},
        {"state": ""},
        {"state": "s" * 513},
        {"state": "caf\u00e9"},
        {"state": "line\nbreak"},
        {"response_type": "token"},
        {"response_type": None},
    ]
    for override in cases:
        response, _ = await browser.get(authorizeQuery(w.a, challenge, **override))
        assert response.code == 400, override
        assert response.headers.getRawHeaders("location") is None, override
    # A parameter given twice is refused too.
    response, _ = await browser.get(authorizeQuery(w.a, challenge) + "&state=other")
    assert response.code == 400 and response.headers.getRawHeaders("location") is None
    # The longest state is fine.
    assert await authorize(browser, w.a, challenge, "s" * 512)


# -- the token endpoint's refusals ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_code_works_once(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    status, first, _ = await token(w, **exchange(w.a, code, verifier))
    assert status == 200
    status, body, _ = await token(w, **exchange(w.a, code, verifier))
    assert (status, body["error"]) == (400, "invalid_grant")
    # The replay revokes nothing: the first token still works.
    assert (await userinfo(w, first["access_token"], w.a.id))[0] == 200


@pytest_twisted.ensureDeferred
async def test_pkce_is_required_and_checked(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    for bad in ({"code_verifier": ""}, {"code_verifier": "a" * 42}, {"code_verifier": "a" * 129},
                {"code_verifier": "a" * 42 + "!"}):  # fmt: skip
        status, body, _ = await token(w, **{**exchange(w.a, code, verifier), **bad})
        assert (status, body["error"]) == (400, "invalid_request"), bad
        assert "code_verifier" in body["error_description"]
    params = exchange(w.a, code, verifier)
    del params["code_verifier"]
    status, body, _ = await token(w, **params)
    assert (status, body["error"]) == (400, "invalid_request")

    # A malformed request does not spend the code; a wrong verifier does.
    other, _ = pkce()
    status, body, _ = await token(w, **exchange(w.a, code, other))
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "code_verifier" in body["error_description"]
    status, body, _ = await token(w, **exchange(w.a, code, verifier))
    assert (status, body["error"]) == (400, "invalid_grant")

    # The challenge itself is no verifier (as it would be with "plain").
    code = await authorize(browser, w.a, challenge)
    status, body, _ = await token(w, **exchange(w.a, code, challenge))
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest_twisted.ensureDeferred
async def test_a_code_is_bound_to_its_client_and_redirect_uri(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    status, body, _ = await token(w, **exchange(w.b, code, verifier))
    assert (status, body["error"]) == (400, "invalid_grant")

    code = await authorize(browser, w.a, challenge)
    status, body, _ = await token(w, **{**exchange(w.a, code, verifier), "redirect_uri": callback(w.a) + "?x"})
    assert (status, body["error"]) == (400, "invalid_grant")

    code = await authorize(browser, w.a, challenge)
    status, body, _ = await token(w, **{**exchange(w.a, code, verifier), "client_id": w.b.id})
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest_twisted.ensureDeferred
async def test_codes_expire_after_a_minute(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    w.clock.advance(61)
    status, body, _ = await token(w, **exchange(w.a, code, verifier))
    assert (status, body["error"]) == (400, "invalid_grant")


@pytest_twisted.ensureDeferred
async def test_the_token_endpoint_takes_only_form_posts(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    params = exchange(w.a, code, verifier)

    response = await treq.get(w.base + "/oauth/token?" + urlencode(params))
    assert response.code == 405
    response = await treq.post(w.base + "/oauth/token?" + urlencode(params))
    assert response.code == 400 and json.loads(await response.text())["error"] == "invalid_request"
    response = await treq.post(w.base + "/oauth/token", json=params)
    assert response.code == 400 and json.loads(await response.text())["error"] == "invalid_request"
    response = await treq.post(
        w.base + "/oauth/token",
        data=(urlencode(params) + "&client_id=" + w.b.id).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.code == 400 and json.loads(await response.text())["error"] == "invalid_request"
    response = await treq.post(
        w.base + "/oauth/token",
        data=b"x=" + b"a" * 9000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.code == 400
    status, body, _ = await token(w, **{**params, "grant_type": "refresh_token"})
    assert (status, body["error"]) == (400, "unsupported_grant_type")
    status, body, _ = await token(w, **{**params, "code": "not a code"})
    assert (status, body["error"]) == (400, "invalid_grant")

    # None of that spent the code.
    status, body, _ = await token(w, **params)
    assert status == 200, body


# -- access decisions ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_person_without_rights_is_sent_back_with_access_denied(world: World) -> None:
    w = world
    browser = await loggedIn(w, "bob")
    _, challenge = pkce()
    response, _ = await browser.get(authorizeQuery(w.a, challenge, "bob's state"))
    assert response.code == 303
    target = location(response)
    assert target.startswith(callback(w.a) + "?")
    query = queryOf(target)
    assert query["error"] == "access_denied" and query["state"] == "bob's state"
    assert "code" not in query


@pytest_twisted.ensureDeferred
async def test_a_revoked_share_loses_access(world: World) -> None:
    w = world
    await w.store.shareInstance(w.a.id, w.bob.id)
    browser = await loggedIn(w, "bob")
    bobs = await accessToken(w, browser, w.a)
    status, info, _ = await userinfo(w, bobs, w.a.id)
    assert status == 200 and info["sub"] == w.bob.id and info["name"] == "bob"

    # A code issued before the share ends cannot be exchanged after.
    verifier, challenge = pkce()
    code = await authorize(browser, w.a, challenge)
    await w.store.unshareInstance(w.a.id, w.bob.id)
    status, body, _ = await token(w, **exchange(w.a, code, verifier))
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body, _ = await userinfo(w, bobs, w.a.id)
    assert status == 403 and body["error"] == "access_denied"

    # A disabled person loses access too.
    alices = await accessToken(w, await loggedIn(w), w.a)
    await w.store.updateUser(w.alice.id, disabled=True)
    assert (await userinfo(w, alices, w.a.id))[0] == 403


@pytest_twisted.ensureDeferred
async def test_userinfo_refuses_tokens_for_other_instances_and_expired_ones(world: World) -> None:
    w = world
    browser = await loggedIn(w)
    forA = await accessToken(w, browser, w.a)

    status, body, response = await userinfo(w, forA, w.b.id)
    assert status == 401 and body["error"] == "invalid_token"
    assert response.headers.getRawHeaders("www-authenticate")[0].startswith('Bearer realm="dit4c"')
    assert (await userinfo(w, None, w.a.id))[0] == 401
    assert (await userinfo(w, "not.a.token", w.a.id))[0] == 401
    assert (await userinfo(w, forA, None))[0] == 400
    assert (await userinfo(w, forA, "Not An Id"))[0] == 400
    # Signed by a key that is not the portal's, however well formed.
    forged = TokenSigner(generatePrivateKey(), issuer=BASE, clock=w.clock).sign(
        {"sub": w.alice.id, "name": "alice"}, audience=f"dit4c-instance:{w.a.id}", lifetime=3600
    )
    assert (await userinfo(w, forged, w.a.id))[0] == 401
    # A token the portal signed for something else.
    other = w.portal.keys.signer().sign({"sub": w.alice.id}, audience="dit4c-routing", lifetime=3600)
    assert (await userinfo(w, other, w.a.id))[0] == 401
    response = await treq.post(w.base + "/oauth/userinfo?instance=" + w.a.id, headers={"Authorization": f"Bearer {forA}"})
    assert response.code == 405

    assert (await userinfo(w, forA, w.a.id))[0] == 200
    w.clock.advance(3600 + 31)  # past expiry and the verifier's leeway
    status, body, _ = await userinfo(w, forA, w.a.id)
    assert status == 401 and "expired" in body["error_description"]
