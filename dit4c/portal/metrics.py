"""
The portal's Prometheus figures (``twistd dit4c-portal --metrics ENDPOINT``,
``/metrics`` and ``/health`` there): instances by state and what changed
them, people, connected schedulers, the pages' open event streams and the
outputs being followed.

What the store holds is read every ``interval`` seconds, not at each
scrape (a scrape must not wait on the database, and prometheus_client asks
synchronously); what happens in this process is counted as it happens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dit4c.common.life import STATES
from dit4c.portal.events import InstanceEvent, InstanceEvents
from dit4c.portal.store.interfaces import IStore

__all__ = ["METRICS_INTERVAL", "PortalMetrics"]

#: Seconds between two reads of the store's figures.
METRICS_INTERVAL = 15.0


class PortalMetrics(Service):
    """Collects the portal's figures; a ``prometheus_client`` collector."""

    log = Logger()

    def __init__(
        self,
        store: IStore,
        events: InstanceEvents,
        clock: IReactorTime,
        *,
        schedulers: Callable[[], int],
        streams: Callable[[], int],
        following: Callable[[], int],
        interval: float = METRICS_INTERVAL,
    ) -> None:
        """
        :param schedulers: how many schedulers are connected now.
        :param streams: how many pages' event streams are open now.
        :param following: how many tool outputs are followed now.
        """
        self.store = store
        self.clock = clock
        self.schedulers = schedulers
        self.streams = streams
        self.following = following
        self.interval = interval
        #: What the store said last: instances by state, and people.
        self.byState: dict[str, int] = {}
        self.people = 0
        #: Instances that reached each state through a node's report or a deadline, since start.
        self.reached: Counter[str] = Counter()
        self._loop: LoopingCall | None = None
        events.subscribeChanges(None, self._changed)

    def _changed(self, event: InstanceEvent) -> None:
        if event.change == "state" and event.instance.state != event.previous.state:
            self.reached[str(event.instance.state)] += 1

    async def refresh(self) -> None:
        """Read the store's figures now."""
        self.byState = await self.store.countInstancesByState()
        self.people = await self.store.countUsers()

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.refresh()).addErrback(self._failed)

    def _failed(self, failure: Failure) -> None:
        # The figures stay as they were; the next read tries again.
        self.log.warn("could not read the portal's figures: {error}", error=failure.getErrorMessage())

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def collect(self) -> Iterator[Metric]:
        instances = GaugeMetricFamily("dit4c_portal_instances", "Instances in each state (read every few seconds).", labels=["state"])
        for state in STATES:
            instances.add_metric([state.value], self.byState.get(state.value, 0))
        yield instances
        reached = CounterMetricFamily(
            "dit4c_portal_instance_states_reached",
            "Instances that reached each state on a node's word or a passed deadline, since the portal started.",
            labels=["state"],
        )
        for state in STATES:
            reached.add_metric([state.value], self.reached.get(state.value, 0))
        yield reached
        yield GaugeMetricFamily("dit4c_portal_people", "People with an account.", value=self.people)
        yield GaugeMetricFamily("dit4c_portal_schedulers_connected", "Schedulers connected to this process.", value=self.schedulers())
        yield GaugeMetricFamily("dit4c_portal_event_streams", "Pages' event streams open on this process.", value=self.streams())
        yield GaugeMetricFamily("dit4c_portal_outputs_followed", "Tool outputs followed through this process.", value=self.following())
