"""
``GET /oauth/watch`` (docs/protocols.md 6.6) over real sockets, read with
the auth helper's own parser: a watch signed with its instance's key hears
every access change to that instance (share, unshare, a link revoked, a
person disabled or logged out) and no other instance's, a keepalive every
few seconds, and nothing without a good token; an instance holds at most
two watches.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest_twisted
import treq
from portal_client import Browser, Client, logIn, submit, tokenFor
from support.waiting import eventually
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol

from dit4c.auth.watch import Notice, NoticeParser
from dit4c.common.keys import generatePrivateKey, publicJWK
from dit4c.common.life import State
from dit4c.common.tokens import TokenSigner
from dit4c.portal.app import Portal
from dit4c.portal.oauth import WATCH_AUDIENCE
from dit4c.portal.streams import WATCH_KEEPALIVE, WATCHES_PER_INSTANCE


class Watch(Protocol):
    def __init__(self) -> None:
        self.parser = NoticeParser()
        self.notices: list[Notice] = []
        self.ended: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.notices += self.parser.feed(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.ended.callback(None)

    def close(self) -> None:
        self.transport.stopProducing()  # type: ignore[attr-defined]

    def changes(self) -> list[str | None]:
        return [n.sub for n in self.notices if n.type == "changed"]

    async def until(self, count: int) -> list[str | None]:
        """
        The subjects of the changes heard, once there are ``count``: the
        caller compares the whole list, so one too many that comes before
        a later step's changes fails there, and :func:`keepalive` is the
        barrier for the last.
        """
        await eventually(lambda: len(self.changes()) >= count, what=lambda: f"{count} changes, heard {self.notices}")
        return self.changes()


async def keepalive(portal: Portal, *watches: Watch) -> None:
    """
    A keepalive, heard on each of ``watches``: it is written after every
    change written before it, so what the portal sent them until now has come.
    """
    heard = {id(w): len(w.notices) for w in watches}
    portal.clock.advance(WATCH_KEEPALIVE)

    def allHeard() -> bool:
        return all(Notice("keepalive") in w.notices[heard[id(w)] :] for w in watches)

    await eventually(allHeard, what=lambda: f"a keepalive on each, heard {[w.notices for w in watches]}")


def watchToken(portal: Portal, key: Any, instance: str, **claims: Any) -> str:
    lifetime = claims.pop("lifetime", 60)
    audience = claims.pop("audience", WATCH_AUDIENCE)
    payload = {"sub": instance, "jti": secrets.token_urlsafe(16), **claims}
    return TokenSigner(key, clock=portal.clock).sign(payload, audience=audience, lifetime=lifetime)


async def ask(portal: Portal, token: str | None, query: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await treq.get(portal.testURL + "/oauth/watch" + query, headers=headers, unbuffered=True)  # type: ignore[attr-defined]


async def openWatch(portal: Portal, key: Any, instance: str) -> Watch:
    response = await ask(portal, watchToken(portal, key, instance))
    assert response.code == 200, await response.text()
    assert response.headers.getRawHeaders("content-type") == ["application/x-ndjson"]
    watch = Watch()
    response.deliverBody(watch)
    await eventually(lambda: watch.notices, what="the watch's first line")
    assert watch.notices[0] == Notice("watching", keepalive=WATCH_KEEPALIVE)
    return watch


async def keyed(portal: Portal, owner: Any) -> tuple[Any, Any]:
    key = generatePrivateKey()
    instance = await portal.store.createInstance(owner.id, portal.image.id, public_jwk=json.dumps(publicJWK(key)))  # type: ignore[attr-defined]
    instance = await portal.store.updateInstance(instance.id, state=State.RUNNING)
    return instance, key


@pytest_twisted.ensureDeferred
async def test_a_watch_hears_every_access_change_to_its_instance_and_no_other(api: Portal) -> None:
    alice, bob = Browser(api), Browser(api)
    await logIn(alice)
    await logIn(bob, "bob", "bobs password!")
    aliceUser, bobUser = await api.store.userByName("alice"), await api.store.userByName("bob")
    a, keyA = await keyed(api, aliceUser)
    b, keyB = await keyed(api, aliceUser)
    watchA, watchB = await openWatch(api, keyA, a.id), await openWatch(api, keyB, b.id)

    await submit(alice, f"/instances/{a.id}/share", user="bob")
    assert await watchA.until(1) == [bobUser.id]
    await submit(alice, f"/instances/{a.id}/unshare", user="bob")
    assert await watchA.until(2) == [bobUser.id] * 2

    aliceAPI = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    status, link = await aliceAPI.call("POST", f"/instances/{a.id}/links")
    assert status == 201
    status, _ = await aliceAPI.call("DELETE", f"/instances/{a.id}/links/{link['id']}")
    assert status == 200
    heard = [bobUser.id, bobUser.id, None]  # None: whoever came through the link
    assert await watchA.until(3) == heard

    # A person's logout or being disabled reaches the instances they may use.
    await submit(alice, f"/instances/{a.id}/share", user="bob")
    await submit(bob, "/logout")
    heard += [bobUser.id, bobUser.id]
    assert await watchA.until(5) == heard
    await submit(alice, "/logout")
    heard += [aliceUser.id]
    assert await watchA.until(6) == heard
    root = Client(api, await tokenFor(api, "root", "root password!"))
    status, _ = await root.call("PATCH", f"/admin/users/{bobUser.id}", {"disabled": True})
    assert status == 200
    heard += [bobUser.id]
    assert await watchA.until(7) == heard

    # A keepalive every few seconds, to each; after it, all each was sent
    # has come: nothing more for A, and for B (alice's too) only her logout.
    await keepalive(api, watchA, watchB)
    assert watchA.notices[-1] == watchB.notices[-1] == Notice("keepalive")
    assert watchA.changes() == heard
    assert watchB.changes() == [aliceUser.id]
    assert api.oauth.watches.watching(a.id) == 1
    watchA.close()
    watchB.close()
    await watchA.ended
    await eventually(lambda: api.oauth.watches.watching(a.id) == 0, what="the closed watch forgotten")


@pytest_twisted.ensureDeferred
async def test_nothing_is_watched_without_a_good_token(api: Portal) -> None:
    alice = await api.store.userByName("alice")
    a, key = await keyed(api, alice)
    cases: list[tuple[str | None, int]] = [
        (None, 401),
        ("not-a-token", 401),
        (watchToken(api, generatePrivateKey(), a.id), 401),  # not the instance's key
        (watchToken(api, key, a.id, audience="dit4c-portal-report"), 401),
        (watchToken(api, key, a.id, lifetime=3600), 401),  # too long-lived
        (watchToken(api, key, a.id, jti=""), 401),
    ]
    for token, status in cases:
        response = await ask(api, token)
        assert response.code == status, (token, await response.text())
        assert (await response.json())["error"] == "invalid_token"
    response = await ask(api, watchToken(api, key, a.id), "?instance=" + a.id)
    assert response.code == 400
    # Each token opens one watch.
    once = watchToken(api, key, a.id)
    response = await ask(api, once)
    assert response.code == 200
    response.deliverBody(Protocol())
    response = await ask(api, once)
    assert response.code == 401 and "used before" in (await response.json())["error_description"]
    # An instance without a key, or discarded, is not watched.
    keyless = await api.store.createInstance(alice.id, api.image.id)  # type: ignore[attr-defined]
    assert (await ask(api, watchToken(api, key, keyless.id))).code == 401
    await api.store.updateInstance(a.id, state=State.DISCARDED)
    assert (await ask(api, watchToken(api, key, a.id))).code == 403


@pytest_twisted.ensureDeferred
async def test_an_instance_holds_at_most_two_watches_the_oldest_closed(api: Portal) -> None:
    alice = await api.store.userByName("alice")
    a, key = await keyed(api, alice)
    watches = [await openWatch(api, key, a.id) for _ in range(WATCHES_PER_INSTANCE)]
    newest = await openWatch(api, key, a.id)
    await watches[0].ended
    assert api.oauth.watches.watching(a.id) == WATCHES_PER_INSTANCE
    assert not watches[1].ended.called and not newest.ended.called
    watches[1].close()
    newest.close()
