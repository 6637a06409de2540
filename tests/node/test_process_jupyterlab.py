"""
JupyterLab under the ``process`` runtime of a root node: it runs as the
instance's own uid (so it starts without ``--allow-root``), listens on the
pod's Unix socket, runs its kernels on Unix sockets too, and a person
logged in through the real auth helper (a process the runtime started, in
front of it) reaches it and starts a kernel. Skipped where jupyter-lab is
not installed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from confined import listeningInodes, socketInodes, toolPid, treeOf
from standins import HELPERS
from support.routing import Signing, startRouting, stopRouting
from support.waiting import eventually
from twisted.internet import reactor

from dit4c.common.keys import loadPrivateKey, savePrivateKey
from dit4c.node.interfaces import PodSpec
from dit4c.node.process import ProcessRuntime, builtinTools

# The auth helper's tests' world (a real portal, alice, her instance), reused as it is.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "auth"))
from auth_client import Browser, closeWorld, execute, logIn, makeWorld, startKernel  # noqa: E402


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Path) -> Any:
    w = await makeWorld(tmp_path)
    yield w
    await closeWorld(w)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_jupyterlab_as_its_own_uid_through_the_auth_helper(world: Any, signing: Signing, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a root node is what runs tools as uids of their own")
    tools = builtinTools()
    if "jupyter/lab" not in tools:
        pytest.skip("jupyter-lab is not installed")
    # The real auth helper (the runtime's default), a stand-in listener.
    runtime = ProcessRuntime(
        reactor, tmp_path / "node", tools, helpers={"listener": HELPERS["listener"]}, podHelpers="separate", stopGrace=5
    )
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
        await runtime.start(PodSpec(instance, "jupyter/lab", None, pod, environment))

        async def ready() -> bool:
            if await runtime.ready(instance):
                return True
            assert runtime._pods[instance]["tool"].running, (pod / "tool.log").read_text()[-3000:]
            return False

        await eventually(ready, timeout=60, what=lambda: (pod / "tool.log").read_text()[-3000:])
        record = json.loads((pod / "pod.json").read_text())
        assert record["uid"] in runtime.toolUids
        log = (pod / "tool.log").read_text()
        assert "--allow-root" not in " ".join(json.loads((pod / "tool.pid").read_text())["argv"])
        assert "Running as root" not in log

        # The auth helper listens on the pod's Unix socket: people reach it through a routing server.
        assert record["auth"] == str(pod / "auth.sock")
        routing = await startRouting(signing)
        stack.append(routing)
        await routing.listen(signing.token(instance), f"unix:path={record['auth']}")
        world.authPort = routing.httpPort
        world.instance = await world.store.updateInstance(instance, url=world.instanceURL)
        alice = Browser(world)
        assert (await logIn(alice, "alice", "/lab")).code == 303
        response = await alice.get(world.instanceURL + "api/status", accept="application/json")
        assert response.code == 200 and "started" in await response.json()

        kernel = await startKernel(alice)
        # The kernel answers: JupyterLab reaches it over its Unix sockets.
        assert await execute(alice, kernel, "import os; os.getuid()") == str(record["uid"])
        # JupyterLab and its kernel talk over Unix sockets. The one TCP port of
        # the tool is ipykernel's IOPub pipe (one per kernel, not configurable):
        # receive-only, and it drops any message without the kernel's random token.
        tree = treeOf(toolPid(pod))
        listening = socketInodes(tree) & listeningInodes()
        owners = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in tree if socketInodes({pid}) & listening]
        assert len(listening) <= 1 and all(b"ipykernel_launcher" in owner for owner in owners), owners
    finally:
        for routing in stack:
            await stopRouting(routing)
        await runtime.discard(instance)
