"""
Changes as they happen: the portal's one in-process bus.

:class:`InstanceEvents`: whatever changes an instance publishes it (a
person's action, an instance's report), and what changes an instance from
outside a request (the scheduler channel, an expired deadline) publishes
the whole :class:`InstanceEvent`, which the bus passes on to those who
subscribed to such changes (by instance, owner, or all: the key directory)
and, as an instance, to everyone else; whatever ends or grants someone's
access (an unshare, a revoked share link, a disabled person, a logout)
publishes an :class:`AccessChange`. The streams that carry changes out of
this process (the pages', the auth helpers') are in
:mod:`dit4c.portal.streams`.

The bus is in-process. Several portal processes behind a load balancer
each see the changes made through themselves; a change made through
another reaches a page at its next event (each is checked in the store)
and an auth helper at its next periodic recheck. Carrying changes between
processes (PostgreSQL LISTEN/NOTIFY) is the path at scale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from twisted.logger import Logger

from dit4c.portal.store.model import Instance

__all__ = ["AccessChange", "EventBus", "InstanceEvent", "InstanceEvents"]

@dataclass(frozen=True)
class AccessChange:
    """
    Someone's leave to use instances may have changed. What changed is
    looked up again in the store by whoever cares; this only says where
    to look.
    """

    #: Whose access: a user id, or None for anyone's (a share link revoked).
    user: str | None = None
    #: Which instance, or None for every instance of theirs (disabled, logged out).
    instance: str | None = None
    #: The hash of the portal session that ended (a logout), if that is the change.
    session: str | None = None


@dataclass(frozen=True)
class InstanceEvent:
    """An instance changed from outside a request: the scheduler channel, or a deadline that passed."""

    #: The instance as it now is.
    instance: Instance
    #: The instance as it was.
    previous: Instance
    #: ``"state"`` (its state, reason or URL) or ``"key"`` (its public key).
    change: str


T = TypeVar("T")


class _Subscribers(Generic[T]):
    """Callbacks that each hear every value published, in order; one failing costs only itself."""

    log = Logger()

    def __init__(self, what: str) -> None:
        self.what = what
        self._callbacks: list[Callable[[T], object]] = []

    def subscribe(self, callback: Callable[[T], object]) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def publish(self, value: T) -> None:
        for callback in list(self._callbacks):
            try:
                callback(value)
            except Exception:
                self.log.failure("{what} subscriber failed", what=self.what)

    def __len__(self) -> int:
        return len(self._callbacks)


class EventBus(Protocol):
    """The one in-process bus of instance and access changes."""

    def publish(self, instance: Instance) -> None:
        """``instance`` changed (the store holds it so)."""

    def subscribe(self, callback: Callable[[Instance], None]) -> Callable[[], None]:
        """Hear every changed instance until the returned function is called."""
        ...

    def accessChanged(self, change: AccessChange) -> None:
        """Someone's leave to use instances may have changed (the store holds it so)."""

    def subscribeAccess(self, callback: Callable[[AccessChange], None]) -> Callable[[], None]:
        """Hear every access change until the returned function is called."""
        ...



class InstanceEvents:
    """The in-process bus (see the module docstring): instance changes, and access changes."""

    def __init__(self) -> None:
        self._instances: _Subscribers[Instance] = _Subscribers("instance event")
        self._access: _Subscribers[AccessChange] = _Subscribers("access change")
        self._changes: dict[str | None, _Subscribers[InstanceEvent]] = {}

    def subscribe(self, callback: Callable[[Instance], None]) -> Callable[[], None]:
        """Call ``callback`` with every changed instance until the returned function is called."""
        return self._instances.subscribe(callback)

    def publish(self, instance: Instance) -> None:
        self._instances.publish(instance)

    @property
    def subscribers(self) -> int:
        return len(self._instances)

    def subscribeAccess(self, callback: Callable[[AccessChange], None]) -> Callable[[], None]:
        """Call ``callback`` with every :class:`AccessChange` until the returned function is called."""
        return self._access.subscribe(callback)

    def subscribeChanges(self, key: str | None, callback: Callable[[InstanceEvent], object]) -> Callable[[], None]:
        """
        Call ``callback`` with every :class:`InstanceEvent` of an instance
        whose id or owner's id is ``key`` (every instance's, for None) until
        the returned function is called.
        """
        subscribers = self._changes.setdefault(key, _Subscribers("instance change"))
        unsubscribe = subscribers.subscribe(callback)

        def unsubscribeAndForget() -> None:
            unsubscribe()
            if not subscribers and self._changes.get(key) is subscribers:
                del self._changes[key]

        return unsubscribeAndForget

    def changed(self, event: InstanceEvent) -> None:
        """Publish ``event`` to its subscribers, then its instance to every instance subscriber."""
        for key in dict.fromkeys((event.instance.id, event.instance.owner_id, None)):
            subscribers = self._changes.get(key)
            if subscribers is not None:
                subscribers.publish(event)
        self.publish(event.instance)

    def accessChanged(self, change: AccessChange) -> None:
        """Publish ``change``: call it once the store holds the change."""
        self._access.publish(change)
