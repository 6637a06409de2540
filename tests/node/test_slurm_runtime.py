"""
The compute node with the ``slurm`` runtime, against a real one-machine
Slurm cluster (munged, slurmctld and slurmd, started for this module:
:mod:`support.slurm`): each instance a batch job whose tool and helper
process (a stand-in here, as in the process runtime's tests) run where
Slurm put them; its waits in the queue on the instance's reason; stopped
with ``scancel``; ended by the cluster at its time limit; found again by a
restarted node; saved from its working directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from confined import snoopTool
from standins import POD_HELPER, TOOLS, Watcher
from support.slurm import CPUS, PARTITION, SlurmCluster, requireSlurm
from support.waiting import deferLater, eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from dit4c.node.node import Node
from dit4c.node.processes import startTime
from dit4c.node.slurm import SlurmRuntime, showQueueWaits

requireSlurm("the slurm runtime's tests")

#: The node's whole CPU count as the cluster sees it: a job asking for it fills the node.
FULL = {"cpus": CPUS}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: Any) -> Any:
    made = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    made.start()
    yield made
    made.stop()


def makeNode(directory: Path, cluster: SlurmCluster, **options: Any) -> tuple[Node, SlurmRuntime, Watcher]:
    tools = options.pop("tools", TOOLS)
    startTimeout = options.pop("startTimeout", 120)
    runtime = SlurmRuntime(
        reactor, directory, tools, partition=PARTITION, helpers=POD_HELPER["helpers"], stopGrace=2,
        pollInterval=0.5, slurmEnvironment=cluster.environment, **options,
    )  # fmt: skip
    node = Node(
        reactor, runtime, directory, portal="http://localhost:8000", portalInternal="http://127.0.0.1:8000",
        routing=("tcp:host=127.0.0.1:port=8001",), startTimeout=startTimeout,
    )  # fmt: skip
    showQueueWaits(runtime, node)
    watcher = Watcher()
    node.subscribe(watcher.observer())
    node.startService()
    return node, runtime, watcher


@pytest_twisted.async_yield_fixture
async def nodes(tmp_path: Path, cluster: SlurmCluster) -> Any:
    made: list[tuple[Node, SlurmRuntime]] = []

    def make(**options: Any) -> tuple[Node, SlurmRuntime, Watcher]:
        node, runtime, watcher = makeNode(tmp_path / "pods", cluster, **options)
        made.append((node, runtime))
        return node, runtime, watcher

    yield make
    for node, _runtime in made:
        node.stopService()
    cluster.cancelAll()
    await eventually(lambda: not jobs(cluster, "PENDING,RUNNING,COMPLETING"), 30, what="the jobs ended")


def jobs(cluster: SlurmCluster, states: str = "all") -> dict[str, dict[str, str]]:
    """The cluster's jobs by name: state, CPUs, memory, time limit (blocking; fine in a test)."""
    out = cluster.run("squeue", "--noheader", f"--states={states}", "--format=%j|%i|%T|%C|%m|%l")
    found = {}
    for line in out.splitlines():
        name, job, state, cpus, memory, limit = line.strip().split("|")
        found[name] = {"job": job, "state": state, "cpus": cpus, "memory": memory, "limit": limit}
    return found


def toolPid(pod: Path) -> int:
    return int(json.loads((pod / "tool.pid").read_text())["pid"])


async def fetch(port: int) -> bytes:
    import treq

    response = await treq.get(f"http://127.0.0.1:{port}/", timeout=5)
    return bytes(await response.content())


@pytest_twisted.ensureDeferred
async def test_a_job_runs_the_tool_with_its_limits_and_a_stop_ends_it(nodes: Any, cluster: SlurmCluster, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("sl1", "web", None, limits={"cpus": 1, "memory": 256})
    running = await watcher.waitFor("sl1", "running", timeout=60)
    assert running.reason is None
    job = jobs(cluster)["dit4c-sl1"]
    assert (job["state"], job["cpus"], job["memory"]) == ("RUNNING", "1", "256M")
    pod = tmp_path / "pods" / "sl1"
    # The tool answers where the job started it, and its helper process got the helper environment.
    port = json.loads((pod / "ready").read_text())["port"]
    assert b"Directory listing" in await fetch(port)
    helper = json.loads((pod / "helpers.env").read_text())
    assert helper["DIT4C_INSTANCE"] == "sl1"
    assert helper["DIT4C_TOOL"] == f"tcp:host=127.0.0.1:port={port}"
    assert helper["DIT4C_AUTH_LISTEN"] == f"unix:address={pod / 'auth.sock'}:mode=600:lockfile=0"
    assert json.loads((pod / "helpers.argv").read_text())[:2] == ["--tool-pid-file", str(pod / "tool.pid")]
    pid = toolPid(pod)
    assert startTime(pid) is not None

    await node.stop("sl1")
    assert watcher.history("sl1")[-2:] == ["stopping", "stopped"]
    assert "dit4c-sl1" not in jobs(cluster, "PENDING,RUNNING,COMPLETING")
    assert startTime(pid) is None, "the tool ended with its job"
    assert (pod / "work").exists(), "a stopped instance keeps its files"


@pytest_twisted.ensureDeferred
async def test_a_start_behind_a_full_node_waits_with_its_place_in_the_queue(nodes: Any, cluster: SlurmCluster) -> None:
    node, runtime, watcher = nodes()
    await node.start("sl2", "web", None, limits=FULL)
    await watcher.waitFor("sl2", "running", timeout=60)
    await node.start("sl3", "web", None, limits=FULL)

    def waiting() -> Any:
        return next((s for s in watcher.states if s.instance == "sl3" and s.reason and "position" in s.reason), None)

    status = await eventually(waiting, 30, what=lambda: str(watcher.states))
    assert (status.state, status.reason) == ("starting", "Waiting for the cluster: position 1.")
    assert jobs(cluster)["dit4c-sl3"]["state"] == "PENDING"
    # Another behind it is second.
    await node.start("sl9", "web", None, limits=FULL)

    def reasons() -> dict[str, str | None]:
        return {s.instance: s.reason for s in node.instances()}

    await eventually(lambda: reasons()["sl9"] == "Waiting for the cluster: position 2.", 30, what=lambda: str(reasons()))
    assert reasons()["sl3"] == "Waiting for the cluster: position 1."

    # Room made, the first waiting job runs, and the second moves up.
    await node.stop("sl2")
    running = await watcher.waitFor("sl3", "running", timeout=60)
    assert running.reason is None
    await eventually(lambda: reasons()["sl9"] == "Waiting for the cluster: position 1.", 30, what=lambda: str(reasons()))
    for instance in ("sl3", "sl9"):
        await node.stop(instance)


@pytest_twisted.ensureDeferred
async def test_a_stop_of_a_waiting_start_cancels_its_job(nodes: Any, cluster: SlurmCluster) -> None:
    node, runtime, watcher = nodes()
    await node.start("sl4", "web", None, limits=FULL)
    await watcher.waitFor("sl4", "running", timeout=60)
    await node.start("sl5", "web", None, limits=FULL)
    await eventually(lambda: jobs(cluster).get("dit4c-sl5"), 10)
    await node.stop("sl5")
    assert watcher.history("sl5")[-1] == "stopped"
    assert "dit4c-sl5" not in jobs(cluster, "PENDING,RUNNING,COMPLETING")
    await node.stop("sl4")


@pytest_twisted.ensureDeferred
async def test_a_stop_while_its_job_is_being_submitted_cancels_it(nodes: Any, cluster: SlurmCluster) -> None:
    """The stop comes after the cluster has the job and before sbatch has answered the node (a loaded machine)."""
    node, runtime, watcher = nodes()
    await node.start("sl4", "web", None, limits=FULL)
    await watcher.waitFor("sl4", "running", timeout=60)
    submitted: Deferred[None] = Deferred()
    answer: Deferred[None] = Deferred()
    slurm = runtime._slurm

    async def slowToAnswer(argv: Any, what: str) -> str:
        out: str = await slurm(argv, what)
        if argv[0] == "sbatch":
            submitted.callback(None)
            await answer
        return out

    runtime._slurm = slowToAnswer
    starting = node.start("sl6", "web", None, limits=FULL)
    await submitted
    stopping = node.stop("sl6")
    answer.callback(None)
    await starting
    await stopping
    assert watcher.history("sl6")[-1] == "stopped"
    assert "dit4c-sl6" not in jobs(cluster, "PENDING,RUNNING,COMPLETING")
    await node.stop("sl4")


@pytest_twisted.ensureDeferred
async def test_a_restarted_node_takes_its_jobs_back(nodes: Any, cluster: SlurmCluster, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("sl6", "web", None)
    await watcher.waitFor("sl6", "running", timeout=60)
    pid = toolPid(tmp_path / "pods" / "sl6")
    node.stopService()

    again, runtime2, watcher2 = nodes()
    await again.whenReported()
    assert [(s.instance, s.state) for s in again.instances()] == [("sl6", "running")]
    assert [(p.instance, p.running) for p in await runtime2.pods()] == [("sl6", True)]
    assert startTime(pid) is not None, "the job ran on while the node was away"
    await again.stop("sl6")
    assert watcher2.history("sl6")[-1] == "stopped"
    assert startTime(pid) is None


@pytest_twisted.ensureDeferred
async def test_save_packs_the_jobs_working_directory(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("sl7", "web", None)
    await watcher.waitFor("sl7", "running", timeout=60)
    (tmp_path / "pods" / "sl7" / "work" / "results.csv").write_text("a,b\n1,2\n")
    await node.stop("sl7")
    archive = tmp_path / "sl7.tar"
    digest = await runtime.capture("sl7", archive)
    assert digest is not None and digest.startswith("sha256:")
    with tarfile.open(archive) as tar:
        assert tar.extractfile("results.csv").read() == b"a,b\n1,2\n"  # type: ignore[union-attr]
        assert json.loads(tar.extractfile(".dit4c-image.json").read())["tool"] == "web"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_job_past_its_time_limit_is_errored_with_the_reason(nodes: Any, cluster: SlurmCluster, tmp_path: Path) -> None:
    # One minute is Slurm's shortest limit; slurmctld looks at limits every half minute or so.
    node, runtime, watcher = nodes(timeLimit=1)
    await node.start("sl8", "web", None)
    await watcher.waitFor("sl8", "running", timeout=60)
    assert jobs(cluster)["dit4c-sl8"]["limit"] == "1:00"
    errored = await watcher.waitFor("sl8", "errored", timeout=150)
    assert errored.reason == "The cluster ended the job at its time limit (1 min)."
    assert jobs(cluster)["dit4c-sl8"]["state"] == "TIMEOUT"
    # What says so once slurmctld has forgotten the job (after MinJobAge): slurmstepd's line in the job's output.
    assert "DUE TO TIME LIMIT" in (tmp_path / "pods" / "sl8" / "job.log").read_text()


@pytest_twisted.ensureDeferred
async def test_a_tool_that_ends_by_itself_errors_its_instance(nodes: Any, cluster: SlurmCluster) -> None:
    node, runtime, watcher = nodes()
    await node.start("sla", "quits", None)
    errored = await watcher.waitFor("sla", "errored", timeout=60)
    assert errored.reason == "The tool exited with status 0."
    assert "dit4c-sla" not in jobs(cluster, "PENDING,RUNNING,COMPLETING")


@pytest_twisted.ensureDeferred
async def test_a_job_cancelled_on_the_cluster_while_the_node_was_away_is_errored(nodes: Any, cluster: SlurmCluster) -> None:
    node, runtime, watcher = nodes()
    await node.start("slb", "web", None)
    await watcher.waitFor("slb", "running", timeout=60)
    node.stopService()
    cluster.run("scancel", jobs(cluster)["dit4c-slb"]["job"])
    await eventually(lambda: "dit4c-slb" not in jobs(cluster, "PENDING,RUNNING,COMPLETING"), 30)

    again, runtime2, watcher2 = nodes()
    errored = await watcher2.waitFor("slb", "errored", timeout=30)
    assert errored.reason == "The instance stopped while its compute node was restarting. The job was cancelled on the cluster."


@pytest_twisted.ensureDeferred
async def test_a_stopped_instance_resumes_as_a_new_job_with_its_files(nodes: Any, cluster: SlurmCluster, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("slc", "web", None)
    await watcher.waitFor("slc", "running", timeout=60)
    work = tmp_path / "pods" / "slc" / "work"
    (work / "notes.txt").write_text("kept")
    first = jobs(cluster)["dit4c-slc"]["job"]
    await node.stop("slc")
    await node.resume("slc")
    await eventually(lambda: watcher.history("slc")[-1] == "running", 60, what=lambda: str(watcher.history("slc")))
    assert jobs(cluster, "RUNNING")["dit4c-slc"]["job"] != first
    port = json.loads((work.parent / "ready").read_text())["port"]
    assert b"notes.txt" in await fetch(port)
    await node.stop("slc")


@pytest_twisted.ensureDeferred
async def test_the_jobs_tool_is_confined_from_the_instance_key(nodes: Any, tmp_path: Path) -> None:
    pod = tmp_path / "pods" / "sld"
    outside = Path(tempfile.mkdtemp(prefix="dit4c-outside-"))
    node, runtime, watcher = nodes(tools={"snoop": snoopTool(pod / "instance.key", outside)})
    try:
        await node.start("sld", "snoop", None)
        await watcher.waitFor("sld", "running", timeout=60)
        seen = json.loads((pod / "work" / "snoop.json").read_text())
        assert seen["key"][0] == "refused", seen
        # The pod's directory holds only what was bound back: not the key, logs or job files.
        assert seen["pod"] == ["ok", ["sock", "work"]]
        # Outside the pod nothing is written (the tool's /tmp is its own: a directory of the node's there is not even seen).
        assert seen["outside"][0] == "refused" and seen["outside"][1] in (errno.EROFS, errno.ENOENT)
        assert not (outside / "planted").exists()
        assert seen["work"][0] == "ok"
        assert seen["pids"] == [1, 2]
        if os.geteuid() == 0:
            uid = json.loads((pod / "job.json").read_text())["uid"]
            assert seen["uid"] == seen["gid"] == uid and uid in runtime.toolUids
            assert (pod / "work" / "written-by-the-tool").stat().st_uid == uid
        await node.stop("sld")
    finally:
        shutil.rmtree(outside)


@pytest_twisted.ensureDeferred
async def test_a_job_the_cluster_cannot_run_is_refused_with_slurms_reason(nodes: Any, cluster: SlurmCluster) -> None:
    node, runtime, watcher = nodes()
    # More memory than any node of the cluster has.
    await node.start("sle", "web", None, limits={"memory": 100_000})
    errored = await watcher.waitFor("sle", "errored", timeout=30)
    assert errored.reason is not None
    assert errored.reason.startswith("The cluster refused the job: submitting the job: sbatch: error:"), errored.reason
    assert "dit4c-sle" not in jobs(cluster, "PENDING,RUNNING,COMPLETING")


@pytest_twisted.ensureDeferred
async def test_discard_cancels_the_job_and_removes_its_directory(nodes: Any, cluster: SlurmCluster, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("slf", "web", None)
    await watcher.waitFor("slf", "running", timeout=60)
    pid = toolPid(tmp_path / "pods" / "slf")
    await node.discard("slf")
    assert watcher.history("slf")[-1] == "discarded"
    assert not (tmp_path / "pods" / "slf").exists()
    assert "dit4c-slf" not in jobs(cluster, "PENDING,RUNNING,COMPLETING")
    assert startTime(pid) is None
    assert await runtime.pods() == []


@pytest_twisted.ensureDeferred
async def test_the_time_a_tool_has_to_answer_begins_when_its_job_runs(nodes: Any, cluster: SlurmCluster) -> None:
    # Ten seconds for the tool to answer (a loaded machine's job needs some of them), and a
    # wait in the queue longer than that.
    node, runtime, watcher = nodes(startTimeout=10)
    blocker = cluster.run("sbatch", "--parsable", f"--cpus-per-task={CPUS}", "--job-name=someone-else", "--wrap", "sleep 600")
    await node.start("slg", "web", None)
    await eventually(lambda: (node.instances()[-1].reason or "").startswith("Waiting for the cluster"), 30)
    # Not a condition to wait for: that nothing happens for longer than the time the tool has.
    await deferLater(node.startTimeout + 3)
    assert watcher.history("slg")[-1] == "starting"
    cluster.run("scancel", blocker.strip())
    running = await watcher.waitFor("slg", "running", timeout=60)
    assert running.reason is None
    await node.stop("slg")
