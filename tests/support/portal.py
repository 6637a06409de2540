"""
Stand-ins for the tests of the portal alone.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from dit4c.channel.wire import LogChunk


class RecordingCommands:
    """
    An ``ICommandSink`` that records the instance commands the portal sends
    (for tests of the portal without a scheduler); ``connectedIds`` says
    which schedulers count as connected.
    """

    def __init__(self, connectedIds: set[str] | None = None) -> None:
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []
        self.connectedIds = connectedIds or set()
        #: Each instance's tool's output, for ``logs``.
        self.output: dict[str, bytes] = {}

    def send(self, scheduler_id: str, op: str, instance_id: str, params: dict[str, Any]) -> Deferred[str]:
        self.sent.append((scheduler_id, op, instance_id, params))
        return defer.succeed(f"cmd{len(self.sent)}")

    def connected(self, scheduler_id: str) -> bool:
        return scheduler_id in self.connectedIds

    def reachable(self, scheduler_id: str) -> Deferred[bool]:
        return defer.succeed(self.connected(scheduler_id))

    def logs(self, scheduler_id: str, instance_id: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """What ``output`` holds for the instance, read as a node reads its tool's log."""
        return defer.succeed(LogChunk.of(self.output.get(instance_id, b""), offset, limit))
