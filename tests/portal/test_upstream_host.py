"""
The upstream login as ``twistd dit4c-portal`` mounts it: ``PortalService``
hands it a ``LoginDoors`` holding only the parts of the portal it uses, and
through those alone a login through a provider signs a person up, starts a
session the portal's own pages take, sends on a person logged in already,
and answers a forged callback with the portal's error page, counted
against its address by the portal's login throttle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest_twisted
import treq
from portal_client import Browser, startService
from test_upstream import FakeGitHub, github, githubConfig  # noqa: F401 (github: its fixture)

from dit4c.portal.security import LoginThrottle
from dit4c.portal.upstream import LoginDoors


def location(response: Any) -> str:
    [value] = response.headers.getRawHeaders("location")
    return str(value)


@pytest_twisted.ensureDeferred
async def test_the_service_gives_the_login_its_doors(tmp_path: Path, github: FakeGitHub) -> None:  # noqa: F811
    service = await startService(tmp_path, "http://portal.test", loginProviders=[githubConfig(github)])
    try:
        portal = service.portal
        assert isinstance(portal.upstream.host, LoginDoors)
        browser = Browser(portal)

        # A forged answer: the portal's error page, a failure of its address.
        response, page = await browser.get("/login/github/callback?state=forged&code=forged")
        assert response.code == 400 and "Login failed" in page
        failures = await portal.store.loginFailures(LoginThrottle.keys(None, "127.0.0.1")[0])
        assert failures is not None and failures.failures == 1

        response, _ = await browser.get("/login/github?next=/instances")
        assert response.code == 303
        authorize = location(response)
        assert authorize.startswith(github.url + "/login/oauth/authorize?")
        atGitHub = await treq.get(authorize, allow_redirects=False)
        callback = urlsplit(location(atGitHub))
        assert callback.netloc == "portal.test" and callback.path == "/login/github/callback"
        response, page = await browser.get(f"{callback.path}?{callback.query}")
        assert response.code == 303, page
        assert location(response) == "/instances"

        # Signed up, and logged in on the portal's own pages.
        user = await portal.store.userByIdentity("github", "583231")
        assert user is not None and user.name == "octo-cat"
        response, page = await browser.get("/")
        assert response.code == 200 and "The Octocat" in page

        # Logged in already: straight on, the provider not asked again.
        response, _ = await browser.get("/login/github?next=/instances")
        assert response.code == 303 and location(response) == "/instances"
        assert len(github.seen) == 1
    finally:
        await service.stopService()
