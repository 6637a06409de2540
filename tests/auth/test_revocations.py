"""
What the auth helper does when the portal says a person's access changed,
on a test clock: the sessions concerned are asked about again at once (and
only they), their open connections close if the portal refuses them, an
answer given before the change never counts as fresh, and the sweep's
pace follows whether the portal's changes are watched.

The portal here is a stand-in whose answers the test gives; the tokens are
real (signed, checked against the key). The real portal and real sockets
are in tests/security/test_revocation.py.
"""

from __future__ import annotations

from collections import defaultdict

import pytest_twisted
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock

from dit4c.auth.connections import Connections, Revocations
from dit4c.auth.errors import PortalUnreachable
from dit4c.auth.gate import ALLOWED, FORBIDDEN, UNAUTHENTICATED, Sessions
from dit4c.auth.portal import UserInfo
from dit4c.common.keys import generatePrivateKey
from dit4c.common.tokens import StaticKeySource, TokenSigner, TokenVerifier

ISSUER = "http://portal.test"
AUDIENCE = "dit4c-instance:abc"


class Portal:
    """Answers userinfo as told, one Deferred per question, and counts the questions per person."""

    def __init__(self) -> None:
        self.asked: dict[str, list[Deferred[UserInfo]]] = defaultdict(list)
        self.subOf: dict[str, str] = {}

    def userinfo(self, token: str) -> Deferred[UserInfo]:
        d: Deferred[UserInfo] = Deferred()
        self.asked[self.subOf[token]].append(d)
        return d

    def answer(self, sub: str, verdict: str) -> None:
        """Answer every open question about ``sub``."""
        for d in self.asked[sub]:
            if not d.called:
                d.callback(UserInfo(verdict, sub, sub) if verdict == "allowed" else UserInfo(verdict))

    def waiting(self, sub: str) -> int:
        return sum(1 for d in self.asked[sub] if not d.called)


class World:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        key = generatePrivateKey()
        self.signer = TokenSigner(key, issuer=ISSUER, clock=self.clock)
        verifier = TokenVerifier(
            StaticKeySource.fromKeys(key.public_key()), audience=AUDIENCE, issuer=ISSUER, clock=self.clock
        )
        self.portal = Portal()
        self.sessions = Sessions(verifier, self.portal, self.clock, recheck=30, unwatchedRecheck=5)  # type: ignore[arg-type]
        self.connections = Connections()
        self.revocations = Revocations(self.sessions, self.connections, self.clock)
        self.closed: list[str] = []

    def token(self, sub: str) -> str:
        token = self.signer.sign({"sub": sub, "name": sub, "sid": "s"}, audience=AUDIENCE, lifetime=3600)
        self.portal.subOf[token] = sub
        return token

    async def connected(self, token: str, name: str) -> None:
        """A connection that forwarded a request for ``token`` (checked and allowed first, as the proxy does)."""
        check = self.sessions.check(token)
        self.portal.answer(self.portal.subOf[token], "allowed")
        assert (await check).kind == ALLOWED
        self.connections.forwarding(name, token, lambda: self.closed.append(name))


async def connected(*names: str, watched: bool = True) -> tuple[World, list[str]]:
    """A world where each of ``names`` holds a connection (``<name>-ws``) for a session of theirs; their tokens."""
    w = World()
    tokens = [w.token(name) for name in names]
    for name, token in zip(names, tokens, strict=True):
        await w.connected(token, f"{name}-ws")
    w.sessions.watched = watched
    return w, tokens


@pytest_twisted.ensureDeferred
async def test_a_change_closes_the_refused_persons_connections_and_no_one_elses() -> None:
    w, (bob, carol) = await connected("bob", "carol")
    await w.connected(bob, "bob-xhr")

    done = w.revocations.changed("bob")
    # Only bob's session is asked about, once for his two connections.
    assert (w.portal.waiting("bob"), w.portal.waiting("carol")) == (1, 0)
    w.portal.answer("bob", "forbidden")
    await done
    assert sorted(w.closed) == ["bob-ws", "bob-xhr"]
    assert (w.connections.count(bob), w.connections.count(carol)) == (0, 1)
    # His next request is refused without asking again; carol's is allowed from memory.
    assert (await w.sessions.check(bob)).kind == FORBIDDEN
    assert (await w.sessions.check(carol)).kind == ALLOWED
    assert (w.portal.waiting("bob"), w.portal.waiting("carol")) == (0, 0)


@pytest_twisted.ensureDeferred
async def test_a_change_for_anyone_asks_about_every_open_session_and_a_logout_is_a_401() -> None:
    w, (bob, carol) = await connected("bob", "carol")
    done = w.revocations.changed(None)  # a share link revoked: whoever came through it
    assert (w.portal.waiting("bob"), w.portal.waiting("carol")) == (1, 1)
    w.portal.answer("bob", "invalid")  # his portal session ended
    w.portal.answer("carol", "allowed")
    await done
    assert w.closed == ["bob-ws"]
    assert (await w.sessions.check(bob)).kind == UNAUTHENTICATED


@pytest_twisted.ensureDeferred
async def test_an_answer_given_before_the_change_is_not_fresh() -> None:
    w, (bob,) = await connected("bob")
    w.clock.advance(31)
    # A page load asks the portal; the answer ("allowed") is on its way ...
    early = w.sessions.check(bob)
    assert w.portal.waiting("bob") == 1
    # ... when the portal says bob's access changed: a new question is asked.
    done = w.revocations.changed("bob")
    assert w.portal.waiting("bob") == 2
    first, second = w.portal.asked["bob"][-2:]
    first.callback(UserInfo("allowed", "bob", "bob"))
    assert (await early).kind == ALLOWED  # the request that asked before the change
    assert w.closed == []
    # That answer made nothing fresh: the next request waits for the new question.
    later = w.sessions.check(bob)
    assert not later.called and w.portal.waiting("bob") == 1
    second.callback(UserInfo("forbidden"))
    await done
    assert w.closed == ["bob-ws"]
    assert (await later).kind == FORBIDDEN
    assert (await w.sessions.check(bob)).kind == FORBIDDEN


@pytest_twisted.ensureDeferred
async def test_the_sweep_follows_the_watch() -> None:
    w, (bob,) = await connected("bob", watched=False)
    w.revocations.startService()
    try:
        # Not watched: answers stand 5 s, and open sessions are asked about every 5 s.
        assert w.sessions.interval == 5
        w.clock.advance(5)
        assert w.portal.waiting("bob") == 1
        w.portal.answer("bob", "allowed")
        w.clock.advance(5)
        assert w.portal.waiting("bob") == 1
        w.portal.answer("bob", "allowed")

        # The watch comes up: everything is asked about once (changes may have been missed) ...
        w.revocations.watching(True)
        assert w.portal.waiting("bob") == 1
        w.portal.answer("bob", "allowed")
        # ... then only every 30 s.
        w.clock.advance(29)
        assert w.portal.waiting("bob") == 0
        w.clock.advance(1)
        assert w.portal.waiting("bob") == 1
        w.portal.answer("bob", "forbidden")
        assert w.closed == ["bob-ws"]

        # An instance with no open connection asks nothing.
        w.clock.advance(300)
        assert w.portal.waiting("bob") == 0
    finally:
        w.revocations.stopService()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_portal_closes_nothing() -> None:
    w, (bob,) = await connected("bob")
    w.portal.userinfo = lambda token: fail(PortalUnreachable("down"))  # type: ignore[method-assign]
    await w.revocations.changed("bob")
    # The last answer stands while the portal cannot be asked (docs/protocols.md 10.1).
    assert w.closed == [] and w.connections.count(bob) == 1


def test_the_registry_follows_each_connection() -> None:
    connections = Connections()
    closed: list[str] = []
    connections.forwarding("c1", "tok-a", lambda: closed.append("c1"))
    connections.forwarding("c2", "tok-a", lambda: closed.append("c2"))
    connections.forwarding("c1", "tok-a", lambda: closed.append("never"))  # again: no change
    assert connections.count("tok-a") == 2
    # A keep-alive connection that now forwards for another session moves.
    connections.forwarding("c2", "tok-b", lambda: closed.append("c2"))
    assert (connections.count("tok-a"), connections.count("tok-b")) == (1, 1)
    connections.ended("c2")
    connections.ended("c2")
    connections.ended("never seen")
    assert sorted(connections.sessions()) == ["tok-a"]
    assert connections.close("tok-a") == 1 and closed == ["c1"]
    assert connections.count() == 0 and connections.close("tok-a") == 0
    connections.ended("c1")  # its connectionLost, after the close


def test_answers_stand_for_less_while_the_portal_is_not_watched() -> None:
    w = World()
    assert w.sessions.interval == 5
    w.sessions.watched = True
    assert w.sessions.interval == 30
    w.sessions.recheck = 2
    w.sessions.watched = False
    assert w.sessions.interval == 2


@pytest_twisted.ensureDeferred
async def test_a_verdict_is_known_without_asking_only_while_it_is_fresh() -> None:
    """What every request of a live session takes: the answer in memory, while it stands, and never after a change."""
    w, (bob, carol) = await connected("bob", "carol")
    stranger = w.token("dave")
    assert w.sessions.known(bob) is not None and w.sessions.known(bob).kind == ALLOWED  # type: ignore[union-attr]
    assert w.sessions.known(stranger) is None  # never asked about
    w.sessions.changed("bob")
    assert w.sessions.known(bob) is None and w.sessions.known(carol) is not None
    w.clock.advance(30)  # the recheck interval (watched)
    assert w.sessions.known(carol) is None
    w.sessions.watched = False
    check = w.sessions.check(carol)
    w.portal.answer("carol", "allowed")
    await check
    w.clock.advance(5)  # unwatched, an answer stands 5 s
    assert w.sessions.known(carol) is None
    assert w.portal.waiting("bob") == 0  # knowing asks nothing
