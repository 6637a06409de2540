"""What the reports from instances need of the store: spent token ids, images found by reference, saved images made once."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock

from dit4c.portal.store import Conflict, Image, Instance, IStore, NotFound, User

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
URL = "https://images.example.org/v1/images/" + DIGEST


async def _setup(store: IStore) -> tuple[User, Image, Instance]:
    alice = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest", port=8888)
    instance = await store.createInstance(alice.id, image.id)
    return alice, image, instance


# -- spent token ids ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_token_id_is_spent_once_until_it_expires(store: IStore, clock: Clock, tableRows: Any) -> None:
    now = clock.seconds()
    assert await store.spendTokenId("inst-a", "jti-1", now + 60) is True
    assert await store.spendTokenId("inst-a", "jti-1", now + 60) is False
    # Another issuer's token may carry the same id.
    assert await store.spendTokenId("inst-b", "jti-1", now + 60) is True
    assert await store.spendTokenId("inst-a", "jti-2", now + 10) is True
    assert len(await tableRows(store, "used_token_ids")) == 3

    # Forgotten once expired (the token could not verify any more anyway).
    clock.advance(61)
    assert await store.spendTokenId("inst-a", "jti-3", clock.seconds() + 60) is True
    assert [row[:2] for row in await tableRows(store, "used_token_ids")] == [("inst-a", "jti-3")]
    assert await store.spendTokenId("inst-a", "jti-1", clock.seconds() + 60) is True


@pytest_twisted.ensureDeferred
async def test_of_concurrent_uses_of_a_token_id_one_wins(store: IStore, clock: Clock) -> None:
    results = await DeferredList(
        [store.spendTokenId("inst-a", "same", clock.seconds() + 60) for _ in range(8)], consumeErrors=True
    )
    assert all(ok for ok, _ in results)
    assert sorted(value for _, value in results) == [False] * 7 + [True]


@pytest_twisted.ensureDeferred
async def test_token_ids_must_be_short(store: IStore, clock: Clock) -> None:
    with pytest.raises(ValueError):
        await store.spendTokenId("inst-a", "", clock.seconds() + 60)
    with pytest.raises(ValueError):
        await store.spendTokenId("inst-a", "x" * 256, clock.seconds() + 60)
    assert await store.spendTokenId("inst-a", "x" * 255, clock.seconds() + 60) is True


# -- finding images -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_images_are_found_by_id_ref_or_digest(store: IStore, clock: Clock) -> None:
    alice, catalogue, _ = await _setup(store)
    bob = await store.createUser("bob")
    mine = await store.createImage("Mine", URL, owner_id=alice.id, digest=DIGEST)
    clock.advance(1)
    bobs = await store.createImage("Bob's", URL + "-bob", owner_id=bob.id, digest=DIGEST)
    assert await store.findImages(mine.id) == [mine]
    assert await store.findImages(URL) == [mine]
    assert await store.findImages(DIGEST) == [mine, bobs]
    assert await store.findImages(catalogue.ref) == [catalogue]
    assert await store.findImages(OTHER) == []
    assert await store.findImages("nope") == []
    await store.deleteImage(mine.id)
    assert await store.findImages(DIGEST) == [bobs]
    assert await store.findImages(mine.id) == []


# -- saving an instance's image ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_instance_saves_an_image_once(store: IStore, clock: Clock) -> None:
    alice, source, instance = await _setup(store)
    await store.updateInstance(instance.id, state="uploading")
    image, created = await store.saveInstanceImage(
        instance.id, "Saved", URL, DIGEST, states=("saving", "uploading")
    )
    assert created
    assert image == Image(image.id, "Saved", URL, DIGEST, alice.id, 8888, clock.seconds(), False)
    assert await store.imageById(image.id) == image

    # A retry (even naming another URL) finds the same image.
    again, created = await store.saveInstanceImage(
        instance.id, "Other name", URL + "?again", DIGEST, states=("saving", "uploading")
    )
    assert (again, created) == (image, False)
    assert await store.listImagesOf(alice.id) == [image]

    # Another digest is another image.
    other, created = await store.saveInstanceImage(instance.id, "Two", URL, OTHER, states=("uploading",))
    assert created and other.id != image.id

    # A deleted image does not count.
    await store.deleteImage(image.id)
    fresh, created = await store.saveInstanceImage(instance.id, "Three", URL, DIGEST, states=("uploading",))
    assert created and fresh.id not in (image.id, other.id)
    assert source.port == fresh.port


@pytest_twisted.ensureDeferred
async def test_an_instance_saves_only_in_the_states_given(store: IStore) -> None:
    alice, _, instance = await _setup(store)
    await store.updateInstance(instance.id, state="running")
    with pytest.raises(Conflict, match="running"):
        await store.saveInstanceImage(instance.id, "Saved", URL, DIGEST, states=("saving", "uploading"))
    with pytest.raises(NotFound):
        await store.saveInstanceImage("nope", "Saved", URL, DIGEST, states=("saving",))
    with pytest.raises(ValueError):
        await store.saveInstanceImage(instance.id, "Saved", URL, DIGEST, states=("flying",))
    with pytest.raises(ValueError):
        await store.saveInstanceImage(instance.id, "Saved", URL, DIGEST, states=())
    assert await store.listImagesOf(alice.id) == []


@pytest_twisted.ensureDeferred
async def test_concurrent_reports_make_one_image(store: IStore) -> None:
    alice, _, instance = await _setup(store)
    await store.updateInstance(instance.id, state="saving")
    results = await DeferredList(
        [
            store.saveInstanceImage(instance.id, f"Saved {i}", URL, DIGEST, states=("saving",))
            for i in range(6)
        ],
        consumeErrors=True,
    )
    assert all(ok for ok, _ in results), results
    images = {value[0].id for _, value in results}
    assert len(images) == 1
    assert sum(value[1] for _, value in results) == 1
    assert len(await store.listImagesOf(alice.id)) == 1
