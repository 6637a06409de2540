"""OAuth 2 authorization codes: one-time, short-lived, kept only as hashes."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import DeferredList
from twisted.internet.task import Clock

from dit4c.portal.store import Instance, IStore, NotFound, User, hashToken
from dit4c.portal.store.interfaces import OAuthCode

CALLBACK = "http://i.localhost:8080/.dit4c/callback"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


async def _setup(store: IStore) -> tuple[User, Instance]:
    alice = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest")
    instance = await store.createInstance(alice.id, image.id)
    return alice, instance


@pytest_twisted.ensureDeferred
async def test_a_code_is_redeemed_once(store: IStore, clock: Clock, tableRows: Any) -> None:
    alice, instance = await _setup(store)
    record, code = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    assert len(code) == 43
    assert record == OAuthCode(
        hashToken(code), instance.id, CALLBACK, alice.id, CHALLENGE, clock.seconds(), clock.seconds() + 60, False
    )
    # Only the hash is in the database.
    [row] = await tableRows(store, "oauth_codes")
    assert code not in row and record.code_hash in row

    clock.advance(59)
    redeemed = await store.redeemOAuthCode(code)
    assert redeemed is not None
    assert (redeemed.client_id, redeemed.redirect_uri, redeemed.user_id, redeemed.code_challenge) == (
        instance.id, CALLBACK, alice.id, CHALLENGE,
    )  # fmt: skip
    assert redeemed.used
    assert await store.redeemOAuthCode(code) is None
    assert await store.redeemOAuthCode("not-a-code") is None


@pytest_twisted.ensureDeferred
async def test_a_replayed_code_changes_nothing_else(store: IStore) -> None:
    alice, instance = await _setup(store)
    _, first = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    _, second = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    assert first != second
    assert await store.redeemOAuthCode(first) is not None
    assert await store.redeemOAuthCode(first) is None
    assert await store.redeemOAuthCode(second) is not None


@pytest_twisted.ensureDeferred
async def test_codes_expire_and_are_forgotten(store: IStore, clock: Clock, tableRows: Any) -> None:
    alice, instance = await _setup(store)
    _, code = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    clock.advance(60)
    assert await store.redeemOAuthCode(code) is None
    assert len(await tableRows(store, "oauth_codes")) == 1
    # The next code issued sweeps the expired ones away.
    await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    assert len(await tableRows(store, "oauth_codes")) == 1
    with pytest.raises(ValueError):
        await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 0)


@pytest_twisted.ensureDeferred
async def test_of_racing_redemptions_exactly_one_wins(store: IStore) -> None:
    alice, instance = await _setup(store)
    _, code = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    results: list[tuple[bool, Any]] = await DeferredList(
        [store.redeemOAuthCode(code) for _ in range(8)], consumeErrors=True
    )
    assert all(ok for ok, _ in results)
    assert len([r for _, r in results if r is not None]) == 1


@pytest_twisted.ensureDeferred
async def test_codes_need_an_instance_and_a_user(store: IStore) -> None:
    alice, instance = await _setup(store)
    with pytest.raises(NotFound):
        await store.createOAuthCode("nope", CALLBACK, alice.id, CHALLENGE, 60)
    with pytest.raises(NotFound):
        await store.createOAuthCode(instance.id, CALLBACK, "nobody", CHALLENGE, 60)
