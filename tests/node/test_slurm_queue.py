"""
What the ``slurm`` runtime reads of ``squeue`` and says of it: the rows,
a pending job's place in its partition's queue (priority first, then
submission), the time limit in minutes, and why a job the cluster ended
ended, from its state, or from slurmstepd's words once slurmctld has
forgotten it; and that a read of the queue judges only the jobs watched
when it began. (The runtime against a real cluster: test_slurm_runtime.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dit4c.node.slurm import SlurmRuntime
from dit4c.node.slurmqueue import Job, endReason, parseQueue, queuePosition, timeLimitMinutes

QUEUE = """\
11|RUNNING|dit4c|4294901750|1:00:00|vm|None|dit4c-abc1
12|PENDING|dit4c|4294901749|1:00:00||Resources|someone's|job
13|PENDING|dit4c|4294901749|1:00:00||Priority|dit4c-abc2
14|PENDING|other|4294901760|1:00:00||Priority|dit4c-abc3
15|PENDING|dit4c|4294901800|1:00:00||Priority|urgent
16|TIMEOUT|dit4c|0|1:00||TimeLimit|dit4c-abc4
not a row
"""


def job(name: str) -> Job:
    return next(j for j in parseQueue(QUEUE) if j.name == name)


def test_rows_are_read_with_names_that_hold_the_separator() -> None:
    rows = parseQueue(QUEUE)
    assert [r.id for r in rows] == ["11", "12", "13", "14", "15", "16"]
    assert rows[1].name == "someone's|job" and rows[1].reason == "Resources"
    assert rows[0].alive and not rows[5].alive


def test_a_pending_jobs_place_counts_those_before_it_in_its_partition() -> None:
    queue = parseQueue(QUEUE)
    # Behind the higher-priority job and the one submitted before it; the other partition's job is not counted.
    assert queuePosition(job("dit4c-abc2"), queue) == 3
    assert queuePosition(job("urgent"), queue) == 1
    assert queuePosition(job("dit4c-abc3"), queue) == 1


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("1:00", 1), ("30:00", 30), ("2:00:00", 120), ("1-00:00:00", 1440), ("0:30", 1), ("UNLIMITED", None)],
)
def test_time_limits_in_minutes(text: str, minutes: int | None) -> None:
    assert timeLimitMinutes(text) == minutes


def test_a_job_ended_at_its_time_limit_says_so_with_the_limit() -> None:
    assert endReason(job("dit4c-abc4"), timeLimit=None, log="", exit=None) == (
        "The cluster ended the job at its time limit (1 min)."
    )
    # Forgotten by slurmctld (past MinJobAge): slurmstepd's line in the job's output, and the limit it was given.
    log = "slurmstepd: error: *** JOB 16 ON vm CANCELLED AT 2026-12-06T23:59:01 DUE TO TIME LIMIT ***\n"
    assert endReason(None, timeLimit=90, log=log, exit={"tool": 143}) == (
        "The cluster ended the job at its time limit (90 min)."
    )


def test_other_ends_are_said_as_what_they_were() -> None:
    assert endReason(None, timeLimit=None, log="", exit={"tool": 2}) == "The tool exited with status 2."
    cancelled = Job("1", "CANCELLED", "p", 0, "1:00", "", "None", "n")
    assert endReason(cancelled, timeLimit=None, log="", exit=None) == "The job was cancelled on the cluster."
    memory = Job("1", "OUT_OF_MEMORY", "p", 0, "1:00", "", "None", "n")
    assert "more memory" in endReason(memory, timeLimit=None, log="", exit=None)
    assert endReason(None, timeLimit=None, log="", exit=None) == "The cluster's job ended, and the cluster no longer says why."


def test_a_job_submitted_while_the_queue_is_read_is_not_taken_for_ended(tmp_path: Path) -> None:
    """
    The runtime reads ``squeue`` every few seconds. A job submitted while
    one read runs may be missing from its answer: that answer says
    nothing of it (it once said "the cluster no longer says why" of a
    start that was only queued), and the next read tells its place.
    """
    clock = Clock()
    runtime = SlurmRuntime(clock, tmp_path / "pods", pollInterval=2.0)
    ended: list[tuple[str, str]] = []
    told: list[tuple[str, str]] = []
    runtime.onExit(lambda instance, why: ended.append((instance, why)))
    runtime.onWaiting(lambda instance, text: told.append((instance, text)))
    answers: list[Deferred[list[Job]]] = []

    def queue() -> Deferred[list[Job]]:
        answers.append(Deferred())
        return answers[-1]

    runtime._queue = queue  # type: ignore[method-assign]
    running = Job("1", "RUNNING", "dit4c", 100, "1:00:00", "vm", "None", "dit4c-first")
    pending = Job("2", "PENDING", "dit4c", 100, "1:00:00", "", "Resources", "dit4c-second")

    runtime._watch("first", "1")  # the first look asks squeue at once
    runtime._watch("second", "2")  # submitted while squeue runs
    answers[0].callback([running])
    assert ended == [] and runtime._jobs == {"first": "1", "second": "2"}

    clock.advance(2.0)
    answers[1].callback([running, pending])
    assert ended == []
    assert ("second", "Waiting for the cluster: position 1.") in told
    runtime._stopPolling()
