"""
Login CSRF under a shared parent domain, and state-changing requests from
other sites.

The layout etc/README.md warns about: the portal at ``portal.example.org``
and instances, where anyone's code runs, at ``*.apps.example.org``. A page
on such a sibling host can set cookies for the whole of ``example.org``
and post forms to the portal; its requests are ``same-site``. In real
Chromium (names mapped to loopback with ``--host-resolver-rules``, the
portal on https with a certificate of the test's own), such a page tries
to log its visitor in as the attacker, by planting the login form's cookie
and a session cookie of the attacker's, and to post a form as the visitor.
Over plain treq, the same rules one by one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from portal_client import Browser, Client, csrfOf, serve, tokenFor
from support.passwords import cheapHash
from support.tls import makeCertificate
from twisted.internet import reactor, ssl, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import openStore

PASSWORDS = {"alice": "correct horse battery", "mallory": "mallorys password"}


class Page(Resource):
    """One HTML page at every path: the attacker's site."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.html = b""

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.html


@dataclass
class Sites:
    portal: Portal
    #: The portal as the browser sees it: ``https://portal.example.org:PORT``.
    url: str
    #: The attacker's page at a sibling host: ``https://evil.apps.example.org:PORT/``.
    evilURL: str
    evil: Page


@asynccontextmanager
async def sites(tmp_path: Path, scheme: str = "https") -> AsyncIterator[Sites]:
    """
    The portal and an attacker's page at a sibling host, both on loopback
    (over https with one certificate for both names, or plain http). The
    portal learns its public URL once it listens.
    """
    key, cert = makeCertificate(tmp_path / "tls", "portal.example.org", "*.apps.example.org")
    context = ssl.PrivateCertificate.loadPEM(key.read_text() + cert.read_text()).options()
    portalSite = Site(Resource())
    evil = Page()

    def listen(site: Site) -> Any:
        if scheme == "https":
            return reactor.listenSSL(0, site, context, interface="127.0.0.1")
        return reactor.listenTCP(0, site, interface="127.0.0.1")

    portalPort, evilPort = listen(portalSite), listen(Site(evil))
    url = f"{scheme}://portal.example.org:{portalPort.getHost().port}"
    store = await openStore(f"sqlite:///{tmp_path / 'portal.db'}", reactor, clock=reactor)
    try:
        portal = Portal(store, KeyRing(tmp_path / "keys", issuer=url, clock=reactor), PortalConfig(url), reactor)
        for name, password in PASSWORDS.items():
            await store.createUser(name, password_hash=cheapHash(password), display_name=name)
        portalSite.resource = portal.app.resource()
        yield Sites(portal, url, f"{scheme}://evil.apps.example.org:{evilPort.getHost().port}/", evil)
    finally:
        await portalPort.stopListening()
        await evilPort.stopListening()
        await store.close()


@asynccontextmanager
async def chromium() -> AsyncIterator[Any]:
    """Chromium that resolves every ``*.example.org`` to loopback and takes the test's certificate."""
    from support.browser import requireBrowser, startBrowser

    requireBrowser()
    browser = await threads.deferToThread(
        startBrowser, hostResolverRules="MAP *.example.org 127.0.0.1", ignoreCertificateErrors=True
    )
    try:
        yield browser
    finally:
        await browser.stop()


async def mallorysLogin(s: Sites) -> dict[str, str]:
    """
    What the attacker gets from the portal for themself, as anyone can: a
    login form (its token and the pre-login id it is bound to) and a session.
    """
    cookies: dict[str, str] = {}
    loopback = s.url.replace("portal.example.org", "127.0.0.1")
    response = await treq.get(loopback + "/login", headers={"Host": s.url.split("//")[1]}, **_loopback(s))
    for raw in response.headers.getRawHeaders("set-cookie", []):
        name, _, rest = raw.partition("=")
        cookies[name] = rest.split(";", 1)[0]
    page = await response.text()
    [preLogin] = [value for name, value in cookies.items() if name.endswith("dit4c_login")]
    return {"token": csrfOf(page), "preLogin": preLogin}


def _loopback(s: Sites) -> dict[str, Any]:
    """treq arguments that reach the portal's loopback port for ``s.url``, whatever its scheme."""
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    class Trusting(BrowserLikePolicyForHTTPS):
        def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
            return ssl.CertificateOptions(verify=False)

    return {"agent": Agent(reactor, contextFactory=Trusting())} if s.url.startswith("https") else {}


def attackPage(s: Sites, cookies: list[str], action: str, fields: dict[str, str]) -> bytes:
    """A page that plants ``cookies`` for the parent domain, then posts a form to the portal."""
    inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
    script = "".join(f"document.cookie = {json.dumps(c)};" for c in cookies)
    return (
        f'<!doctype html><title>free cat pictures</title><form id="f" method="post" action="{s.url}{action}">'
        f"{inputs}</form><script>{script} document.getElementById('f').submit();</script>"
    ).encode()


async def postMallorysLogin(s: Sites, browser: Any, theirs: dict[str, str], planted: list[str]) -> None:
    """The attacker's page plants ``planted`` and posts the attacker's login: refused as sent from another site."""
    s.evil.html = attackPage(
        s, planted, "/login",
        {"csrf": theirs["token"], "username": "mallory", "password": PASSWORDS["mallory"], "next": "/"},
    )  # fmt: skip
    async def visit() -> None:
        await browser.get(s.evilURL)
        # (The page posts as it loads; a loaded machine takes its time.)
        await browser.waitForText("#error", "sent from another site", 30)

    try:
        await browser.again(visit)
    except Exception as e:
        where = await browser.run(lambda: browser.driver.current_url)
        shown = await browser.run(lambda: browser.driver.page_source)
        text = await browser.execute("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"not refused as sent from another site: at {where}, saying {text[:600]!r}, from {shown[:300]!r}") from e


async def logInWithChromium(browser: Any, s: Sites, name: str) -> None:
    async def logIn() -> None:
        # (A loaded machine takes its time drawing the form and the next page.)
        await browser.get(s.url + "/login")
        await browser.fill("#username", name, 30)
        await browser.fill("#password", PASSWORDS[name])
        await browser.click("#submit")
        await browser.waitForText("#who", name, 30)

    try:
        await browser.again(logIn)
    except Exception as e:
        where = await browser.run(lambda: browser.driver.current_url)
        shown = await browser.run(lambda: browser.driver.page_source)
        text = await browser.execute("return document.body ? document.body.innerText : ''")
        raise AssertionError(f"{name} not logged in: at {where}, saying {text[:600]!r}, from {shown[:300]!r}") from e


@pytest_twisted.ensureDeferred
async def test_a_sibling_host_cannot_log_its_visitor_in_as_the_attacker(tmp_path: Path) -> None:
    """
    The attacker's page plants, for ``example.org``, the login form's cookie
    (the pre-login id the attacker's own form token is bound to, under every
    name the portal has used) and the attacker's session cookie, then posts
    the attacker's login. The post is refused as sent from another site;
    the planted cookies are not the ones the portal reads (Chromium refuses
    a ``__Host-`` cookie with a Domain); the visitor is not logged in as the
    attacker, and can still log in as themself.
    """
    async with sites(tmp_path) as s, chromium() as browser:
        theirs = await mallorysLogin(s)
        session = await s.portal.store.createSession(
            (await s.portal.store.userByName("mallory")).id, 3600
        )
        planted = [
            f"{name}={value}; domain=example.org; path=/; secure"
            for name, value in [
                ("dit4c_login", theirs["preLogin"]),
                ("__Host-dit4c_login", theirs["preLogin"]),
                ("dit4c_login_csrf", theirs["token"]),
                ("dit4c_session", session.id),
                ("__Host-dit4c_session", session.id),
            ]
        ]
        await postMallorysLogin(s, browser, theirs, planted)

        # What the browser holds for the portal: the parent domain's plants,
        # but no __Host- cookie of the attacker's.
        held = {c["name"]: c for c in await browser.cookies()}
        assert held["dit4c_session"]["value"] == session.id  # planted, and ignored
        assert held.get("__Host-dit4c_session", {}).get("value") != session.id
        assert held.get("__Host-dit4c_login", {}).get("value") != theirs["preLogin"]

        await browser.get(s.url + "/")
        await browser.waitFor("#username", 10)  # not logged in as mallory
        await logInWithChromium(browser, s, "alice")


@pytest_twisted.ensureDeferred
async def test_a_sibling_host_cannot_post_a_form_as_its_visitor(tmp_path: Path) -> None:
    """
    Logged in as alice, the visitor opens the attacker's page, which posts
    the logout form and an instance form with her session cookie (SameSite=Lax
    cookies go with same-site posts). Both are refused as sent from another
    site before anything else is looked at, and she is still logged in.
    """
    async with sites(tmp_path) as s, chromium() as browser:
        await logInWithChromium(browser, s, "alice")
        for action, fields in [("/logout", {"csrf": "guess"}), ("/instances", {"csrf": "guess", "image": "x"})]:
            s.evil.html = attackPage(s, [], action, fields)
            await browser.get(s.evilURL)
            await browser.waitForText("main", "sent from another site", 10)
        await browser.get(s.url + "/")
        await browser.waitForText("#who", "alice", 10)


@pytest_twisted.ensureDeferred
async def test_over_http_the_origin_header_refuses_the_sibling(tmp_path: Path) -> None:
    """
    Over plain http Chromium sends no Sec-Fetch-Site to these names and no
    ``__Host-`` cookie exists: the attacker's plants are read, and the
    Origin check alone refuses the post (docs/security.md: what holds
    without https).
    """
    async with sites(tmp_path, scheme="http") as s, chromium() as browser:
        theirs = await mallorysLogin(s)
        planted = [f"dit4c_login={theirs['preLogin']}; domain=example.org; path=/"]
        await postMallorysLogin(s, browser, theirs, planted)
        await browser.get(s.url + "/")
        await browser.waitFor("#username", 10)


# -- the rules one by one, over plain HTTP ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_login_token_is_bound_to_the_browsers_own_pre_login_cookie(tmp_path: Path) -> None:
    """
    On https the portal reads only the ``__Host-`` cookie; its token must be
    the one made for that cookie's pre-login id, not another browser's.
    """
    store = await openStore(f"sqlite:///{tmp_path / 'p.db'}", reactor, clock=reactor)
    portal = Portal(store, KeyRing(tmp_path / "k", issuer="https://p.test", clock=reactor), PortalConfig("https://p.test"), reactor)
    await store.createUser("mallory", password_hash=cheapHash(PASSWORDS["mallory"]))
    port = serve(portal)
    try:
        mallory, victim = Browser(portal), Browser(portal)
        _, page = await mallory.get("/login")
        token, preLogin = csrfOf(page), mallory.cookies["__Host-dit4c_login"]
        await victim.get("/login")
        form = {"csrf": token, "username": "mallory", "password": PASSWORDS["mallory"]}

        # The attacker's pair planted under the plain name: not read on https.
        planted = Browser(portal)
        planted.cookies["dit4c_login"] = preLogin
        response, _ = await planted.post("/login", form)
        assert response.code == 400 and "__Host-dit4c_session" not in planted.cookies
        # The victim's own pre-login cookie with the attacker's token: not bound to it.
        response, _ = await victim.post("/login", form)
        assert response.code == 400 and "__Host-dit4c_session" not in victim.cookies
        # Made up, or signed for another purpose: refused.
        other = portal.keys.signer().sign({"sub": preLogin}, audience="someone else", lifetime=60)
        for forged in ("x", other):
            response, _ = await mallory.post("/login", {**form, "csrf": forged})
            assert response.code == 400
        # The attacker's own pair, in the attacker's own browser: in.
        response, _ = await mallory.post("/login", form)
        assert response.code == 303 and "__Host-dit4c_session" in mallory.cookies
    finally:
        await port.stopListening()
        await store.close()


CROSS = [{"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.apps.portal.test"}, {"Origin": "null"}]
SAME = [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": "http://portal.test"}]


@pytest_twisted.ensureDeferred
async def test_state_changing_requests_from_other_sites_are_refused(api: Portal) -> None:
    """
    Forms and API calls by session, sent from another site, get 403 whatever
    they carry; the same with the portal's own origin (or from no browser)
    go on to their CSRF check. API calls by bearer token and the
    server-to-server endpoints are not judged by where they come from.
    """
    alice = Browser(api)
    response, page = await alice.get("/login")
    for headers in CROSS:
        alice.extra = headers
        response, page = await alice.post(
            "/login", {"csrf": csrfOf(page), "username": "alice", "password": "correct horse battery"}
        )
        assert response.code == 403 and "sent from another site" in page, headers
        assert "dit4c_session" not in alice.cookies
    alice.extra = {"Sec-Fetch-Site": "same-origin"}
    response, _ = await alice.post(
        "/login", {"csrf": csrfOf(page), "username": "alice", "password": "correct horse battery"}
    )
    assert response.code == 303
    alice.extra = {}
    _, home = await alice.get("/")
    csrf = csrfOf(home)

    for headers in CROSS:
        alice.extra = headers
        for path in ("/instances", "/logout", "/admin/users", "/images/x/delete"):
            response, _ = await alice.post(path, {"csrf": csrf, "image": "nothing"})
            assert response.code == 403, (path, headers)
        response = await treq.post(
            api.testURL + "/api/v1/tokens",  # type: ignore[attr-defined]
            data=b'{"name": "x"}',
            headers={**alice._headers(), "X-CSRF-Token": csrf},
        )
        assert response.code == 403, headers
        assert (await response.json())["error"] == "http"
    for headers in SAME:
        alice.extra = headers
        response = await treq.post(
            api.testURL + "/api/v1/tokens",  # type: ignore[attr-defined]
            data=b'{"name": "x"}',
            headers={**alice._headers(), "X-CSRF-Token": csrf},
        )
        assert response.code == 201, headers
        response, _ = await alice.post("/instances", {"csrf": "wrong"})
        assert response.code == 400, headers  # past the origin check, stopped by the token

    # By bearer token: where it was sent from does not matter.
    token = await tokenFor(api, "bob", "bobs password!")
    for headers in CROSS:
        code, body = await Client(api, token).call("POST", "/tokens", {"name": "ci"}, **headers)
        assert code == 201, (headers, body)
        # The server-to-server endpoints answer for themselves (here: what is missing).
        for path in ("/oauth/token", "/reports/url"):
            response = await treq.post(api.testURL + path, data=b"", headers=headers)  # type: ignore[attr-defined]
            assert response.code not in (403, 404), (path, response.code)
