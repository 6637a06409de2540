"""
The pages' event streams (``GET /events``) over real sockets, with the
portal's store on SQLite and its clock a test clock: each event is checked
when it is sent against what the person may see then, a stream ends with
its portal session (logout, a disabled person, expiry), and a person holds
at most ``STREAMS_PER_PERSON`` of them, the oldest closed to make room.

Instance changes are published as the scheduler channel publishes them
(``portal.events.publish`` of the instance the store now holds); access
ends the way people end it, through the pages and the API.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from portal_client import Browser, Client, logIn, submit, tokenFor
from support.sockets import RawClient
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from dit4c.common.life import State
from dit4c.portal import security
from dit4c.portal.app import Portal
from dit4c.portal.store.errors import StoreClosed
from dit4c.portal.streams import STREAM_KEEPALIVE, STREAM_RETRY_REPLACED, STREAMS_PER_PERSON

END = b"\r\n0\r\n\r\n"


async def openStream(portal: Portal, browser: Browser) -> RawClient:
    stream = RawClient()
    port = int(portal.testURL.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stream)
    cookie = browser._headers()["Cookie"]
    stream.transport.write(f"GET /events HTTP/1.1\r\nHost: portal\r\nCookie: {cookie}\r\n\r\n".encode())
    await until(lambda: b"watching" in stream.received, stream)
    return stream


def received(stream: RawClient, event: bytes = b"instance") -> list[dict[str, Any]]:
    """The bodies of the stream's events named ``event`` (changes as they happen), in order."""
    found = []
    for block in bytes(stream.received).split(b"\n\n"):
        lines = block.split(b"\n")
        if b"event: " + event in lines:
            found += [json.loads(line[len(b"data: ") :]) for line in lines if line.startswith(b"data: ")]
    return found


def ended(stream: RawClient) -> bool:
    return stream.received.endswith(END) or stream.done.called


async def until(condition: Any, stream: RawClient) -> None:
    await eventually(condition, what=lambda: repr(bytes(stream.received[-400:])))


def heard(stream: RawClient) -> list[tuple[str, str]]:
    """(id, state) of the stream's changes, in order."""
    return [(e["id"], e["state"]) for e in received(stream)]


async def roundTrip(stream: RawClient) -> None:
    """
    Once the stream has ended: a request on its connection (kept alive),
    answered. What the portal wrote on that connection before the answer
    has come.
    """
    answered = len(stream.received)
    stream.transport.write(b"GET /events HTTP/1.1\r\nHost: portal\r\n\r\n")
    await until(lambda: b"\r\n\r\n" in stream.received[answered:] and b"HTTP/1.1 " in stream.received[answered:], stream)


async def changed(portal: Portal, instance: Any, state: State) -> Any:
    """A new state for ``instance``, as the scheduler channel would report it."""
    updated = await portal.store.updateInstance(instance.id, state=state)
    portal.events.publish(updated)
    return updated


async def bobTwice(portal: Portal) -> tuple[Browser, Browser, Any]:
    """Bob logged in in two browsers (two portal sessions), and his user."""
    _, bob, _, bobUser = await people(portal)
    laptop = Browser(portal)
    await logIn(laptop, "bob", "bobs password!")
    return bob, laptop, bobUser


async def people(portal: Portal) -> tuple[Browser, Browser, Any, Any]:
    alice, bob = Browser(portal), Browser(portal)
    await logIn(alice)
    await logIn(bob, "bob", "bobs password!")
    return alice, bob, await portal.store.userByName("alice"), await portal.store.userByName("bob")


@pytest_twisted.ensureDeferred
async def test_an_instance_is_streamed_only_while_it_may_be_seen(api: Portal) -> None:
    alice, bob, aliceUser, bobUser = await people(api)
    image = api.image  # type: ignore[attr-defined]
    shared = await api.store.createInstance(aliceUser.id, image.id)
    private = await api.store.createInstance(aliceUser.id, image.id)
    bobs = await api.store.createInstance(bobUser.id, image.id)
    await submit(alice, f"/instances/{shared.id}/share", user="bob")
    stream = await openStream(api, bob)

    await changed(api, shared, State.RUNNING)
    await changed(api, private, State.RUNNING)  # alice's, never shared: never bob's
    await changed(api, bobs, State.RUNNING)
    await until(lambda: len(received(stream)) == 2, stream)
    assert [(e["id"], e["state"]) for e in received(stream)] == [(shared.id, "running"), (bobs.id, "running")]

    await submit(alice, f"/instances/{shared.id}/unshare", user="bob")
    await changed(api, shared, State.STOPPING)
    await changed(api, bobs, State.STOPPING)
    # Bob's own change is sent after the check of the shared one before it.
    await until(lambda: (bobs.id, "stopping") in heard(stream), stream)
    assert heard(stream) == [(shared.id, "running"), (bobs.id, "running"), (bobs.id, "stopping")]

    # Shared again while the stream is open: it is seen again.
    await submit(alice, f"/instances/{shared.id}/share", user="bob")
    await changed(api, shared, State.STOPPED)
    await until(lambda: len(received(stream)) == 4, stream)
    assert received(stream)[-1]["id"] == shared.id
    assert not ended(stream)
    stream.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_stream_starts_with_where_every_visible_instance_stands(api: Portal) -> None:
    """
    A change between the page's load and its stream's start (or while the
    browser reconnects) is not lost: the stream starts with a snapshot of
    the person's own and shared instances as they stand, before any change
    heard after it; nobody else's, and nothing discarded.
    """
    alice, bob, aliceUser, bobUser = await people(api)
    image = api.image  # type: ignore[attr-defined]
    shared = await api.store.createInstance(aliceUser.id, image.id)
    await api.store.createInstance(aliceUser.id, image.id)  # alice's, never shared
    bobs = await api.store.createInstance(bobUser.id, image.id)
    gone = await api.store.createInstance(bobUser.id, image.id)
    await api.store.shareInstance(shared.id, bobUser.id)
    # Changed with nobody told (as if between a page load and its stream).
    await api.store.updateInstance(bobs.id, state=State.ERRORED, reason="The tool exited with status 1.")
    await api.store.updateInstance(gone.id, state=State.DISCARDED)
    stream = await openStream(api, bob)
    await until(lambda: len(received(stream, b"snapshot")) == 2, stream)
    assert {(e["id"], e["state"], e["reason"]) for e in received(stream, b"snapshot")} == {
        (shared.id, shared.state, None),
        (bobs.id, "errored", "The tool exited with status 1."),
    }
    # And which stand at all: the discarded one is known gone.
    await until(lambda: received(stream, b"snapshot-end"), stream)
    [end] = received(stream, b"snapshot-end")
    assert sorted(end["ids"]) == sorted([shared.id, bobs.id])
    # Then the changes, as they happen.
    await changed(api, bobs, State.DISCARDED)
    await until(lambda: len(received(stream)) == 1, stream)
    text = bytes(stream.received)
    assert text.rindex(b"event: snapshot") < text.index(b"event: instance")
    assert [(e["id"], e["state"]) for e in received(stream)] == [(bobs.id, "discarded")]
    stream.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_shared_instances_change_while_the_snapshot_is_read_is_not_lost(api: Portal, monkeypatch: Any) -> None:
    """
    The snapshot reads what is shared with the person; a change committed
    and published while that read is under way (the read saw it or not) is
    still sent after the snapshot, checked as every shared event is.
    """
    _, bob, aliceUser, bobUser = await people(api)
    shared = await api.store.createInstance(aliceUser.id, api.image.id)  # type: ignore[attr-defined]
    await api.store.shareInstance(shared.id, bobUser.id)
    read: Deferred[None] = Deferred()
    gate: Deferred[None] = Deferred()
    reading = api.store.listInstancesSharedWith

    async def slowRead(user: str) -> Any:
        found = await reading(user)
        read.callback(None)
        await gate
        return found

    monkeypatch.setattr(api.store, "listInstancesSharedWith", slowRead)
    stream = await openStream(api, bob)
    await read  # the snapshot has read what is shared: before the change below
    await changed(api, shared, State.RUNNING)
    gate.callback(None)
    await until(lambda: len(received(stream)) == 1, stream)
    assert [(e["id"], e["state"]) for e in received(stream, b"snapshot")] == [(shared.id, "requested")]
    assert [(e["id"], e["state"]) for e in received(stream)] == [(shared.id, "running")]
    stream.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_each_event_is_checked_when_it_is_sent(api: Portal) -> None:
    """An unshare this process never heard of (made through another portal process) still holds."""
    alice, bob, aliceUser, bobUser = await people(api)
    shared = await api.store.createInstance(aliceUser.id, api.image.id)  # type: ignore[attr-defined]
    bobs = await api.store.createInstance(bobUser.id, api.image.id)  # type: ignore[attr-defined]
    await api.store.shareInstance(shared.id, bobUser.id)
    stream = await openStream(api, bob)
    await changed(api, shared, State.RUNNING)
    await until(lambda: len(received(stream)) == 1, stream)

    await api.store.unshareInstance(shared.id, bobUser.id)  # no event published
    await changed(api, shared, State.STOPPING)
    await changed(api, bobs, State.RUNNING)
    # Bob's own change is sent after the check of the shared one before it.
    await until(lambda: (bobs.id, "running") in heard(stream), stream)
    assert heard(stream) == [(shared.id, "running"), (bobs.id, "running")]
    stream.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_logout_ends_that_sessions_streams_only(api: Portal) -> None:
    bob, laptop, bobUser = await bobTwice(api)
    bobs = await api.store.createInstance(bobUser.id, api.image.id)  # type: ignore[attr-defined]
    here, there = await openStream(api, bob), await openStream(api, laptop)

    await submit(bob, "/logout")
    await until(lambda: ended(here), here)
    await changed(api, bobs, State.RUNNING)
    await until(lambda: len(received(there)) == 1, there)
    assert not ended(there) and received(here) == []
    # Logged out: a new stream is refused.
    response, _ = await bob.get("/events")
    assert response.code == 401
    there.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_session_ended_where_this_process_did_not_hear_ends_the_stream_at_the_next_keepalive(api: Portal) -> None:
    """A logout through another portal process: this one finds out at the stream's next keepalive (15 s)."""
    _, bob, _, bobUser = await people(api)
    bobs = await api.store.createInstance(bobUser.id, api.image.id)  # type: ignore[attr-defined]
    stream = await openStream(api, bob)
    await api.store.deleteSession(bob.cookies[security.SESSION_COOKIE.decode()])
    api.clock.advance(STREAM_KEEPALIVE)
    await until(lambda: ended(stream), stream)
    await changed(api, bobs, State.RUNNING)
    await roundTrip(stream)
    assert received(stream) == []


@pytest_twisted.ensureDeferred
async def test_a_disabled_person_loses_every_stream(api: Portal) -> None:
    bob, laptop, bobUser = await bobTwice(api)
    here, there = await openStream(api, bob), await openStream(api, laptop)
    root = Client(api, await tokenFor(api, "root", "root password!"))
    status, _ = await root.call("PATCH", f"/admin/users/{bobUser.id}", {"disabled": True})
    assert status == 200
    await until(lambda: ended(here), here)
    await until(lambda: ended(there), there)
    assert api.streams.open(bobUser.id) == 0


@pytest_twisted.ensureDeferred
async def test_a_stream_ends_when_its_session_expires(api: Portal) -> None:
    _, bob, _, bobUser = await people(api)
    bobs = await api.store.createInstance(bobUser.id, api.image.id)  # type: ignore[attr-defined]
    stream = await openStream(api, bob)
    api.clock.advance(api.config.sessionLifetime - 1)
    # Still served a second before: a change comes (a closed stream sends none).
    await changed(api, bobs, State.RUNNING)
    await until(lambda: heard(stream) == [(bobs.id, "running")], stream)
    assert not ended(stream)
    api.clock.advance(1)
    await until(lambda: ended(stream), stream)
    assert api.streams.open(bobUser.id) == 0


@pytest_twisted.ensureDeferred
async def test_at_most_so_many_streams_per_person_the_oldest_closed(api: Portal) -> None:
    alice, bob, aliceUser, bobUser = await people(api)
    streams = [await openStream(api, bob) for _ in range(STREAMS_PER_PERSON)]
    assert api.streams.open(bobUser.id) == STREAMS_PER_PERSON
    aliceStream = await openStream(api, alice)

    newest = await openStream(api, bob)
    oldest = streams.pop(0)
    await until(lambda: ended(oldest), oldest)
    # Told to wait a minute before coming back, so that tabs over the cap do not cycle.
    assert b"retry: %d\n" % STREAM_RETRY_REPLACED in bytes(oldest.received)
    assert api.streams.open(bobUser.id) == STREAMS_PER_PERSON
    assert not any(ended(s) for s in [*streams, newest, aliceStream])
    # Another person's streams are not counted with bob's.
    assert api.streams.open(aliceUser.id) == 1

    bobs = await api.store.createInstance(bobUser.id, api.image.id)  # type: ignore[attr-defined]
    await changed(api, bobs, State.RUNNING)
    for stream in [*streams, newest]:
        await until(lambda s=stream: len(received(s)) == 1, stream)  # type: ignore[misc]
    for stream in [*streams, newest, aliceStream]:
        stream.transport.loseConnection()
    await eventually(
        lambda: api.streams.open(bobUser.id) == 0 and api.events.subscribers == 0,
        what=lambda: f"no stream left: {api.streams.open(bobUser.id)} open, {api.events.subscribers} subscribers",
    )


@pytest_twisted.ensureDeferred
async def test_a_stopping_portal_ends_its_streams_without_an_error_from_their_checks(
    api: Portal, monkeypatch: Any
) -> None:
    """
    The portal stops while a stream's snapshot is being read: the stream
    ends, and the read that fails as the store closes is no error (this
    test fails if one is logged).
    """
    _, bob, _, _ = await people(api)
    reading: Deferred[None] = Deferred()
    closing: Deferred[None] = Deferred()

    async def closedUnderIt(user: str) -> Any:
        reading.callback(None)
        await closing
        raise StoreClosed()

    monkeypatch.setattr(api.store, "listInstancesOf", closedUnderIt)
    stream = await openStream(api, bob)
    await reading
    api.streams.closeAll("the portal is stopping")
    closing.callback(None)
    await until(lambda: ended(stream), stream)
    assert api.streams.open((await api.store.userByName("bob")).id) == 0


@pytest_twisted.ensureDeferred
async def test_a_store_closed_before_the_streams_are_told_ends_a_stream_without_an_error(
    api: Portal, monkeypatch: Any
) -> None:
    """
    A stream whose snapshot finds the store already closed (it began as the
    portal stopped, before the streams were closed) ends quietly: the
    portal is stopping, which is no error (this test fails if one is logged).
    """
    _, bob, _, _ = await people(api)

    async def closed(user: str) -> Any:
        raise StoreClosed()

    monkeypatch.setattr(api.store, "listInstancesOf", closed)
    stream = await openStream(api, bob)
    await until(lambda: ended(stream), stream)
    bobId = (await api.store.userByName("bob")).id
    await eventually(lambda: api.streams.open(bobId) == 0, what="bob's stream let go")
