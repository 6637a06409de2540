"""
A code remembers the portal session it was issued in (only its hash), and
the store says whether that session still lives: what lets a logout end
the access made from it (docs/protocols.md 6.4).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from twisted.internet.task import Clock

from dit4c.portal.store import IStore, hashToken

CALLBACK = "http://i.localhost:8080/.dit4c/callback"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest_twisted.ensureDeferred
async def test_a_code_keeps_only_the_hash_of_its_session(store: IStore, tableRows: Any) -> None:
    alice = await store.createUser("alice")
    image = await store.createImage("Jupyter", "quay.io/jupyter/base-notebook:latest")
    instance = await store.createInstance(alice.id, image.id)
    session = await store.createSession(alice.id, 3600)
    record, code = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60, session=session.id)
    assert record.session_hash == hashToken(session.id)
    [row] = await tableRows(store, "oauth_codes")
    assert session.id not in row and hashToken(session.id) in row
    redeemed = await store.redeemOAuthCode(code)
    assert redeemed is not None and redeemed.session_hash == hashToken(session.id)
    # A code made without a session says so.
    _, other = await store.createOAuthCode(instance.id, CALLBACK, alice.id, CHALLENGE, 60)
    assert (await store.redeemOAuthCode(other)).session_hash is None  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_session_lives_until_deleted_expired_or_its_person_disabled(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    first = await store.createSession(alice.id, 3600)
    second = await store.createSession(alice.id, 60)
    bobs = await store.createSession(bob.id, 3600)
    for session in (first, second, bobs):
        assert await store.sessionLive(hashToken(session.id))
    # The secret itself is not its hash: nothing is found by it.
    assert not await store.sessionLive(first.id)
    assert not await store.sessionLive("0" * 64)

    await store.deleteSession(first.id)
    assert not await store.sessionLive(hashToken(first.id))
    clock.advance(61)
    assert not await store.sessionLive(hashToken(second.id))
    await store.updateUser(bob.id, disabled=True)
    assert not await store.sessionLive(hashToken(bobs.id))
