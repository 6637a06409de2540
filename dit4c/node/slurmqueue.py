"""
The ``slurm`` runtime's view of the cluster: running Slurm's commands
(``sbatch``, ``squeue``, ``scancel``) as child processes with a timeout,
never blocking the reactor (through the podman runtime's collector,
:class:`dit4c.node.podmancommand._Collect`), ``squeue``'s answer read into
:class:`Job` rows, a pending job's place in its partition's queue, and why
a job that ended by itself ended, said for the person whose instance it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from dit4c.node.errors import RuntimeError_

# The podman runtime's collector (gathers a child's output, kills it at its timeout): one for both.
from dit4c.node.podmancommand import _Collect as Collect

__all__ = [
    "ALIVE",
    "SQUEUE_FORMAT",
    "Job",
    "SlurmCommands",
    "SlurmError",
    "endReason",
    "parseQueue",
    "queuePosition",
    "timeLimitMinutes",
]

#: What ``squeue`` is asked to print of each job: the name last (it is the only free text but the reason).
SQUEUE_FORMAT = "%i|%T|%P|%Q|%l|%N|%r|%j"
#: Job states of a job that holds (or waits for) its place in the cluster.
ALIVE = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING", "SIGNALING", "STAGE_OUT",
    "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
})  # fmt: skip


class SlurmError(RuntimeError_):
    """A Slurm command failed or did not answer in time (the message says which, and Slurm's reason)."""


@dataclass(frozen=True)
class Job:
    """One row of ``squeue``."""

    id: str
    state: str
    partition: str
    priority: int
    #: As squeue prints it: ``1:00``, ``1-00:00:00``, ``UNLIMITED``.
    timeLimit: str
    nodes: str
    reason: str
    name: str

    @property
    def alive(self) -> bool:
        return self.state in ALIVE


def parseQueue(text: str) -> list[Job]:
    """``squeue --noheader --format=`` :data:`SQUEUE_FORMAT` read into rows (lines it cannot read are left out)."""
    jobs = []
    for line in text.splitlines():
        parts = line.strip().split("|", 7)
        if len(parts) != 8:
            continue
        try:
            priority = int(parts[3])
        except ValueError:
            priority = 0
        jobs.append(Job(parts[0], parts[1], parts[2], priority, parts[4], parts[5], parts[6], parts[7]))
    return jobs


def _jobNumber(job: Job) -> tuple[int, str]:
    head = job.id.split("_")[0]
    return (int(head), job.id) if head.isdigit() else (0, job.id)


def queuePosition(job: Job, queue: Sequence[Job]) -> int:
    """
    ``job``'s place among the pending jobs of its partition, counted from
    1: those of higher priority first, then those submitted earlier (as
    Slurm's main scheduler takes them).
    """
    ahead = 0
    for other in queue:
        if other.state != "PENDING" or other.partition != job.partition or other.id == job.id:
            continue
        if (-other.priority, _jobNumber(other)) < (-job.priority, _jobNumber(job)):
            ahead += 1
    return ahead + 1


def timeLimitMinutes(text: str) -> int | None:
    """squeue's time limit (``[days-]hours:minutes:seconds``, ``minutes:seconds``) in whole minutes; None if none."""
    text = text.strip()
    days = 0
    if "-" in text:
        head, _, text = text.partition("-")
        if not head.isdigit():
            return None
        days = int(head)
    parts = text.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    numbers = [int(p) for p in parts]
    while len(numbers) < 3:
        numbers.insert(0, 0)
    hours, minutes, seconds = numbers
    return days * 1440 + hours * 60 + minutes + (1 if seconds else 0)


def endReason(job: Job | None, *, timeLimit: int | None, log: str, exit: Mapping[str, Any] | None) -> str:
    """
    Why a job ended that no one asked to stop: the person reads it.

    :param job: its last row in ``squeue --states=all`` (None: slurmctld has
        forgotten it, after ``MinJobAge``).
    :param timeLimit: the minutes it was given, if known.
    :param log: the job's own output (slurmstepd writes ``DUE TO TIME LIMIT``
        there when it ends a job at its limit).
    :param exit: what the job wrote of how the tool ended (``exit.json``).
    """
    state = job.state if job is not None else None
    if state == "TIMEOUT" or "DUE TO TIME LIMIT" in log:
        minutes = timeLimitMinutes(job.timeLimit) if job is not None else None
        minutes = minutes or timeLimit
        return f"The cluster ended the job at its time limit ({minutes} min)." if minutes else "The cluster ended the job at its time limit."
    if state == "OUT_OF_MEMORY":
        return "The cluster ended the job: it used more memory than it was given."
    if state in ("NODE_FAIL", "BOOT_FAIL"):
        return "The cluster's compute node running the job failed."
    if state == "PREEMPTED" or "DUE TO PREEMPTION" in log:
        return "The cluster ended the job to make room for another (preempted)."
    if state == "DEADLINE":
        return "The cluster ended the job at its deadline."
    if exit is not None and "tool" in exit:
        return f"The tool exited with status {exit['tool']}."
    if exit is not None and "helpers" in exit:
        return f"The pod's helpers exited with status {exit['helpers']}."
    if state == "CANCELLED" or "CANCELLED AT" in log:
        return "The job was cancelled on the cluster."
    if state is None:
        return "The cluster's job ended, and the cluster no longer says why."
    return f"The cluster's job ended ({state.lower()})."


class SlurmCommands:
    """
    Running Slurm's commands (a part of :class:`dit4c.node.slurm.SlurmRuntime`,
    which sets what is declared here).
    """

    log = Logger()

    reactor: Any
    #: Seconds a Slurm command may take.
    commandTimeout: float
    #: Added to the node's environment for every command (``SLURM_CONF``, say).
    slurmEnvironment: Mapping[str, str]
    #: Where the commands run.
    workDirectory: str

    async def _slurm(self, argv: Sequence[str], what: str) -> str:
        """
        Run a Slurm command; its standard output.

        :raises SlurmError: it failed or timed out; the message says what
            was being done and Slurm's own reason.
        """
        executable = shutil.which(argv[0]) or argv[0]
        proto = Collect(self.reactor, self.commandTimeout, None)
        try:
            self.reactor.spawnProcess(
                proto, executable, list(argv), env={**os.environ, **self.slurmEnvironment}, path=self.workDirectory
            )
        except OSError as e:
            raise SlurmError(f"{what}: cannot run {argv[0]}: {e.strerror}") from None
        out, err, code = await proto.done
        if proto.timedOut:
            raise SlurmError(f"{what}: {argv[0]} did not answer within {self.commandTimeout:g} s")
        if code != 0:
            lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"{argv[0]} exited with status {code}"
            raise SlurmError(f"{what}: {reason[:300]}")
        return out.decode("utf-8", "replace")

    async def _queue(self) -> list[Job]:
        """Every job slurmctld holds, ended ones too (for ``MinJobAge`` seconds after their end)."""
        out = await self._slurm(["squeue", "--noheader", "--states=all", f"--format={SQUEUE_FORMAT}"], "reading the queue")
        return parseQueue(out)
