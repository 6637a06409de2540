"""
Portal processes on one PostgreSQL database telling each other what changed
(dit4c.portal.peers, dit4c.portal.pgpeers; docs/protocols.md 16), on a real
PostgreSQL server: messages arrive in order and never back at their sender,
a lost link is made again and says so, an instance changed through one
process reaches the other's bus as the store holds it, and each process
checks tokens the other signed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
from support.postgres import PostgresServer
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.life import State
from dit4c.common.tokens import InvalidToken, TokenVerifier
from dit4c.portal.events import AccessChange, InstanceEvents
from dit4c.portal.keys import KeyRing, KeyRingKeySource, SharedKeys
from dit4c.portal.peers import EventRelay, NoPeers, decode, encode
from dit4c.portal.pgpeers import PostgresPeers
from dit4c.portal.store import IStore, openStore
from dit4c.portal.store.model import Instance

ISSUER = "https://portal.test"


@pytest_twisted.async_yield_fixture
async def database(postgresServer: PostgresServer) -> AsyncIterator[str]:
    name = postgresServer.createDatabase()
    yield postgresServer.url(name)
    postgresServer.dropDatabase(name)


async def _peers(url: str) -> PostgresPeers:
    peers = PostgresPeers(reactor, url)
    peers.startService()
    await peers.listening
    return peers


def test_messages_are_checked_both_ways() -> None:
    text = encode("p1", "instance", {"id": "i1", "keys": True, "extra": "dropped"})
    assert decode(text) == ("p1", "instance", {"id": "i1", "keys": True})
    with pytest.raises(ValueError, match="no such kind"):
        encode("p1", "shutdown", {})
    with pytest.raises(ValueError, match="too long"):
        encode("p1", "command", {"scheduler": "s" * 8000})
    for bad in ("not json", "[]", '{"v": 2, "from": "p", "kind": "keys"}', '{"v": 1, "from": "p", "kind": "nope"}',
                '{"v": 1, "from": "p", "kind": "command", "scheduler": {"a": 1}}'):  # fmt: skip
        assert decode(bad) is None
    NoPeers().tell("keys", {})  # alone, nothing is sent, but the message is still checked
    with pytest.raises(ValueError):
        NoPeers().tell("nope", {})


@pytest_twisted.ensureDeferred
async def test_what_one_tells_the_others_hear_in_order_and_it_does_not(database: str) -> None:
    one, two, three = [await _peers(database) for _ in range(3)]
    heard: dict[str, list[Any]] = {"one": [], "two": [], "three": []}
    for name, peers in (("one", one), ("two", two), ("three", three)):
        peers.hear("command", lambda body, name=name: heard[name].append(body["scheduler"]))
    try:
        for n in range(20):
            one.tell("command", {"scheduler": f"s{n}"})
        wanted = [f"s{n}" for n in range(20)]
        await eventually(lambda: heard["two"] == wanted and heard["three"] == wanted, what=lambda: str(heard))
        assert heard["one"] == []
    finally:
        for peers in (one, two, three):
            peers.stopService()


@pytest_twisted.ensureDeferred
async def test_a_lost_link_is_made_again_and_says_so(database: str, postgresServer: PostgresServer) -> None:
    one, two = await _peers(database), await _peers(database)
    rejoined: list[bool] = []
    heard: list[str] = []
    two.onJoined(lambda: rejoined.append(True))
    two.hear("command", lambda body: heard.append(body["scheduler"]))
    try:
        # The database ends two's listening connection, as a restart or a network cut would.
        import psycopg

        pid = two._listening.connection.info.backend_pid  # type: ignore[union-attr]
        with psycopg.connect(database, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await eventually(lambda: rejoined, what="two listening again")
        one.tell("command", {"scheduler": "after"})
        await eventually(lambda: heard == ["after"], what=lambda: f"heard {heard}")
    finally:
        one.stopService()
        two.stopService()


async def _instance(store: IStore) -> Instance:
    user = await store.createUser("alice")
    image = await store.createImage("Tool", "tool", owner_id=None)
    instance: Instance = await store.createInstance(user.id, image.id)
    return instance


@pytest_twisted.ensureDeferred
async def test_a_change_through_one_process_is_on_the_others_bus(database: str) -> None:
    stores = [await openStore(database, reactor) for _ in range(2)]
    peers = [await _peers(database) for _ in range(2)]
    buses = [InstanceEvents(), InstanceEvents()]
    for bus, each, store in zip(buses, peers, stores, strict=True):
        EventRelay(bus, each, store)
    seen: list[tuple[str, State]] = []
    keys: list[bool] = []
    access: list[AccessChange] = []
    buses[1].subscribe(lambda i: seen.append((i.id, i.state)))
    buses[1].subscribeKeys(lambda: keys.append(True))
    buses[1].subscribeAccess(access.append)
    try:
        instance = await _instance(stores[0])
        # Several changes in a row: the other bus hears each as the store held it then or later, never going back.
        for state in (State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED):
            updated = await stores[0].updateInstance(instance.id, state=state)
            buses[0].publish(updated)
        await eventually(lambda: seen and seen[-1] == (instance.id, State.STOPPED), what=lambda: str(seen))
        order = [State.STARTING, State.RUNNING, State.STOPPING, State.STOPPED]
        assert [order.index(state) for _, state in seen] == sorted(order.index(state) for _, state in seen)
        assert keys == []  # a person's action: no key changed
        buses[0].accessChanged(AccessChange(user=instance.owner_id, session="abc"))
        await eventually(lambda: access, what="the access change")
        assert access == [AccessChange(user=instance.owner_id, instance=None, session="abc")]
    finally:
        for each in peers:
            each.stopService()
        for store in stores:
            await store.close()


@pytest_twisted.ensureDeferred
async def test_each_process_checks_what_the_other_signed_also_after_a_rotation(database: str, tmp_path: Path) -> None:
    stores = [await openStore(database, reactor) for _ in range(2)]
    peers = [await _peers(database) for _ in range(2)]
    rings = [KeyRing(tmp_path / f"keys{n}", issuer=ISSUER, clock=reactor) for n in range(2)]
    for ring, store, each in zip(rings, stores, peers, strict=True):
        await SharedKeys(ring, store, each).publish()

    def verifier(ring: KeyRing) -> TokenVerifier:
        return TokenVerifier(KeyRingKeySource(ring), audience="test", issuer=ISSUER, clock=reactor)

    try:
        # The first to start heard of the second's key when it was published.
        await eventually(lambda: len(rings[0].publicJWKs()) == 2, what="the first process taking the second's key")
        token = rings[0].signer().sign({"sub": "alice"}, audience="test", lifetime=60)
        assert (await verifier(rings[1]).verify(token))["sub"] == "alice"
        # Both publish the same JWKS.
        assert sorted(k["kid"] for k in rings[0].publicJWKs()) == sorted(k["kid"] for k in rings[1].publicJWKs())

        old = rings[0].signer().kid
        new = rings[0].rotate()
        await eventually(lambda: new in {k["kid"] for k in rings[1].publicJWKs()}, what="the rotated key at the other")
        token = rings[0].signer().sign({"sub": "bob"}, audience="test", lifetime=60)
        assert jwt.get_unverified_header(token)["kid"] == new
        assert (await verifier(rings[1]).verify(token))["sub"] == "bob"
        assert old in {k["kid"] for k in rings[1].publicJWKs()}  # kept until tokens it signed expire

        # A key retired from the first is no longer taken by the second.
        rings[0].retain = 0
        rings[0].ownJWKs()
        await eventually(lambda: old not in {k["kid"] for k in rings[1].publicJWKs()}, what="the retired key gone")
        forged = rings[1].signer().sign({"sub": "x"}, audience="other", lifetime=60)
        with pytest.raises(InvalidToken):
            await verifier(rings[0]).verify(forged)  # wrong audience still refused
        assert (await stores[1].portalKeys()).keys() == {k["kid"] for k in rings[1].publicJWKs()}
    finally:
        for each in peers:
            each.stopService()
        for store in stores:
            await store.close()
