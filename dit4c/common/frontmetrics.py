"""
The counters a shared HTTP front keeps, apart from the machine so that
whoever shows them (the routing server's admin endpoint, the benches)
needs nothing else of the front.
"""

from __future__ import annotations

__all__ = ["FrontMetrics"]


class FrontMetrics:
    """Counters a front keeps (the routing server's admin endpoint shows them); plain ints, so the hot path stays cheap."""

    def __init__(self) -> None:
        self.requests = 0
        self.connections = 0
        self.open = 0
        self.bytesIn = 0
        self.bytesOut = 0
        self.errors: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
