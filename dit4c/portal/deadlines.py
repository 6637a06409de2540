"""
The portal's watch over transient states.

A compute node errors an instance whose start, stop, save, upload or
discard outlives its deadline (:data:`dit4c.common.life.DEADLINES`) and
says so. When nobody can say so — the node or its scheduler is away, or
never took the command — the portal does it itself: every ``interval``
seconds it looks for instances that have stayed in a transient state,
unchanged, for longer than the deadline plus a ``grace`` (so that a node's
own verdict, which says more, comes first), and moves each to ``errored``
with the reason, through its life and a compare-and-set on the state it
found (with several portal processes, one of them wins; a word from the
node meanwhile wins over both). An errored instance can always be
discarded, so nothing stays stuck.

The clock starts at the instance's last change (its ``updated`` time): a
save whose upload keeps reporting progress is not stuck.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dit4c.common.life import DEADLINES, TRANSIENT, Life, State, expiredReason
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.store.errors import Conflict, NotFound, StoreError
from dit4c.portal.store.interfaces import IInstances
from dit4c.portal.store.model import Instance

__all__ = ["DeadlineWatch"]


class DeadlineWatch(Service):
    """Errors instances stuck in a transient state (a ``Service``: it looks while it runs)."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        store: IInstances,
        publish: Callable[[Instance], object] | None = None,
        *,
        events: InstanceEvents | None = None,
        interval: float = 30.0,
        grace: float = 60.0,
        deadlines: Mapping[State, float] | None = None,
    ) -> None:
        """
        :param publish: called with every instance this errors.
        :param events: the portal's event bus, told of every instance this
            errors as an ``InstanceEvent`` (the pages, and the key
            directory, hear of it there).
        """
        self.reactor = reactor
        self.store = store
        self.publish = publish
        self.events = events
        self.interval = interval
        self.grace = grace
        self.deadlines: Mapping[State, float] = {**DEADLINES, **(deadlines or {})}
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(lambda f: self.log.failure("the deadline watch failed", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def sweep(self) -> Deferred[list[Instance]]:
        """Look once; fires with the instances it errored."""
        return Deferred.fromCoroutine(self._sweep())

    async def _sweep(self) -> list[Instance]:
        errored: list[Instance] = []
        now = self.reactor.seconds()
        for state in sorted(TRANSIENT):
            try:
                stuck = await self.store.listInstancesIn([state], now - self.deadlines[state] - self.grace)
            except StoreError as e:
                self.log.warn("could not look for stuck instances: {error}", error=e.message)
                return errored
            for instance in stuck:
                updated = await self._expire(instance, state)
                if updated is not None:
                    errored.append(updated)
        return errored

    async def _expire(self, instance: Instance, state: State) -> Instance | None:
        new = Life(instance.state).expire()
        reason = expiredReason(state, self.deadlines[state])
        try:
            updated: Instance = await self.store.updateInstance(
                instance.id, state=new, reason=reason, url=None, expected_state=instance.state
            )
        except (Conflict, NotFound):
            return None  # it moved meanwhile: whatever moved it knows better
        except StoreError as e:
            self.log.warn("could not error instance {instance}: {error}", instance=instance.id, error=e.message)
            return None
        self.log.warn(
            "instance {instance} was {state} for longer than its deadline: {reason}",
            instance=instance.id,
            state=state.value,
            reason=reason,
        )
        if self.events is not None:
            self.events.changed(InstanceEvent(updated, instance, "state"))
        if self.publish is not None:
            self.publish(updated)
        return updated
