"""The instance pages: start a tool, act on it, share it, with clear refusals."""

from __future__ import annotations

import pytest_twisted
from portal_client import Browser, csrfOf, logIn

from dit4c.portal.app import Portal


@pytest_twisted.ensureDeferred
async def test_start_act_and_share_from_the_page(api: Portal) -> None:
    alice = Browser(api)
    await logIn(alice)
    _, page = await alice.get("/")
    assert "You have no instances yet" in page and "Tool" in page
    response, _ = await alice.post("/instances", {"csrf": csrfOf(page), "image": api.image.id})  # type: ignore[attr-defined]
    assert response.code == 303
    [instance] = await api.store.listInstancesOf((await api.store.userByName("alice")).id)
    _, page = await alice.get("/")
    assert f'data-instance="{instance.id}"' in page and 'data-state="requested"' in page

    response, _ = await alice.post(f"/instances/{instance.id}/share", {"csrf": csrfOf(page), "user": "bob"})
    assert response.code == 303
    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    _, bobsPage = await bob.get("/")
    assert "Shared with you" in bobsPage and instance.id in bobsPage

    response, page = await alice.post(f"/instances/{instance.id}/discard", {"csrf": csrfOf(page)})
    assert response.code == 409 and "Cannot discard an instance that is requested" in page
    response, _ = await alice.post(f"/instances/{instance.id}/stop", {"csrf": csrfOf(page)})
    assert response.code == 303
    assert (await api.store.instanceById(instance.id)).state == "stopping"
    # Someone else's instance cannot be touched, even knowing its id.
    response, page = await bob.post(f"/instances/{instance.id}/stop", {"csrf": csrfOf(bobsPage)})
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_quota_refusal_says_why(api: Portal) -> None:
    alice = Browser(api)
    await logIn(alice)
    for _ in range(2):
        _, page = await alice.get("/")
        await alice.post("/instances", {"csrf": csrfOf(page), "image": api.image.id})  # type: ignore[attr-defined]
    _, page = await alice.get("/")
    response, page = await alice.post("/instances", {"csrf": csrfOf(page), "image": api.image.id})  # type: ignore[attr-defined]
    assert response.code == 409
    assert "You may run 2 instances at once and have 2" in page


@pytest_twisted.ensureDeferred
async def test_forms_without_csrf_do_nothing(api: Portal) -> None:
    alice = Browser(api)
    await logIn(alice)
    response, _ = await alice.post("/instances", {"csrf": "forged", "image": api.image.id})  # type: ignore[attr-defined]
    assert response.code == 400
    assert await api.store.listInstancesOf((await api.store.userByName("alice")).id) == []




@pytest_twisted.ensureDeferred
async def test_changes_stream_to_the_page_as_server_sent_events(api: Portal) -> None:
    from support.sockets import RawClient
    from support.waiting import eventually
    from test_event_streams import received
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    alice = Browser(api)
    await logIn(alice)
    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    stream = RawClient()
    port = int(api.testURL.rsplit(":", 1)[1])  # type: ignore[attr-defined]
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), stream)
    cookie = alice._headers()["Cookie"]
    stream.transport.write(f"GET /events HTTP/1.1\r\nHost: portal\r\nCookie: {cookie}\r\n\r\n".encode())
    await eventually(lambda: b"watching" in stream.received, what=lambda: repr(bytes(stream.received)))
    assert b"content-type: text/event-stream" in bytes(stream.received).lower()

    _, page = await alice.get("/")
    await alice.post("/instances", {"csrf": csrfOf(page), "image": api.image.id})  # type: ignore[attr-defined]
    [instance] = await api.store.listInstancesOf((await api.store.userByName("alice")).id)
    # Someone else's instance never reaches alice's stream.
    _, bobsPage = await bob.get("/")
    await bob.post("/instances", {"csrf": csrfOf(bobsPage), "image": api.image.id})  # type: ignore[attr-defined]
    await alice.post(f"/instances/{instance.id}/stop", {"csrf": csrfOf(page)})
    # Alice's stop is published after bob's start: bob's would have come before it.
    await eventually(lambda: stream.received.count(b"event: instance") >= 2, what=lambda: repr(bytes(stream.received)))
    assert [(e["id"], e["state"]) for e in received(stream)] == [(instance.id, "requested"), (instance.id, "stopping")]

    # When the page goes away, so does its subscription.
    assert api.events.subscribers == 1
    stream.transport.loseConnection()
    await stream.done
    await eventually(lambda: api.events.subscribers == 0, what="the stream's subscription ended")


@pytest_twisted.ensureDeferred
async def test_share_links_from_the_page(api: Portal) -> None:
    import re

    alice = Browser(api)
    await logIn(alice)
    _, page = await alice.get("/")
    await alice.post("/instances", {"csrf": csrfOf(page), "image": api.image.id})  # type: ignore[attr-defined]
    [instance] = await api.store.listInstancesOf((await api.store.userByName("alice")).id)
    _, page = await alice.get("/")
    response, page = await alice.post(f"/instances/{instance.id}/link", {"csrf": csrfOf(page)})
    assert response.code == 200
    url = re.search(r'<code id="new-link">([^<]+)</code>', page).group(1)  # type: ignore[union-attr]
    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    await bob.get(url[len("http://portal.test"):])
    bobsID = (await api.store.userByName("bob")).id
    assert await api.store.mayUseInstance(bobsID, instance.id)
    link = re.search(r'name="link" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    response, _ = await alice.post(f"/instances/{instance.id}/revoke-link", {"csrf": csrfOf(page), "link": link})
    assert response.code == 303
    assert not await api.store.mayUseInstance(bobsID, instance.id)


@pytest_twisted.ensureDeferred
async def test_saved_images_are_shared_and_deleted_from_the_page(api: Portal) -> None:
    store = api.store
    alice = await store.userByName("alice")
    saved = await store.createImage("My work", "http://images.test/images/sha256:" + "a" * 64,
                                    owner_id=alice.id, digest="sha256:" + "a" * 64)  # fmt: skip
    browser = Browser(api)
    await logIn(browser)
    _, page = await browser.get("/")
    assert f'data-image="{saved.id}"' in page

    # CSRF first: a forged form changes nothing.
    response, _ = await browser.post(f"/images/{saved.id}/delete", {"csrf": "forged"})
    assert response.code == 400 and not (await store.imageById(saved.id)).deleted

    response, _ = await browser.post(f"/images/{saved.id}/share", {"csrf": csrfOf(page), "user": "bob"})
    assert response.code == 303
    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    _, bobsPage = await bob.get("/")
    assert "My work" in bobsPage and f'data-image="{saved.id}"' not in bobsPage  # his to use, not to manage
    response, refusal = await bob.post(f"/images/{saved.id}/delete", {"csrf": csrfOf(bobsPage)})
    assert response.code == 404 and "no such saved image of yours" in refusal
    assert not (await store.imageById(saved.id)).deleted

    response, _ = await browser.post(f"/images/{saved.id}/delete", {"csrf": csrfOf(page)})
    assert response.code == 303 and (await store.imageById(saved.id)).deleted
    _, bobsPage = await bob.get("/")
    assert "My work" not in bobsPage


@pytest_twisted.ensureDeferred
async def test_an_instance_page_is_its_owners_and_its_forms_come_back_to_it(api: Portal) -> None:
    """
    The page of an instance: its owner's alone (anyone else, knowing the
    id, is told there is no such instance); logged out, a login first;
    every form on it answers with a redirect back to it (a reload sends
    nothing again), or the page with the refusal.
    """
    alice = Browser(api)
    await logIn(alice)
    _, page = await alice.get("/")
    await alice.post("/instances", {"csrf": csrfOf(page), "image": api.image.id})  # type: ignore[attr-defined]
    [instance] = await api.store.listInstancesOf((await api.store.userByName("alice")).id)
    where = f"/instances/{instance.id}"

    response, page = await alice.get(where)
    assert response.code == 200 and 'id="no-access"' in page and 'id="no-links"' in page
    response, _ = await alice.post(f"{where}/share", {"csrf": csrfOf(page), "user": "bob", "from": "instance"})
    assert response.code == 303 and response.headers.getRawHeaders("location") == [where]
    response, page = await alice.post(f"{where}/share", {"csrf": csrfOf(page), "user": "nobody", "from": "instance"})
    assert response.code == 404 and "There is nobody called" in page and 'data-person="bob"' in page
    response, page = await alice.post(f"{where}/unshare", {"csrf": "forged", "user": "bob", "from": "instance"})
    assert response.code == 400 and 'data-person="bob"' in page
    response, _ = await alice.post(f"{where}/stop", {"csrf": csrfOf(page), "from": "instance"})
    assert response.code == 303 and response.headers.getRawHeaders("location") == [where]
    # From the home page, an action's refusal is shown on the home page.
    response, page = await alice.post(f"{where}/discard", {"csrf": csrfOf(page)})
    assert response.code == 409 and "<h1>Your instances</h1>" in page

    bob = Browser(api)
    await logIn(bob, "bob", "bobs password!")
    response, page = await bob.get(where)
    assert response.code == 404 and "no such instance" in page.lower()
    response, _ = await Browser(api).get(where)
    assert response.code == 303
    assert response.headers.getRawHeaders("location") == [f"/login?next={where}"]
