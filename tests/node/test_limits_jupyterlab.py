"""
JupyterLab under the ``process`` runtime with a catalogue entry's limits:
a person logged in through the real auth helper runs a busy loop in a
kernel (through Jupyter's REST and WebSocket API), and the tool's cgroup
shows it got no more than its CPUs; then a kernel takes more memory than the
limit, and the instance is stopped with the reason. Skipped where
jupyter-lab is not installed, or where the machine cannot enforce limits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from standins import HELPERS
from support.routing import Signing, startRouting, stopRouting
from support.waiting import eventually
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from dit4c.common.keys import loadPrivateKey, savePrivateKey
from dit4c.common.limits import ToolLimits
from dit4c.node.cgroups import PodCgroup, detect
from dit4c.node.interfaces import PodSpec
from dit4c.node.process import ProcessRuntime, builtinTools

# The auth helper's tests' world (a real portal, alice, her instance), reused as it is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, execute, logIn, makeWorld, startKernel  # noqa: E402

#: In the kernel: one busy thread in the kernel itself, and a busy child of it.
BUSY = (
    "import subprocess, sys, threading\n"
    "threading.Thread(target=lambda: exec('while True: pass'), daemon=True).start()\n"
    "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
    "'busy'"
)


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    w = await makeWorld(tmp_path)
    yield w
    await closeWorld(w)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_jupyterlab_kernels_get_their_cpus_and_their_memory_stops_them(
    world: Any, signing: Signing, tmp_path: Path
) -> None:
    tools = builtinTools()
    if "jupyter/lab" not in tools:
        pytest.skip("jupyter-lab is not installed")
    if isinstance(cgroups := detect("probe"), str):
        pytest.skip(f"this machine cannot enforce limits with cgroups: {cgroups}")
    runtime = ProcessRuntime(
        reactor, tmp_path / "node", tools, helpers={"listener": HELPERS["listener"]}, podHelpers="separate",
        stopGrace=5, oomInterval=0.2,
    )  # fmt: skip
    exits: list[tuple[str, str]] = []
    runtime.onExit(lambda instance, reason: exits.append((instance, reason)))
    instance = world.instance.id
    pod = tmp_path / "node" / instance
    pod.mkdir(parents=True, mode=0o700)
    savePrivateKey(loadPrivateKey(world.keyFile), pod / "instance.key")
    environment = {
        "DIT4C_INSTANCE": instance,
        "DIT4C_INSTANCE_KEY": str(pod / "instance.key"),
        "DIT4C_PORTAL": world.portalURL,
        "DIT4C_STATE_DIR": str(pod / "state"),
    }
    stack: list[Any] = []
    try:
        limits = ToolLimits(cpus=0.5, memory=512)
        await runtime.start(PodSpec(instance, "jupyter/lab", None, pod, environment, limits=limits))

        async def ready() -> bool:
            if await runtime.ready(instance):
                return True
            assert runtime._pods[instance]["tool"].running, (pod / "tool.log").read_text()[-3000:]
            return False

        await eventually(ready, timeout=120, what=lambda: (pod / "tool.log").read_text()[-3000:])
        cgroup = PodCgroup.fromJSON(json.loads((pod / "pod.json").read_text())["cgroup"])
        assert cgroup is not None and cgroup.limits == limits

        record = json.loads((pod / "pod.json").read_text())
        routing = await startRouting(signing)
        stack.append(routing)
        await routing.listen(signing.token(instance), f"unix:path={record['auth']}")
        world.authPort = routing.httpPort
        world.instance = await world.store.updateInstance(instance, url=world.instanceURL)
        alice = Browser(world)
        assert (await logIn(alice, "alice", "/lab")).code == 303
        kernel = await startKernel(alice)
        assert await execute(alice, kernel, BUSY, timeout=120) == "'busy'"

        # The kernel's busy thread and its busy child would take two CPUs: the cgroup holds them to half of one.
        cpu0, wall0 = cgroup.cpuSeconds(), time.monotonic()
        await deferLater(reactor, 4.0, lambda: None)
        share = (cgroup.cpuSeconds() - cpu0) / (time.monotonic() - wall0)
        # It runs (at most its limit; how far below depends on what else the machine runs now).
        assert 0 < share <= 0.6, f"{share:.2f} CPU-seconds a second"

        # A kernel that takes a GiB is killed by the kernel's OOM killer; the
        # instance is stopped with the reason (JupyterLab alone would start another kernel).
        hog = Deferred.fromCoroutine(execute(alice, kernel, "x = b'x' * (1 << 30)", timeout=120))
        hog.addErrback(lambda failure: None)  # its kernel never answers
        await eventually(lambda: exits, timeout=120, what="the tool stopped for its memory")
        assert exits == [(instance, "The tool used more than its 512 MiB of memory and was stopped.")]
        assert cgroup.oomKills() >= 1
    finally:
        for routing in stack:
            await stopRouting(routing)
        await runtime.discard(instance)
        runtime.forget()
    assert not any(d.exists() for d in cgroup.directories), "the pod's cgroup went with it"
