"""
Where the portal sends a browser after a login, on a real socket: the
forms that once reached another site, in real Chromium, and a generated
family through every redirect after login (``POST /login``, ``GET /login``
of a person logged in already, the upstream login's start), each
``Location`` judged by Chromium's own URL parser.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest_twisted
from hypothesis import given, settings
from portal_client import Browser, csrfOf, logIn
from support.nextpath import browserOrigin, inReactor, nextValues
from treq.client import HTTPClient
from twisted.internet import reactor, threads
from twisted.web.client import Agent

from dit4c.portal.app import Portal
from dit4c.portal.upstream import ProviderConfig, UpstreamLogin

#: As written in the query string of ``/login?next=...``.
KNOWN = [
    "/%09/evil.example/",
    "/%0A/evil.example/",
    "/%0D%0A/evil.example/",
    "/%5C/evil.example/",
    "/%5Cevil.example/",
    "//evil.example/",
    "/%2F/evil.example/",
    "https://evil.example/",
    "/%E3%80%82/evil.example/",
]


@pytest_twisted.ensureDeferred
async def test_known_forms_of_next_stay_on_the_portal_in_a_browser(running: str, browser: Any) -> None:
    """Log in from ``/login?next=<form>`` in Chromium: the browser ends up on the portal every time."""
    for form in KNOWN:
        await browser.run(browser.driver.delete_all_cookies)
        await browser.get(f"{running}/login?next={form}")
        await browser.fill("#username", "alice")
        await browser.fill("#password", "correct horse battery")
        await browser.click("#submit")
        await browser.waitForText("#who", "Alice A.", 10)
        where = await browser.run(lambda: browser.driver.current_url)
        assert urlsplit(where).netloc == urlsplit(running).netloc, (form, where)
        # Logged in already, the login page sends the browser on at once.
        await browser.get(f"{running}/login?next={form}")
        where = await browser.run(lambda: browser.driver.current_url)
        assert urlsplit(where).netloc == urlsplit(running).netloc, (form, where)


def withUpstream(portal: Portal) -> None:
    """An OpenID Connect provider (never reached: a person logged in already goes straight on)."""
    provider = ProviderConfig("op", "oidc", "dit4c", "a secret that is long enough", issuer="http://127.0.0.1:9")
    portal.upstream = UpstreamLogin(portal, [provider], HTTPClient(Agent(reactor)))


@pytest_twisted.ensureDeferred
async def test_generated_next_values_stay_on_the_portal(portal: Portal, browser: Any) -> None:
    """
    A logged-in person's ``GET /login`` and ``GET /login/<provider>``, and
    a login form posted, each with a generated ``next``: every Location,
    read by Chromium, is on the portal.
    """
    base = portal.testURL  # type: ignore[attr-defined]
    withUpstream(portal)
    person = Browser(portal)
    assert (await logIn(person)).code == 303

    @settings(max_examples=60, deadline=None)
    @given(value=nextValues())
    def staysHere(value: str) -> None:
        own = browserOrigin(browser, "/", base)
        for path in ("/login?", "/login/op?"):
            target = path + urlencode({"next": value})
            response, _ = inReactor(lambda: person.get(target))  # noqa: B023 (called at once)
            assert response.code == 303
            [location] = response.headers.getRawHeaders("location")
            assert browserOrigin(browser, location, base) == own, (path, value, location)

        async def logInWithNext() -> Any:
            fresh = Browser(portal)
            _, page = await fresh.get("/login?next=" + quote(value, safe=""))
            form = {"csrf": csrfOf(page), "username": "alice", "password": "correct horse battery", "next": value}
            response, _ = await fresh.post("/login", form)
            return response

        response = inReactor(logInWithNext)
        assert response.code == 303
        [location] = response.headers.getRawHeaders("location")
        assert browserOrigin(browser, location, base) == own, (value, location)

    await threads.deferToThread(staysHere)
