"""
The auth helper as the shared front (dit4c.common.frontconn), on real
sockets with a real portal: a logged-in request that asks to switch
protocols and is answered 200 leaves the connection HTTP, so no later
request on it reaches the tool with a forged ``X-DIT4C-User`` or the
helper's own cookie; answers of the helper's own come in order among the
tool's; and heads no front can pass on safely are refused.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from auth_client import Browser, logIn
from support.sockets import rawRequest, responses, seenHeaders


async def aliceIn(world: Any) -> str:
    """The auth helper started, alice logged in: her cookie header for the instance."""
    await world.startAuth()
    alice = Browser(world)
    assert (await logIn(alice, "alice")).code == 303
    return "; ".join(f"{k}={v}" for k, v in alice.instanceCookies().items())


@pytest_twisted.ensureDeferred
async def test_an_upgrade_answered_200_leaves_every_later_request_checked(world: Any) -> None:
    cookie = await aliceIn(world)
    forged = f"X-DIT4C-User: IMPERSONATED-OWNER\r\nCookie: {cookie}; theirs=kept\r\n"
    answer = await rawRequest(
        world.authPort,
        (
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nUpgrade: foo\r\nConnection: upgrade\r\n{forged}\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\n{forged}\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\n{forged}Connection: close\r\n\r\n"
        ).encode(),
    )
    got = responses(answer)
    assert [status for status, _ in got] == [200, 200, 200]
    for _, body in got:
        seen = seenHeaders(body)
        assert seen["x-dit4c-user"] == ["alice"]
        assert seen["cookie"] == ["theirs=kept"]
    assert b"IMPERSONATED" not in answer and b"dit4c_auth" not in answer
    assert world.toolSaw == [b"/headers"] * 3


@pytest_twisted.ensureDeferred
async def test_an_upgrade_without_a_session_does_not_open_a_pipe_either(world: Any) -> None:
    cookie = await aliceIn(world)
    answer = await rawRequest(
        world.authPort,
        (
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookie}\r\nX-DIT4C-User: IMPERSONATED-OWNER\r\n\r\n"
        ).encode(),
    )
    # Answered here (401: a script cannot log in), and the connection closed: nothing after it went on.
    assert [status for status, _ in responses(answer)] == [401]
    assert world.toolSaw == []


@pytest_twisted.ensureDeferred
async def test_own_answers_come_in_order_among_the_tools(world: Any) -> None:
    cookie = await aliceIn(world)
    answer = await rawRequest(
        world.authPort,
        (
            f"GET /bytes?n=200000 HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookie}\r\n\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nAccept: application/json\r\n\r\n"
            f"GET /.dit4c/nothing HTTP/1.1\r\nHost: {world.host}\r\n\r\n"
            f"GET /headers HTTP/1.1\r\nHost: {world.host}\r\nCookie: {cookie}\r\nConnection: close\r\n\r\n"
        ).encode(),
    )
    got = responses(answer)
    assert [status for status, _ in got] == [200, 401, 404, 200]
    assert len(got[0][1]) == 200000
    assert seenHeaders(got[3][1])["x-dit4c-user"] == ["alice"]


@pytest.mark.parametrize(
    "head",
    [
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: {host}\r\nHost: {host}\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: {host}\r\nX-A: a\r\n b\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: {host}\r\nUpgrade: foo\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\nabc",
    ],
    ids=["no-host", "two-hosts", "obs-fold", "upgrade-with-body"],
)
@pytest_twisted.ensureDeferred
async def test_heads_no_front_can_pass_on_safely_are_400(world: Any, head: str) -> None:
    cookie = await aliceIn(world)
    withCookie = head.replace("\r\n\r\n", f"\r\nCookie: {cookie}\r\n\r\n", 1).format(host=world.host)
    answer = await rawRequest(world.authPort, withCookie.encode())
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert world.toolSaw == []
