"""
The compute nodes as administrators see them: the portal as ``twistd
dit4c-portal`` builds it, a real Scheduler (over nodes in memory) dialling
its channel on a loopback port, the admin page (``/admin/nodes``) and the
REST API (``/api/v1/admin/nodes``). What a scheduler says is kept while its
channel is open; a cool-down, an accept and a drain go down the channel,
and a drain's stops go the way a person's Stop does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from portal_client import Browser, Client, csrfOf, logIn, startService, tokenFor
from support.passwords import cheapHash
from support.stubnode import StubNode
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.channel.errors import ProtocolError
from dit4c.channel.wire import CloseCode
from dit4c.common.life import State
from dit4c.portal.nodes import NodeUnavailable
from dit4c.scheduler.channel import ChannelClient
from dit4c.scheduler.scheduler import COOLING, Scheduler
from dit4c.testing.scheduler import RawChannel, registerScheduler


class Site:
    """A portal, a scheduler registered with it, and that scheduler running over two nodes in memory."""

    def __init__(self, service: Any, scheduler: Any, key: Any) -> None:
        self.service = service
        self.portal = service.portal
        self.store = service.portal.store
        self.hub = service.channels
        self.scheduler = scheduler
        self.key = key
        self.url = self.portal.testURL.replace("http://", "ws://")
        self.n1, self.n2 = StubNode("n1"), StubNode("n2", capacity=4)
        self.running: Scheduler | None = None
        self.raws: list[RawChannel] = []

    async def connect(self) -> Scheduler:
        made = Scheduler([self.n1, self.n2], reactor=reactor, nodesDelay=0.05)
        made.channel = ChannelClient(reactor, self.url, self.scheduler.id, self.key, made)
        made.startService()
        made.channel.startService()
        await made.channel.whenConnected()
        await eventually(lambda: self.hub.nodes.of(self.scheduler.id) is not None)
        self.running = made
        return made

    async def disconnect(self) -> None:
        if self.running is not None:
            assert self.running.channel is not None
            await self.running.channel.stopService()
            await self.running.stopService()
            self.running = None
        await eventually(lambda: not self.hub.connected(self.scheduler.id))

    async def raw(self) -> RawChannel:
        channel = await RawChannel.connect(reactor, self.url)
        self.raws.append(channel)
        await channel.hello(self.scheduler.id, self.key)
        assert (await channel.next())["type"] == "welcome"
        return channel


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Path) -> Any:
    service = await startService(tmp_path, "http://portal.localhost")
    store = service.portal.store
    await store.createUser("alice", password_hash=cheapHash("correct horse battery"))
    await store.createUser("root", password_hash=cheapHash("root password!"), is_admin=True)
    service.portal.image = await store.createImage("Tool", "tool:latest", owner_id=None, port=8888)
    scheduler, key = await registerScheduler(store, "cluster")
    made = Site(service, scheduler, key)
    try:
        yield made
    finally:
        for raw in made.raws:
            raw.abort()
        await made.disconnect()
        await service.stopService()


async def admin(site: Site) -> Browser:
    browser = Browser(site.portal)
    assert (await logIn(browser, "root", "root password!")).code == 303
    return browser


def row(page: str, node: str) -> str:
    match = re.search(rf'<tr data-node="{node}"[^>]*>(.*?)</tr>', page, re.S)
    assert match, page
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", match.group(0))).strip()


async def stateOf(site: Site, instance: str) -> str:
    return str((await site.store.instanceById(instance)).state)


@pytest_twisted.ensureDeferred
async def test_an_administrator_sees_the_nodes_and_cools_one_down(site: Site) -> None:
    site.n1.move("held1", State.RUNNING)
    await site.connect()
    browser = await admin(site)
    _, page = await browser.get("/admin/")
    assert 'href="/admin/nodes"' in page
    response, page = await browser.get("/admin/nodes")
    assert response.code == 200
    assert row(page, "n1") == "n1 linked taking 2 1 1 (running 1) Cool down Drain"
    assert row(page, "n2") == "n2 linked taking 4 0 0 Cool down Drain"
    assert "stopped, not discarded" in page

    # Cooled down with the form: back to the page (303), which says so.
    response, _ = await browser.post(
        "/admin/nodes", {"csrf": csrfOf(page), "scheduler": site.scheduler.id, "node": "n1", "action": "cool-down"}
    )
    assert (response.code, response.headers.getRawHeaders("location")) == (303, ["/admin/nodes?done=cool-down&count=0"])
    assert site.n1.accepting is False
    _, page = await browser.get("/admin/nodes?done=cool-down&count=0")
    assert "The node is cooling down" in page
    assert row(page, "n1") == "n1 linked cooling down 2 1 1 (running 1) Accept again Drain"
    # The scheduler's own word follows (pushed, not asked for) and says the same.
    await eventually(lambda: not site.hub.nodes.of(site.scheduler.id)[0].accepting and site.running._nodesCall is None)

    # A form without its token does nothing.
    response, _ = await browser.post(
        "/admin/nodes", {"csrf": "forged", "scheduler": site.scheduler.id, "node": "n1", "action": "accept"}
    )
    assert response.code == 400 and site.n1.accepting is False
    # Bad input is refused with the reason, on the page.
    for node, action, status, reason in [
        ("n9", "accept", 404, "no compute node called &#39;n9&#39;"),
        ("n1", "explode", 404, "no such action"),
    ]:
        response, answer = await browser.post(
            "/admin/nodes", {"csrf": csrfOf(page), "scheduler": site.scheduler.id, "node": node, "action": action}
        )
        assert response.code == status and reason in answer, answer

    response, _ = await browser.post(
        "/admin/nodes", {"csrf": csrfOf(page), "scheduler": site.scheduler.id, "node": "n1", "action": "accept"}
    )
    assert response.code == 303 and site.n1.accepting is True


@pytest_twisted.ensureDeferred
async def test_only_administrators(site: Site) -> None:
    await site.connect()
    alice = Browser(site.portal)
    await logIn(alice)
    response, _ = await alice.get("/admin/nodes")
    assert response.code == 403
    _, home = await alice.get("/")
    response, _ = await alice.post(
        "/admin/nodes", {"csrf": csrfOf(home), "scheduler": site.scheduler.id, "node": "n1", "action": "cool-down"}
    )
    assert response.code == 403 and site.n1.accepting is True
    api = Client(site.portal, await tokenFor(site.portal, "alice", "correct horse battery"))
    assert (await api.call("GET", "/admin/nodes"))[0] == 403
    assert (await api.call("POST", f"/admin/nodes/{site.scheduler.id}/n1/drain"))[0] == 403
    assert site.n1.accepting is True
    anonymous = Browser(site.portal)
    response, _ = await anonymous.get("/admin/nodes")
    assert response.code == 303


@pytest_twisted.ensureDeferred
async def test_a_drain_stops_as_each_owner_would_and_a_cooled_cluster_refuses_starts(site: Site) -> None:
    await site.connect()
    root = Client(site.portal, await tokenFor(site.portal, "root", "root password!"))
    alice = Client(site.portal, await tokenFor(site.portal, "alice", "correct horse battery"))
    image = site.portal.image.id

    # Alice's instance lands on the node with the most room: n2.
    _, instance = await alice.call("POST", "/instances", {"image": image})
    await eventually(lambda: stateIs(site, instance["id"], "running"))
    assert instance["id"] in site.n2.statuses
    code, listed = await root.call("GET", "/admin/nodes")
    assert code == 200
    [shown] = listed["schedulers"]
    assert (shown["id"], shown["connected"]) == (site.scheduler.id, True)
    await eventually(lambda: _node(site, "n2").instances == {"running": 1})
    code, listed = await root.call("GET", "/admin/nodes")
    assert listed["schedulers"][0]["nodes"][1] == {
        "node": "n2", "connected": True, "capacity": 4, "accepting": True, "instances": {"running": 1}, "active": 1,
    }  # fmt: skip

    # Drained: cooled down, and her instance stopped through the command path.
    code, done = await root.call("POST", f"/admin/nodes/{site.scheduler.id}/n2/drain")
    assert (code, done["stopping"]) == (200, [instance["id"]])
    assert site.n2.accepting is False
    await eventually(lambda: stateIs(site, instance["id"], "stopped"))
    # As her own Stop would have: a stop command, stored, sent and acknowledged.
    assert await site.store.latestCommandOp(instance["id"]) == "stop"
    await eventually(lambda: nothingPending(site), what="every command acknowledged")

    # With every node cooling down, a start is refused, and says why.
    assert (await root.call("POST", f"/admin/nodes/{site.scheduler.id}/n1/cool-down"))[0] == 200
    _, refused = await alice.call("POST", "/instances", {"image": image})
    await eventually(lambda: stateIs(site, refused["id"], "errored"))
    assert (await site.store.instanceById(refused["id"])).reason == COOLING

    # Accepted again: a start runs.
    assert (await root.call("POST", f"/admin/nodes/{site.scheduler.id}/n2/accept"))[0] == 200
    _, again = await alice.call("POST", "/instances", {"image": image})
    await eventually(lambda: stateIs(site, again["id"], "running"))


def _node(site: Site, name: str) -> Any:
    return next(n for n in site.hub.nodes.of(site.scheduler.id) or () if n.node == name)


async def nothingPending(site: Site) -> bool:
    return not await site.store.pendingCommands(site.scheduler.id, limit=10)


async def stateIs(site: Site, instance: str, state: str) -> bool:
    return await stateOf(site, instance) == state


@pytest_twisted.ensureDeferred
async def test_a_scheduler_away_is_said_to_be(site: Site) -> None:
    await site.connect()
    root = Client(site.portal, await tokenFor(site.portal, "root", "root password!"))
    await site.disconnect()
    assert site.hub.nodes.of(site.scheduler.id) is None
    code, listed = await root.call("GET", "/admin/nodes")
    assert listed["schedulers"] == [
        {"id": site.scheduler.id, "name": "cluster", "disabled": False, "connected": False, "nodes": None}
    ]
    code, refused = await root.call("POST", f"/admin/nodes/{site.scheduler.id}/n1/cool-down")
    assert (code, refused["error"]) == (503, "node_unavailable") and "away" in refused["reason"]
    browser = await admin(site)
    _, page = await browser.get("/admin/nodes")
    assert "This scheduler is away" in page and 'data-node="n1"' not in page


@pytest_twisted.ensureDeferred
async def test_a_node_that_is_away_is_shown_and_cannot_be_asked(site: Site) -> None:
    await site.connect()
    site.n2.connected = False
    assert site.running is not None
    site.running.nodeChanged(site.n2)
    await eventually(lambda: not _node(site, "n2").connected)
    browser = await admin(site)
    _, page = await browser.get("/admin/nodes")
    assert row(page, "n2") == "n2 away — 4 0 0"
    root = Client(site.portal, await tokenFor(site.portal, "root", "root password!"))
    code, refused = await root.call("POST", f"/admin/nodes/{site.scheduler.id}/n2/drain")
    assert code == 503 and "not linked" in refused["reason"]


@pytest_twisted.ensureDeferred
async def test_a_request_open_when_the_scheduler_goes_fails_then(site: Site) -> None:
    raw = await site.raw()
    raw.send({"type": "nodes", "nodes": [{"node": "n1", "connected": True, "capacity": 1, "accepting": True, "instances": {}}]})
    await eventually(lambda: site.hub.nodes.of(site.scheduler.id) is not None)
    asked = site.hub.nodes.command(site.scheduler.id, "n1", "cool-down")
    request = await raw.next()
    assert {k: request[k] for k in ("type", "node", "op")} == {"type": "node-command", "node": "n1", "op": "cool-down"}
    # An answer to nothing open is dropped; the channel stays.
    raw.send({"type": "node-done", "id": "not-asked", "error": None, "stop": []})
    raw.abort()
    with pytest.raises(NodeUnavailable, match="went away"):
        await asked
    assert site.hub.nodes.of(site.scheduler.id) is None


@pytest_twisted.ensureDeferred
async def test_a_scheduler_that_says_nothing_of_its_nodes(site: Site) -> None:
    """A scheduler older than the portal: connected, its nodes not known (not taken for none)."""
    await site.raw()
    browser = await admin(site)
    _, page = await browser.get("/admin/nodes")
    assert "connected but has not said what compute nodes it has" in page
    root = Client(site.portal, await tokenFor(site.portal, "root", "root password!"))
    _, listed = await root.call("GET", "/admin/nodes")
    assert [(s["connected"], s["nodes"]) for s in listed["schedulers"]] == [(True, None)]
    code, refused = await root.call("POST", f"/admin/nodes/{site.scheduler.id}/n1/cool-down")
    assert code == 503 and "has not said" in refused["reason"]


@pytest_twisted.ensureDeferred
async def test_malformed_nodes_close_the_channel(site: Site) -> None:
    raw = await site.raw()
    raw.send({"type": "nodes", "nodes": [{"node": "n1", "connected": True, "capacity": "lots", "accepting": True, "instances": {}}]})
    code, reason = await raw.closed
    assert code == CloseCode.PROTOCOL_ERROR and reason is not None and "capacity" in reason
    with pytest.raises(ProtocolError):
        site.hub.nodes.received(site.scheduler.id, "node-done", {"type": "node-done", "id": "x", "stop": "abc"})
    assert json.dumps(site.hub.nodes.of(site.scheduler.id)) == "null"
