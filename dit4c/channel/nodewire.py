"""
What a scheduler tells the portal about its compute nodes, and what an
administrator asks of a node (docs/protocols.md 7.7, and 11 for the node
link), in the shapes both ends of each link check alike.

A scheduler sends ``nodes`` (every node it drives: linked or not, its
capacity, whether it takes new instances, the instances it holds by state)
after every welcome and whenever any of it changes. The portal keeps it
in memory while the channel is open. An administrator's ``node-command``
(cool down, accept again, drain) is asked on the open channel and answered
``node-done``; like a question about a tool's output, it is never stored
or sent again: a node that is cooling down is something to see and decide
about now, not a command to deliver later.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dit4c.channel.errors import ProtocolError
from dit4c.channel.wire import MAX_REASON, instanceField, text
from dit4c.common.life import ACTIVE, STATES, State

__all__ = [
    "LINK_NODE_OPS",
    "NODE_OPS",
    "NodeCommand",
    "NodeDone",
    "NodeSummary",
    "nodeStateMessage",
    "nodesMessage",
    "parseLinkNodeCommand",
    "parseNodeCommand",
    "parseNodeDone",
    "parseNodeState",
    "parseNodes",
]

#: What an administrator may ask of a node through the portal: take no new
#: instances, take them again, or take none and have those on it stopped.
NODE_OPS: tuple[str, ...] = ("cool-down", "accept", "drain")
#: What a scheduler asks of a node over the node link (a drain is a cool-down
#: there: the stops come from the portal, as a person's would).
LINK_NODE_OPS: tuple[str, ...] = ("cool-down", "accept")
#: The most instance ids one ``node-done`` names.
MAX_STOP = 10000


@dataclass(frozen=True)
class NodeSummary:
    """One compute node as its scheduler sees it now."""

    #: The node's name, unique under its scheduler.
    node: str
    #: Whether the scheduler's link to it is up (an in-process node always is).
    connected: bool
    #: Instances it may run at once.
    capacity: int
    #: Whether it takes new instances (False: cooling down, or not linked).
    accepting: bool
    #: How many instances it holds, by state (states it holds none in are left out).
    instances: Mapping[str, int] = field(default_factory=dict)

    @property
    def active(self) -> int:
        """Instances that hold compute (or are about to): what counts against its capacity."""
        return sum(count for state, count in self.instances.items() if state in ACTIVE)

    @property
    def total(self) -> int:
        return sum(self.instances.values())

    def toJSON(self) -> dict[str, Any]:
        return {
            "node": self.node, "connected": self.connected, "capacity": self.capacity,
            "accepting": self.accepting, "instances": dict(self.instances),
        }  # fmt: skip

    @classmethod
    def counting(cls, node: str, connected: bool, capacity: int, accepting: bool, states: Iterable[State]) -> NodeSummary:
        """A summary that counts ``states``, one for each instance the node holds."""
        counts: dict[str, int] = {}
        for state in states:
            counts[state.value] = counts.get(state.value, 0) + 1
        return cls(node, connected, capacity, accepting, {s.value: counts[s.value] for s in STATES if s.value in counts})


def nodesMessage(summaries: Iterable[NodeSummary]) -> dict[str, Any]:
    return {"type": "nodes", "nodes": [summary.toJSON() for summary in summaries]}


def _flag(message: Mapping[str, Any], name: str) -> bool:
    value = message.get(name)
    if not isinstance(value, bool):
        raise ProtocolError(f"{message.get('type', 'nodes')}: {name} must be true or false")
    return value


def _count(message: Mapping[str, Any], name: str) -> int:
    value = message.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"{message.get('type', 'nodes')}: {name} must be a whole number from 0")
    return value


def _summary(entry: object) -> NodeSummary:
    if not isinstance(entry, Mapping):
        raise ProtocolError("nodes: each node must be a JSON object")
    counts = entry.get("instances")
    if not isinstance(counts, Mapping) or not all(state in STATES for state in counts):
        raise ProtocolError("nodes: instances must map states to counts")
    return NodeSummary(
        text({"type": "nodes", **entry}, "node"),
        _flag(entry, "connected"),
        _count(entry, "capacity"),
        _flag(entry, "accepting"),
        {state: _count(counts, state) for state in counts},
    )


def parseNodes(message: Mapping[str, Any]) -> tuple[NodeSummary, ...]:
    """The nodes of a ``nodes`` message (no two of one name)."""
    nodes = message.get("nodes")
    if not isinstance(nodes, list):
        raise ProtocolError("nodes: nodes must be a list")
    summaries = tuple(_summary(entry) for entry in nodes)
    if len({s.node for s in summaries}) != len(summaries):
        raise ProtocolError("nodes: two nodes have one name")
    return summaries


@dataclass(frozen=True)
class NodeCommand:
    """An administrator's request about one node (portal → scheduler)."""

    id: str
    node: str
    #: One of :data:`NODE_OPS`.
    op: str

    def toJSON(self) -> dict[str, Any]:
        return {"type": "node-command", "id": self.id, "node": self.node, "op": self.op}


def parseNodeCommand(message: Mapping[str, Any]) -> NodeCommand:
    op = message.get("op")
    if op not in NODE_OPS:
        raise ProtocolError(f"node-command: op must be one of {', '.join(NODE_OPS)}")
    return NodeCommand(text(message, "id"), text(message, "node"), op)


def parseLinkNodeCommand(message: Mapping[str, Any]) -> tuple[str, str]:
    """A ``node-command`` on the node link: its id and op (the link is one node's)."""
    op = message.get("op")
    if op not in LINK_NODE_OPS:
        raise ProtocolError(f"node-command: op must be one of {', '.join(LINK_NODE_OPS)}")
    return text(message, "id"), op


@dataclass(frozen=True)
class NodeDone:
    """
    The scheduler's answer to a :class:`NodeCommand`: done (``error`` None)
    or why not; for a drain, the instances on the node that the portal is
    to stop, as their owners' Stop would.
    """

    id: str
    error: str | None = None
    stop: tuple[str, ...] = ()

    def toJSON(self) -> dict[str, Any]:
        return {"type": "node-done", "id": self.id, "error": self.error, "stop": list(self.stop)}


def parseNodeDone(message: Mapping[str, Any]) -> NodeDone:
    stop = message.get("stop", [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP:
        raise ProtocolError(f"node-done: stop must be a list of at most {MAX_STOP} instance ids")
    return NodeDone(
        text(message, "id"),
        text(message, "error", limit=MAX_REASON, optional=True),
        tuple(instanceField({"type": "node-done", "instance": each}) for each in stop),
    )


def nodeStateMessage(capacity: int, accepting: bool) -> dict[str, Any]:
    """What a node says over its link whenever its capacity or its taking of instances changes."""
    return {"type": "node-state", "capacity": capacity, "accepting": accepting}


def parseNodeState(message: Mapping[str, Any]) -> tuple[int, bool]:
    return _count(message, "capacity"), _flag(message, "accepting")

