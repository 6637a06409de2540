"""
Quotas under concurrency, on SQLite and PostgreSQL: claims racing from
several connections (as from several portal processes), a claim waiting for
another process that holds the same person, and the REST API answering
requests that arrive at once.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from portal_client import Client, serve, tokenFor
from support.passwords import cheapHash
from support.portal import RecordingCommands
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import Clock

from dit4c.common.life import ACTIVE, State
from dit4c.portal.app import Portal, PortalConfig
from dit4c.portal.keys import KeyRing
from dit4c.portal.store import Image, IStore, newInstanceId, openStore
from dit4c.portal.store._open import sqlitePath
from dit4c.portal.store.errors import QuotaReached

#: Claims sent at once in each race.
RACERS = 16


async def _image(store: IStore) -> Image:
    return await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest", port=8888)


async def _race(stores: list[IStore], claims: list[tuple[str, str, int]]) -> list[tuple[bool, Any]]:
    """Send every ``(owner, image, quota)`` claim at once, spread over ``stores``; each one's outcome."""
    sent = [
        stores[i % len(stores)].createInstance(owner, image, quota=quota)
        for i, (owner, image, quota) in enumerate(claims)
    ]
    results: list[tuple[bool, Any]] = await DeferredList(sent, consumeErrors=True)
    return results


def _refusals(results: list[tuple[bool, Any]]) -> list[QuotaReached]:
    refused = [outcome for ok, outcome in results if not ok]
    for failure in refused:
        failure.trap(QuotaReached)
    return [failure.value for failure in refused]


@pytest_twisted.ensureDeferred
async def test_racing_claims_make_exactly_the_quota(stores: list[IStore]) -> None:
    """
    Of many claims for one person sent at once from several connections,
    exactly as many succeed as the quota leaves room for; every other is
    refused, saying how many the person has.
    """
    alice, image = await stores[0].createUser("alice"), await _image(stores[0])
    # One running and some that hold nothing: the race has room for three.
    for state in (State.RUNNING, State.STOPPED, State.SAVED, State.ERRORED, State.DISCARDED):
        made = await stores[0].createInstance(alice.id, image.id)
        await stores[0].updateInstance(made.id, state=state)

    results = await _race(stores, [(alice.id, image.id, 4)] * RACERS)

    claimed = [outcome for ok, outcome in results if ok]
    assert len(claimed) == 3
    assert [(r.quota, r.active) for r in _refusals(results)] == [(4, 4)] * (RACERS - 3)
    mine = await stores[1].listInstancesOf(alice.id)
    assert len([i for i in mine if i.state in ACTIVE]) == 4
    assert {i.id for i in mine if i.state == State.REQUESTED} == {i.id for i in claimed}


@pytest_twisted.ensureDeferred
async def test_racing_claims_for_two_people_each_fill_their_own_quota(stores: list[IStore]) -> None:
    alice, bob, image = await stores[0].createUser("alice"), await stores[0].createUser("bob"), await _image(stores[0])

    results = await _race(stores, [(alice.id, image.id, 4), (bob.id, image.id, 3)] * RACERS)

    claimed = [outcome.owner_id for ok, outcome in results if ok]
    assert sorted(claimed) == sorted([alice.id] * 4 + [bob.id] * 3)
    assert sorted((r.quota, r.active) for r in _refusals(results)) == sorted(
        [(4, 4)] * (RACERS - 4) + [(3, 3)] * (RACERS - 3)
    )
    assert len(await stores[2].listInstancesOf(alice.id)) == 4
    assert len(await stores[3].listInstancesOf(bob.id)) == 3


# -- a claim and another process's transaction ------------------------------------------------------


class _OtherProcess:
    """
    A connection of its own to the store's database, doing what another
    portal process's claim does: holding a person (SQLite: the write lock;
    PostgreSQL: the person's row) while it adds an instance for them.
    """

    def __init__(self, storeURL: str) -> None:
        self.sqlite = storeURL.startswith("sqlite:")
        if self.sqlite:
            self.db: Any = sqlite3.connect(sqlitePath(storeURL), isolation_level=None)
        else:
            import psycopg

            self.db = psycopg.connect(storeURL)

    def _sql(self, statement: str) -> str:
        return statement if self.sqlite else statement.replace("?", "%s")

    def hold(self, user_id: str) -> None:
        if self.sqlite:
            self.db.execute("BEGIN IMMEDIATE")
        else:
            self.db.execute(self._sql("SELECT id FROM users WHERE id = ? FOR NO KEY UPDATE"), (user_id,))

    def addInstance(self, user_id: str, image_id: str) -> None:
        self.db.execute(
            self._sql(
                "INSERT INTO instances (id, owner_id, image_id, state, created, updated) VALUES (?, ?, ?, ?, ?, ?)"
            ),
            (newInstanceId(time.time()), user_id, image_id, State.RUNNING.value, time.time(), time.time()),
        )

    def commit(self) -> None:
        self.db.execute("COMMIT") if self.sqlite else self.db.commit()

    def close(self) -> None:
        self.db.close()


@contextmanager
def _tracedSQLite() -> Iterator[list[str]]:
    """Every statement SQLite starts on the connections opened in the block, as long as they live."""
    statements: list[str] = []
    connect = sqlite3.connect

    def tracing(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_trace_callback(statements.append)
        return connection

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite3, "connect", tracing)
        yield statements


async def _untilWaiting(storeURL: str, claim: Deferred[Any], statements: tuple[list[str], int] | None = None) -> None:
    """
    Wait until ``claim`` waits for a lock. PostgreSQL shows it; on SQLite,
    the claim's connection has started its BEGIN IMMEDIATE (among
    ``statements``: those :func:`_tracedSQLite` saw, and how many of them
    came before the claim), which waits for the other process's write lock.
    """
    if storeURL.startswith("sqlite:"):
        assert statements is not None
        seen, since = statements

        def begun() -> bool:
            assert not claim.called
            return "BEGIN IMMEDIATE" in seen[since:]

        await eventually(begun, what=lambda: f"the claim's BEGIN IMMEDIATE, saw {seen[since:]}")
        assert not claim.called
        return
    import psycopg

    with psycopg.connect(storeURL, autocommit=True) as watcher:

        def waiting() -> bool:
            assert not claim.called
            found = watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'dit4c-portal' AND wait_event_type = 'Lock'"
            ).fetchone()
            return bool(found and found[0])

        await eventually(waiting, what="the claim waiting for the lock")


@pytest.mark.parametrize("isolation", [None, "repeatable read"])
@pytest_twisted.ensureDeferred
async def test_a_claim_counts_what_another_process_added_meanwhile(
    storeURL: str, clock: Clock, isolation: str | None
) -> None:
    """
    A claim made while another process holds the person waits for it (SQLite:
    the busy timeout, not "database is locked"), then counts the instance it
    added. On PostgreSQL that holds whatever isolation the database defaults
    to: the store works in READ COMMITTED, so its count after the wait sees
    what was committed during it.
    """
    if isolation is not None:
        if storeURL.startswith("sqlite:"):
            pytest.skip("SQLite has one isolation")
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        with psycopg.connect(storeURL, autocommit=True) as admin:
            admin.execute(
                f"ALTER DATABASE {conninfo_to_dict(storeURL)['dbname']}"
                f" SET default_transaction_isolation = '{isolation}'"
            )
    with _tracedSQLite() as statements:
        store = await openStore(storeURL, reactor, clock=clock)
    other = _OtherProcess(storeURL)
    try:
        alice, image = await store.createUser("alice"), await _image(store)
        other.hold(alice.id)
        seen = len(statements)
        claim = store.createInstance(alice.id, image.id, quota=1)
        await _untilWaiting(storeURL, claim, (statements, seen))
        other.addInstance(alice.id, image.id)
        other.commit()
        with pytest.raises(QuotaReached) as refused:
            await claim
        assert (refused.value.quota, refused.value.active) == (1, 1)
        assert len(await store.listInstancesOf(alice.id)) == 1
    finally:
        other.close()
        await store.close()


@pytest_twisted.ensureDeferred
async def test_claims_for_others_do_not_wait_for_a_held_person(storeURL: str, store: IStore) -> None:
    """PostgreSQL: a claim waits only for claims for the same person (SQLite has one writer at a time)."""
    if storeURL.startswith("sqlite:"):
        pytest.skip("SQLite has one writer at a time: every claim waits for it")
    alice, bob, image = await store.createUser("alice"), await store.createUser("bob"), await _image(store)
    other = _OtherProcess(storeURL)
    try:
        other.hold(alice.id)
        alices = store.createInstance(alice.id, image.id, quota=1)
        await _untilWaiting(storeURL, alices)
        bobs = await store.createInstance(bob.id, image.id, quota=1)
        assert bobs.owner_id == bob.id
        assert not alices.called
        other.commit()
        assert (await alices).owner_id == alice.id
    finally:
        other.close()


# -- through the REST API -----------------------------------------------------------------------------


@pytest.mark.parametrize("portals", [1, 2])
@pytest_twisted.ensureDeferred
async def test_concurrent_starts_through_the_api_keep_the_quota(
    storeURL: str, tmp_path: Path, portals: int
) -> None:
    """
    Eight ``POST /api/v1/instances`` at once, on real sockets, to one portal
    or spread over two sharing a database: exactly the quota's worth are
    made (201), the rest refused (409 ``quota``) with the count.
    """
    clock = Clock()
    clock.advance(1_800_000_000)
    commands = RecordingCommands()
    stores = [await openStore(storeURL, reactor, clock=clock) for _ in range(portals)]
    served = []
    try:
        store = stores[0]
        await store.createUser(
            "alice", password_hash=cheapHash("correct horse battery"), max_instances=4
        )
        scheduler = await store.createScheduler("cluster", json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "A" * 43}))
        commands.connectedIds.add(scheduler.id)
        image = await _image(store)
        for i, each in enumerate(stores):
            portal = Portal(
                each,
                KeyRing(tmp_path / f"keys{i}", issuer="http://portal.test", clock=clock),
                PortalConfig(publicURL="http://portal.test", defaultQuota=2),
                clock,
                commands,
            )
            served.append((portal, serve(portal)))
        token = await tokenFor(served[0][0], "alice", "correct horse battery")
        clients = [Client(portal, token) for portal, _ in served]

        answers = await gatherResults(
            [
                Deferred.fromCoroutine(clients[i % portals].call("POST", "/instances", {"image": image.id}))
                for i in range(8)
            ]
        )

        made = [body for code, body in answers if code == 201]
        refused = [(code, body) for code, body in answers if code != 201]
        assert len(made) == 4
        assert refused == [
            (409, {"error": "quota", "reason": "You may run 4 instances at once and have 4; stop one first."})
        ] * 4
        code, listed = await clients[-1].call("GET", "/instances")
        assert code == 200
        assert sorted(i["id"] for i in listed if i["state"] in ACTIVE) == sorted(i["id"] for i in made)
        assert sorted(i for _, op, i, _ in commands.sent if op == "start") == sorted(i["id"] for i in made)
    finally:
        for _, port in served:
            await port.stopListening()
        for each in stores:
            await each.close()
