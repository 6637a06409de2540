"""
Cooling a compute node down over a real node link (docs/protocols.md 11):
the scheduler's RemoteNode asks, the node's NodeLinkServer answers with
its new state, and a scheduler on top places nothing new there while what
runs there runs on. A node started again takes instances.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from support.waiting import eventually
from test_link import Link, link  # noqa: F401  (the fixture)
from twisted.internet import reactor

from dit4c.channel.errors import NodeAway, NodeFull
from dit4c.channel.interfaces import observer
from dit4c.channel.nodewire import NodeSummary
from dit4c.channel.wire import Command
from dit4c.common.life import State
from dit4c.scheduler.scheduler import COOLING, Scheduler


class Channel:
    """Where a scheduler's messages to the portal would go: recorded."""

    def __init__(self) -> None:
        self.states: list[tuple[str, str, str | None]] = []
        self.nodes: list[list[NodeSummary]] = []

    def sendState(self, instance: str, state: str, reason: str | None = None, url: str | None = None) -> None:
        self.states.append((instance, str(state), reason))

    def sendInstanceKey(self, instance: str, jwk: Any) -> None:
        pass

    def sendNodes(self, summaries: list[NodeSummary]) -> None:
        self.nodes.append(summaries)


@pytest_twisted.ensureDeferred
async def test_a_cooled_node_takes_nothing_new_and_runs_on(link: Link) -> None:  # noqa: F811
    await link.startNode()
    remote, watcher = link.remote(name="n1")
    changes: list[bool] = []
    remote.subscribe(observer(lambda *_: None, lambda *_: None, lambda node: changes.append(node.accepting)))
    scheduler = Scheduler([remote], reactor=reactor, nodesDelay=0.05)
    channel = Channel()
    scheduler.channel = channel  # type: ignore[assignment]
    await remote.whenConnected()
    await remote.start("cool1", "web", None)
    await watcher.waitFor("cool1", State.RUNNING)

    await scheduler.nodeCommand("n1", "cool-down")
    assert link.node is not None and link.node.accepting is False
    assert remote.accepting is False and changes[-1] is False
    # The portal hears of it (once the burst of changes is in).
    cooled = [NodeSummary("n1", True, 2, False, {"running": 1})]
    await eventually(lambda: channel.nodes and channel.nodes[-1] == cooled, what=lambda: f"{cooled}: {channel.nodes[-1:]}")

    # Nothing new is placed there: a person's start is refused, and says why.
    await scheduler.command(Command("c1", "start", "cool2", {"image": "web"}))
    assert channel.states[-1] == ("cool2", "errored", COOLING)
    with pytest.raises(NodeFull):
        remote.start("cool2", "web", None)
    # The node itself refuses too, whoever asks.
    with pytest.raises(NodeFull):
        link.node.start("cool3", "web", None)
    # What ran there runs on.
    assert [(s.instance, s.state) for s in remote.instances()] == [("cool1", State.RUNNING)]
    assert link.node._state("cool1") == State.RUNNING

    await scheduler.nodeCommand("n1", "accept")
    assert link.node.accepting is True and remote.accepting is True
    await scheduler.command(Command("c2", "start", "cool4", {"image": "web"}))
    await watcher.waitFor("cool4", State.RUNNING)

    # A drain cools it down and names what is there to stop (the portal stops them).
    assert sorted(await scheduler.nodeCommand("n1", "drain")) == ["cool1", "cool4"]
    assert link.node.accepting is False
    with pytest.raises(LookupError, match="no compute node called n9"):
        await scheduler.nodeCommand("n9", "cool-down")
    await scheduler.stopService()


@pytest_twisted.ensureDeferred
async def test_a_node_started_again_takes_instances(link: Link) -> None:  # noqa: F811
    await link.startNode()
    remote, _ = link.remote(name="n1", grace=30)
    await remote.whenConnected()
    await remote.setAccepting(False)
    assert remote.accepting is False
    port = link.port

    # Away: asking fails at once, never waits for the node.
    await link.stopNode()
    await eventually(lambda: not remote.connected)
    with pytest.raises(NodeAway, match="not linked"):
        await remote.setAccepting(True)

    # Back: it takes instances (a node's cooling is not kept across a restart).
    await link.startNode(port=port)
    await remote.whenConnected()
    assert remote.accepting is True and link.node is not None and link.node.accepting is True


@pytest_twisted.ensureDeferred
async def test_a_request_open_when_the_link_drops_fails_then(link: Link) -> None:  # noqa: F811
    await link.startNode()
    remote, _ = link.remote(name="n1", grace=30)
    await remote.whenConnected()
    assert link.server is not None
    # The node never answers this one: its link server is made deaf to requests.
    link.server._nodeCommand = lambda *_: None  # type: ignore[method-assign]
    asked = remote.setAccepting(False)
    await link.stopNode()
    with pytest.raises(NodeAway, match="was lost"):
        await asked
