"""
A person's page read at once (``IPageViews.pageView``): what it returns,
and that it reads one snapshot, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dit4c.portal.store import Image, IStore, PageView, _views

JWK = json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})


@pytest_twisted.ensureDeferred
async def test_pageView_lists_what_the_page_shows(store: IStore, clock: Clock) -> None:
    """Own instances but discarded ones, others' shared ones (directly or by a live link), images, schedulers, counts."""
    alice, bob, carol = [await store.createUser(name) for name in ("alice", "bob", "carol")]
    jupyter = await store.createImage("Jupyter", "jupyter")
    gone = await store.createImage("Old", "old")
    saved = await store.createImage("Alice's save", "save", owner_id=alice.id)
    bobs = await store.createImage("Bob's tool", "bob", owner_id=bob.id)
    await store.shareImage(bobs.id, alice.id)
    await store.createImage("Carol's tool", "carol", owner_id=carol.id)
    open_ = await store.createScheduler("cloud", JWK)
    closed = await store.createScheduler("hpc", JWK)
    await store.setSchedulerUsers(closed.id, [bob.id])

    mine = [await store.createInstance(alice.id, image.id) for image in (jupyter, gone, jupyter)]
    await store.updateInstance(mine[2].id, state="discarded")
    await store.deleteImage(gone.id)
    await store.shareInstance(mine[0].id, bob.id)
    _, link = await store.createShareLink(mine[0].id)
    await store.redeemShareLink(link, carol.id)
    await store.redeemShareLink(link, bob.id)  # bob twice (share and link): one person
    bobsShared, bobsDiscarded = [await store.createInstance(bob.id, jupyter.id) for _ in range(2)]
    await store.shareInstance(bobsShared.id, alice.id)
    await store.shareInstance(bobsDiscarded.id, alice.id)
    await store.updateInstance(bobsDiscarded.id, state="discarded")
    carols = await store.createInstance(carol.id, jupyter.id)
    _, carolsLink = await store.createShareLink(carols.id)
    await store.redeemShareLink(carolsLink, alice.id)
    await store.createInstance(carol.id, jupyter.id)  # not shared

    view = await store.pageView(user_id=alice.id)
    assert view is not None
    assert view.user == alice and view.session is None
    assert [i.id for i in view.instances] == sorted([mine[0].id, mine[1].id])
    assert [i.id for i in view.shared] == sorted([bobsShared.id, carols.id])
    assert [i.name for i in view.images] == ["Jupyter", "Alice's save", "Bob's tool"]
    assert view.imageNames[gone.id] == "Old"  # deleted, but an instance still runs from it
    assert [s.name for s in view.schedulers] == [open_.name]
    assert view.sharedCounts == {mine[0].id: 2}
    assert await store.listInstancesOf(alice.id) == view.instances
    assert await store.listInstancesSharedWith(alice.id) == view.shared
    assert saved.id in view.imageNames
    assert view.images == (
        await store.listCatalogue() + await store.listImagesOf(alice.id) + await store.listImagesSharedWith(alice.id)
    )

    short = await store.pageView(user_id=alice.id, full=False)
    assert short == PageView(alice, None, view.instances, view.shared)


@pytest_twisted.ensureDeferred
async def test_pageView_finds_the_person_by_session_or_API_token(
    store: IStore, clock: Clock, tableRows: Any
) -> None:
    alice = await store.createUser("alice")
    session = await store.createSession(alice.id, 3600)
    record, token = await store.createApiToken(alice.id, "laptop")

    bySession = await store.pageView(sessionToken=session.id)
    assert bySession is not None and bySession.user == alice and bySession.session == session
    assert await store.pageView(sessionToken=session.id + "x") is None
    assert await store.pageView(apiToken=token + "x") is None
    assert await store.pageView(user_id="nobody") is None

    async def lastUsed() -> Any:
        [listed] = await store.listApiTokens(alice.id)
        return listed.last_used

    byToken = await store.pageView(apiToken=token, full=False)
    assert byToken is not None and byToken.user == alice and byToken.session is None
    first = clock.seconds()
    assert await lastUsed() == first
    # Written at most once a minute: page views stay reads.
    clock.advance(_views.LAST_USED_EVERY - 1)
    await store.pageView(apiToken=token)
    assert await lastUsed() == first
    clock.advance(2)
    await store.pageView(apiToken=token)
    assert await lastUsed() == clock.seconds()

    await store.updateUser(alice.id, disabled=True)
    assert await store.pageView(sessionToken=session.id) is None
    assert await store.pageView(apiToken=token) is None
    assert await store.pageView(user_id=alice.id) is None
    await store.updateUser(alice.id, disabled=False)
    await store.revokeApiToken(record.id)
    assert await store.pageView(apiToken=token) is None
    clock.advance(3600)
    assert await store.pageView(sessionToken=session.id) is None
    with pytest.raises(ValueError, match="one of"):
        await store.pageView(user_id=alice.id, apiToken=token)


@pytest_twisted.ensureDeferred
async def test_pageView_reads_one_snapshot(
    stores: list[IStore], clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Writes another process commits while the page is being read, after
    its first parts and before the rest, are not seen by any later part:
    SQLite reads one WAL snapshot in a deferred transaction, PostgreSQL
    reads in REPEATABLE READ.
    """
    reader, writer = stores[0], stores[1]
    alice, bob = await reader.createUser("alice"), await reader.createUser("bob")
    jupyter = await reader.createImage("Jupyter", "jupyter")
    hers = await reader.createInstance(alice.id, jupyter.id)
    his = await reader.createInstance(bob.id, jupyter.id)

    async def meanwhile() -> None:
        await writer.shareInstance(his.id, alice.id)
        await writer.shareInstance(hers.id, bob.id)
        await writer.createImage("RStudio", "rstudio")
        await writer.createScheduler("cloud", JWK)
        await writer.updateInstance(hers.id, state="starting")

    realImages = _views.allImages
    wrote: list[bool] = []

    def allImages(t: Any, user_id: str) -> list[Image]:
        # In the reader's pool thread, between the read of the person and
        # their instances and the rest: another store's writes, committed.
        if not wrote:
            wrote.append(True)
            threads.blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(meanwhile()))  # type: ignore[arg-type]
        return realImages(t, user_id)

    monkeypatch.setattr(_views, "allImages", allImages)
    view = await reader.pageView(user_id=alice.id)
    assert wrote
    assert view is not None
    assert (view.shared, view.sharedCounts, [i.name for i in view.images], view.schedulers) == ([], {}, ["Jupyter"], [])
    assert [i.state for i in view.instances] == ["requested"]

    after = await reader.pageView(user_id=alice.id)
    assert after is not None
    assert [i.id for i in after.shared] == [his.id]
    assert after.sharedCounts == {hers.id: 1}
    assert [i.name for i in after.images] == ["Jupyter", "RStudio"]
    assert [s.name for s in after.schedulers] == ["cloud"]
    assert [i.state for i in after.instances] == ["starting"]
