"""
A compute node in memory (an ``INode``), for tests of what sits above
nodes (the scheduler, the portal's view of nodes): its instances move at
once, or when the test says, and it cools down as a real node does.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from dit4c.channel.errors import NodeAway, NodeFull
from dit4c.channel.interfaces import INode, INodeObserver
from dit4c.channel.wire import InstanceStatus, LogChunk
from dit4c.common.life import ACTIVE, State


@implementer(INode)
class StubNode:
    def __init__(self, name: str, capacity: int = 2) -> None:
        self.nodeName = name
        self.capacity = capacity
        self.accepting = True
        #: Set False to have it away (its scheduler's link down).
        self.connected = True
        self.statuses: dict[str, InstanceStatus] = {}
        self.observers: list[INodeObserver] = []

    def load(self) -> int:
        return sum(1 for s in self.statuses.values() if s.state in ACTIVE)

    def instances(self) -> list[InstanceStatus]:
        return list(self.statuses.values())

    def subscribe(self, observer: INodeObserver) -> None:
        self.observers.append(observer)

    def whenReported(self) -> Deferred[None]:
        return succeed(None)

    def setAccepting(self, accepting: bool) -> Deferred[None]:
        if not self.connected:
            return fail(NodeAway(f"The compute node {self.nodeName} is not linked to its scheduler now."))
        self.accepting = accepting
        for observer in self.observers:
            observer.nodeChanged(self)
        return succeed(None)

    def move(self, instance: str, state: State) -> None:
        """The instance moves to ``state``, and whoever watches hears of it."""
        status = InstanceStatus(instance, state)
        if state is State.DISCARDED:
            self.statuses.pop(instance, None)
        else:
            self.statuses[instance] = status
        for observer in self.observers:
            observer.instanceState(self, status)

    def start(
        self,
        instance: str,
        image: str,
        port: int | None,
        digest: str | None = None,
        token: str | None = None,
        limits: object = None,
    ) -> Deferred[None]:
        if not self.connected or not self.accepting or self.load() >= self.capacity:
            raise NodeFull(f"node {self.nodeName} takes no instances now")
        self.move(instance, State.STARTING)
        self.move(instance, State.RUNNING)
        return succeed(None)

    def resume(self, instance: str) -> Deferred[None]:
        return self.start(instance, "", None)

    def stop(self, instance: str) -> Deferred[None]:
        self.move(instance, State.STOPPING)
        self.move(instance, State.STOPPED)
        return succeed(None)

    def save(self, instance: str) -> Deferred[None]:
        return self.stop(instance)

    def discard(self, instance: str) -> Deferred[None]:
        self.move(instance, State.DISCARDED)
        return succeed(None)

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        return succeed(LogChunk.of(b"", offset, limit))
