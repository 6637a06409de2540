"""
Stand-ins for the tests of the portal alone.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred


class RecordingCommands:
    """
    An ``ICommandSink`` that records the instance commands the portal sends
    (for tests of the portal without a scheduler); ``connectedIds`` says
    which schedulers count as connected.
    """

    def __init__(self, connectedIds: set[str] | None = None) -> None:
        self.sent: list[tuple[str, str, str, dict[str, Any]]] = []
        self.connectedIds = connectedIds or set()

    def send(self, scheduler_id: str, op: str, instance_id: str, params: dict[str, Any]) -> Deferred[str]:
        self.sent.append((scheduler_id, op, instance_id, params))
        return defer.succeed(f"cmd{len(self.sent)}")

    def connected(self, scheduler_id: str) -> bool:
        return scheduler_id in self.connectedIds
