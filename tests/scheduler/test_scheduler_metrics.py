"""
The scheduler's Prometheus figures (``twistd dit4c-scheduler --metrics``):
a scheduler built as twistd builds it (its ``Options`` and
``makeService``), dialling a real portal channel (a ``ChannelHub`` on
SQLite) and two real compute nodes (``Node`` behind ``NodeLinkServer``,
with a runtime whose pods start at once) on loopback. Its ``/metrics`` is
scraped over a real socket as the portal's commands are handled and as the
portal and a node go away; and once more from ``twistd -n`` as a user runs
it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from support.metrics import Figures, scrape
from support.waiting import eventually
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.python import usage
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dit4c.channel.wire import OPS, LogChunk
from dit4c.common.keys import PrivateKey, generatePrivateKey, jwks, savePrivateKey
from dit4c.common.life import STATES
from dit4c.common.service import ListeningService
from dit4c.common.tokens import StaticKeySource
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus
from dit4c.node.link import NodeLinkServer
from dit4c.node.node import Node
from dit4c.portal.channel import ChannelHub
from dit4c.portal.store import openStore
from dit4c.scheduler.metrics import OUTCOMES
from dit4c.scheduler.scheduler import Scheduler
from dit4c.scheduler.tap import Options, makeService
from dit4c.testing.scheduler import registerScheduler

ISSUER = "http://portal.test"




def figure(scraped: Figures, name: str, **labels: str) -> float:
    return scraped[(name, tuple(sorted(labels.items())))]


def onNodes(scraped: Figures, state: str) -> dict[str, float]:
    """Instances in ``state``, by node."""
    return {
        dict(labels)["node"]: value
        for (name, labels), value in scraped.items()
        if name == "dit4c_scheduler_instances" and dict(labels)["state"] == state
    }


# -- a node whose pods start at once ------------------------------------------------------


@implementer(IRuntime)
class InstantRuntime:
    """Every pod starts, answers, stops and goes at once: the node's life is what is under test."""

    name = "instant"
    resumable = True

    def start(self, spec: PodSpec) -> Deferred[None]:
        return succeed(None)

    def stop(self, instance: str) -> Deferred[None]:
        return succeed(None)

    def capture(self, instance: str, archive: Path) -> Deferred[str | None]:
        archive.write_bytes(b"saved")
        return succeed(None)

    def discard(self, instance: str) -> Deferred[None]:
        return succeed(None)

    def pods(self) -> Deferred[list[PodStatus]]:
        return succeed([])

    def ready(self, instance: str) -> Deferred[bool]:
        return succeed(True)

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        return succeed(LogChunk.of(b"", offset, limit))

    def forget(self) -> None:
        pass

    def onExit(self, callback: Any) -> None:
        pass


def test_the_stand_in_is_a_runtime() -> None:
    verifyObject(IRuntime, InstantRuntime())


# -- the world: a portal channel and two nodes on loopback --------------------------------


@dataclass
class World:
    directory: Path
    store: Any
    hub: ChannelHub
    url: str
    user: Any
    image: Any
    schedulerId: str
    schedulerKey: PrivateKey
    #: Each node's name -> (its node, its link server, the port it listens on).
    nodes: dict[str, tuple[Node, NodeLinkServer, int]] = field(default_factory=dict)
    services: list[MultiService] = field(default_factory=list)

    async def addNode(self, name: str, capacity: int) -> None:
        key = generatePrivateKey()
        (self.directory / f"{name}.jwks").write_text(json.dumps(jwks(key)))
        node = Node(reactor, InstantRuntime(), self.directory / name, name=name, portal=ISSUER, capacity=capacity)
        server = NodeLinkServer(reactor, node, key, StaticKeySource.fromKeys(self.schedulerKey))
        listening = server.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
        node.startService()
        server.startService()
        assert listening.port is not None
        self.nodes[name] = (node, server, listening.port.getHost().port)  # type: ignore[attr-defined]

    def args(self, *extra: str) -> list[str]:
        """The scheduler's command line for this world."""
        nodes = [
            argument
            for name, (_, _, port) in self.nodes.items()
            for argument in ("--node", f"name={name},url=ws://127.0.0.1:{port},key={self.directory / f'{name}.jwks'}")
        ]
        return ["--portal", self.url, "--id", self.schedulerId, "--key", str(self.directory / "scheduler.pem"), *nodes, *extra]

    def scheduler(self, *extra: str) -> tuple[Scheduler, int | None]:
        """A running scheduler built as twistd builds it, and its metrics port (if it has one)."""
        config = Options()
        config.parseOptions(self.args(*extra))
        service = makeService(config, reactor)
        assert isinstance(service, Scheduler)
        self.services.append(service)
        service.startService()
        admin = [child for child in service if isinstance(child, ListeningService)]
        if not admin:
            return service, None
        assert admin[0].port is not None
        return service, admin[0].port.getHost().port  # type: ignore[attr-defined]

    async def instance(self) -> str:
        made = await self.store.createInstance(self.user.id, self.image.id, scheduler_id=self.schedulerId)
        return str(made.id)


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    store = await openStore(f"sqlite://{tmp_path}/portal.db", reactor)
    hub = ChannelHub(reactor, store, issuer=ISSUER, handshakeTimeout=3.0, pollInterval=None)
    listening = hub.listen(serverFromString(reactor, "tcp:0:interface=127.0.0.1"))
    hub.startService()
    assert listening.port is not None
    record, key = await registerScheduler(store, "hpc")
    savePrivateKey(key, tmp_path / "scheduler.pem")
    made = World(
        directory=tmp_path,
        store=store,
        hub=hub,
        url=f"ws://127.0.0.1:{listening.port.getHost().port}",  # type: ignore[attr-defined]
        user=await store.createUser("alice"),
        image=await store.createImage("Jupyter", "quay.io/jupyter/base-notebook", port=8888),
        schedulerId=record.id,
        schedulerKey=key,
    )
    try:
        yield made
    finally:
        for service in made.services:
            if service.running:
                await service.stopService()
        for node, server, _ in made.nodes.values():
            if server.running:
                await server.stopService()
            if node.running:
                await node.stopService()
        if hub.running:
            await hub.stopService()
        await store.close()


# -- the figures ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_figures_follow_the_portals_commands_and_the_links(world: World) -> None:
    await world.addNode("n1", capacity=1)
    await world.addNode("n2", capacity=1)
    scheduler, port = world.scheduler("--metrics", "tcp:0:interface=127.0.0.1")
    assert port is not None

    async def linked() -> bool:
        now = await scrape(port)
        return figure(now, "dit4c_scheduler_portal_connected") == 1 and figure(now, "dit4c_scheduler_nodes_connected") == 2

    await eventually(linked, what="the portal and both nodes linked")
    assert scheduler.channel is not None
    await scheduler.channel.whenConnected()  # and its report sent
    before = await scrape(port)
    assert figure(before, "dit4c_scheduler_nodes") == 2
    for node in ("n1", "n2"):
        assert figure(before, "dit4c_scheduler_node_connected", node=node) == 1
        assert figure(before, "dit4c_scheduler_node_capacity", node=node) == 1
        assert figure(before, "dit4c_scheduler_instances_placed_total", node=node) == 0
        for state in STATES:
            assert figure(before, "dit4c_scheduler_instances", node=node, state=state.value) == 0
    for op in OPS:
        for outcome in OUTCOMES:
            assert figure(before, "dit4c_scheduler_commands_total", op=op, outcome=outcome) == 0
    assert figure(before, "dit4c_scheduler_starts_refused_total") == 0

    # Two starts: one on each node (each has room for one), and running there.
    first, second, third = await world.instance(), await world.instance(), await world.instance()
    for instance in (first, second):
        await world.hub.send(world.schedulerId, "start", instance, {"image": "web", "port": None})

    async def bothRunning() -> Figures | None:
        now = await scrape(port)
        ok = figure(now, "dit4c_scheduler_commands_total", op="start", outcome="ok") == 2
        return now if ok and onNodes(now, "running") == {"n1": 1, "n2": 1} else None

    running = await eventually(bothRunning, what=lambda: f"two running: {scheduler.metrics.commands}")
    assert figure(running, "dit4c_scheduler_instances_placed_total", node="n1") == 1
    assert figure(running, "dit4c_scheduler_instances_placed_total", node="n2") == 1
    assert figure(running, "dit4c_scheduler_starts_refused_total") == 0

    # A third: every node is full. Refused, counted, and the portal told.
    await world.hub.send(world.schedulerId, "start", third, {"image": "web", "port": None})

    async def refused() -> Figures | None:
        now = await scrape(port)
        return now if figure(now, "dit4c_scheduler_starts_refused_total") == 1 else None

    full = await eventually(refused, what="the third start refused")
    assert figure(full, "dit4c_scheduler_commands_total", op="start", outcome="error") == 1
    assert figure(full, "dit4c_scheduler_commands_total", op="start", outcome="ok") == 2
    assert sum(onNodes(full, "running").values()) == 2  # it went nowhere
    assert (await eventually(lambda: _errored(world, third))).reason == "No compute node has room for this instance now."

    # A stop, on the node that holds it; a discard of what no node holds.
    holder = "n1" if any(s.instance == first for s in world.nodes["n1"][0].instances()) else "n2"
    await world.hub.send(world.schedulerId, "stop", first, {})
    await world.hub.send(world.schedulerId, "discard", third, {})

    async def handled() -> Figures | None:
        now = await scrape(port)
        done = (
            figure(now, "dit4c_scheduler_commands_total", op="stop", outcome="ok") == 1
            and figure(now, "dit4c_scheduler_commands_total", op="discard", outcome="ok") == 1
            and figure(now, "dit4c_scheduler_instances", node=holder, state="stopped") == 1
        )
        return now if done else None

    after = await eventually(handled, what=lambda: f"the stop and the discard: {scheduler.metrics.commands}")
    assert figure(after, "dit4c_scheduler_instances", node=holder, state="running") == 0
    assert sum(onNodes(after, "running").values()) == 1
    assert figure(after, "dit4c_scheduler_starts_refused_total") == 1  # a counter: it stays

    # A node's link goes: it is counted out (its instances stay known through the grace).
    await world.nodes["n2"][1].stopService()

    async def n2Away() -> Figures | None:
        now = await scrape(port)
        return now if figure(now, "dit4c_scheduler_node_connected", node="n2") == 0 else None

    away = await eventually(n2Away, what="n2's link down")
    assert figure(away, "dit4c_scheduler_nodes_connected") == 1
    assert figure(away, "dit4c_scheduler_nodes") == 2
    assert figure(away, "dit4c_scheduler_node_connected", node="n1") == 1

    # The portal goes.
    await world.hub.stopService()

    async def portalAway() -> bool:
        return figure(await scrape(port), "dit4c_scheduler_portal_connected") == 0

    await eventually(portalAway, what="the channel to the portal down")
    health = await (await treq.get(f"http://127.0.0.1:{port}/health")).json()
    assert health == {"status": "ok", "portal": False, "nodes": 2, "nodesConnected": 1}


async def _errored(world: World, instance: str) -> Any:
    found = await world.store.instanceById(instance)
    return found if found is not None and found.state == "errored" else None


@pytest_twisted.ensureDeferred
async def test_no_figures_without_the_option(world: World) -> None:
    await world.addNode("n1", capacity=1)
    scheduler, port = world.scheduler()
    assert port is None
    assert not [child for child in scheduler if isinstance(child, ListeningService)]


@pytest_twisted.ensureDeferred
async def test_the_option_is_checked(world: World) -> None:
    await world.addNode("n1", capacity=1)
    for bad in ("tcp:notaport", "nonsense:9102"):
        with pytest.raises(usage.UsageError, match=r"^--metrics: bad endpoint"):
            Options().parseOptions(world.args("--metrics", bad))
    config = Options()
    config.parseOptions(world.args("--metrics", "tcp:9102:interface=127.0.0.1"))
    assert config["metrics"] == "tcp:9102:interface=127.0.0.1"
    assert "--metrics" in str(Options())


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_figures_on_their_own_endpoint(world: World, processes: Any) -> None:
    await world.addNode("n1", capacity=3)
    await world.addNode("n2", capacity=2)
    proc = processes("dit4c-scheduler", *world.args("--metrics", "tcp:0:interface=127.0.0.1"))
    port = await proc.waitForPort("scheduler metrics")

    async def linked() -> Figures | None:
        now = await scrape(port)
        up = figure(now, "dit4c_scheduler_portal_connected") == 1 and figure(now, "dit4c_scheduler_nodes_connected") == 2
        return now if up else None

    figures = await eventually(linked, timeout=20, what=lambda: f"linked, in:\n{proc.log()}")
    assert figure(figures, "dit4c_scheduler_node_capacity", node="n1") == 3
    assert figure(figures, "dit4c_scheduler_node_capacity", node="n2") == 2
    assert figure(figures, "dit4c_scheduler_commands_total", op="start", outcome="ok") == 0
    assert world.hub.connected(world.schedulerId)
    health = await (await treq.get(f"http://127.0.0.1:{port}/health")).json()
    assert health == {"status": "ok", "portal": True, "nodes": 2, "nodesConnected": 2}
