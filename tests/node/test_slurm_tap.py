"""
``twistd dit4c-node --runtime slurm``: the options that reach the Slurm
runtime (partition, the shared pods directory, the jobs' time limit, the
tool table and the stop grace), and the runtime's queue waits reaching the
node's instances.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_node_tap import nodeService, runtimeOf, toolTable
from twisted.python import usage

from dit4c.common.life import State
from dit4c.node.noderecords import InstanceRecord
from dit4c.node.slurm import SlurmRuntime


def test_the_slurm_options_reach_the_runtime(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "pods"
    service = nodeService(
        tmp_path, "--runtime", "slurm", "--slurm-partition", "gpu", "--slurm-directory", str(shared),
        "--slurm-time-limit", "90", "--stop-grace", "20", "--tools", str(toolTable(tmp_path)),
    )  # fmt: skip
    runtime = runtimeOf(service)
    assert isinstance(runtime, SlurmRuntime)
    assert (runtime.partition, runtime.timeLimit, runtime.stopGrace) == ("gpu", 90, 20.0)
    assert runtime.directory == shared.resolve()
    assert list(runtime.tools) == ["site/lab"]
    # The node keeps its instances' records where the jobs find their pods.
    node = next(s for s in service if s.__class__.__name__ == "Node")
    assert node.directory == shared.resolve()


def test_without_slurm_options_jobs_go_to_the_default_partition_for_a_day(tmp_path: Path) -> None:
    runtime = runtimeOf(nodeService(tmp_path, "--runtime", "slurm"))
    assert (runtime.partition, runtime.timeLimit) == (None, 24 * 60)
    assert runtime.directory == (tmp_path / "node" / "pods").resolve()


def test_a_queue_wait_is_a_starting_instances_reason(tmp_path: Path) -> None:
    service = nodeService(tmp_path, "--runtime", "slurm")
    node = next(s for s in service if s.__class__.__name__ == "Node")
    node._records["abc1"] = InstanceRecord("abc1", "dit4c/notes", None, None, State.STARTING, since=0.0)
    runtimeOf(service)._tell("abc1", "Waiting for the cluster: position 2.")
    assert [(s.instance, s.state, s.reason) for s in node.instances()] == [
        ("abc1", "starting", "Waiting for the cluster: position 2.")
    ]


@pytest.mark.parametrize("minutes", ["0", "-5", "a day"])
def test_a_time_limit_must_be_whole_minutes(tmp_path: Path, minutes: str) -> None:
    with pytest.raises(usage.UsageError):
        nodeService(tmp_path, "--runtime", "slurm", "--slurm-time-limit", minutes)
