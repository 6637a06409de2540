"""Schedulers, images, instances and sharing."""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from dit4c.common.life import ACTIVE, State
from dit4c.portal.store import (
    Conflict,
    Image,
    Instance,
    IStore,
    NotFound,
    User,
    hashToken,
)
from dit4c.portal.store.errors import QuotaReached

JWK = json.dumps({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})


async def _setup(store: IStore) -> tuple[User, Image]:
    alice = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest", port=8888)
    return alice, image


# -- schedulers ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_schedulers(store: IStore, clock: Clock) -> None:
    s1 = await store.createScheduler("hpc", JWK)
    s2 = await store.createScheduler("cloud", JWK, id="sched-cloud")
    assert s2.id == "sched-cloud"
    assert (s1.name, s1.public_jwk, s1.created, s1.disabled) == ("hpc", JWK, clock.seconds(), False)
    assert await store.schedulerById(s1.id) == s1
    assert await store.schedulerById("nope") is None
    assert [s.name for s in await store.listSchedulers()] == ["cloud", "hpc"]
    with pytest.raises(Conflict, match="'hpc'"):
        await store.createScheduler("hpc", JWK)
    with pytest.raises(Conflict):
        await store.createScheduler("other", JWK, id="sched-cloud")
    disabled = await store.updateScheduler(s1.id, disabled=True, public_jwk="{}")
    assert (disabled.disabled, disabled.public_jwk, disabled.name) == (True, "{}", "hpc")
    assert await store.schedulerById(s1.id) == disabled
    with pytest.raises(NotFound):
        await store.updateScheduler("nope", disabled=True)
    with pytest.raises(Conflict):
        await store.updateScheduler(s1.id, name="cloud")


# -- images ----------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_images(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    rstudio = await store.createImage("RStudio", "docker.io/rocker/rstudio:4", digest="sha256:ab", port=8787)
    jupyter = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook")
    saved = await store.createImage("my work", "https://images.example/i/1", owner_id=alice.id)
    assert rstudio == Image(
        rstudio.id, "RStudio", "docker.io/rocker/rstudio:4", "sha256:ab", None, 8787, clock.seconds(), False
    )
    assert saved.owner_id == alice.id and saved.port is None and saved.digest is None
    assert await store.imageById(rstudio.id) == rstudio
    assert await store.imageById("nope") is None
    assert [i.name for i in await store.listCatalogue()] == ["Jupyter", "RStudio"]
    assert await store.listImagesOf(alice.id) == [saved]
    assert await store.listImagesOf(bob.id) == []
    with pytest.raises(NotFound, match="no user"):
        await store.createImage("x", "y", owner_id="nobody")

    await store.deleteImage(jupyter.id)
    assert [i.name for i in await store.listCatalogue()] == ["RStudio"]
    deleted = await store.imageById(jupyter.id)
    assert deleted is not None and deleted.deleted
    with pytest.raises(NotFound):
        await store.deleteImage("nope")


@pytest_twisted.ensureDeferred
async def test_imageSharing(store: IStore) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    carol = await store.createUser("carol")
    catalogue = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook")
    saved = await store.createImage("my work", "https://images.example/i/1", owner_id=alice.id)
    assert await store.mayUseImage(bob.id, catalogue.id)
    assert await store.mayUseImage(alice.id, saved.id)
    assert not await store.mayUseImage(bob.id, saved.id)
    assert not await store.mayUseImage(bob.id, "nope")
    await store.shareImage(saved.id, bob.id)
    await store.shareImage(saved.id, bob.id)
    assert await store.mayUseImage(bob.id, saved.id)
    assert not await store.mayUseImage(carol.id, saved.id)
    assert await store.listImagesSharedWith(bob.id) == [saved]
    assert await store.listImagesSharedWith(carol.id) == []
    with pytest.raises(NotFound):
        await store.shareImage("nope", bob.id)
    with pytest.raises(NotFound):
        await store.shareImage(saved.id, "nobody")
    await store.unshareImage(saved.id, bob.id)
    assert not await store.mayUseImage(bob.id, saved.id)
    await store.shareImage(saved.id, bob.id)
    await store.deleteImage(saved.id)
    assert not await store.mayUseImage(bob.id, saved.id)
    assert not await store.mayUseImage(alice.id, saved.id)
    assert await store.listImagesSharedWith(bob.id) == []


# -- instances -------------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_createInstance(store: IStore, clock: Clock) -> None:
    alice, image = await _setup(store)
    scheduler = await store.createScheduler("hpc", JWK)
    instance = await store.createInstance(alice.id, image.id, scheduler_id=scheduler.id, public_jwk=JWK)
    assert instance == Instance(
        id=instance.id,
        owner_id=alice.id,
        image_id=image.id,
        scheduler_id=scheduler.id,
        state="requested",
        reason=None,
        url=None,
        public_jwk=JWK,
        created=clock.seconds(),
        updated=clock.seconds(),
    )
    assert await store.instanceById(instance.id) == instance
    assert await store.instanceById("nope") is None


@pytest_twisted.ensureDeferred
async def test_createInstanceMissing(store: IStore) -> None:
    alice, image = await _setup(store)
    with pytest.raises(NotFound, match="no user"):
        await store.createInstance("nobody", image.id)
    with pytest.raises(NotFound, match="no image"):
        await store.createInstance(alice.id, "nope")
    with pytest.raises(NotFound, match="no scheduler"):
        await store.createInstance(alice.id, image.id, scheduler_id="nope")
    await store.deleteImage(image.id)
    with pytest.raises(NotFound, match="no image"):
        await store.createInstance(alice.id, image.id)


@pytest_twisted.ensureDeferred
async def test_listInstances(store: IStore, clock: Clock) -> None:
    alice, image = await _setup(store)
    bob = await store.createUser("bob")
    hpc = await store.createScheduler("hpc", JWK)
    made = []
    for i in range(4):
        clock.advance(0.002)
        made.append(await store.createInstance(alice.id, image.id, scheduler_id=hpc.id if i % 2 else None))
    clock.advance(0.002)
    theirs = await store.createInstance(bob.id, image.id, scheduler_id=hpc.id)
    assert [i.id for i in made] == sorted(i.id for i in made)
    assert await store.listInstancesOf(alice.id) == made
    await store.updateInstance(made[1].id, state="discarded")
    assert [i.id for i in await store.listInstancesOf(alice.id)] == [made[0].id, made[2].id, made[3].id]
    assert [i.id for i in await store.listInstancesOf(alice.id, includeDiscarded=True)] == [i.id for i in made]
    assert [i.id for i in await store.listInstancesOfScheduler(hpc.id)] == [made[3].id, theirs.id]
    assert len(await store.listInstancesOfScheduler(hpc.id, includeDiscarded=True)) == 3
    assert await store.listInstancesOf("nobody") == []


@pytest_twisted.ensureDeferred
async def test_updateInstance(store: IStore, clock: Clock) -> None:
    alice, image = await _setup(store)
    hpc = await store.createScheduler("hpc", JWK)
    instance = await store.createInstance(alice.id, image.id)
    clock.advance(5)
    placed = await store.updateInstance(instance.id, scheduler_id=hpc.id, state="starting")
    assert (placed.scheduler_id, placed.state, placed.updated) == (hpc.id, "starting", clock.seconds())
    assert placed.created == instance.created
    running = await store.updateInstance(
        instance.id, state="running", url="https://x.example/", public_jwk=JWK
    )
    assert (running.url, running.public_jwk, running.reason) == ("https://x.example/", JWK, None)
    failed = await store.updateInstance(instance.id, state="errored", reason="node lost", url=None)
    assert (failed.state, failed.reason, failed.url, failed.public_jwk) == ("errored", "node lost", None, JWK)
    assert await store.instanceById(instance.id) == failed
    with pytest.raises(NotFound):
        await store.updateInstance("nope", state="running")
    with pytest.raises(NotFound, match="no scheduler"):
        await store.updateInstance(instance.id, scheduler_id="nope")
    with pytest.raises(ValueError, match="not an instance state"):
        await store.updateInstance(instance.id, state="exploded")
    with pytest.raises(ValueError, match="not an instance state"):
        await store.updateInstance(instance.id, state="running", expected_state="exploded")


@pytest_twisted.ensureDeferred
async def test_updateInstanceCompareAndSet(store: IStore) -> None:
    alice, image = await _setup(store)
    instance = await store.createInstance(alice.id, image.id)
    started = await store.updateInstance(instance.id, state="starting", expected_state="requested")
    assert started.state == "starting"
    with pytest.raises(Conflict, match="is starting, not requested"):
        await store.updateInstance(instance.id, state="starting", url="u", expected_state="requested")
    unchanged = await store.instanceById(instance.id)
    assert unchanged == started
    stopping = await store.updateInstance(instance.id, state="stopping", expected_state=["starting", "running"])
    assert stopping.state == "stopping"
    with pytest.raises(Conflict, match="not starting or running"):
        await store.updateInstance(instance.id, state="stopping", expected_state=("starting", "running"))
    with pytest.raises(NotFound):
        await store.updateInstance("nope", state="stopping", expected_state="running")


@pytest_twisted.ensureDeferred
async def test_compareAndSetRace(store: IStore) -> None:
    """Of many changes racing from one state, exactly one wins."""
    from twisted.internet.defer import DeferredList

    alice, image = await _setup(store)
    instance = await store.createInstance(alice.id, image.id)
    results: list[tuple[bool, Any]] = await DeferredList(
        [store.updateInstance(instance.id, state=s, expected_state="requested") for s in ("starting", "errored") * 4],
        consumeErrors=True,
    )
    wins = [r for ok, r in results if ok]
    losses = [r for ok, r in results if not ok]
    assert len(wins) == 1 and len(losses) == 7
    assert all(f.check(Conflict) for f in losses)


@pytest_twisted.ensureDeferred
async def test_aQuotaCountsTheActiveStates(store: IStore) -> None:
    """A claim counts the owner's instances in ``ACTIVE`` states, no others, and no one else's."""
    alice, image = await _setup(store)
    bob = await store.createUser("bob")
    for state in (*sorted(ACTIVE), State.SAVED, State.STOPPED, State.ERRORED, State.DISCARDED):
        made = await store.createInstance(alice.id, image.id)
        await store.updateInstance(made.id, state=state)
    await store.createInstance(bob.id, image.id)
    before = await store.listInstancesOf(alice.id, includeDiscarded=True)
    with pytest.raises(QuotaReached) as refused:
        await store.createInstance(alice.id, image.id, quota=len(ACTIVE))
    assert (refused.value.quota, refused.value.active) == (len(ACTIVE), len(ACTIVE))
    assert str(refused.value) == f"{len(ACTIVE)} active instances, and the quota is {len(ACTIVE)}"
    assert await store.listInstancesOf(alice.id, includeDiscarded=True) == before
    claimed = await store.createInstance(alice.id, image.id, quota=len(ACTIVE) + 1)
    assert claimed.state == State.REQUESTED and await store.instanceById(claimed.id) == claimed
    with pytest.raises(QuotaReached) as refused:
        await store.createInstance(alice.id, image.id, quota=len(ACTIVE) + 1)
    assert refused.value.active == len(ACTIVE) + 1
    await store.createInstance(bob.id, image.id, quota=2)
    with pytest.raises(QuotaReached, match="2 active instances, and the quota is 2"):
        await store.createInstance(bob.id, image.id, quota=2)
    with pytest.raises(QuotaReached, match="0 active instances, and the quota is 0"):
        await store.createInstance((await store.createUser("carol")).id, image.id, quota=0)


@pytest_twisted.ensureDeferred
async def test_aClaimNeedsItsOwnerAndImage(store: IStore) -> None:
    alice, image = await _setup(store)
    with pytest.raises(NotFound, match="no user"):
        await store.createInstance("nobody", image.id, quota=1)
    with pytest.raises(NotFound, match="no image"):
        await store.createInstance(alice.id, "nope", quota=1)
    with pytest.raises(NotFound, match="no scheduler"):
        await store.createInstance(alice.id, image.id, scheduler_id="nope", quota=1)
    with pytest.raises(ValueError, match="negative"):
        await store.createInstance(alice.id, image.id, quota=-1)
    assert await store.listInstancesOf(alice.id) == []


# -- sharing instances ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mayUseInstance(store: IStore) -> None:
    alice, image = await _setup(store)
    bob = await store.createUser("bob")
    stranger = await store.createUser("mallory")
    instance = await store.createInstance(alice.id, image.id)
    assert await store.mayUseInstance(alice.id, instance.id)  # owner
    assert not await store.mayUseInstance(bob.id, instance.id)
    assert not await store.mayUseInstance(stranger.id, instance.id)
    assert not await store.mayUseInstance(alice.id, "nope")

    await store.shareInstance(instance.id, bob.id)
    await store.shareInstance(instance.id, bob.id)  # again: harmless
    assert await store.mayUseInstance(bob.id, instance.id)  # shared
    assert not await store.mayUseInstance(stranger.id, instance.id)  # stranger
    assert [(g.user_id, g.name, g.link_id) for g in await store.listInstanceAccess(instance.id)] == [
        (bob.id, "bob", None)
    ]
    assert [i.id for i in await store.listInstancesSharedWith(bob.id)] == [instance.id]
    assert await store.listInstancesSharedWith(stranger.id) == []

    await store.unshareInstance(instance.id, bob.id)
    assert not await store.mayUseInstance(bob.id, instance.id)  # unshared
    assert await store.listInstanceAccess(instance.id) == []
    assert await store.mayUseInstance(alice.id, instance.id)

    with pytest.raises(NotFound):
        await store.shareInstance("nope", bob.id)
    with pytest.raises(NotFound):
        await store.shareInstance(instance.id, "nobody")


@pytest_twisted.ensureDeferred
async def test_shareLinks(store: IStore, tableRows: Any) -> None:
    alice, image = await _setup(store)
    bob = await store.createUser("bob")
    carol = await store.createUser("carol")
    stranger = await store.createUser("mallory")
    instance = await store.createInstance(alice.id, image.id)
    link, token = await store.createShareLink(instance.id)
    assert (link.instance_id, link.revoked, link.token_hash) == (instance.id, False, hashToken(token))
    assert token not in repr(await tableRows(store, "share_links"))

    assert await store.redeemShareLink(token, bob.id) == instance.id
    assert await store.redeemShareLink(token, bob.id) == instance.id
    assert await store.redeemShareLink(token + "x", carol.id) is None
    assert await store.mayUseInstance(bob.id, instance.id)  # through the link
    assert not await store.mayUseInstance(carol.id, instance.id)
    assert not await store.mayUseInstance(stranger.id, instance.id)
    assert [i.id for i in await store.listInstancesSharedWith(bob.id)] == [instance.id]

    await store.revokeShareLink(link.id)
    assert not await store.mayUseInstance(bob.id, instance.id)  # revoked share
    assert await store.redeemShareLink(token, carol.id) is None
    assert not await store.mayUseInstance(carol.id, instance.id)
    assert await store.listInstancesSharedWith(bob.id) == []
    assert await store.listShareLinks(instance.id) == [
        type(link)(link.id, link.instance_id, link.token_hash, link.created, True)
    ]
    with pytest.raises(NotFound):
        await store.revokeShareLink("nope")
    with pytest.raises(NotFound):
        await store.createShareLink("nope")
    other, otherToken = await store.createShareLink(instance.id)
    with pytest.raises(NotFound, match="no user"):
        await store.redeemShareLink(otherToken, "nobody")


@pytest_twisted.ensureDeferred
async def test_discardedNotListedAsShared(store: IStore) -> None:
    alice, image = await _setup(store)
    bob = await store.createUser("bob")
    instance = await store.createInstance(alice.id, image.id)
    await store.shareInstance(instance.id, bob.id)
    await store.updateInstance(instance.id, state="discarded")
    assert await store.listInstancesSharedWith(bob.id) == []


@pytest_twisted.ensureDeferred
async def test_access_lists_each_way_in_and_an_unshare_ends_them_all(store: IStore) -> None:
    """
    The owner sees who may use the instance and how: named, or through which
    link. Taking it back from someone ends their uses of its links too; the
    link stays for the others, and a revoked link's people leave the list.
    """
    alice, image = await _setup(store)
    bob, carol = await store.createUser("bob"), await store.createUser("carol")
    instance = await store.createInstance(alice.id, image.id)
    other = await store.createInstance(alice.id, image.id)
    link, token = await store.createShareLink(instance.id)
    otherLink, otherToken = await store.createShareLink(other.id)
    await store.shareInstance(instance.id, bob.id)
    assert await store.redeemShareLink(token, bob.id) == instance.id
    assert await store.redeemShareLink(token, carol.id) == instance.id
    assert await store.redeemShareLink(otherToken, bob.id) == other.id

    access = await store.listInstanceAccess(instance.id)
    assert sorted((g.name, g.link_id or "") for g in access) == [("bob", ""), ("bob", link.id), ("carol", link.id)]

    await store.unshareInstance(instance.id, bob.id)
    assert [(g.name, g.link_id) for g in await store.listInstanceAccess(instance.id)] == [("carol", link.id)]
    assert not await store.mayUseInstance(bob.id, instance.id)
    assert await store.mayUseInstance(carol.id, instance.id)
    # Another instance's link is that instance's business.
    assert await store.mayUseInstance(bob.id, other.id)

    await store.revokeShareLink(link.id)
    assert await store.listInstanceAccess(instance.id) == []


@pytest_twisted.ensureDeferred
async def test_an_image_is_renamed_until_it_is_deleted(store: IStore) -> None:
    alice, image = await _setup(store)
    saved = await store.createImage("Notes (saved)", "https://images.test/a", owner_id=alice.id)
    renamed = await store.renameImage(saved.id, "My notes")
    assert renamed.name == "My notes" and (await store.imageById(saved.id)).name == "My notes"
    await store.deleteImage(saved.id)
    with pytest.raises(NotFound):
        await store.renameImage(saved.id, "again")
    with pytest.raises(NotFound):
        await store.renameImage("nope", "x")
