"""
A real installation (portal, routing server, scheduler, each its own
process) whose compute node is ``twistd dit4c-node --runtime slurm`` on a
one-machine Slurm cluster started for this module, in Chromium: a person's
start behind a job that fills the cluster shows its place in the queue on
their page, runs once the cluster has room, and the tool greets them
through the routing server, its listener dialling out from the Slurm job.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cluster import PASSWORD, Cluster
from flows import openTool, submitStart
from support.slurm import CPUS, PARTITION, SlurmCluster, requireSlurm

requireSlurm("the slurm node's end-to-end test")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: Any) -> Iterator[SlurmCluster]:
    made = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    made.start()
    yield made
    made.stop()


@pytest.fixture
def cluster(tmp_path: Path, slurm: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    # The node (a child process) finds the cluster as a site's would: SLURM_CONF.
    for name, value in slurm.environment.items():
        monkeypatch.setenv(name, value)
    made = Cluster(tmp_path / "cluster", nodeOptions=("--runtime", "slurm", "--slurm-partition", PARTITION))
    yield made
    made.stop()


@pytest_twisted.ensureDeferred
async def test_a_start_waits_in_the_clusters_queue_on_the_page_then_runs(
    cluster: Cluster, slurm: SlurmCluster, browser: Any
) -> None:
    await cluster.start()
    # Someone else's job fills the cluster's one node.
    blocker = slurm.run("sbatch", "--parsable", f"--cpus-per-task={CPUS}", "--job-name=someone-else", "--wrap", "sleep 600")
    await browser.logIn(cluster.portal, "alice", PASSWORD)
    instance = await submitStart(browser, cluster.portal, "Notes")
    row = f'#instances tr[data-instance="{instance}"]'
    await browser.waitForText(f"{row} td.state", "Waiting for the cluster: position 1.", 60)
    assert "dit4c-" + instance in slurm.run("squeue", "--noheader", "--states=PENDING", "--format=%j")

    # Room made: the start runs, and the tool greets alice through the routing server.
    slurm.run("scancel", blocker.strip())
    await browser.waitFor(f'{row} td.state[data-state="running"]', 90)
    await browser.waitFor(f"{row} td.url a", 30)
    url = await browser.execute(f"return document.querySelector('{row} td.url a').href")
    await openTool(browser, url, "Hello, alice.")
    await browser.get(cluster.portal + "/")
    await browser.submit(f"{row} button.stop")
    await browser.waitFor(f'{row} td.state[data-state="stopped"]', 60)
    assert "dit4c-" + instance not in slurm.run("squeue", "--noheader", "--states=PENDING,RUNNING", "--format=%j")
