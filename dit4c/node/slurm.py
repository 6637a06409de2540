"""
The ``slurm`` runtime: each instance is one Slurm batch job on a cluster
this node submits to (``twistd dit4c-node --runtime slurm``).

The node's pods directory is on storage the cluster's compute nodes share
(on one machine: the node's own data directory). For each pod the runtime
writes ``job.json`` (the tool's command, the helpers' command and
environment) and a job script there, and submits it with ``sbatch
--parsable``: the job's name is ``<prefix>-<instance>``, so a restarted node
finds its jobs again in ``squeue``; ``--cpus-per-task`` and ``--mem`` come
from the catalogue entry's limits, ``--time`` from the node's time limit.
The job (:mod:`dit4c.node.slurmjob`) runs the tool and the pod's helper
process (``dit4c-helper-pod``) in the pod's working directory on whichever
compute node Slurm picked, so the listener dials out to the routing server
from there: a cluster behind NAT needs no open port.

What the runtime knows of its jobs comes from ``squeue`` (accounting may be
off, so never from ``sacct``), read every ``pollInterval`` seconds while it
holds a job:

- a pending job's instance is ``starting``, its reason its place in the
  queue ("Waiting for the cluster: position 3.", told through
  :meth:`SlurmRuntime.onWaiting`); ``start`` fires once the job runs, so
  the node's time for the tool to answer (``--start-timeout``) begins then
  and the wait in the queue is bounded by the ``starting`` state's deadline
  alone; a start waiting in the queue is given up as soon as the node no
  longer wants it (:func:`showQueueWaits` tells it), so a stop cancels the
  queued job at once;
- a running job is ready once its tool and auth helper answer (the job
  writes ``ready`` in the pod's directory: the node cannot reach a Unix
  socket on another machine);
- a job that ended with no stop asked is reported (``onExit``) with why:
  its state in ``squeue --states=all`` (``TIMEOUT``: "The cluster ended the
  job at its time limit (N min)."; slurmctld keeps an ended job for its
  ``MinJobAge``), else slurmstepd's words in the job's output ("DUE TO TIME
  LIMIT"), else what the job wrote of the tool's end (``exit.json``).

A stop is ``scancel --signal=TERM --full`` (the tool and its helpers are
asked to end), then, after the grace, ``scancel`` (Slurm kills what is left
after its ``KillWait``); a pending job is simply cancelled. A save packs the
job's working directory as the process runtime does
(:func:`dit4c.node.processarchive.packArchive`); a start from a saved image
unpacks it there first.

The tool is confined in the job as the process runtime confines it
(:mod:`dit4c.node.confine`): the directory holding the pods (their keys) is
hidden from it, the rest of the file system read-only, and, when the node
(and so its jobs) runs as root, it runs as a uid of its own, one per
instance, its working directory handed to that uid by the job. Its CPUs and
memory are Slurm's to enforce (the cluster's task plugin).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from zope.interface import implementer

from dit4c.channel.wire import LogChunk
from dit4c.common.helperenv import VARIABLES, inherited, toEnvironment
from dit4c.node.errors import RuntimeError_
from dit4c.node.interfaces import IRuntime, PodSpec, PodStatus, helperCommand
from dit4c.node.processarchive import packArchive
from dit4c.node.processes import removePodDirectory
from dit4c.node.processlaunch import (
    AUTH_SOCKET,
    SOCKET_DIRECTORY,
    SOCKET_NAME,
    TOOL_UIDS,
    homeDirectory,
    linkStorage,
    podTool,
    recorded,
    toolUid,
)
from dit4c.node.processlaunch import _exposed as exposed
from dit4c.node.processtools import Tool, builtinTools
from dit4c.node.slurmjob import EXIT, JOB, READY, STARTED
from dit4c.node.slurmqueue import Job, SlurmCommands, SlurmError, endReason, queuePosition
from dit4c.node.toollogs import readChunk

__all__ = ["JOB_RECORD", "SlurmRuntime", "showQueueWaits"]

#: In the pod's directory: the job's id, name, tool and time limit (the node writes it at submission).
JOB_RECORD = "slurm.json"
#: The job script, in the pod's directory.
SCRIPT = "job.sh"
#: The job's own output (slurmstepd's messages), in the pod's directory.
JOB_LOG = "job.log"
#: Minutes a job may run unless the node is told otherwise (Slurm's ``--time``).
TIME_LIMIT = 24 * 60
POLL_INTERVAL = 2.0
COMMAND_TIMEOUT = 30.0


@implementer(IRuntime)
class SlurmRuntime(SlurmCommands):
    """Runs each instance as a Slurm batch job; knows its jobs from ``squeue``."""

    name = "slurm"
    #: A stopped job's working directory stays: a start of its instance submits a new job in it.
    resumable = True
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        directory: Path,
        tools: Mapping[str, Tool] | None = None,
        *,
        partition: str | None = None,
        timeLimit: int = TIME_LIMIT,
        prefix: str = "dit4c",
        helpers: list[str] | None = None,
        stopGrace: float = 5.0,
        pollInterval: float = POLL_INTERVAL,
        commandTimeout: float = COMMAND_TIMEOUT,
        slurmEnvironment: Mapping[str, str] | None = None,
        toolUids: range = TOOL_UIDS,
    ) -> None:
        """
        :param directory: the pods' directory (``<directory>/<instance>/``),
            on storage every compute node of the partition shares.
        :param tools: image name → tool (default :func:`dit4c.node.processtools.builtinTools`).
        :param partition: where jobs go (None: the cluster's default partition).
        :param timeLimit: minutes each job may run (``sbatch --time``).
        :param prefix: the jobs' names are ``<prefix>-<instance>``: this
            runtime sees only its own jobs.
        :param helpers: the pod's helper process's command (default
            ``dit4c-helper-pod``), given ``--tool-pid-file`` and ``--hold``.
        :param stopGrace: seconds a job's tool has to end after SIGTERM before ``scancel`` ends the job.
        :param slurmEnvironment: added to the environment of every Slurm command (``SLURM_CONF``).
        :param toolUids: when the node (and so its jobs) runs as root, the
            uids its tools run as, one per instance, as the process runtime's.
        """
        self.reactor = reactor
        self.directory = directory
        self.tools = dict(tools) if tools is not None else builtinTools()
        self.partition = partition
        self.timeLimit = timeLimit
        self.prefix = prefix
        self.helpers = list(helpers) if helpers is not None else helperCommand("dit4c-helper-pod")
        self.stopGrace = stopGrace
        self.pollInterval = pollInterval
        self.commandTimeout = commandTimeout
        self.slurmEnvironment = dict(slurmEnvironment or {})
        #: A job runs as the node's user: as root, each tool runs as a uid of its own.
        self.root = os.geteuid() == 0
        self.toolUids = toolUids
        #: What tools must not see: the directory holding the pods (their keys), and a non-root node's home.
        self.hide = [str(directory.resolve().parent), *([] if self.root else [str(homeDirectory())])]
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.workDirectory = str(directory)
        #: Each watched instance's job id.
        self._jobs: dict[str, str] = {}
        #: Instances whose stop was asked: their job's end is no surprise.
        self._stopping: set[str] = set()
        #: What each pending instance was last told of its wait.
        self._told: dict[str, str] = {}
        self._exitCallbacks: list[Callable[[str, str], object]] = []
        self._waitingCallbacks: list[Callable[[str, str], object]] = []
        self._poll: LoopingCall | None = None
        #: Starts waiting for their job to leave the queue.
        self._queued: dict[str, list[Deferred[None]]] = {}
        #: Instances the node gave up starting since their start began: told
        #: while ``sbatch`` still ran, before the start waits (a stop that
        #: soon would otherwise find no wait to end, and the start wait on).
        self._givenUp: set[str] = set()

    def jobName(self, instance: str) -> str:
        return f"{self.prefix}-{instance}"

    # -- IRuntime ---------------------------------------------------------------------------

    def onExit(self, callback: Callable[[str, str], object]) -> None:
        self._exitCallbacks.append(callback)

    def onWaiting(self, callback: Callable[[str, str], object]) -> None:
        """
        Call ``callback(instance, text)`` as a start waits on the cluster:
        "Waiting for the cluster: position 2." while its job is pending,
        then where it runs while its tool comes up.
        """
        self._waitingCallbacks.append(callback)

    def start(self, spec: PodSpec) -> Deferred[None]:
        """
        Submit the pod's job; fires once the cluster runs it (its processes
        start only then), or it ended, or the start was given up first.
        """
        return Deferred.fromCoroutine(self._start(spec))

    def stop(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop(instance))

    def discard(self, instance: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._discard(instance))

    def pods(self) -> Deferred[list[PodStatus]]:
        return Deferred.fromCoroutine(self._pods())

    def capture(self, instance: str, archive: Path) -> Deferred[str | None]:
        """The job's working directory as a tar archive, with the tool's name in it (as the process runtime saves)."""
        directory = self.directory / instance
        try:
            tool = json.loads((directory / JOB_RECORD).read_text())["image"]
        except (OSError, ValueError, KeyError) as e:
            raise RuntimeError_(f"Nothing to save: the instance has no job here ({e}).") from None
        return threads.deferToThread(packArchive, directory / "work", archive, str(tool))

    def logs(self, instance: str, offset: int | None, limit: int) -> Deferred[LogChunk]:
        """The tool's output, from ``<pod>/tool.log`` (written by the job on the shared storage)."""
        return threads.deferToThread(readChunk, self.directory / instance / "tool.log", offset, limit)

    def ready(self, instance: str) -> Deferred[bool]:
        """Whether the job has said its tool and auth helper answer (``ready`` in the pod's directory)."""
        if instance not in self._jobs:
            return succeed(False)
        return threads.deferToThread((self.directory / instance / READY).exists)

    def forget(self) -> None:
        """Stop watching the jobs (the node is stopping; they run on, and a new runtime finds them by name)."""
        self._exitCallbacks.clear()
        self._waitingCallbacks.clear()
        self._jobs.clear()
        self._stopPolling()
        for instance in list(self._queued):
            self._leftQueue(instance)

    # -- starting ---------------------------------------------------------------------------

    async def _start(self, spec: PodSpec) -> None:
        self._givenUp.discard(spec.instance)
        work, tool = await podTool(spec, self.tools, JOB_RECORD)
        sockets = spec.directory / SOCKET_DIRECTORY
        socketPath = sockets / SOCKET_NAME if tool.socket else None
        if socketPath is not None:
            sockets.mkdir(mode=0o700, exist_ok=True)
        authPath = spec.directory / AUTH_SOCKET
        storage = spec.directory / "mnt" if spec.environment.get(VARIABLES["fileServer"]) else None
        if storage is not None:
            storage.mkdir(exist_ok=True)
            linkStorage(work)
        base = inherited()
        helperEnv = {
            **base,
            **spec.environment,
            **toEnvironment(
                tool=f"unix:path={quoteStringArgument(str(socketPath))}" if socketPath else None,
                authListen=f"unix:address={quoteStringArgument(str(authPath))}:mode=600:lockfile=0",
                auth=f"unix:path={quoteStringArgument(str(authPath))}",
                storageMount=str(storage) if storage is not None else None,
            ),
        }
        toolEnv = {**base, "HOME": str(work), **({"DIT4C_STORAGE": str(storage)} if storage is not None else {})}
        job = {
            "work": str(work),
            "tool": {"name": tool.name, "command": list(tool.command), "environment": dict(tool.environment or {})},
            "socket": str(socketPath) if socketPath else None,
            "port": spec.port,
            "authSocket": str(authPath),
            "helpers": self.helpers,
            "hold": self.stopGrace + 5.0,
            "helperEnvironment": helperEnv,
            "toolEnvironment": toolEnv,
            # The tool is confined in the job as the process runtime confines it (dit4c.node.confine).
            "uid": self._toolUid(spec.instance) if self.root else None,
            "hide": self.hide,
            "expose": exposed(),
            "storage": str(storage) if storage is not None else None,
        }
        jobFile = spec.directory / JOB
        jobFile.write_text(json.dumps(job))
        os.chmod(jobFile, 0o600)
        script = spec.directory / SCRIPT
        script.write_text(f"#!/bin/sh\nexec {sys.executable} -m dit4c.node.slurmjob {spec.directory}\n")
        os.chmod(script, 0o700)
        for stale in (READY, EXIT, STARTED):
            (spec.directory / stale).unlink(missing_ok=True)
        argv = [
            "sbatch", "--parsable", f"--job-name={self.jobName(spec.instance)}",
            *([f"--partition={self.partition}"] if self.partition else []),
            "--nodes=1", "--ntasks=1", f"--time={self.timeLimit}",
            f"--chdir={work}", f"--output={spec.directory / JOB_LOG}", "--export=NONE",
            *([f"--cpus-per-task={math.ceil(spec.limits.cpus)}"] if spec.limits.cpus is not None else []),
            *([f"--mem={spec.limits.memory}M"] if spec.limits.memory is not None else []),
            str(script),
        ]  # fmt: skip
        try:
            out = await self._slurm(argv, "submitting the job")
        except SlurmError as e:
            raise RuntimeError_(f"The cluster refused the job: {e}") from None
        jobId = out.strip().split(";")[0]
        (spec.directory / JOB_RECORD).write_text(
            json.dumps({"job": jobId, "name": self.jobName(spec.instance), "image": tool.name, "timeLimit": self.timeLimit})
        )
        self.log.info("{instance}: {tool} submitted as job {job}", instance=spec.instance, tool=tool.name, job=jobId)
        self._stopping.discard(spec.instance)
        # The pod's processes start only once the cluster runs the job: the
        # start waits for it (its place in the queue told meanwhile), so
        # the node's time for the tool to answer begins when the job runs.
        left: Deferred[None] = Deferred()
        self._queued.setdefault(spec.instance, []).append(left)
        self._watch(spec.instance, jobId)
        if spec.instance in self._givenUp:
            self._leftQueue(spec.instance)
        await self._untilRunning(spec.directory, left)
        waiting = self._queued.get(spec.instance, [])
        if left in waiting:
            waiting.remove(left)
        if not waiting:
            self._queued.pop(spec.instance, None)

    async def _untilRunning(self, directory: Path, left: Deferred[None]) -> None:
        """
        Until the job has begun (it writes ``started`` first: seen within
        moments, where the queue is read only every ``pollInterval``), or
        ``left`` fires (the queue says it runs or ended, or the start was
        given up).
        """
        pause = 0.05
        while not left.called:
            if await threads.deferToThread((directory / STARTED).exists):
                return
            await deferLater(self.reactor, pause, lambda: None)
            pause = min(pause * 2, 1.0)

    # -- watching ---------------------------------------------------------------------------

    def _watch(self, instance: str, jobId: str) -> None:
        self._jobs[instance] = jobId
        self._told.pop(instance, None)
        if self._poll is None:
            self._poll = LoopingCall(lambda: Deferred.fromCoroutine(self._look()))
            self._poll.clock = self.reactor
            self._poll.start(self.pollInterval, now=True).addErrback(self._pollFailed)

    def _pollFailed(self, failure: Any) -> None:
        """A bug in a look at the queue: said, and the next job watched starts the looks again."""
        self.log.failure("watching the jobs", failure)
        self._poll = None

    def givenUp(self, instance: str) -> None:
        """
        The node no longer wants ``instance`` started (a stop, a discard, its
        deadline): a start waiting for its job to leave the queue returns at
        once, so that the stop, which waits for the start, can cancel the job.
        """
        self._givenUp.add(instance)
        self._leftQueue(instance)

    def _leftQueue(self, instance: str) -> None:
        """The start of ``instance`` waits no longer (on the reactor's next turn, never inside the caller)."""
        for waiter in self._queued.pop(instance, []):
            self.reactor.callLater(0, waiter.callback, None)

    def _stopPolling(self) -> None:
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    async def _look(self) -> None:
        """
        One look at the queue: waits told, ended jobs reported. Only the
        jobs watched when ``squeue`` was asked are judged by its answer: a
        job submitted while it ran may not be in it, and is not ended.
        """
        if not self._jobs:
            self._stopPolling()
            return
        watched = dict(self._jobs)
        try:
            queue = await self._queue()
        except SlurmError as e:
            self.log.warn("cannot see the cluster's jobs: {error}", error=str(e))
            return
        byId = {job.id: job for job in queue}
        for instance, jobId in watched.items():
            job = byId.get(jobId)
            if instance in self._stopping or self._jobs.get(instance) != jobId:
                continue  # stopped, or started again, while an earlier one was looked at
            if job is not None and job.state == "PENDING":
                self._tell(instance, f"Waiting for the cluster: position {queuePosition(job, queue)}.")
            elif job is not None and job.alive:
                self._leftQueue(instance)
                self._tell(instance, f"Running on the cluster's node {job.nodes}; waiting for the tool.")
            else:
                self._leftQueue(instance)
                self._jobs.pop(instance, None)
                self._told.pop(instance, None)
                reason = await self._endReason(instance, job)
                self.log.warn("{instance}: job {job} ended: {reason}", instance=instance, job=jobId, reason=reason)
                for callback in list(self._exitCallbacks):
                    callback(instance, reason)

    def _tell(self, instance: str, text: str) -> None:
        if self._told.get(instance) == text:
            return
        self._told[instance] = text
        for callback in list(self._waitingCallbacks):
            callback(instance, text)

    async def _endReason(self, instance: str, job: Job | None) -> str:
        directory = self.directory / instance

        def read() -> tuple[str, dict[str, Any] | None, int | None]:
            try:
                log = (directory / JOB_LOG).read_text(errors="replace")[-8192:]
            except OSError:
                log = ""
            try:
                exited = json.loads((directory / EXIT).read_text())
            except (OSError, ValueError):
                exited = None
            try:
                limit = json.loads((directory / JOB_RECORD).read_text()).get("timeLimit")
            except (OSError, ValueError, AttributeError):
                limit = None
            return log, exited if isinstance(exited, dict) else None, limit if isinstance(limit, int) else None

        log, exited, limit = await threads.deferToThread(read)
        return endReason(job, timeLimit=limit, log=log, exit=exited)

    # -- finding jobs again -----------------------------------------------------------------

    def _toolUid(self, instance: str) -> int:
        """The uid ``instance``'s tool runs as (a root node): the one its ``job.json`` names, or the lowest free."""
        return toolUid(self.directory, JOB, instance, self.toolUids)

    def _recordedJob(self, instance: str) -> str | None:
        return recorded(self.directory / instance / JOB_RECORD, "job")

    async def _pods(self) -> list[PodStatus]:
        """
        Every job of this runtime's name in the queue (one that waits counts
        as a pod that runs: the node waits for it again), and every pod
        directory whose job has ended, with why.
        """
        queue = await self._patientQueue()
        prefix = f"{self.prefix}-"
        found: dict[str, PodStatus] = {}
        for job in queue:
            if not job.name.startswith(prefix) or not job.alive:
                continue
            instance = job.name[len(prefix) :]
            if instance not in self._jobs and instance not in self._stopping:
                self._watch(instance, job.id)
            waiting = f"Waiting for the cluster: position {queuePosition(job, queue)}." if job.state == "PENDING" else None
            found[instance] = PodStatus(instance, True, waiting)
        byId = {job.id: job for job in queue}
        records = await threads.deferToThread(lambda: sorted(p.parent.name for p in self.directory.glob(f"*/{JOB_RECORD}")))
        for instance in records:
            if instance in found:
                continue
            jobId = self._recordedJob(instance)
            found[instance] = PodStatus(instance, False, await self._endReason(instance, byId.get(jobId or "")))
        return [found[instance] for instance in sorted(found)]

    # -- stopping ---------------------------------------------------------------------------

    async def _patientQueue(self, tries: int = 3) -> list[Job]:
        """
        The queue, asked again (a second apart) if slurmctld does not
        answer at once: a restarted node that took every job for gone
        would error every instance.
        """
        for attempt in range(tries):
            try:
                return await self._queue()
            except SlurmError as e:
                if attempt == tries - 1:
                    raise
                self.log.warn("cannot see the cluster's jobs, asking again: {error}", error=str(e))
                await deferLater(self.reactor, 1.0, lambda: None)
        raise AssertionError("not reached")

    async def _liveJob(self, instance: str) -> Job | None:
        """``instance``'s job if it holds or waits for its place in the cluster."""
        jobId = self._jobs.get(instance) or self._recordedJob(instance)
        name = self.jobName(instance)
        for job in await self._queue():
            if job.alive and (job.id == jobId or job.name == name):
                return job
        return None

    async def _stop(self, instance: str) -> None:
        self._stopping.add(instance)
        self._jobs.pop(instance, None)
        self._told.pop(instance, None)
        self._leftQueue(instance)
        job = await self._liveJob(instance)
        if job is None:
            return
        if job.state != "PENDING":
            await self._slurm(["scancel", "--signal=TERM", "--full", job.id], "stopping the job")
            if await self._ended(job.id, self.stopGrace):
                return
        await self._slurm(["scancel", job.id], "cancelling the job")
        if not await self._ended(job.id, self.commandTimeout + 60.0):
            raise SlurmError(f"The cluster did not end job {job.id}.")

    async def _ended(self, jobId: str, within: float) -> bool:
        deadline = self.reactor.seconds() + within
        pause = 0.05
        while True:
            if not any(job.id == jobId and job.alive for job in await self._queue()):
                return True
            if self.reactor.seconds() >= deadline:
                return False
            await deferLater(self.reactor, pause, lambda: None)
            pause = min(pause * 2, 1.0)

    async def _discard(self, instance: str) -> None:
        await self._stop(instance)
        await threads.deferToThread(removePodDirectory, self.directory / instance)
        self._stopping.discard(instance)


def showQueueWaits(runtime: SlurmRuntime, node: Any) -> None:
    """
    A starting instance's reason on its page says how its job waits on the
    cluster: the runtime's waits told to the node, as its start's progress
    (``starting`` with that reason; gone once it runs). And a start waiting
    in the queue is given up as soon as the node's instance leaves
    ``starting`` (the node's stop waits for its start to settle).
    """
    from dit4c.channel.interfaces import observer

    runtime.onWaiting(node._tellStarting)

    def changed(_node: Any, status: Any) -> None:
        if status.state != "starting":
            runtime.givenUp(status.instance)

    node.subscribe(observer(changed, lambda *_: None))
