"""
How a restarted node takes back every pod it finds (:meth:`NodeRecovery._recover`):
it reads its records, asks the runtime which pods still run, and carries on
from where each instance was — a running one runs on, a stop or save under
way is finished, an upload still running is watched again (one that ended
is judged by what it left, one that died is started afresh), partial files
are removed, a resume under way goes on, and a pod with no record is
discarded. Each instance is taken back on its own: one that cannot be is
reported ``errored`` with the reason and the others go on.
"""

from __future__ import annotations

import json
from functools import partial

from twisted.internet import threads

from dit4c.common.files import removeFile
from dit4c.common.life import State
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import PodStatus
from dit4c.node.noderecords import InstanceRecord
from dit4c.node.nodestart import FETCHED, RESUMING, NodeStarting
from dit4c.node.nodestop import NodeStopping
from dit4c.node.processes import RECORD, removePodDirectory

__all__ = ["NodeRecovery"]


class NodeRecovery(NodeStarting, NodeStopping):
    """Taking instances back after a restart (a part of :class:`dit4c.node.node.Node`)."""

    async def _recover(self) -> None:
        found: list[InstanceRecord] = []
        for path in sorted(self.directory.glob(f"*/{RECORD}")):
            try:
                record = InstanceRecord.fromJSON(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError, KeyError):
                self.log.warn("ignoring an unreadable instance record {path}", path=str(path))
                continue
            self._records[record.instance] = record
            found.append(record)
        try:
            pods = {pod.instance: pod for pod in await self.runtime.pods()}
        except Exception:
            self.log.failure("the runtime could not list its pods")
            pods = {}
        for instance in pods:
            if instance not in self._records:
                # Made by this node but not recorded (a discard that died half way):
                # nothing can use it any more.
                self.log.warn("discarding pod {instance}, which this node holds no record of", instance=instance)
                self._spawn(instance, "discard", partial(self._discardPod, instance))
        for record in found:
            if self._records.get(record.instance) is not record:
                # A command came while the runtime was asked (a resume, a stop,
                # a discard): its own work carries the instance on from here.
                continue
            self._arm(record)
            self._spawn(record.instance, "take back", partial(self._takeBack, record, pods.get(record.instance)))
        if self._records:
            self.log.info("found {count} instances again", count=len(self._records))

    async def _discardPod(self, instance: str) -> None:
        try:
            await self.runtime.discard(instance)
            await threads.deferToThread(removePodDirectory, self._podDirectory(instance))
        except (OSError, RuntimeError_) as e:
            # Tried again at the next restart: it is still a pod with no record.
            self.log.warn("could not discard pod {instance}: {error}", instance=instance, error=str(e))

    async def _takeBack(self, record: InstanceRecord, pod: PodStatus | None) -> None:
        """Carry on from where ``record`` was when the node stopped."""
        instance, state = record.instance, record.state
        directory = self._podDirectory(instance)
        if state is State.STARTING and (directory / RESUMING).exists():
            await self._carryOnResuming(record, pod)
        elif state is State.STARTING:
            await removeFile(directory / FETCHED)
            await removeFile(directory / (FETCHED + ".partial"))
            if pod is not None and pod.running:
                self.log.info("{instance} was starting: waiting for it again", instance=instance)
                await self._waitUntilReady(instance, self.reactor.seconds() + self.startTimeout)
            else:
                self._failed(
                    instance, "The compute node restarted while this instance was starting.", during=State.STARTING
                )
                await self.runtime.stop(instance)
        elif state is State.RUNNING:
            if pod is not None and pod.running:
                self.log.info("found {instance} running again", instance=instance)
                self._emit(record)
            else:
                why = pod.reason if pod is not None and pod.reason else "Its pod is gone."
                why = f"The instance stopped while its compute node was restarting. {why}"
                self._failed(instance, why, during=State.RUNNING)
                await self.runtime.stop(instance)
        elif state is State.STOPPING:
            await self._finishStop(instance)
        elif state is State.SAVING:
            await self._capture(instance)
        elif state is State.UPLOADING:
            await self._upload(instance)
        elif state is State.DISCARDING:
            await self._discard(instance)
        elif state is State.ERRORED and pod is not None and pod.running:
            # What is left of an errored pod must not run on unseen.
            await self.runtime.stop(instance)
        else:
            self._emit(record)

    async def _carryOnResuming(self, record: InstanceRecord, pod: PodStatus | None) -> None:
        """
        A resume the restart cut short goes on: a pod that runs is waited
        for; one that does not is stopped (what of it had started) and
        started again. Either way the instance ends ``running``, or
        ``stopped`` with the reason and its files kept.
        """
        instance = record.instance
        try:
            if pod is not None and pod.running:
                self.log.info("{instance} was resuming: waiting for it again", instance=instance)
                await self._waitUntilReady(instance, self.reactor.seconds() + self.startTimeout, resuming=True)
            else:
                self.log.info("{instance} was resuming: resuming it again", instance=instance)
                await self.runtime.stop(instance)
                await self._start(record, stale=False, resuming=True)
        finally:
            await removeFile(self._podDirectory(instance) / RESUMING)
