"""Users, external identities, sessions, API tokens and failed logins."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from dit4c.portal.store import Conflict, IStore, NotFound, StoreError, User, hashToken
from dit4c.portal.store.errors import InvalidName

# -- users --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_createUser(store: IStore, clock: Clock) -> None:
    user = await store.createUser(
        "Alice", email="alice@example.org", password_hash="$argon2id$x", max_instances=3
    )
    assert user == User(
        id=user.id,
        name="alice",
        email="alice@example.org",
        password_hash="$argon2id$x",
        display_name="alice",
        is_admin=False,
        max_instances=3,
        created=clock.seconds(),
        disabled=False,
    )
    assert await store.userById(user.id) == user
    assert await store.userByName("alice") == user
    assert await store.userByName("ALICE") == user
    assert await store.userById("nobody") is None
    assert await store.userByName("bob") is None


@pytest_twisted.ensureDeferred
async def test_userNameUnique(store: IStore) -> None:
    await store.createUser("alice")
    with pytest.raises(Conflict, match="'alice' is taken"):
        await store.createUser("ALICE")
    bob = await store.createUser("bob", display_name="Bob B.", is_admin=True)
    assert bob.display_name == "Bob B." and bob.is_admin
    with pytest.raises(Conflict, match="is taken"):
        await store.updateUser(bob.id, name="alice")


@pytest.mark.parametrize(
    "name", ["  ", "a" * 33, "<script>", "al ice", "-alice", "alice.", "ålice", "a/b", "a" * 200_000]
)
@pytest_twisted.ensureDeferred
async def test_a_name_that_is_no_login_name_is_refused(store: IStore, name: str) -> None:
    """1 to 32 of a-z, 0-9, '.', '_', '-', a letter or digit at each end: anything else is refused, as a store error."""
    with pytest.raises(InvalidName, match="not a login name"):
        await store.createUser(name)
    user = await store.createUser("alice")
    with pytest.raises(InvalidName):
        await store.updateUser(user.id, name=name)
    assert await store.listUsers(0, 10) == [user]


@pytest.mark.parametrize("name", ["a", "a" * 32, "j.smith", "jo_smith-2", "007"])
@pytest_twisted.ensureDeferred
async def test_login_names(store: IStore, name: str) -> None:
    assert (await store.createUser(name.upper())).name == name


@pytest_twisted.ensureDeferred
async def test_updateUser(store: IStore) -> None:
    user = await store.createUser("alice", email="a@example.org", max_instances=2)
    updated = await store.updateUser(user.id, email=None, is_admin=True, max_instances=None, disabled=True)
    assert updated == User(
        **{**user.__dict__, "email": None, "is_admin": True, "max_instances": None, "disabled": True}
    )
    assert await store.userById(user.id) == updated
    # Nothing given: nothing changes.
    assert await store.updateUser(user.id) == updated
    renamed = await store.updateUser(user.id, name="Alicia", display_name="Alicia A.", password_hash="h")
    assert (renamed.name, renamed.display_name, renamed.password_hash) == ("alicia", "Alicia A.", "h")
    with pytest.raises(NotFound):
        await store.updateUser("nobody", is_admin=True)
    with pytest.raises(NotFound):
        await store.updateUser("nobody")


@pytest_twisted.ensureDeferred
async def test_listUsers(store: IStore) -> None:
    for name in ["dave", "alice", "carol", "bob", "eve"]:
        await store.createUser(name)
    assert await store.countUsers() == 5
    assert [u.name for u in await store.listUsers()] == ["alice", "bob", "carol", "dave", "eve"]
    assert [u.name for u in await store.listUsers(offset=1, limit=2)] == ["bob", "carol"]
    assert [u.name for u in await store.listUsers(offset=4, limit=10)] == ["eve"]
    assert await store.listUsers(offset=5) == []
    with pytest.raises(ValueError):
        await store.listUsers(offset=-1)


@pytest_twisted.ensureDeferred
async def test_identities(store: IStore) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    identity = await store.linkIdentity(alice.id, "github", "12345")
    assert (identity.provider, identity.subject, identity.user_id) == ("github", "12345", alice.id)
    await store.linkIdentity(alice.id, "oidc:uni", "alice@uni")
    assert await store.userByIdentity("github", "12345") == alice
    assert await store.userByIdentity("github", "54321") is None
    assert await store.userByIdentity("gitlab", "12345") is None
    with pytest.raises(Conflict, match="github login is linked"):
        await store.linkIdentity(bob.id, "github", "12345")
    with pytest.raises(NotFound, match="no user"):
        await store.linkIdentity("nobody", "github", "999")
    assert [i.provider for i in await store.identitiesOf(alice.id)] == ["github", "oidc:uni"]
    assert await store.identitiesOf(bob.id) == []


# -- sessions --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_session(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    session = await store.createSession(alice.id, 3600)
    assert session.user_id == alice.id
    assert session.expires == clock.seconds() + 3600
    assert len(session.id) >= 43 and len(session.csrf) >= 43 and session.id != session.csrf
    assert await store.sessionByToken(session.id) == session
    assert await store.sessionByToken(session.id + "x") is None
    assert await store.sessionByToken("") is None
    other = await store.createSession(alice.id, 3600)
    assert other.id != session.id
    with pytest.raises(NotFound, match="no user"):
        await store.createSession("nobody", 3600)


@pytest_twisted.ensureDeferred
async def test_sessionStoredHashed(store: IStore, tableRows: Any) -> None:
    alice = await store.createUser("alice")
    session = await store.createSession(alice.id, 3600)
    rows = await tableRows(store, "sessions")
    assert len(rows) == 1
    assert session.id not in repr(rows)
    assert hashToken(session.id) in rows[0]


@pytest_twisted.ensureDeferred
async def test_sessionExpires(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    session = await store.createSession(alice.id, 60)
    clock.advance(59.9)
    assert await store.sessionByToken(session.id) is not None
    clock.advance(0.1)
    assert await store.sessionByToken(session.id) is None
    assert await store.deleteExpiredSessions() == 1
    assert await store.deleteExpiredSessions() == 0


@pytest_twisted.ensureDeferred
async def test_touchSession(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    session = await store.createSession(alice.id, 60)
    clock.advance(30)
    await store.touchSession(session.id)
    touched = await store.sessionByToken(session.id)
    assert touched is not None
    assert (touched.last_seen, touched.expires) == (clock.seconds(), session.expires)
    await store.touchSession(session.id, expires=clock.seconds() + 60)
    clock.advance(45)
    extended = await store.sessionByToken(session.id)
    assert extended is not None and extended.expires == clock.seconds() + 15
    await store.touchSession("no such session")


@pytest_twisted.ensureDeferred
async def test_sessionOfDisabledUser(store: IStore) -> None:
    alice = await store.createUser("alice")
    session = await store.createSession(alice.id, 3600)
    await store.updateUser(alice.id, disabled=True)
    assert await store.sessionByToken(session.id) is None
    await store.updateUser(alice.id, disabled=False)
    assert await store.sessionByToken(session.id) == session


@pytest_twisted.ensureDeferred
async def test_deleteSessions(store: IStore) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    a1 = await store.createSession(alice.id, 3600)
    a2 = await store.createSession(alice.id, 3600)
    a3 = await store.createSession(alice.id, 3600)
    b1 = await store.createSession(bob.id, 3600)
    await store.deleteSession(a1.id)
    await store.deleteSession(a1.id)
    assert await store.sessionByToken(a1.id) is None
    assert await store.sessionByToken(a2.id) == a2
    # Everywhere but here (a password changed in a2).
    assert await store.deleteSessionsOfUser(alice.id, keep=a2.id) == 1
    assert await store.sessionByToken(a3.id) is None
    assert await store.sessionByToken(a2.id) == a2
    assert await store.deleteSessionsOfUser(alice.id) == 1
    assert await store.sessionByToken(a2.id) is None
    assert await store.sessionByToken(b1.id) == b1


# -- API tokens ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_apiToken(store: IStore, clock: Clock, tableRows: Any) -> None:
    alice = await store.createUser("alice")
    record, token = await store.createApiToken(alice.id, "laptop")
    assert token.startswith("dit4c_") and len(token) > 40
    assert (record.user_id, record.name, record.revoked, record.last_used) == (alice.id, "laptop", False, None)
    assert record.token_hash == hashToken(token)
    rows = await tableRows(store, "api_tokens")
    assert token not in repr(rows)
    clock.advance(10)
    assert await store.userByApiToken(token) == alice
    assert await store.userByApiToken(token + "x") is None
    [listed] = await store.listApiTokens(alice.id)
    assert listed.last_used == clock.seconds()
    assert listed.id == record.id
    with pytest.raises(NotFound, match="no user"):
        await store.createApiToken("nobody", "x")


@pytest_twisted.ensureDeferred
async def test_revokeApiToken(store: IStore, clock: Clock) -> None:
    alice = await store.createUser("alice")
    bob = await store.createUser("bob")
    r1, t1 = await store.createApiToken(alice.id, "one")
    clock.advance(1)
    r2, t2 = await store.createApiToken(alice.id, "two")
    with pytest.raises(NotFound):
        await store.revokeApiToken(r1.id, user_id=bob.id)
    assert await store.userByApiToken(t1) == alice
    await store.revokeApiToken(r1.id, user_id=alice.id)
    assert await store.userByApiToken(t1) is None
    assert await store.userByApiToken(t2) == alice
    await store.revokeApiToken(r2.id)
    assert await store.userByApiToken(t2) is None
    assert [(t.name, t.revoked) for t in await store.listApiTokens(alice.id)] == [("one", True), ("two", True)]
    assert await store.listApiTokens(bob.id) == []
    with pytest.raises(NotFound):
        await store.revokeApiToken("no such token")


@pytest_twisted.ensureDeferred
async def test_apiTokenOfDisabledUser(store: IStore) -> None:
    alice = await store.createUser("alice")
    _, token = await store.createApiToken(alice.id, "ci")
    await store.updateUser(alice.id, disabled=True)
    assert await store.userByApiToken(token) is None


# -- failed logins ---------------------------------------------------------------------------------


def _after(free: int) -> Any:
    """``free`` failures back to back, then 10 s between attempts."""
    return lambda failures: 0.0 if failures < free else 10.0


@pytest_twisted.ensureDeferred
async def test_loginFailures(store: IStore) -> None:
    t = 1000.0
    both = {"addr": _after(5), "pair": _after(2)}
    assert [await store.claimLoginAttempt(both, t + i, 60) for i in range(2)] == [0, 0]
    assert (await store.loginFailures("pair")).failures == 2  # type: ignore[union-attr]
    # The pair's delay holds for both keys, and a refused attempt counts nothing.
    assert await store.claimLoginAttempt(both, t + 2, 60) == 9.0
    assert (await store.loginFailures("addr")).failures == 2  # type: ignore[union-attr]
    assert await store.claimLoginAttempt({"addr": _after(5)}, t + 2, 60) == 0
    assert await store.claimLoginAttempt(both, t + 11, 60) == 0
    assert (await store.loginFailures("addr")).failures == 4  # type: ignore[union-attr]
    # A success clears one key and takes its own failure back from the other.
    await store.loginSucceeded(clear=["pair"], takeBack=["addr"])
    assert await store.loginFailures("pair") is None
    assert (await store.loginFailures("addr")).failures == 3  # type: ignore[union-attr]
    # Failures are forgotten ``forget`` seconds after the latest attempt.
    assert await store.claimLoginAttempt(both, t + 71, 60) == 0
    assert (await store.loginFailures("addr")).failures == 1  # type: ignore[union-attr]
    assert await store.forgetLoginFailures(t + 71) == 0
    assert await store.forgetLoginFailures(t + 72) == 2
    assert await store.loginFailures("addr") is None
    await store.loginSucceeded(clear=["nobody"], takeBack=["nobody either"])


@pytest_twisted.ensureDeferred
async def test_loginFailuresConcurrent(storeURL: str) -> None:
    """
    Attempts from several portal processes at once are let through one by
    one: of 30 at the same moment with 4 free, 4 go ahead and 26 wait.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults

    from dit4c.portal.store import openStore

    stores = await gatherResults([openStore(storeURL, reactor, poolSize=3) for _ in range(3)])
    try:
        waits = await gatherResults(
            [s.claimLoginAttempt({"a": _after(4), "b": _after(6)}, 1000.0, 60) for s in stores for _ in range(10)]
        )
        assert sorted(waits) == [0.0] * 4 + [10.0] * 26
        assert (await stores[0].loginFailures("a")).failures == 4  # type: ignore[union-attr]
    finally:
        for s in stores:
            await s.close()


@pytest_twisted.ensureDeferred
async def test_storeErrorsAreStoreErrors(store: IStore) -> None:
    """Every failure the database reports is a StoreError, with its message."""
    assert issubclass(Conflict, StoreError) and issubclass(NotFound, StoreError)
    await store.createUser("alice")
    with pytest.raises(StoreError) as info:
        await store.createUser("alice")
    assert str(info.value) == "the login name 'alice' is taken"


# -- removing a person ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_disabled_person_whose_instances_are_discarded_is_removed(store: IStore) -> None:
    """
    Everything that gave them access goes with them; their saved images are
    no longer listed or shared, while another person's instance started
    from one keeps its record; their login name is free again.
    """
    dana = await store.createUser("dana", password_hash="$argon2id$x")
    erin = await store.createUser("erin")
    catalogue = await store.createImage("Notes", "notes")
    saved = await store.createImage("dana's work", "https://images.example/i/1", owner_id=dana.id)
    await store.shareImage(saved.id, erin.id)
    hers = await store.createInstance(dana.id, catalogue.id)
    shared = await store.createInstance(erin.id, saved.id)
    await store.shareInstance(shared.id, dana.id)
    await store.shareInstance(hers.id, erin.id)
    _, link = await store.createShareLink(hers.id)
    session = await store.createSession(dana.id, 3600)
    _, token = await store.createApiToken(dana.id, "laptop")
    await store.linkIdentity(dana.id, "github", "12345")

    # Refused while she may still log in, and while an instance of hers is not discarded.
    with pytest.raises(Conflict, match="disable"):
        await store.removeUser(dana.id)
    await store.updateUser(dana.id, disabled=True)
    with pytest.raises(Conflict, match="1 of their instances"):
        await store.removeUser(dana.id)
    assert await store.userById(dana.id) is not None

    await store.updateInstance(hers.id, state="discarded")
    removed = await store.removeUser(dana.id)
    assert (removed.instances, [i.id for i in removed.images]) == (1, [saved.id])
    assert await store.userById(dana.id) is None
    assert await store.userByIdentity("github", "12345") is None
    assert await store.sessionByToken(session.id) is None
    assert await store.userByApiToken(token) is None
    assert await store.instanceById(hers.id) is None
    assert await store.redeemShareLink(link, erin.id) is None
    assert await store.listImagesSharedWith(erin.id) == []
    assert [i.id for i in await store.listCatalogue()] == [catalogue.id]
    # Erin's instance, started from dana's saved image, is untouched (and no longer shared with anyone).
    assert (await store.instanceById(shared.id)).owner_id == erin.id  # type: ignore[union-attr]
    assert await store.listInstancesSharedWith(erin.id) == []
    # The name is free for someone new, who inherits nothing.
    again = await store.createUser("dana")
    assert again.id != dana.id and await store.listInstancesOf(again.id, includeDiscarded=True) == []

    with pytest.raises(NotFound):
        await store.removeUser(dana.id)
