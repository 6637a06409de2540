"""
A catalogue entry's CPU and memory limits under the ``podman`` runtime, with
real pods through a real compute node: busybox tools (two busy shell loops;
a shell that takes 200 MiB) measured from the tool container's own cgroup,
and a tool killed for its memory errored with the reason; the limits kept
through a stop and a resume, and by a restarted node.

Every pod here carries a prefix of its own, removed at the end even after a
failed test. Skipped where podman cannot run; under CI (``CI=true``) that is
a failure instead.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from standins import Watcher
from support.podman import (
    buildBusyboxImage,
    podmanEnv,
    removePods,
    requirePodman,
    standInAuthCommand,
    standInListenerCommand,
)
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue

from dit4c.node.node import Node
from dit4c.node.podman import PodmanRuntime

requirePodman("podman limits tests")

PREFIX = f"dit4cl{os.getpid()}{secrets.token_hex(2)}"
#: Two busy loops, and httpd in front so the tool answers.
BUSY = ["sh", "-c", "while :; do :; done & while :; do :; done & exec httpd -f -p 8000 -h /www"]
#: httpd, then (a moment later) a shell that reads 200 MiB into a variable.
HOG = [
    "sh", "-c",
    "httpd -p 8000 -h /www; sleep 2; x=$(busybox head -c 209715200 /dev/zero | busybox tr '\\0' a); sleep 3600",
]  # fmt: skip


async def podman(*args: str) -> str:
    out, err, code = await getProcessOutputAndValue("podman", list(args), env=podmanEnv())
    assert code == 0, err
    return out.decode().strip()


class Nodes:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.watcher = Watcher()
        self.node: Node | None = None
        self.runtime: PodmanRuntime | None = None

    def start(self) -> Node:
        self.runtime = PodmanRuntime(
            reactor, prefix=PREFIX, authCommand=standInAuthCommand(), listenerCommand=standInListenerCommand(),
            pollInterval=0.3, stopTimeout=1, helperStopGrace=2.0, workDirectory=self.directory.parent / "podman",
        )  # fmt: skip
        self.node = Node(reactor, self.runtime, self.directory, portal="http://localhost:8000", readyInterval=0.2)
        self.node.subscribe(self.watcher.observer())
        self.node.startService()
        return self.node


@pytest_twisted.async_yield_fixture
async def nodes(tmp_path: Path) -> AsyncIterator[Nodes]:
    made = Nodes(tmp_path / "node")
    try:
        yield made
    finally:
        if made.node is not None:
            made.node.stopService()
        await removePods(reactor, PREFIX)


async def cpuSeconds(container: str) -> float:
    """CPU time of the container's cgroup (cgroup v1 ``cpuacct.usage``, or v2 ``cpu.stat``), in seconds."""
    path = await podman("inspect", "--format", "{{.State.CgroupPath}}", container)
    v1 = Path(f"/sys/fs/cgroup/cpuacct{path}/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    for line in Path(f"/sys/fs/cgroup{path}/cpu.stat").read_text().splitlines():
        if line.startswith("usage_usec "):
            return int(line.split()[1]) / 1e6
    raise AssertionError(f"no CPU count for {container}")


async def cpuShare(container: str, seconds: float) -> float:
    """CPU-seconds the container used per second elapsed (both measured here), over ``seconds``."""
    cpu0, wall0 = await cpuSeconds(container), time.monotonic()
    await deferLater(reactor, seconds, lambda: None)
    return (await cpuSeconds(container) - cpu0) / (time.monotonic() - wall0)


@pytest_twisted.ensureDeferred
async def test_a_busy_tool_gets_its_share_and_keeps_it_through_resume_and_restart(nodes: Nodes) -> None:
    image = await buildBusyboxImage("busy", {"/www/index.html": b"busy\n"}, expose=8000, cmd=BUSY)
    node = nodes.start()
    instance = f"c{secrets.token_hex(4)}"
    await node.start(instance, image, None, limits={"cpus": 0.5, "memory": 128})
    await nodes.watcher.waitFor(instance, "running", timeout=60)
    tool = f"{PREFIX}-{instance}-tool"
    assert await podman("inspect", "--format", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}} {{.HostConfig.MemorySwap}}", tool) == (
        f"500000000 {128 << 20} {128 << 20}"
    )
    share = await cpuShare(tool, 3.0)
    # It runs (at most its limit; how far below depends on what else the machine runs now).
    assert 0 < share <= 0.6, f"{share:.2f} CPU-seconds a second"

    await node.stop(instance)
    await eventually(lambda: nodes.watcher.history(instance)[-1] == "stopped", timeout=60, what="stopped")
    await node.resume(instance)
    await eventually(lambda: nodes.watcher.history(instance)[-1] == "running", timeout=60, what="resumed")
    assert await cpuShare(tool, 2.0) <= 0.6

    # A restarted node: the pod, its limits, and its memory limit known again (its label).
    node.stopService()
    again = nodes.start()
    await eventually(lambda: any(s.instance == instance and s.state == "running" for s in again.instances()), timeout=60)
    assert nodes.runtime is not None
    await eventually(lambda: nodes.runtime is not None and instance in nodes.runtime._pods, what="found again")
    assert nodes.runtime._pods[instance].memory == 128
    assert await cpuShare(tool, 2.0) <= 0.6
    await again.discard(instance)


@pytest_twisted.ensureDeferred
async def test_a_tool_past_its_memory_is_errored_with_the_reason(nodes: Nodes) -> None:
    image = await buildBusyboxImage("hog", {"/www/index.html": b"hog\n"}, expose=8000, cmd=HOG)
    node = nodes.start()
    instance = f"m{secrets.token_hex(4)}"
    await node.start(instance, image, None, limits={"cpus": None, "memory": 64})
    await nodes.watcher.waitFor(instance, "running", timeout=60)
    errored = await nodes.watcher.waitFor(instance, "errored", timeout=60)
    assert errored.reason == "The tool used more than its 64 MiB of memory and was stopped."
    await node.discard(instance)
    # What podman's conmon leaves of it is in the runtime's own directory, not wherever the node was started.
    assert (nodes.directory.parent / "podman" / "oom").exists() and not Path("oom").exists()


@pytest_twisted.ensureDeferred
async def test_a_process_under_the_tool_killed_for_memory_errors_the_instance_after_a_restart(
    nodes: Nodes,
) -> None:
    """A process in the tool's container (as a Jupyter kernel is) takes 200 MiB while the tool lives on."""
    image = await buildBusyboxImage("limits-httpd", {"/www/index.html": b"quiet\n"}, expose=8000)
    node = nodes.start()
    instance = f"k{secrets.token_hex(4)}"
    await node.start(instance, image, None, limits={"cpus": None, "memory": 64})
    await nodes.watcher.waitFor(instance, "running", timeout=60)
    node.stopService()
    again = nodes.start()
    await eventually(lambda: any(s.instance == instance and s.state == "running" for s in again.instances()), timeout=60)
    hog = "x=$(busybox head -c 209715200 /dev/zero | busybox tr '\\0' a)"
    await getProcessOutputAndValue("podman", ["exec", f"{PREFIX}-{instance}-tool", "sh", "-c", hog], env=podmanEnv())
    errored = await nodes.watcher.waitFor(instance, "errored", timeout=60)
    assert errored.reason == "The tool used more than its 64 MiB of memory and was stopped."
    await again.discard(instance)


@pytest_twisted.ensureDeferred
async def test_a_tool_with_no_limits_is_run_without(nodes: Nodes) -> None:
    image = await buildBusyboxImage("busy", {"/www/index.html": b"busy\n"}, expose=8000, cmd=BUSY)
    node = nodes.start()
    instance = f"n{secrets.token_hex(4)}"
    await node.start(instance, image, None)
    await nodes.watcher.waitFor(instance, "running", timeout=60)
    tool = f"{PREFIX}-{instance}-tool"
    assert await podman("inspect", "--format", "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}", tool) == "0 0"
    await node.discard(instance)
