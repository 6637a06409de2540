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

The bus is in-process. Several portal processes on one PostgreSQL
database tell each other what they publish (:mod:`dit4c.portal.peers`,
through ``relay``): what another process tells is put on this bus with
:meth:`InstanceEvents.heard` and :meth:`InstanceEvents.heardAccess`, and
is not told on again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from twisted.logger import Logger

from dit4c.portal.store.model import Instance

__all__ = ["AccessChange", "EventBus", "InstanceEvent", "InstanceEvents", "Subscribers"]

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


class Subscribers(Generic[T]):
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
        self._instances: Subscribers[Instance] = Subscribers("instance event")
        self._access: Subscribers[AccessChange] = Subscribers("access change")
        self._keys: Subscribers[None] = Subscribers("key change")
        self._changes: dict[str | None, Subscribers[InstanceEvent]] = {}
        #: Where what is published here is told to the other portal processes
        #: ``(kind, body)`` (``IPeers.tell``); None: there are none.
        self.relay: Callable[[str, dict[str, object]], None] | None = None

    def _tell(self, kind: str, body: dict[str, object]) -> None:
        if self.relay is not None:
            self.relay(kind, body)

    def subscribe(self, callback: Callable[[Instance], None]) -> Callable[[], None]:
        """Call ``callback`` with every changed instance until the returned function is called."""
        return self._instances.subscribe(callback)

    def publish(self, instance: Instance) -> None:
        self._instances.publish(instance)
        self._tell("instance", {"id": instance.id})

    def heard(self, instance: Instance, *, keys: bool = False) -> None:
        """
        Another portal process changed ``instance`` (the store holds it so):
        published here, and the key directory told if its key or life
        changed (``keys``).
        """
        self._instances.publish(instance)
        if keys:
            self._keys.publish(None)

    def subscribeKeys(self, callback: Callable[[], object]) -> Callable[[], None]:
        """
        Call ``callback`` whenever an instance's published key may have
        changed (a change from outside a request, here or in another
        portal process) until the returned function is called.
        """
        return self._keys.subscribe(lambda _: callback())

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
        subscribers = self._changes.setdefault(key, Subscribers("instance change"))
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
        self._instances.publish(event.instance)
        self._keys.publish(None)
        self._tell("instance", {"id": event.instance.id, "keys": True})

    def accessChanged(self, change: AccessChange) -> None:
        """Publish ``change``: call it once the store holds the change."""
        self._access.publish(change)
        self._tell("access", {"user": change.user, "instance": change.instance, "session": change.session})

    def heardAccess(self, change: AccessChange) -> None:
        """Another portal process changed someone's access (the store holds it so): published here."""
        self._access.publish(change)
