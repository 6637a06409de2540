"""
The scheduler's Prometheus figures (``twistd dit4c-scheduler --metrics
ENDPOINT``, ``/metrics`` and ``/health`` there): whether the channel to the
portal is up, its nodes and which of them are linked, the instances each
node holds by state, the commands the portal sent and how they ended, and
where new instances went (or that none could go anywhere).

Everything is in memory: what happens is counted by the scheduler as it
happens (:meth:`SchedulerMetrics.commandHandled`, :meth:`~SchedulerMetrics.placed`,
:meth:`~SchedulerMetrics.refused`), and the rest is what the channel and the
nodes know already, read at each scrape (prometheus_client asks
synchronously, so nothing here may wait).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dit4c.channel.interfaces import INode
from dit4c.channel.wire import OPS
from dit4c.common.life import STATES

__all__ = ["OUTCOMES", "Outcome", "SchedulerMetrics", "nodeConnected"]

#: How a command from the portal ended, as the scheduler took it on.
Outcome = Literal["ok", "error"]
OUTCOMES: tuple[Outcome, ...] = ("ok", "error")


def nodeConnected(node: INode) -> bool:
    """
    Whether the scheduler can reach the node now. A node across the network
    (:class:`dit4c.node.remote.RemoteNode`) says so (its link is up: the
    node welcomed it); one in this process has no link to lose.
    """
    return bool(getattr(node, "connected", True))


class SchedulerMetrics:
    """
    Counts what the scheduler does, and reads what its nodes and channel
    know at each scrape; a ``prometheus_client`` collector.
    """

    def __init__(self, nodes: Callable[[], Sequence[INode]], portalConnected: Callable[[], bool]) -> None:
        """
        :param nodes: the scheduler's nodes now.
        :param portalConnected: whether the channel to the portal is up now.
        """
        self.nodes = nodes
        self.portalConnected = portalConnected
        #: Commands from the portal by (op, outcome), since start.
        self.commands: Counter[tuple[str, Outcome]] = Counter()
        #: Starts handed to each node (by name), since start.
        self.placements: Counter[str] = Counter()
        #: Starts no node had room for, since start.
        self.refusals = 0

    # -- what the scheduler tells it -----------------------------------------------------

    def commandHandled(self, op: str, outcome: Outcome) -> None:
        """A command from the portal was taken on (``ok``) or could not be (``error``)."""
        self.commands[(op, outcome)] += 1

    def placed(self, node: INode) -> None:
        """A node took a start."""
        self.placements[node.nodeName] += 1

    def refused(self) -> None:
        """A start found no node with room (every one refused it: ``NodeFull``)."""
        self.refusals += 1

    # -- what a scrape reads ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """What ``/health`` adds to ``{"status": "ok"}``."""
        nodes = self.nodes()
        return {
            "portal": self.portalConnected(),
            "nodes": len(nodes),
            "nodesConnected": sum(1 for node in nodes if nodeConnected(node)),
        }

    def collect(self) -> Iterator[Metric]:
        nodes = list(self.nodes())
        yield GaugeMetricFamily(
            "dit4c_scheduler_portal_connected",
            "Whether the channel to the portal is up (1) or not (0).",
            value=1 if self.portalConnected() else 0,
        )
        yield GaugeMetricFamily("dit4c_scheduler_nodes", "Compute nodes this scheduler drives.", value=len(nodes))
        yield GaugeMetricFamily(
            "dit4c_scheduler_nodes_connected",
            "Compute nodes this scheduler can reach now (their link is up).",
            value=sum(1 for node in nodes if nodeConnected(node)),
        )
        connected = GaugeMetricFamily(
            "dit4c_scheduler_node_connected", "Whether each node's link is up (1) or not (0).", labels=["node"]
        )
        capacity = GaugeMetricFamily(
            "dit4c_scheduler_node_capacity",
            "Instances each node may run at once (0 until a remote node has said).",
            labels=["node"],
        )
        instances = GaugeMetricFamily(
            "dit4c_scheduler_instances",
            "Instances each node holds, by state, as the scheduler last heard.",
            labels=["node", "state"],
        )
        for node in nodes:
            connected.add_metric([node.nodeName], 1 if nodeConnected(node) else 0)
            capacity.add_metric([node.nodeName], node.capacity)
            byState = Counter(str(status.state) for status in node.instances())
            for state in STATES:
                instances.add_metric([node.nodeName, state.value], byState.get(state.value, 0))
        yield connected
        yield capacity
        yield instances
        commands = CounterMetricFamily(
            "dit4c_scheduler_commands",
            "Commands from the portal, by op and outcome (error: the scheduler could not take it on, "
            "or no node had room for a start), since the scheduler started.",
            labels=["op", "outcome"],
        )
        for op in OPS:
            for outcome in OUTCOMES:
                commands.add_metric([op, outcome], self.commands.get((op, outcome), 0))
        yield commands
        placed = CounterMetricFamily(
            "dit4c_scheduler_instances_placed",
            "Starts each node took, since the scheduler started.",
            labels=["node"],
        )
        for name in dict.fromkeys([node.nodeName for node in nodes] + list(self.placements)):
            placed.add_metric([name], self.placements.get(name, 0))
        yield placed
        yield CounterMetricFamily(
            "dit4c_scheduler_starts_refused",
            "Starts no node had room for (every node full, cooled down or away), since the scheduler started.",
            value=self.refusals,
        )
