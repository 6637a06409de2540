"""
The node link: a scheduler's RemoteNode dialling a node's NodeLinkServer
over a real WebSocket on loopback, each proving itself with its key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standins import HELPERS, TOOLS, Watcher
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString

from dit4c.channel.questions import Unanswered
from dit4c.common.keys import generatePrivateKey
from dit4c.common.life import State
from dit4c.common.tokens import StaticKeySource
from dit4c.listener.service import backoff
from dit4c.node.link import NodeLinkServer
from dit4c.node.node import Node
from dit4c.node.process import ProcessRuntime
from dit4c.node.remote import RemoteNode

SCHEDULER_KEY = generatePrivateKey()
NODE_KEY = generatePrivateKey()


class Link:
    """A node behind a link server, and the remote nodes dialling it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.remotes: list[RemoteNode] = []
        self.runtimes: list[ProcessRuntime] = []
        self.node: Node | None = None
        self.server: NodeLinkServer | None = None
        self.port = 0

    async def startNode(
        self, schedulerKey: Any = SCHEDULER_KEY, port: int = 0, runtimeClass: type[ProcessRuntime] = ProcessRuntime
    ) -> None:
        runtime = runtimeClass(reactor, self.directory, TOOLS, helpers=HELPERS, stopGrace=2)
        self.runtimes.append(runtime)
        self.node = Node(reactor, runtime, self.directory, name="n1", portal="http://localhost:8000", capacity=2)
        self.server = NodeLinkServer(reactor, self.node, NODE_KEY, StaticKeySource.fromKeys(schedulerKey))
        listening = self.server.listen(serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"))
        self.node.startService()
        self.server.startService()
        assert listening.port is not None
        self.port = listening.port.getHost().port  # type: ignore[attr-defined]

    async def stopNode(self) -> None:
        assert self.server is not None and self.node is not None
        await self.server.stopService()
        await self.node.stopService()

    def remote(self, key: Any = SCHEDULER_KEY, nodeKey: Any = NODE_KEY, **options: Any) -> tuple[RemoteNode, Watcher]:
        remote = RemoteNode(
            reactor,
            f"ws://127.0.0.1:{self.port}",
            "sched1",
            key,
            StaticKeySource.fromKeys(nodeKey),
            retryPolicy=backoff(initial=0.05, maximum=0.2),
            **options,
        )
        watcher = Watcher()
        remote.subscribe(watcher.observer())
        remote.startService()
        self.remotes.append(remote)
        return remote, watcher


@pytest_twisted.async_yield_fixture
async def link(tmp_path: Path) -> Any:
    made = Link(tmp_path / "node")
    yield made
    for remote in made.remotes:
        if remote.running:
            await remote.stopService()
    if made.server is not None and made.server.running:
        await made.stopNode()
    for runtime in made.runtimes:
        for instance in list(runtime._pods):
            await runtime.discard(instance)


@pytest_twisted.ensureDeferred
async def test_link_starts_and_stops_an_instance(link: Link) -> None:
    await link.startNode()
    remote, watcher = link.remote(name="n1")
    await remote.whenConnected()
    assert (remote.nodeName, remote.capacity, remote.accepting) == ("n1", 2, True)

    await remote.start("abc1", "web", None)
    await watcher.waitFor("abc1", "running")
    assert watcher.history("abc1") == ["starting", "running"]
    assert watcher.keys["abc1"]["kty"] == "EC" and "d" not in watcher.keys["abc1"]
    assert remote.load() == 1

    await remote.stop("abc1")
    await watcher.waitFor("abc1", "stopped")
    await remote.discard("abc1")
    await watcher.waitFor("abc1", "discarded")
    assert remote.instances() == []


@pytest_twisted.ensureDeferred
async def test_node_refuses_an_unknown_scheduler(link: Link) -> None:
    await link.startNode()
    remote, _ = link.remote(key=generatePrivateKey())
    await eventually(lambda: remote.lastError is not None)
    assert remote.lastError == "4001 bad proof: unknown key"
    assert not remote.connected


@pytest_twisted.ensureDeferred
async def test_scheduler_refuses_a_node_with_another_key(link: Link) -> None:
    await link.startNode()
    remote, _ = link.remote(nodeKey=generatePrivateKey())
    await eventually(lambda: remote.lastError is not None)
    assert remote.lastError is not None and remote.lastError.startswith("the node's proof was refused")
    assert not remote.connected


@pytest_twisted.ensureDeferred
async def test_scheduler_refuses_a_node_with_another_name(link: Link) -> None:
    await link.startNode()
    remote, _ = link.remote(name="n2")
    await eventually(lambda: remote.lastError is not None)
    assert remote.lastError == "the node says it is 'n1', not 'n2'"


@pytest_twisted.ensureDeferred
async def test_a_node_away_too_long_loses_its_instances_and_is_cleaned_up(link: Link) -> None:
    await link.startNode()
    remote, watcher = link.remote(name="n1", grace=0.5)
    await remote.whenConnected()
    await remote.start("abc2", "web", None)
    await watcher.waitFor("abc2", "running")
    port = link.port

    # The node goes away (its pods run on) for longer than the grace period.
    await link.stopNode()
    lost = await watcher.waitFor("abc2", "errored")
    assert lost.reason == "The compute node n1 is unreachable."

    # It comes back: the instance the portal was told is lost must not run on.
    await link.startNode(port=port)
    await remote.whenConnected()
    assert link.node is not None
    await eventually(lambda: link.node is not None and link.node._state("abc2") == "stopped")


@pytest_twisted.ensureDeferred
async def test_a_short_absence_loses_nothing(link: Link) -> None:
    await link.startNode()
    remote, watcher = link.remote(name="n1", grace=30)
    await remote.whenConnected()
    await remote.start("abc3", "web", None)
    await watcher.waitFor("abc3", "running")
    port = link.port
    await link.stopNode()
    await link.startNode(port=port)
    await remote.whenConnected()
    await eventually(lambda: any(s.instance == "abc3" for s in remote.instances()))
    assert [s.state for s in remote.instances()] == ["running"]
    assert "errored" not in watcher.history("abc3")


class HeldDiscards(ProcessRuntime):
    """A process runtime whose discards wait until ``going`` fires."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.going: Deferred[None] = Deferred()

    def discard(self, instance: str) -> Deferred[None]:
        async def held() -> None:
            await self.going
            await ProcessRuntime.discard(self, instance)

        return Deferred.fromCoroutine(held())


@pytest_twisted.ensureDeferred
async def test_a_discard_finished_while_the_link_was_down_is_passed_on(link: Link) -> None:
    """
    The node finishes a discard while its link is down (a restarted node
    does, before the scheduler has dialled it again): its word is lost, and
    its next report leaves the instance out. The scheduler passes it on as
    discarded rather than leaving it discarding.
    """
    await link.startNode(runtimeClass=HeldDiscards)
    remote, watcher = link.remote(name="n1", grace=30)
    await remote.whenConnected()
    await remote.start("abc5", "web", None)
    await watcher.waitFor("abc5", State.RUNNING)
    await remote.stop("abc5")
    await watcher.waitFor("abc5", State.STOPPED)
    await remote.discard("abc5")
    await watcher.waitFor("abc5", State.DISCARDING)
    node, runtime, port = link.node, link.runtimes[-1], link.port
    assert node is not None and isinstance(runtime, HeldDiscards)

    await link.stopNode()
    await eventually(lambda: not remote.connected and link.server is not None and link.server.link is None)
    runtime.going.callback(None)
    await node.whenIdle()
    assert not (link.directory / "abc5").exists()
    assert State.DISCARDED not in watcher.history("abc5")

    await link.startNode(port=port)
    await remote.whenConnected()
    await watcher.waitFor("abc5", State.DISCARDED)
    assert remote.instances() == []


@pytest_twisted.ensureDeferred
async def test_the_schedulers_report_waits_for_its_nodes(link: Link) -> None:
    """
    A scheduler that just started must not tell the portal its node holds
    nothing before the node has said what it holds (the portal would take
    the instances for lost).
    """
    from dit4c.scheduler.scheduler import Scheduler

    await link.startNode()
    first, watcher = link.remote(name="n1")
    await first.whenConnected()
    await first.start("abc4", "web", None)
    await watcher.waitFor("abc4", "running")
    await first.stopService()

    # A new scheduler, whose link to the node is not up yet when it reports.
    remote, _ = link.remote(name="n1")
    scheduler = Scheduler([remote], reactor=reactor, reportWait=10)
    statuses = await scheduler.report()
    assert [(s.instance, s.state) for s in statuses] == [("abc4", "running")]

    # A node that never answers delays the report by reportWait at most.
    await link.stopNode()
    await eventually(lambda: not remote.connected)
    stuck = Scheduler([remote], reactor=reactor, reportWait=0.3)
    assert [(s.instance, s.state) for s in await stuck.report()] == [("abc4", "running")]


@pytest_twisted.ensureDeferred
async def test_a_tools_output_is_read_across_the_link(link: Link) -> None:
    """
    The scheduler asks the node for a tool's output: the last bytes, from
    an offset, nothing for an instance the node does not hold (said in the
    answer), and, with the link down, a failure at once rather than a wait.
    """
    await link.startNode()
    remote, watcher = link.remote(name="n1")
    await remote.whenConnected()
    await remote.start("abc1", "web", None)
    await watcher.waitFor("abc1", "running")
    with open(link.directory / "abc1" / "tool.log", "ab") as log:  # as the tool writes it
        log.write("the tool says héllo\n".encode())
    size = (link.directory / "abc1" / "tool.log").stat().st_size

    tail = await remote.logs("abc1", None, 21)
    assert (tail.text, tail.next, tail.error) == ("the tool says héllo\n", size, None)
    assert (await remote.logs("abc1", size, 100)).text == ""
    assert (await remote.logs("abc1", size - 4, 3)).text == "llo"
    unknown = await remote.logs("nope1", 0, 10)
    assert unknown.text == "" and "holds nothing of instance nope1" in (unknown.error or "")

    await link.stopNode()
    await eventually(lambda: not remote.connected, what="the link down")
    with pytest.raises(Unanswered):
        await remote.logs("abc1", None, 10)
