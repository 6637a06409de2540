"""
Where the auth helper sends a browser after a login: back to the request
target that started it, only if that is a path on the instance
(``dit4c.common.nextpath``). Request targets sent raw to the real helper
(known forms, then a generated family), each through the whole login
with the real portal; the callback's Location, read by Chromium's own URL
parser, is on the instance every time.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from auth_client import Browser, location
from hypothesis import given, settings
from support.nextpath import browserOrigin, inReactor, nextValues
from support.sockets import rawRequest
from twisted.internet import threads

KNOWN = [
    b"/%09/evil.example/",
    b"/\t/evil.example/",
    b"/%5C/evil.example/",
    b"/\\evil.example/",
    b"//evil.example/",
    b"/%2F/evil.example/",
    b"http://evil.example/",
    b"/%E2%80%AE/evil.example/",
    b"/lab?next=//evil.example/",
]


async def loginReturnsTo(browser: Browser, target: bytes) -> str | None:
    """
    Open ``target`` on the instance (raw, not logged in there), log in, and
    return the callback's Location; None if the helper refused the target.
    """
    world = browser.world
    raw = await rawRequest(
        world.authPort,
        b"GET " + target + b" HTTP/1.1\r\nHost: " + world.host.encode()
        + b"\r\nAccept: text/html\r\nConnection: close\r\n\r\n",
    )  # fmt: skip
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    status = int(head[0].split(b" ")[1])
    if status != 303:
        assert 400 <= status < 500, raw[:300]
        return None
    headers = [line.split(b":", 1) for line in head[1:]]
    [authorize] = [v.strip().decode() for k, v in headers if k.lower() == b"location"]
    [flow] = [v.strip().decode() for k, v in headers if k.lower() == b"set-cookie" and v.strip().startswith(b"dit4c_auth_flow=")]
    browser.instanceCookies()["dit4c_auth_flow"] = flow.split(";", 1)[0].split("=", 1)[1]
    response = await browser.get(authorize)
    assert response.code == 303, await response.text()
    callback = await browser.get(location(response))
    assert callback.code == 303, await callback.text()
    return location(callback)


@pytest_twisted.ensureDeferred
async def test_a_login_comes_back_to_the_instance_whatever_started_it(world: Any, browser: Any) -> None:
    await world.startAuth()
    person = Browser(world)
    await person.logInAtPortal("alice")
    own = browserOrigin(browser, "/", world.instanceURL)
    assert own == world.instanceURL.rstrip("/")

    for target in KNOWN:
        back = await loginReturnsTo(person, target)
        if back is not None:
            assert await threads.deferToThread(browserOrigin, browser, back, world.instanceURL) == own, (target, back)
    assert await loginReturnsTo(person, b"/lab/tree/a%20b.ipynb?x=1") == "/lab/tree/a%20b.ipynb?x=1"

    @settings(max_examples=60, deadline=None)
    @given(value=nextValues(exclude=" \r\n", ascii=True))
    def staysOnTheInstance(value: str) -> None:
        target = value.encode("utf-8")
        back = inReactor(lambda: loginReturnsTo(person, target))
        if back is not None:
            assert browserOrigin(browser, back, world.instanceURL) == own, (target, back)

    await threads.deferToThread(staysOnTheInstance)
