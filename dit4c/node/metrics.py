"""
A compute node's Prometheus figures (``twistd dit4c-node --metrics ENDPOINT``,
``/metrics`` and ``/health`` there): the instances it holds by state, its
capacity and whether it is cooling down, the operations it ended (start,
stop, save, discard, resume) and how, the bytes of saved images it
uploaded, and the pods whose processes run now.

Everything here is in the node's memory (its records, its counts, its
runtime's pods), so a scrape reads nothing from disk and waits on nothing:
prometheus_client asks synchronously, on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dit4c.common.life import STATES
from dit4c.node.noderecords import GOALS, OUTCOMES
from dit4c.node.podmanpods import HeldPod, PodPhase

if TYPE_CHECKING:
    from dit4c.node.node import Node

__all__ = ["NodeMetrics", "podsRunning"]


def podsRunning(runtime: Any) -> int | None:
    """
    How many of the runtime's pods have every process running, as far as
    it knows without looking (a process whose end it has not yet heard of
    or polled counts as running); None for a runtime that does not say.

    The process runtime holds each pod's processes (an ended one has no
    pid); the podman runtime, each pod's phase.
    """
    pods = getattr(runtime, "_pods", None)
    if not isinstance(pods, dict):
        return None
    count = 0
    for pod in pods.values():
        if isinstance(pod, HeldPod):
            count += pod.state is PodPhase.UP
        elif isinstance(pod, dict):
            count += bool(pod) and all(getattr(p, "pid", None) is not None for p in pod.values())
        else:
            return None
    return count


class NodeMetrics:
    """A node's figures; a ``prometheus_client`` collector."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def health(self) -> dict[str, Any]:
        """What ``/health`` adds to ``{"status": "ok"}``."""
        return {"instances": len(self.node.instances()), "accepting": self.node.accepting}

    def collect(self) -> Iterator[Metric]:
        node = self.node
        byState: dict[str, int] = {}
        for status in node.instances():
            byState[status.state] = byState.get(status.state, 0) + 1
        instances = GaugeMetricFamily("dit4c_node_instances", "Instances this node holds, by state (its records).", labels=["state"])
        for state in STATES:
            instances.add_metric([state.value], byState.get(state.value, 0))
        yield instances
        yield GaugeMetricFamily("dit4c_node_capacity", "The most instances this node holds a pod of at once.", value=node.capacity)
        yield GaugeMetricFamily(
            "dit4c_node_load", "Instances this node holds a pod of now (what a new one must fit beside).", value=node.load()
        )
        yield GaugeMetricFamily(
            "dit4c_node_cooling_down", "1 while this node takes no new instances (cooling down), else 0.", value=0 if node.accepting else 1
        )
        operations = CounterMetricFamily(
            "dit4c_node_operations",
            "Operations this node ended since it started, by op and outcome (a refused start or resume is an error).",
            labels=["op", "outcome"],
        )
        for op in GOALS:
            for outcome in OUTCOMES:
                operations.add_metric([op, outcome], node.outcomes.get((op, outcome), 0))
        yield operations
        yield CounterMetricFamily(
            "dit4c_node_uploaded_bytes",
            "Bytes of saved images this node's upload helper delivered to the image server since it started.",
            value=node.uploadedBytes,
        )
        running = podsRunning(node.runtime)
        if running is not None:
            yield GaugeMetricFamily("dit4c_node_pods_running", "Pods whose processes all run now, as the runtime knows.", value=running)
