"""
Instance changes as they happen, for everyone in this portal process who
watches: the pages' Server-Sent Events stream subscribes, and whatever
changes an instance (a person's action, the scheduler channel) publishes.

This bus is in-process. Several portal processes behind a load balancer
each see the changes made through themselves; carrying changes between
processes (PostgreSQL LISTEN/NOTIFY) is the path at scale.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from dit4c.portal.store.model import Instance

Subscriber = Callable[[Instance], None]


class InstanceEvents:
    log = Logger()

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback`` with every changed instance until the returned function is called."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, instance: Instance) -> None:
        for callback in list(self._subscribers):
            try:
                callback(instance)
            except Exception:
                self.log.failure("instance event subscriber failed")

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
