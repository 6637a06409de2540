"""
Instances left unused: stopped, or saved, once their catalogue entry's idle
limit has passed with no traffic through the routing server
(docs/protocols.md 14.5).

What counts as use is what an instance's helpers see come down its tunnel:
each new connection and each piece of data a browser sends (an open page's
WebSocket answers the tool's pings, so a page left open counts). The pod's
helper process reports the latest such time to the portal at most once a
minute (``POST /reports/activity``, :meth:`dit4c.portal.reports.Reports.activity`),
signed with the instance's key like every report; the portal keeps it in
the store (``instances.active_at``), so every portal process sees it.

The portal decides, not the node: only it knows the catalogue entry's limit
and can act as the owner would (:meth:`Instances.act`, with the reason kept
on the instance), and a person's page shows the moment it will happen
(:func:`idleDeadline`) before it does.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from dit4c.common.life import State
from dit4c.common.limits import ToolLimits
from dit4c.portal.errors import InstanceError
from dit4c.portal.instances import Instances
from dit4c.portal.store.errors import StoreError
from dit4c.portal.store.interfaces import IStore
from dit4c.portal.store.model import Instance

__all__ = ["CULL_INTERVAL", "IdleCuller", "idleDeadline", "idleReason"]

#: Seconds between two looks for instances past their idle limit.
CULL_INTERVAL = 30.0


def idleDeadline(instance: Instance, limits: ToolLimits) -> float | None:
    """
    When a running ``instance`` is stopped or saved if nothing uses it
    meanwhile: its idle limit after the later of its last use and its last
    change of state (so one that just started, or resumed, has the whole
    limit). None: it has no idle limit, or is not running.
    """
    if limits.idle is None or instance.state is not State.RUNNING:
        return None
    return max(instance.active_at or 0.0, instance.updated) + limits.idle * 60


def idleReason(limits: ToolLimits) -> str:
    """What the instance says once culled."""
    done = "Stopped" if limits.idleAction == "stop" else "Saved"
    return f"{done} after {limits.idle} min without use."


class IdleCuller(Service):
    """Every ``interval`` seconds, stops or saves each running instance past its idle limit, as its owner would."""

    log = Logger()

    def __init__(self, store: IStore, instances: Instances, clock: IReactorTime, interval: float = CULL_INTERVAL) -> None:
        self.store = store
        self.instances = instances
        self.clock = clock
        self.interval = interval
        self._loop: LoopingCall | None = None
        #: Instances this culler stopped or saved since it started.
        self.culled = 0

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(lambda: Deferred.fromCoroutine(self.look()))
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("the idle culler stopped", f)
        )

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    async def look(self) -> int:
        """Act on every instance past its idle limit now; how many were."""
        now = self.clock.seconds()
        try:
            running = await self.store.listRunningWithIdleLimits()
        except StoreError as e:
            self.log.warn("could not look for unused instances: {error}", error=str(e))
            return 0
        acted = 0
        for instance, limits in running:
            deadline = idleDeadline(instance, limits)
            if deadline is None or now < deadline:
                continue
            owner = await self.store.userById(instance.owner_id)
            if owner is None:
                continue
            try:
                await self.instances.act(owner, instance.id, limits.idleAction, reason=idleReason(limits))
            except (InstanceError, StoreError) as e:
                # It changed meanwhile (stopped by its owner, say), or its owner is at their quota: next look.
                self.log.info("could not {action} unused {instance}: {error}", action=limits.idleAction, instance=instance.id, error=str(e))
                continue
            acted += 1
            self.culled += 1
            self.log.info(
                "{action} {instance} of {owner}: unused for {minutes} min",
                action="stopped" if limits.idleAction == "stop" else "saving", instance=instance.id,
                owner=owner.name, minutes=limits.idle,
            )  # fmt: skip
        return acted
