"""
The scheduler: takes instance commands from the portal's channel, places
each new instance on a compute node with room, and passes every state and
key its nodes tell it back up the channel.

It knows each instance's node from the nodes themselves (what each says it
holds), so a restarted scheduler needs no memory of its own: its first
report to the portal is what its nodes hold.

It tells the portal about its nodes too (linked or not, capacity, cooling
down or not, the instances each holds: ``nodes``, docs/protocols.md 7.7)
after every welcome and whenever that changes, and cools a node down, or
has it take instances again, when an administrator asks.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from dit4c.channel.errors import NodeFull
from dit4c.channel.interfaces import INode, INodeObserver, startFrom
from dit4c.channel.nodewire import NodeSummary
from dit4c.channel.wire import Command, InstanceStatus, LogChunk
from dit4c.common.life import ACTIONS, State
from dit4c.scheduler.channel import ChannelClient, INodesHandler, ISchedulerHandler
from dit4c.scheduler.metrics import SchedulerMetrics

__all__ = ["Scheduler"]


#: What a person is told when every linked node is cooling down.
COOLING = "No compute node takes new instances now: they are cooling down for maintenance. Try again later."


@implementer(ISchedulerHandler, INodesHandler, INodeObserver)
class Scheduler(MultiService):
    log = Logger()

    def __init__(
        self, nodes: list[INode] | None = None, *, reactor: Any = None, reportWait: float = 30.0, nodesDelay: float = 0.2
    ) -> None:
        """
        :param reportWait: seconds the first report to the portal (after
            every connect) waits for the nodes to say what they hold: an
            instance missing from it is taken for lost.
        :param nodesDelay: seconds a change to the nodes waits before the
            portal is told, so that a burst of changes (a drain's stops)
            goes up as one ``nodes`` message.
        """
        super().__init__()
        self.reactor = reactor
        self.reportWait = reportWait
        self.nodesDelay = nodesDelay
        self._nodesCall: IDelayedCall | None = None
        self.nodes: list[INode] = []
        #: The channel to the portal (set by whoever builds the scheduler).
        self.channel: ChannelClient | None = None
        #: What it counts as it goes, and its figures (served with ``--metrics``).
        self.metrics = SchedulerMetrics(lambda: self.nodes, lambda: self.channel is not None and self.channel.connected)
        for node in nodes or []:
            self.addNode(node)

    def addNode(self, node: INode) -> None:
        self.nodes.append(node)
        node.subscribe(self)

    def nodeOf(self, instance: str) -> INode | None:
        for node in self.nodes:
            if any(status.instance == instance for status in node.instances()):
                return node
        return None

    # -- ISchedulerHandler -------------------------------------------------------------------

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        node = self.nodeOf(instance)
        if node is None:
            return fail(LookupError(f"No compute node of this scheduler holds instance {instance}."))
        return node.logs(instance, offset, limit)

    def report(self) -> Deferred[list[InstanceStatus]]:
        return Deferred.fromCoroutine(self._report())

    async def _report(self) -> list[InstanceStatus]:
        # A node not linked yet (this scheduler just started) would leave its
        # instances out, and the portal would take them for lost: wait for
        # each to say what it holds, for a while.
        waits = [node.whenReported() for node in self.nodes]
        if waits and self.reactor is not None:
            for d in waits:
                d.addTimeout(self.reportWait, self.reactor)
            await DeferredList(waits, consumeErrors=True)
        return [status for node in self.nodes for status in node.instances()]

    def command(self, command: Command) -> Deferred[None]:
        def taken(ok: bool) -> None:
            self.metrics.commandHandled(command.op, "ok" if ok else "error")

        def failed(failure: Failure) -> Failure:
            self.metrics.commandHandled(command.op, "error")
            return failure  # the channel logs it and tells the portal

        handling: Deferred[bool] = maybeDeferred(self._act, command)
        return handling.addCallbacks(taken, failed)

    def _act(self, command: Command) -> Deferred[bool]:
        """Act on a command: whether it was taken on (a start no node has room for is not)."""
        node = self.nodeOf(command.instance)
        if command.op == "start":
            # Its node again if one holds it; else the nodes with room, most room first.
            for candidate in [node] if node is not None else self._candidates():
                try:
                    started = startFrom(candidate, command)
                except NodeFull:
                    continue
                self.metrics.placed(candidate)
                return started.addCallback(lambda _: True)
            self.metrics.refused()
            linked = [n for n in self.nodes if n.connected]
            why = COOLING if linked and not any(n.accepting for n in linked) else "No compute node has room for this instance now."
            self._tell(InstanceStatus(command.instance, State.ERRORED, why))
            return succeed(False)
        if node is None:
            # No node holds it: whatever it was asked, nothing of it runs.
            final = State.DISCARDED if command.op == "discard" else State.STOPPED
            self._tell(InstanceStatus(command.instance, final))
            return succeed(True)
        action = {"stop": node.stop, "save": node.save, "discard": node.discard, "resume": node.resume}[command.op]
        action(command.instance).addErrback(
            lambda f: self.log.failure("{op} {instance}", f, op=command.op, instance=command.instance)
        )
        return succeed(True)

    def _candidates(self) -> list[INode]:
        """The nodes that take instances and have room, most room first."""
        candidates = [n for n in self.nodes if n.accepting and n.load() < n.capacity]
        return sorted(candidates, key=lambda n: n.capacity - n.load(), reverse=True)

    # -- INodeObserver -------------------------------------------------------------------------

    def instanceState(self, node: INode, status: InstanceStatus) -> None:
        self._tell(status)
        self.nodeChanged(node)  # what it holds, by state

    def instanceKey(self, node: INode, instance: str, jwk: dict[str, Any]) -> None:
        if self.channel is not None:
            self.channel.sendInstanceKey(instance, jwk)

    def _tell(self, status: InstanceStatus) -> None:
        if self.channel is not None:
            self.channel.sendState(status.instance, status.state, status.reason, status.url)

    def nodeChanged(self, node: INode) -> None:
        """Tell the portal about the nodes, once this turn's changes (and ``nodesDelay``'s) are in."""
        if self.reactor is None:
            self._sendNodes()
        elif self._nodesCall is None:
            self._nodesCall = self.reactor.callLater(self.nodesDelay, self._sendNodes)

    def _sendNodes(self) -> None:
        self._nodesCall = None
        if self.channel is not None:
            self.channel.sendNodes(self.nodeSummaries())

    # -- INodesHandler -------------------------------------------------------------------------

    def nodeSummaries(self) -> list[NodeSummary]:
        return [
            NodeSummary.counting(
                node.nodeName, node.connected, node.capacity, node.accepting, (s.state for s in node.instances())
            )
            for node in self.nodes
        ]

    def nodeCommand(self, name: str, op: str) -> Deferred[list[str]]:
        return Deferred.fromCoroutine(self._nodeCommand(name, op))

    async def _nodeCommand(self, name: str, op: str) -> list[str]:
        node = next((n for n in self.nodes if n.nodeName == name), None)
        if node is None:
            raise LookupError(f"This scheduler has no compute node called {name}.")
        await node.setAccepting(op == "accept")
        self.log.info("node {name}: {op}", name=name, op=op)
        if op != "drain":
            return []
        # Cooled down first, so nothing new lands there; what it holds that a
        # person could stop, the portal stops as that person's Stop would.
        return [s.instance for s in node.instances() if s.state in ACTIONS["stop"].allowedIn]

    def stopService(self) -> Deferred[None]:
        if self._nodesCall is not None and self._nodesCall.active():
            self._nodesCall.cancel()
        self._nodesCall = None
        return maybeDeferred(super().stopService)
