"""
A scheduler tells the portal about its compute nodes and takes requests
about them (docs/protocols.md 7.7): the messages' checks, and a real
Scheduler behind a real ChannelClient against a scripted portal on a
loopback WebSocket.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from support.stubnode import StubNode
from support.waiting import eventually
from test_scheduler_channel import Handler, Setup, setup  # noqa: F401  (the fixture)

from dit4c.channel.errors import ProtocolError
from dit4c.channel.nodewire import (
    NodeCommand,
    NodeDone,
    NodeSummary,
    nodesMessage,
    parseNodeCommand,
    parseNodeDone,
    parseNodes,
)
from dit4c.channel.wire import CloseCode
from dit4c.common.life import State
from dit4c.scheduler.scheduler import Scheduler

# -- the messages ---------------------------------------------------------------------------


def test_a_summary_counts_by_state_in_the_lifes_order() -> None:
    summary = NodeSummary.counting("n1", True, 4, True, [State.STOPPED, State.RUNNING, State.RUNNING, State.STARTING])
    assert list(summary.instances.items()) == [("starting", 1), ("running", 2), ("stopped", 1)]
    assert (summary.active, summary.total) == (3, 4)
    assert parseNodes(nodesMessage([summary])) == (summary,)


@pytest.mark.parametrize(
    "nodes, reason",
    [
        ("n1", "nodes must be a list"),
        (["n1"], "each node must be a JSON object"),
        ([{"connected": True, "capacity": 1, "accepting": True, "instances": {}}], "node must be a non-empty string"),
        ([{"node": "n1", "connected": "yes", "capacity": 1, "accepting": True, "instances": {}}], "connected must be true or false"),
        ([{"node": "n1", "connected": True, "capacity": -1, "accepting": True, "instances": {}}], "capacity must be a whole number"),
        ([{"node": "n1", "connected": True, "capacity": 1, "accepting": True, "instances": {"paused": 1}}], "map states to counts"),
        ([{"node": "n1", "connected": True, "capacity": 1, "accepting": True, "instances": {"running": True}}], "running must be"),
        ([{"node": "n1", "connected": True, "capacity": 1, "accepting": True, "instances": {}}] * 2, "two nodes have one name"),
    ],
)
def test_malformed_nodes_are_refused(nodes: Any, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        parseNodes({"type": "nodes", "nodes": nodes})


def test_node_commands_and_answers() -> None:
    command = NodeCommand("q1", "n1", "drain")
    assert parseNodeCommand(command.toJSON()) == command
    with pytest.raises(ProtocolError, match="op must be one of cool-down, accept, drain"):
        parseNodeCommand({"type": "node-command", "id": "q1", "node": "n1", "op": "explode"})
    done = NodeDone("q1", None, ("abc1", "abc2"))
    assert parseNodeDone(done.toJSON()) == done
    with pytest.raises(ProtocolError, match="not an instance id"):
        parseNodeDone({"type": "node-done", "id": "q1", "stop": ["../etc"]})
    with pytest.raises(ProtocolError, match="longer than 1000"):
        parseNodeDone({"type": "node-done", "id": "q1", "error": "x" * 1001})


# -- a scheduler and its nodes ------------------------------------------------------------------


def _nodes(setup: Setup) -> list[list[dict[str, Any]]]:  # noqa: F811
    return [m["nodes"] for _, m in setup.portal.received if m["type"] == "nodes"]


@pytest_twisted.async_yield_fixture
async def scheduler(setup: Setup) -> Any:  # noqa: F811
    from twisted.internet import reactor

    n1, n2 = StubNode("n1"), StubNode("n2", capacity=4)
    n1.move("abc1", State.RUNNING)
    made = Scheduler([n1, n2], reactor=reactor, nodesDelay=0.05)
    made.channel = setup.client(made)
    made.startService()
    made.channel.startService()
    await made.channel.whenConnected()
    yield made, n1, n2
    await made.stopService()


@pytest_twisted.ensureDeferred
async def test_the_nodes_follow_every_report_and_every_change(setup: Setup, scheduler: Any) -> None:  # noqa: F811
    made, n1, n2 = scheduler
    await eventually(lambda: "nodes" in setup.portal.types())
    assert setup.portal.types() == ["hello", "report", "nodes"]
    assert _nodes(setup)[0] == [
        {"node": "n1", "connected": True, "capacity": 2, "accepting": True, "instances": {"running": 1}},
        {"node": "n2", "connected": True, "capacity": 4, "accepting": True, "instances": {}},
    ]

    # A burst of changes goes up as one message, pushed (nobody asked).
    n2.move("abc2", State.STARTING)
    n2.move("abc2", State.RUNNING)
    n2.connected = False
    made.nodeChanged(n2)
    await eventually(lambda: len(_nodes(setup)) == 2)
    await setup.portal.live.roundTrip()
    assert _nodes(setup)[1][1] == {"node": "n2", "connected": False, "capacity": 4, "accepting": True, "instances": {"running": 1}}
    assert len(_nodes(setup)) == 2

    # After a reconnect, the report is followed by the nodes again.
    assert made.channel is not None
    made.channel.dropConnection()
    await eventually(lambda: len(_nodes(setup)) == 3)
    assert setup.portal.types()[-2:] == ["report", "nodes"]


@pytest_twisted.ensureDeferred
async def test_node_commands_are_done_and_answered(setup: Setup, scheduler: Any) -> None:  # noqa: F811
    made, n1, n2 = scheduler
    portal = setup.portal.live
    portal.sendJSON(NodeCommand("q1", "n1", "cool-down").toJSON())
    assert await setup.portal.next("node-done") == {"type": "node-done", "id": "q1", "error": None, "stop": []}
    assert n1.accepting is False
    await eventually(lambda: _nodes(setup) and _nodes(setup)[-1][0]["accepting"] is False)

    portal.sendJSON(NodeCommand("q2", "n1", "accept").toJSON())
    assert (await setup.portal.next("node-done"))["error"] is None
    assert n1.accepting is True

    # A drain names what the portal is to stop: what a person's Stop would stop.
    n1.move("abc3", State.STOPPED)
    n1.move("abc4", State.STARTING)
    portal.sendJSON(NodeCommand("q3", "n1", "drain").toJSON())
    done = await setup.portal.next("node-done")
    assert (done["error"], sorted(done["stop"]), n1.accepting) == (None, ["abc1", "abc4"], False)

    # Refusals say why, for the administrator; the channel stays open.
    portal.sendJSON(NodeCommand("q4", "n9", "cool-down").toJSON())
    done = await setup.portal.next("node-done")
    assert done["error"] == "This scheduler has no compute node called n9."
    n2.connected = False
    portal.sendJSON(NodeCommand("q5", "n2", "cool-down").toJSON())
    assert "not linked" in (await setup.portal.next("node-done"))["error"]
    assert made.channel is not None and made.channel.connected


@pytest_twisted.ensureDeferred
async def test_a_scheduler_without_nodes_to_tell_says_so(setup: Setup) -> None:  # noqa: F811
    client = setup.client(Handler())
    client.startService()
    await client.whenConnected()
    await setup.portal.live.roundTrip()
    assert "nodes" not in setup.portal.types()
    setup.portal.live.sendJSON(NodeCommand("q1", "n1", "drain").toJSON())
    done = await setup.portal.next("node-done")
    assert done["error"] == "This scheduler does not take requests about its compute nodes."


@pytest_twisted.ensureDeferred
async def test_a_malformed_node_command_closes_the_channel(setup: Setup, scheduler: Any) -> None:  # noqa: F811
    closed = setup.portal.closed()
    setup.portal.live.sendJSON({"type": "node-command", "id": "q1", "node": "n1", "op": "explode"})
    code, reason = await closed
    assert code == CloseCode.PROTOCOL_ERROR and "op must be one of" in reason
