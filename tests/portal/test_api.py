"""
The REST API over real HTTP: tokens, instances (quota, actions, sharing),
administration, JSON errors and the OpenAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest_twisted
import treq
from portal_client import Browser, Client, logIn, tokenFor
from support.waiting import eventually

from dit4c.portal.app import Portal


@pytest_twisted.ensureDeferred
async def test_tokens_authenticate_and_can_be_revoked(api: Portal) -> None:
    token = await tokenFor(api, "alice", "correct horse battery")
    alice = Client(api, token)
    code, me = await alice.call("GET", "/me")
    assert code == 200 and me["name"] == "alice"
    code, tokens = await alice.call("GET", "/tokens")
    assert [t["name"] for t in tokens] == ["laptop"] and "token" not in tokens[0]
    code, _ = await alice.call("DELETE", f"/tokens/{tokens[0]['id']}")
    assert code == 200
    code, error = await alice.call("GET", "/me")
    assert code == 401 and error["error"] == "unauthenticated"
    code, error = await Client(api, "dit4c_forged").call("GET", "/me")
    assert code == 401


@pytest_twisted.ensureDeferred
async def test_a_session_cookie_needs_the_csrf_header_to_change_things(api: Portal) -> None:
    browser = Browser(api)
    await logIn(browser)
    response = await treq.post(
        api.testURL + "/api/v1/tokens",  # type: ignore[attr-defined]
        data=b'{"name": "x"}',
        headers=browser._headers(),
    )
    assert response.code == 403 and (await response.json())["error"] == "csrf"
    response = await treq.get(api.testURL + "/api/v1/me", headers=browser._headers())  # type: ignore[attr-defined]
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_start_stop_save_discard_with_quota(api: Portal) -> None:
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    image = api.image.id  # type: ignore[attr-defined]
    code, first = await alice.call("POST", "/instances", {"image": image})
    assert code == 201 and first["state"] == "requested"
    code, second = await alice.call("POST", "/instances", {"image": image})
    assert code == 201
    code, error = await alice.call("POST", "/instances", {"image": image})
    assert code == 409 and error["error"] == "quota" and "2 instances" in error["reason"]
    sent = api.commands.sent  # type: ignore[attr-defined]
    assert [(op, i) for _, op, i, _ in sent] == [("start", first["id"]), ("start", second["id"])]
    assert sent[0][3] == {"image": "tool:latest", "port": 8888, "digest": None}

    code, stopped = await alice.call("POST", f"/instances/{first['id']}/stop")
    assert code == 200 and stopped["state"] == "stopping"
    code, error = await alice.call("POST", f"/instances/{first['id']}/save")
    assert code == 409 and error["error"] == "state"
    await api.store.updateInstance(first["id"], state="stopped")
    code, gone = await alice.call("POST", f"/instances/{first['id']}/discard")
    # Discarding, until its node says nothing of it is left.
    assert code == 200 and gone["state"] == "discarding"
    assert [op for _, op, _, _ in sent][2:] == ["stop", "discard"]
    code, again = await alice.call("POST", f"/instances/{first['id']}/discard")
    assert code == 409 and again["error"] == "state"
    # A stopped instance frees a place under the quota.
    code, _ = await alice.call("POST", "/instances", {"image": image})
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_the_life_is_published(api: Portal) -> None:
    from dit4c.common.life import toJSON

    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    code, life = await alice.call("GET", "/life")
    assert code == 200 and life == toJSON()
    code, document = await alice.call("GET", "/openapi.json")
    states = document["components"]["schemas"]["Instance"]["properties"]["state"]["enum"]
    assert code == 200 and states == life["states"] and "discarding" in states


@pytest_twisted.ensureDeferred
async def test_instances_are_private_unless_shared(api: Portal) -> None:
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    bob = Client(api, await tokenFor(api, "bob", "bobs password!"))
    _, instance = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    code, _ = await bob.call("GET", f"/instances/{instance['id']}")
    assert code == 404
    code, _ = await bob.call("POST", f"/instances/{instance['id']}/stop")
    assert code == 404
    code, shares = await alice.call("POST", f"/instances/{instance['id']}/shares", {"user": "bob"})
    assert code == 200 and [(g["name"], g["link"]) for g in shares["shared_with"]] == [("bob", None)]
    assert (await alice.call("GET", f"/instances/{instance['id']}/shares")) == (200, shares)
    # Who has access is the owner's to know.
    code, _ = await bob.call("GET", f"/instances/{instance['id']}/shares")
    assert code == 404
    code, seen = await bob.call("GET", f"/instances/{instance['id']}")
    assert code == 200
    code, listed = await bob.call("GET", "/instances")
    assert [(i["id"], i["shared"]) for i in listed] == [(instance["id"], True)]
    # Sharing does not make bob the owner.
    code, _ = await bob.call("POST", f"/instances/{instance['id']}/stop")
    assert code == 404
    await alice.call("DELETE", f"/instances/{instance['id']}/shares/bob")
    code, _ = await bob.call("GET", f"/instances/{instance['id']}")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_administration_through_the_api(api: Portal) -> None:
    root = Client(api, await tokenFor(api, "root", "root password!"))
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    code, error = await alice.call("GET", "/admin/users")
    assert code == 403
    code, carol = await root.call("POST", "/admin/users", {"name": "carol"})
    assert code == 201 and len(carol["password"]) >= 16
    code, changed = await root.call("PATCH", f"/admin/users/{carol['id']}", {"max_instances": 7})
    assert code == 200 and changed["max_instances"] == 7
    code, error = await root.call("PATCH", f"/admin/users/{carol['id']}", {"password_hash": "x"})
    assert code == 400
    code, image = await root.call("POST", "/admin/images", {"name": "R", "ref": "rstudio", "port": 8787})
    assert code == 201
    code, error = await root.call("POST", "/admin/schedulers", {"name": "x", "public_jwk": {"kty": "oct", "k": "c2VjcmV0"}})
    assert code == 400 and error["error"] == "bad_key"


@pytest_twisted.ensureDeferred
async def test_bad_requests_get_json_reasons(api: Portal) -> None:
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    response = await treq.post(
        api.testURL + "/api/v1/instances", data=b"{not json", headers=alice.headers  # type: ignore[attr-defined]
    )
    assert response.code == 400 and (await response.json())["error"] == "bad_json"
    response = await treq.post(
        api.testURL + "/api/v1/instances", data=b"x" * 70000, headers=alice.headers  # type: ignore[attr-defined]
    )
    assert response.code == 413
    code, error = await alice.call("POST", "/instances", {})
    assert code == 400 and "image" in error["reason"]
    code, error = await alice.call("POST", "/instances", {"image": "nope"})
    assert code == 404
    code, error = await alice.call("GET", "/no/such/thing")
    assert code == 404 and "reason" in error


@pytest_twisted.ensureDeferred
async def test_openapi_document_describes_the_routes(api: Portal) -> None:
    """
    The served document and the routes agree both ways: every documented
    operation is routed, and every route is documented (a route that takes
    several actions, once for each).
    """
    from werkzeug.exceptions import MethodNotAllowed, NotFound

    from dit4c.portal.api import API

    code, document = await Client(api, None).call("GET", "/openapi.json")
    assert code == 200 and document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": "http://portal.test/api/v1"}]
    routes = API.app.url_map.bind("portal.test")
    documented: set[tuple[str, str]] = set()
    for path, operations in document["paths"].items():
        concrete = re.sub(r"\{(\w+)\}", r"x\1", path)
        for method in operations:
            try:
                rule, _ = routes.match(concrete, method.upper(), return_rule=True)
            except (NotFound, MethodNotAllowed):
                raise AssertionError(f"{method.upper()} {path} is documented but not routed") from None
            documented.add((rule.rule, method.upper()))
    for rule in API.app.url_map.iter_rules():
        if rule.rule == "/openapi.json":
            continue
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                assert (rule.rule, method) in documented, f"{method} {rule.rule} is routed but not documented"



@pytest_twisted.ensureDeferred
async def test_share_links_can_be_followed_and_revoked(api: Portal) -> None:
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    _, instance = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    code, link = await alice.call("POST", f"/instances/{instance['id']}/links")
    assert code == 201 and link["url"].startswith("http://portal.test/share/")
    path = link["url"][len("http://portal.test"):]

    bob = Browser(api)
    response, _ = await bob.get(path)
    assert response.code == 303 and "/login?next=/share/" in response.headers.getRawHeaders("location")[0]
    await logIn(bob, "bob", "bobs password!")
    response, _ = await bob.get(path)
    assert response.code == 303
    bobsID = (await api.store.userByName("bob")).id
    assert await api.store.mayUseInstance(bobsID, instance["id"])
    _, access = await alice.call("GET", f"/instances/{instance['id']}/shares")
    assert [(g["name"], g["link"]) for g in access["shared_with"]] == [("bob", link["id"])]

    # Taken back from bob, who came through the link: the link stays (for
    # whoever else has it), and following it again lets him back in.
    code, access = await alice.call("DELETE", f"/instances/{instance['id']}/shares/bob")
    assert code == 200 and access["shared_with"] == []
    assert not await api.store.mayUseInstance(bobsID, instance["id"])
    response, _ = await bob.get(path)
    assert response.code == 303 and await api.store.mayUseInstance(bobsID, instance["id"])

    code, _ = await alice.call("DELETE", f"/instances/{instance['id']}/links/{link['id']}")
    assert code == 200
    assert not await api.store.mayUseInstance(bobsID, instance["id"])
    response, page = await bob.get(path)
    assert response.code == 404 and "revoked" in page
    # Only the owner makes links.
    bobClient = Client(api, await tokenFor(api, "bob", "bobs password!"))
    code, _ = await bobClient.call("POST", f"/instances/{instance['id']}/links")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_saved_images_are_shared_and_deleted_by_their_owner(api: Portal) -> None:
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    bob = Client(api, await tokenFor(api, "bob", "bobs password!"))
    aliceID = (await api.store.userByName("alice")).id
    saved = await api.store.createImage("my analysis", "https://images.test/sha256/ab", owner_id=aliceID, digest="sha256:" + "ab" * 32)
    _, images = await bob.call("GET", "/images")
    assert saved.id not in [i["id"] for i in images]
    code, _ = await bob.call("POST", f"/images/{saved.id}/shares", {"user": "bob"})
    assert code == 404  # not bob's to share
    code, _ = await alice.call("POST", f"/images/{saved.id}/shares", {"user": "bob"})
    assert code == 200
    _, images = await bob.call("GET", "/images")
    assert saved.id in [i["id"] for i in images]
    code, started = await bob.call("POST", "/instances", {"image": saved.id})
    assert code == 201
    # Renamed by its owner only, to a name of 1 to 200 printable characters.
    code, renamed = await alice.call("PATCH", f"/images/{saved.id}", {"name": "  the final analysis "})
    assert code == 200 and renamed["name"] == "the final analysis"
    assert [i["name"] for i in (await bob.call("GET", "/images"))[1] if i["id"] == saved.id] == ["the final analysis"]
    assert (await bob.call("PATCH", f"/images/{saved.id}", {"name": "mine now"}))[0] == 404
    for bad in ("x" * 201, "tab\there"):
        code, answer = await alice.call("PATCH", f"/images/{saved.id}", {"name": bad})
        assert code == 400 and "printable" in answer["reason"], bad
    code, _ = await bob.call("DELETE", f"/images/{saved.id}")
    assert code == 404
    code, _ = await alice.call("DELETE", f"/images/{saved.id}")
    assert code == 200
    code, _ = await bob.call("POST", "/instances", {"image": saved.id})
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_a_person_runs_only_on_clusters_open_to_them(api: Portal) -> None:
    root = Client(api, await tokenFor(api, "root", "root password!"))
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    bob = Client(api, await tokenFor(api, "bob", "bobs password!"))
    [cluster] = await api.store.listSchedulers()
    code, _ = await root.call("PUT", f"/admin/schedulers/{cluster.id}/users", {"users": ["alice"]})
    assert code == 200
    code, _ = await alice.call("POST", "/instances", {"image": api.image.id, "scheduler": cluster.id})  # type: ignore[attr-defined]
    assert code == 201
    code, error = await bob.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    assert code == 503 and "available to you" in error["reason"]
    code, error = await bob.call("POST", "/instances", {"image": api.image.id, "scheduler": cluster.id})  # type: ignore[attr-defined]
    assert code == 503 and "not open to you" in error["reason"]
    await root.call("PUT", f"/admin/schedulers/{cluster.id}/users", {"users": []})
    code, _ = await bob.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_an_instances_output_is_read_in_pieces_and_followed(api: Portal) -> None:
    """
    The tool's output through the API: a piece from an offset, the last
    bytes, the owner's only; followed, it grows as the tool writes and ends
    when the instance stops.
    """
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    bob = Client(api, await tokenFor(api, "bob", "bobs password!"))
    _, instance = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    path = f"/instances/{instance['id']}/logs"
    code, piece = await alice.call("GET", path)
    assert code == 200 and piece["text"] == "" and "not started" in piece["error"]

    await api.store.updateInstance(instance["id"], state="running")
    output: dict[str, bytes] = api.commands.output  # type: ignore[attr-defined]
    output[instance["id"]] = b"line one\nline two\n"
    assert (await alice.call("GET", path))[1] == {"offset": 0, "next": 18, "text": "line one\nline two\n", "error": None}
    assert (await alice.call("GET", path + "?offset=9"))[1]["text"] == "line two\n"
    assert (await alice.call("GET", path + "?limit=4"))[1] == {"offset": 14, "next": 18, "text": "two\n", "error": None}
    assert (await alice.call("GET", path + "?offset=x"))[0] == 400
    await alice.call("POST", f"/instances/{instance['id']}/shares", {"user": "bob"})
    assert (await bob.call("GET", path))[0] == 404  # shared: the tool, not its output

    response = await treq.get(
        alice.base + path + "?follow=1", headers=alice.headers, unbuffered=True
    )
    assert response.code == 200 and response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
    received: list[bytes] = []
    finished = treq.collect(response, received.append)
    await eventually(lambda: b"".join(received) == b"line one\nline two\n", what=lambda: repr(received))
    output[instance["id"]] += b"line three\n"
    await eventually(ticking(api, lambda: b"".join(received).endswith(b"line three\n")), what=lambda: repr(received))
    await api.store.updateInstance(instance["id"], state="stopped")
    await eventually(ticking(api, lambda: finished.called), what="the followed output ended once the instance stopped")
    assert b"".join(received) == b"line one\nline two\nline three\n"


def ticking(api: Portal, predicate: Callable[[], bool]) -> Callable[[], bool]:
    """
    ``predicate``, with a second of the portal's clock passed before each
    look: a followed output asks again a second after its last answer was
    written, and that second is counted from when the server got to it,
    which may be after the test saw the answer.
    """

    def look() -> bool:
        api.clock.advance(1)  # type: ignore[attr-defined]
        return predicate()

    return look


@pytest_twisted.ensureDeferred
async def test_a_person_follows_at_most_so_many_outputs_at_once(api: Portal) -> None:
    """Each followed output asks its node once a second: a person holds at most FOLLOWS_PER_PERSON."""
    from dit4c.portal.api import FOLLOWS_PER_PERSON

    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    _, instance = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    await api.store.updateInstance(instance["id"], state="running")
    url = alice.base + f"/instances/{instance['id']}/logs?follow=1"
    held = [await treq.get(url, headers=alice.headers, unbuffered=True) for _ in range(FOLLOWS_PER_PERSON)]
    assert [r.code for r in held] == [200] * FOLLOWS_PER_PERSON
    refused = await treq.get(url, headers=alice.headers)
    assert refused.code == 429 and "At most" in (await refused.json())["reason"]
    # One ends (the instance stops): room again.
    finished = [treq.collect(r, lambda _: None) for r in held]
    await api.store.updateInstance(instance["id"], state="stopped")
    await eventually(ticking(api, lambda: all(d.called for d in finished)), what="every followed output ended")
    await eventually(lambda: api.api.following == {}, what="every follow let go")


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_is_resumed_within_the_quota(api: Portal) -> None:
    """Resume: only from stopped, told to its scheduler, and counted against the quota as a start is."""
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    _, first = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    code, answer = await alice.call("POST", f"/instances/{first['id']}/resume")
    assert code == 409 and "Cannot resume an instance that is requested" in answer["reason"]
    await api.store.updateInstance(first["id"], state="stopped")

    code, resumed = await alice.call("POST", f"/instances/{first['id']}/resume")
    assert code == 200 and resumed["state"] == "starting"
    assert api.commands.sent[-1][1:3] == ("resume", first["id"])  # type: ignore[attr-defined]

    # Two active instances (the quota here): a third cannot come back to life.
    await api.store.updateInstance(first["id"], state="stopped")
    for _ in range(2):
        assert (await alice.call("POST", "/instances", {"image": api.image.id}))[0] == 201  # type: ignore[attr-defined]
    code, answer = await alice.call("POST", f"/instances/{first['id']}/resume")
    assert code == 409 and "You may run 2 instances at once and have 2" in answer["reason"]
    assert (await api.store.instanceById(first["id"])).state == "stopped"


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_is_saved_as_it_is(api: Portal) -> None:
    """Save from stopped: straight to saving (its pod is stopped already), told to its scheduler, within the quota."""
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    _, first = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    await api.store.updateInstance(first["id"], state="stopped")
    code, saving = await alice.call("POST", f"/instances/{first['id']}/save")
    assert code == 200 and saving["state"] == "saving"
    assert api.commands.sent[-1][1:3] == ("save", first["id"])  # type: ignore[attr-defined]

    # Saving holds compute (the capture, the upload): past the quota, it waits.
    await api.store.updateInstance(first["id"], state="stopped")
    for _ in range(2):
        assert (await alice.call("POST", "/instances", {"image": api.image.id}))[0] == 201  # type: ignore[attr-defined]
    code, answer = await alice.call("POST", f"/instances/{first['id']}/save")
    assert code == 409 and "You may run 2 instances at once and have 2" in answer["reason"]


@pytest_twisted.ensureDeferred
async def test_an_instance_that_never_ran_has_nothing_to_save_or_resume(api: Portal) -> None:
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    _, instance = await alice.call("POST", "/instances", {"image": api.image.id})  # type: ignore[attr-defined]
    await api.store.updateInstance(instance["id"], state="stopped", scheduler_id=None)
    for action in ("save", "resume"):
        code, answer = await alice.call("POST", f"/instances/{instance['id']}/{action}")
        assert code == 409 and answer["reason"] == f"Cannot {action} an instance that never ran on a compute node."
    assert (await api.store.instanceById(instance["id"])).state == "stopped"


@pytest_twisted.ensureDeferred
async def test_limits_of_the_catalogue_reach_the_start_command(api: Portal) -> None:
    root = Client(api, await tokenFor(api, "root", "root password!"))
    alice = Client(api, await tokenFor(api, "alice", "correct horse battery"))
    limits = {"cpus": 0.5, "memory": 256, "idle": 10, "idle_action": "stop"}
    code, image = await root.call("POST", "/admin/images", {"name": "Lab", "ref": "lab", "limits": limits})
    assert code == 201 and image["limits"] == limits
    for bad, why in (({"cpus": -1}, "between 0.01"), ({"idle_action": "explode"}, "stop or save"), ({"swap": 1}, "Unknown limit")):
        code, error = await root.call("PUT", f"/admin/images/{image['id']}/limits", bad)
        assert (code, error["error"]) == (400, "bad_limits") and why in error["reason"]
    assert (await alice.call("PUT", f"/admin/images/{image['id']}/limits", limits))[0] == 403
    assert (await root.call("PUT", "/admin/images/nope/limits", limits))[0] == 404

    code, listed = await alice.call("GET", "/images")
    assert [i["limits"] for i in listed if i["id"] == image["id"]] == [limits]
    code, instance = await alice.call("POST", "/instances", {"image": image["id"]})
    assert code == 201
    op, params = api.commands.sent[-1][1], api.commands.sent[-1][3]  # type: ignore[attr-defined]
    assert op == "start" and params["limits"] == {"cpus": 0.5, "memory": 256}  # the idle limit is the portal's own

    code, changed = await root.call("PUT", f"/admin/images/{image['id']}/limits", {"idle": 5})
    assert code == 200 and changed["limits"] == {"cpus": None, "memory": None, "idle": 5, "idle_action": "stop"}
    await alice.call("POST", "/instances", {"image": image["id"]})
    assert "limits" not in api.commands.sent[-1][3]  # type: ignore[attr-defined]
