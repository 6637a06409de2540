"""
A catalogue entry's CPU and memory limits under the ``process`` runtime:
real tools in real cgroups (this machine's: cgroup v1, or v2 where the
unified hierarchy has the controllers), measured from the cgroup's own
count of CPU time; and what a node without cgroups does.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standins import POD_HELPER, Watcher
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dit4c.node.cgroups import Cgroups, PodCgroup, detect
from dit4c.node.node import Node
from dit4c.node.process import ProcessRuntime, Tool

#: Listens on its port, and keeps two processes busy for ever.
BUSY = (
    "import subprocess, sys;"
    "[subprocess.Popen([sys.executable, '-c', 'while True: pass']) for _ in range(2)];"
    "import http.server;"
    "http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')"
)
#: Listens on its port, then (in a thread, a moment later) takes 200 MiB and touches every page.
HOG = (
    "import sys, threading, time, http.server;"
    "threading.Thread(target=lambda: (time.sleep(1), bytearray(b'x' * (200 << 20))), daemon=True).start();"
    "http.server.test(http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]), bind='127.0.0.1')"
)
TOOLS = {
    "busy": Tool("busy", ("{python}", "-c", BUSY, "{port}")),
    "hog": Tool("hog", ("{python}", "-c", HOG, "{port}")),
}

cgroups = detect("probe")
needsCgroups = pytest.mark.skipif(
    isinstance(cgroups, str), reason=f"this machine cannot enforce limits with cgroups: {cgroups}"
)


@pytest_twisted.async_yield_fixture
async def nodes(tmp_path: Path) -> Any:
    made: list[tuple[Node, ProcessRuntime]] = []

    def make(**options: Any) -> tuple[Node, ProcessRuntime, Watcher]:
        runtime = ProcessRuntime(
            reactor, tmp_path / "node", TOOLS, helpers=POD_HELPER, stopGrace=2, oomInterval=0.2,
            **options,
        )  # fmt: skip
        node = Node(reactor, runtime, tmp_path / "node", portal="http://localhost:8000", startTimeout=30)
        watcher = Watcher()
        node.subscribe(watcher.observer())
        node.startService()
        made.append((node, runtime))
        return node, runtime, watcher

    yield make
    for _node, runtime in made:
        for instance in list(runtime._pods):
            await runtime.discard(instance)
        runtime.forget()


async def cpuShare(cgroup: PodCgroup, seconds: float) -> float:
    """CPU-seconds the cgroup used per second of elapsed time, over ``seconds`` (both measured here)."""
    cpu0, wall0 = cgroup.cpuSeconds(), time.monotonic()
    await deferLater(reactor, seconds, lambda: None)
    return (cgroup.cpuSeconds() - cpu0) / (time.monotonic() - wall0)


def podCgroup(tmp_path: Path, instance: str) -> PodCgroup:
    found = PodCgroup.fromJSON(json.loads((tmp_path / "node" / instance / "pod.json").read_text()).get("cgroup"))
    assert found is not None, "the pod's record names its cgroup"
    return found


@needsCgroups
@pytest_twisted.ensureDeferred
async def test_a_busy_tool_gets_no_more_than_its_cpus(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("cpu1", "busy", None, limits={"cpus": 0.5, "memory": None})
    await watcher.waitFor("cpu1", "running")
    cgroup = podCgroup(tmp_path, "cpu1")
    assert cgroup.limits.cpus == 0.5 and cgroup.limits.memory is None
    # Every process of the tool is in it: the launcher, its init, the tool and both busy children.
    def inEach() -> list[set[int]]:
        return [{int(p) for p in (d / "cgroup.procs").read_text().split()} for d in cgroup.directories]

    await eventually(lambda: all(len(procs) >= 5 for procs in inEach()), what=lambda: f"in its cgroup: {inEach()}")
    assert runtime._pods["cpu1"]["tool"].pid in inEach()[0]
    # Two busy processes would take up to two CPUs; the limit holds them to half of one.
    share = await cpuShare(cgroup, 3.0)
    # It runs (at most its limit; how far below depends on what else the machine runs now).
    assert 0 < share <= 0.6, f"{share:.2f} CPU-seconds a second"


@needsCgroups
@pytest_twisted.ensureDeferred
async def test_a_tool_past_its_memory_is_stopped_with_the_reason(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("mem1", "hog", None, limits={"cpus": None, "memory": 64})
    await watcher.waitFor("mem1", "running")
    errored = await watcher.waitFor("mem1", "errored")
    assert errored.reason == "The tool used more than its 64 MiB of memory and was stopped."
    cgroup = podCgroup(tmp_path, "mem1")
    assert cgroup.oomKills() >= 1
    await node.discard("mem1")
    await watcher.waitFor("mem1", "discarded")
    assert not any(d.exists() for d in cgroup.directories), "the pod's cgroup went with it"


@needsCgroups
@pytest_twisted.ensureDeferred
async def test_a_resume_and_a_restarted_node_keep_the_limits(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes()
    await node.start("res1", "busy", None, limits={"cpus": 0.25, "memory": 256})
    await watcher.waitFor("res1", "running")
    record = json.loads((tmp_path / "node" / "res1" / "instance.json").read_text())
    assert record["limits"] == {"cpus": 0.25, "memory": 256, "idle": None, "idle_action": "stop"}
    await node.stop("res1")
    await watcher.waitFor("res1", "stopped")

    await node.resume("res1")
    await eventually(lambda: watcher.history("res1")[-2:] == ["starting", "running"], what="resumed")
    cgroup = podCgroup(tmp_path, "res1")
    assert cgroup.limits.cpus == 0.25 and cgroup.limits.memory == 256
    assert await cpuShare(cgroup, 2.0) <= 0.35

    # The node restarts: the new one finds the pod's cgroup, and a discard removes it.
    await node.stopService()
    runtime.forget()
    again, runtime2, watcher2 = nodes()
    await eventually(lambda: watcher2.history("res1") == ["running"], what="the restarted node took it back")
    assert runtime2._cgroups["res1"] == cgroup
    assert await cpuShare(cgroup, 2.0) <= 0.35
    await again.discard("res1")
    await watcher2.waitFor("res1", "discarded")
    assert not any(d.exists() for d in cgroup.directories)


@pytest_twisted.ensureDeferred
async def test_where_the_node_cannot_enforce_limits_the_tools_log_says_so(nodes: Any, tmp_path: Path) -> None:
    node, runtime, watcher = nodes(cgroups="no cgroup file system is mounted")
    await node.start("nol1", "busy", None, limits={"cpus": 0.5, "memory": 512})
    await watcher.waitFor("nol1", "running")
    chunk = await runtime.logs("nol1", 0, 4096)
    assert chunk.text.startswith(
        "dit4c-confine: This compute node does not enforce this instance's limits (0.5 CPUs, 512 MiB): "
        "no cgroup file system is mounted.\n"
    ), chunk.text
    assert json.loads((tmp_path / "node" / "nol1" / "pod.json").read_text())["cgroup"] is None


@pytest_twisted.ensureDeferred
async def test_limits_that_are_not_valid_error_the_instance(nodes: Any) -> None:
    node, runtime, watcher = nodes()
    await node.start("bad1", "busy", None, limits={"cpus": "lots"})
    errored = await watcher.waitFor("bad1", "errored")
    assert errored.reason == (
        "The catalogue entry's limits cannot be applied: The CPU limit must be a number of CPUs, such as 0.5 or 2."
    )
    assert watcher.history("bad1") == ["starting", "errored"]
    assert "bad1" not in runtime._pods


def test_detection_names_what_is_missing(tmp_path: Path) -> None:
    """Without cgroup mounts, the reason says so; with this machine's, a place per role."""
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    assert detect("x", tmp_path / "mounts", tmp_path / "cgroup") == (
        "no cgroup v1 cpu, cpuacct and memory hierarchies are mounted"
    )
    if isinstance(cgroups, Cgroups):
        assert set(cgroups.bases) == ({"unified"} if cgroups.version == 2 else {"cpu", "cpuacct", "memory"})
    assert sys.platform.startswith("linux")
